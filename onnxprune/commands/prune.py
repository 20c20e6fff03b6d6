"""`onnxprune prune`: remove channels and write a smaller model with the same interface.

With --data (any format `eval` reads), channels can be scored from activations, the model recovered without
retraining (--recover bias|lstsq), a MAC/parameter budget met (--target-macs/--target-params), or the largest
compression searched whose held-out accuracy stays within --max-drop. --mode unstructured zeroes weights
instead of removing channels. The options that say what a prune does form a recipe (onnxprune/recipe.py):
--recipe FILE reads one, options given on the command line override it, and the JSON report embeds the
recipe that made the model.
"""

from __future__ import annotations

from pathlib import Path

import click
from click.core import ParameterSource

from onnxprune.choices import ALLOCATIONS, GQA_MODES, MODES
from onnxprune.commands._output import (
    console,
    creates_output_folders,
    groups_table,
    interface_table,
    show_faults,
    show_finetune,
    summary_table,
    write_json,
)
from onnxprune.commands.options import (
    data_options,
    dataset_from_options,
    finetune_options,
    parse_input_shapes,
    tracking_option,
)
from onnxprune.errors import InputError
from onnxprune.io.model_folder import check_targets, has_config, write_folder
from onnxprune.io.model_io import load_model, save_model
from onnxprune.io.weights import Workspace, is_lazy, keeps_data_files
from onnxprune.names import ShortNames
from onnxprune.pipeline.risks import data_free_warnings
from onnxprune.pipeline.score import DATA_CRITERIA, all_criteria
from onnxprune.runtime.stages import parse_bytes
from onnxprune.recipe import Recipe, field_names, load_recipe, option_name

RECOVERY = ("none", "bias", "lstsq")
QUANTIZE = ("int8", "static", "dynamic", "fp16", "int4")


def default_output(model: str, suffix: str = "pruned") -> Path:
    path = Path(model)
    return path.with_name(f"{path.stem}.{suffix}.onnx")


def recipe_options(f):
    """The recipe's options (shared by prune; sweep takes the same names as comma lists). Defaults are the
    Recipe's; only options given on the command line override a --recipe file (click's parameter source)."""
    options = [
        click.option("--recipe", "recipe_path", type=click.Path(dir_okay=False), default=None,
                     help="Recipe file (TOML, or JSON: a report from --json replays its run); options given on "
                          "the command line override it."),
        click.option("--ratio", type=float, default=None,
                     help="Fraction of channels (or, unstructured, of weights) to remove, in [0, 1). [default: 0.5]"),
        click.option("--head-ratio", type=float, default=None,
                     help="Fraction of attention heads to remove in head groups, in [0, 1). [default: --ratio]"),
        click.option("--criterion", type=click.Choice(all_criteria()), default=None,
                     help=f"How channels are scored ({', '.join(sorted(DATA_CRITERIA))} need --data). "
                          "[default: hybrid with --data, else l1]"),
        click.option("--global/--no-global", "global_ranking", default=False,
                     help="Rank channels across groups instead of per group."),
        click.option("--round-to", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Keep channel counts at a multiple of N (8 suits most hardware)."),
        click.option("--exclude", multiple=True, help="Node-name glob whose output channels stay (repeatable)."),
        click.option("--prune-hidden/--no-prune-hidden", default=False,
                     help="Also prune the hidden size (residual stream through LayerNorm). Approximate: LayerNorm "
                          "statistics change, so check the result with eval."),
        click.option("--recover", type=click.Choice(RECOVERY), default="none", show_default=True,
                     help="Retraining-free recovery from --data: fold removed channels' means into biases, or "
                          "refit each affected layer by ridge least squares."),
        click.option("--target-macs", type=float, default=None, metavar="F", help="Keep this fraction of the MACs."),
        click.option("--target-params", type=float, default=None, metavar="F",
                     help="Keep this fraction of the parameters."),
        click.option("--target-latency", default=None, metavar="F|Nms",
                     help="Keep this fraction of the latency measured on --provider at --batch with --threads "
                          "(0.5), or a time (12ms); channels are chosen by a measured latency table."),
        click.option("--provider", "--latency-provider", "latency_provider", default="cpu", show_default=True,
                     help="Execution provider --target-latency is measured on (cpu, cuda, ...)."),
        click.option("--batch", "--latency-batch", "latency_batch", type=click.IntRange(min=1), default=1,
                     show_default=True, help="Batch size --target-latency is measured at."),
        click.option("--threads", "--latency-threads", "latency_threads", type=click.IntRange(min=1), default=1,
                     show_default=True, help="onnxruntime intra-op threads --target-latency is measured with."),
        click.option("--allocate", type=click.Choice(list(ALLOCATIONS)), default="global", show_default=True,
                     help="How a budget (--target-macs/-params/-latency) is spread over groups (sensitivity: by "
                          "the drop measured when each group alone is pruned, on --data)."),
        click.option("--mode", type=click.Choice(list(MODES)), default="structured", show_default=True,
                     help="unstructured: zero the smallest weights, same shapes (no speed-up in onnxruntime)."),
        click.option("--threshold", type=float, default=None, help="Unstructured: zero weights with |w| below this."),
        click.option("--quantize", type=click.Choice([*QUANTIZE, "none"]), default=None,
                     help="Quantize the pruned model (int8 calibrates on --data)."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed for random scores and test inputs."),
        click.option("--gqa-mode", type=click.Choice(list(GQA_MODES)), default="auto", show_default=True,
                     help="Grouped-query attention: remove whole key/value groups, or query heads within them; "
                          "auto: whole groups when they can meet the ratio, else query heads."),
        click.option("--drop-blocks", type=float, default=None, metavar="N",
                     help="Depth: drop the N residual blocks (decoder layers) whose output differs least from their "
                          "input on --data (block influence), or this share of them when N < 1; combines with "
                          "--ratio (blocks go first)."),
        click.option("--keep-kv-cache/--no-keep-kv-cache", default=False,
                     help="Decoders: keep the key/value cache shapes (no key/value heads are removed)."),
    ]
    for option in reversed(options):
        f = option(f)
    return finetune_options(f)


def recipe_from_options(params: dict) -> tuple[Recipe, dict]:
    """The recipe that --recipe and the recipe options describe, and the options given on the command line.

    Pops the recipe options out of `params`."""
    ctx = click.get_current_context()
    path = params.pop("recipe_path", None)
    values = {name: params.pop(name) for name in field_names()}
    given = {name: value for name, value in values.items()
             if ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)}
    base = load_recipe(path) if path else Recipe()
    return base.replace(**given), given


@click.command("prune")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Where to write (default: MODEL.pruned.onnx).")
@click.option("--overwrite", is_flag=True, help="Replace the output file if it exists.")
@recipe_options
@data_options
@click.option("--max-drop", type=float, default=None, metavar="POINTS",
              help="Find the largest MAC reduction whose accuracy on --eval-data drops at most POINTS "
                   "(agreement with the unpruned model when there are no labels; for a causal LM the largest "
                   "perplexity ratio, e.g. 1.15).")
@click.option("--eval-data", type=click.Path(), default=None,
              help="Held-out data for --max-drop and the report (default: half of --data, split off).")
@click.option("--dry-run", is_flag=True, help="Print the plan; write nothing.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the report as JSON here.")
@click.option("--all", "show_all", is_flag=True, help="List every group, not only the pruned ones.")
@click.option("--strict", is_flag=True,
              help="Fail (exit 2) when a handler fault or a failed validation had to be contained.")
@click.option("--latency-cache", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="Folder of measured latency tables (--target-latency). [default: ~/.cache/onnxprune/latency]")
@click.option("--memory-budget", default=None, metavar="SIZE",
              help="Most memory calibration keeps (e.g. 8G, 512M); past it, activations spill to disk beside "
                   "the output. [default: a quarter of the machine's memory]")
@click.option("--linalg-device", default="auto", show_default=True, metavar="auto|cpu|cuda[:N]",
              help="Where least-squares refits and refit scores factorise their Gram matrices: auto is a CUDA GPU "
                   "through torch when both are there (matrices from 1,024 wide), else numpy on the CPU.")
@tracking_option
@creates_output_folders(output="-o", json_path="--json")
def prune(model: str, output: str | None, overwrite: bool, max_drop: float | None, eval_data: str | None,
          dry_run: bool, json_path: str | None, show_all: bool, mlflow_uri: str | None, strict: bool,
          memory_budget: str | None, latency_cache: str | None, linalg_device: str, **params) -> None:
    """Prune MODEL structurally: remove RATIO of the channels of every prunable group."""
    out_path = Path(output) if output else default_output(model)
    if not dry_run:
        if out_path.resolve() == Path(model).resolve() and not overwrite:
            raise InputError(f"refusing to overwrite the input model {model} (pass --overwrite to replace it)")
        if out_path.exists() and not overwrite:
            raise InputError(f"output exists: {out_path} (pass --overwrite to replace it)")
    if mlflow_uri:
        from onnxprune.sweep.tracking import require_mlflow

        require_mlflow()  # before any work: a missing extra is an install hint, not a lost run
    budget = parse_bytes(memory_budget)
    from onnxprune.runtime.linalg import resolve

    resolve(linalg_device)  # a device that is not there fails before any work
    recipe, given = recipe_from_options(params)
    train_device = params.pop("finetune_device")
    if recipe.finetune != "none":  # a device that is not there fails before the prune, not after it
        from onnxprune.train.distill import resolve_device

        train_device = resolve_device(train_device)
    data_kwargs = params
    if max_drop is not None:
        budgets = [option_name(k) for k in ("ratio", "target_macs", "target_params", "target_latency")
                   if given.get(k) is not None]
        if budgets:
            raise InputError(f"give one of --ratio, --target-macs, --target-params, --target-latency, --max-drop "
                             f"(got {', '.join(budgets)}, --max-drop)")
        if recipe.mode == "unstructured" or given.get("head_ratio") is not None:
            raise InputError("--head-ratio goes with --ratio (structured), not with --max-drop or --mode unstructured"
                             if given.get("head_ratio") is not None else "--max-drop is for structured pruning")
        recipe = recipe.without_budget()
    if recipe.prune_hidden:
        click.echo("warning: --prune-hidden changes LayerNorm statistics: the result only approximates the "
                   "original, even where removed channels were zero", err=True)
    original = load_model(model)
    batch_size = data_kwargs.get("batch_size") or 32
    input_shapes = parse_input_shapes(data_kwargs.get("input_shapes"), original)
    calib = dataset_from_options(original, data_kwargs)
    if calib is None and max_drop is not None:
        raise InputError("this needs calibration data: pass --data FILE (--max-drop)")
    held = None
    if eval_data is not None:
        if calib is None:
            raise InputError("--eval-data is compared with --data: pass --data too")
        from onnxprune.evaluate.data import load_data

        held = load_data(eval_data, original, batch_size=batch_size)
    elif max_drop is not None:
        from onnxprune.evaluate.data import split_dataset

        calib, held = split_dataset(calib, 0.5, recipe.seed)

    from onnxprune.pipeline.prepare import prepare_recipe
    from onnxprune.pipeline.prune import Reuse, RunSettings, prune_model
    from onnxprune.pipeline.search import prune_within_drop

    prep = prepare_recipe(original, recipe) if recipe.mode == "structured" else None
    warnings = data_free_warnings(original, recipe, calib is not None, prep.analysis if prep else None)
    for warning in warnings:  # before the prune, which they are about
        click.echo(f"warning: {warning}", err=True)
    if prep is not None and is_lazy(prep.model) and not dry_run:
        prep.workspace = Workspace(near=out_path.parent, one_file=not keeps_data_files(prep.model))  # sliced weights are written beside the output
    run = RunSettings(calibration=calib, input_shapes=input_shapes, strict=strict, memory_budget=budget,
                      reuse=Reuse(prepared=prep), latency_cache=latency_cache, eval_data=held,
                      train_device=train_device, linalg_device=linalg_device)
    if max_drop is not None:
        result = prune_within_drop(original, max_drop, held, recipe, run)
    else:
        result = prune_model(original, recipe, run)
    recipe = result.recipe
    report = prune_report(result, model, None if dry_run else out_path, calib, held, max_drop, warnings)
    _show(result, show_all)
    if calib is not None or held is not None:
        report["quality"] = _quality(original, result.model, calib, held)
    if not dry_run:
        folder = recipe.mode == "structured" and has_config(model)
        if folder:
            check_targets(model, out_path, overwrite)
        save_model(result.model, out_path, overwrite=overwrite)
        console.print(f"wrote {out_path}")
        if folder:  # config.json / genai_config.json beside the model: the output folder gets updated copies
            report["model_folder"] = write_folder(model, out_path, result, overwrite)
            for note in report["model_folder"]:
                console.print(f"note: {note}")
    if json_path:
        write_json(json_path, report)
    if mlflow_uri:
        from onnxprune.sweep.tracking import log_prune

        log_prune(mlflow_uri, report, json_path)


def latency_line(r: dict) -> str:
    """The latency target, what the table predicted and what was measured, in one line."""
    t = r["table"]
    source = "from the cache" if t["cached"] else f"measured in {t['seconds']:.1f} s"
    return (f"latency on {t['provider']} (batch {t['batch']}, {t['threads']} threads): target {r['target_ms']:.3f} ms "
            f"({r['target_ratio']:.3f} of {r['base_ms']:.3f} ms); predicted {r['predicted_ms']:.3f} ms "
            f"({r['predicted_ratio']:.3f}), measured {r['measured_ms']:.3f} ms ({r['measured_ratio']:.3f}, "
            f"noise {100 * r['noise']:.1f}%) after {len(r['iterations'])} iteration(s); table {source}"
            + ("; channels priced by measured sensitivity" if r.get("importance") == "sensitivity" else ""))


def prune_report(result, model: str, output: Path | None, calib, held, max_drop: float | None,
                 warnings: list[str]) -> dict:
    """The JSON report of a prune, from its result alone (what `--json` writes and a `--recipe` replays)."""
    recipe = result.recipe
    report: dict = {"model": model, "output": None if output is None else str(output), "mode": recipe.mode,
                    "seed": recipe.seed, "recipe": recipe.to_dict(),
                    "calibration": None if calib is None else {"source": calib.source, "samples": len(calib)},
                    "evaluation": None if held is None else {"source": held.source, "samples": len(held)},
                    "warnings": warnings}
    if recipe.mode == "unstructured":
        report.update({"ratio": recipe.ratio, "threshold": recipe.threshold, "stats": result.stats,
                       "layers": result.layers, "notes": result.notes})
    else:
        groups = result.group_rows()
        report.update({"ratio": recipe.ratio, "head_ratio": recipe.head_ratio, "criterion": recipe.criterion,
                       "global": recipe.global_ranking, "round_to": recipe.round_to, "recover": recipe.recover,
                       "target_macs": recipe.target_macs, "target_params": recipe.target_params,
                       "target_latency": recipe.target_latency, "latency": result.stats.get("latency"),
                       "allocate": recipe.allocate, "max_drop": max_drop, "stats": result.stats,
                       "groups": groups, "recovery": result.recovery, "search": result.search,
                       "notes": result.notes, "faults": result.faults, "gqa_mode": recipe.gqa_mode,
                       "gqa_modes_used": sorted({r["gqa_mode"] for r in groups if r.get("gqa_mode")}),
                       "keep_kv_cache": recipe.keep_kv_cache, "interface": result.interface,
                       "depth": result.depth})
    if result.finetune:
        report["finetune"] = result.finetune
    if recipe.quantize:
        report["quantize"] = {"mode": result.stats["quantize"], "notes": result.notes,
                              "size_bytes": {"before": result.stats["bytes_float"], "after": result.stats["bytes_after"]}}
    return report


def _show(result, show_all: bool) -> None:
    """The tables and notes a prune prints."""
    if result.recipe.mode == "unstructured":
        _show_unstructured(result)
        return
    groups_rows = result.group_rows()
    shown = groups_rows if show_all else [r for r in groups_rows if r["kept"] != r["channels"]]
    console.print(summary_table(result.stats))
    console.print(groups_table(shown, f"{len(result.plan.kept)} of {len(groups_rows)} groups pruned"
                                      f" ({result.stats['channels_removed']} channels)",
                               names=ShortNames(s for r in groups_rows for s in r["sources"])))
    if "latency" in result.stats:
        console.print(latency_line(result.stats["latency"]))
    if result.interface:
        console.print(interface_table(result.interface))
    if result.finetune:
        show_finetune(result.finetune)
    for note in result.notes:
        console.print(f"note: {note}")
    show_faults(result.faults)


def _show_unstructured(result) -> None:
    from rich.table import Table

    s = result.stats
    table = Table(title=f"unstructured sparsity {100 * s['sparsity']:.1f}% of {s['weights']:,} weights",
                  title_justify="left")
    for col in ("layer", "op", "weights", "zeros", "sparsity"):
        table.add_column(col, justify="left" if col in ("layer", "op") else "right")
    names = ShortNames(r["node"] for r in result.layers)
    for r in result.layers:
        table.add_row(names(r["node"]), r["op_type"], f"{r['size']:,}", f"{r['zeros']:,}", f"{100 * r['sparsity']:.1f}%")
    console.print(table)
    console.print(f"file size {s['bytes_before']:,} -> {s['bytes_after']:,} bytes; gzip {s['gzip_before']:,} -> "
                  f"{s['gzip_after']:,} bytes ({s['gzip_after'] / max(s['gzip_before'], 1):.3f}x)")
    for note in result.notes:
        console.print(f"note: {note}")


def _quality(original, pruned, calib, held) -> dict:
    """Accuracy (or agreement) before and after on the calibration data and on the held-out data.

    A recovery fitted on the calibration set can look better there than it is: both are shown side by side.
    """
    from rich.table import Table

    from onnxprune.pipeline.search import measure
    from onnxprune.evaluate.metrics import metric_digest
    from onnxprune.runtime.session import run_batches

    table = Table(title="quality (scores and recovery were fitted on the calibration data; judge by evaluation)",
                  title_justify="left")
    for col in ("role", "samples", "metric", "before", "after", "change"):
        table.add_column(col, justify="right" if col in ("samples", "before", "after", "change") else "left")
    rows = {}
    for role, ds in (("calibration", calib), ("evaluation", held)):
        if ds is None:
            continue
        ref = run_batches(original, ds, reduce=metric_digest(ds))  # a language model's logits: never all kept
        before = measure(original, ds, reference_outputs=ref, outputs=ref)
        after = measure(pruned, ds, reference_outputs=ref)
        rows[role] = {"source": ds.source, "samples": len(ds), "metric": after["metric"],
                      "before": before["value"], "after": after["value"]}
        console.print(f"{role} data: {ds.source}")
        if after["metric"] == "perplexity_kept":  # a causal LM: lower is better, the change is a ratio
            rows[role].update(metric="perplexity", before=before["perplexity"], after=after["perplexity"])
            table.add_row(role, str(len(ds)), "perplexity", f"{before['perplexity']:.4g}",
                          f"{after['perplexity']:.4g}", f"x{after['perplexity'] / before['perplexity']:.4f}")
            continue
        table.add_row(role, str(len(ds)), f"{after['metric']} (%)", f"{before['value']:.2f}",
                      f"{after['value']:.2f}", f"{after['value'] - before['value']:+.2f}")
    console.print(table)
    return rows
