"""`onnxprune prune`: remove channels and write a smaller model with the same interface.

With --data (any format `eval` reads), channels can be scored from activations, the model recovered without
retraining (--recover bias|lstsq), a MAC/parameter budget met (--target-macs/--target-params), or the largest
compression searched whose held-out accuracy stays within --max-drop. --mode unstructured zeroes weights
instead of removing channels.
"""

from __future__ import annotations

from pathlib import Path

import click

from onnxprune.cli_options import data_options, dataset_from_options
from onnxprune.commands._output import console, groups_table, interface_table, summary_table, write_json
from onnxprune.graph.analysis import GQA_MODES
from onnxprune.errors import InputError
from onnxprune.model_folder import check_targets, has_config, write_folder
from onnxprune.model_io import load_model, save_model
from onnxprune.scoring import DATA_CRITERIA, all_criteria

RECOVERY = ("none", "bias", "lstsq")
QUANTIZE = ("int8", "static", "dynamic", "fp16", "int4")


def default_output(model: str, suffix: str = "pruned") -> Path:
    path = Path(model)
    return path.with_name(f"{path.stem}.{suffix}.onnx")


@click.command("prune")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Where to write (default: MODEL.pruned.onnx).")
@click.option("--overwrite", is_flag=True, help="Replace the output file if it exists.")
@click.option("--ratio", type=float, default=None,
              help="Fraction of channels (or, unstructured, of weights) to remove, in [0, 1). [default: 0.5]")
@click.option("--head-ratio", type=float, default=None,
              help="Fraction of attention heads to remove in head groups, in [0, 1). [default: --ratio]")
@click.option("--criterion", type=click.Choice(all_criteria()), default=None,
              help=f"How channels are scored ({', '.join(sorted(DATA_CRITERIA))} need --data). "
                   "[default: hybrid with --data, else l1]")
@click.option("--global", "global_ranking", is_flag=True, help="Rank channels across groups instead of per group.")
@click.option("--round-to", type=click.IntRange(min=1), default=1, show_default=True,
              help="Keep channel counts at a multiple of N (8 suits most hardware).")
@click.option("--exclude", multiple=True, help="Node-name glob whose output channels stay (repeatable).")
@click.option("--prune-hidden", is_flag=True,
              help="Also prune the hidden size (residual stream through LayerNorm). Approximate: LayerNorm "
                   "statistics change, so check the result with eval.")
@click.option("--gqa-mode", type=click.Choice(GQA_MODES), default="kv-groups", show_default=True,
              help="Grouped-query attention: remove whole KV groups (k/v heads with their query heads), or query "
                   "heads evenly inside every KV group (k/v heads and the KV cache stay).")
@click.option("--keep-kv-cache", is_flag=True,
              help="Keep a decoder's key/value cache inputs and outputs as they are (their heads then stay).")
@data_options
@click.option("--recover", type=click.Choice(RECOVERY), default="none", show_default=True,
              help="Retraining-free recovery from --data: fold removed channels' means into biases, or refit "
                   "each affected layer by ridge least squares.")
@click.option("--target-macs", type=float, default=None, metavar="F", help="Keep this fraction of the MACs.")
@click.option("--target-params", type=float, default=None, metavar="F", help="Keep this fraction of the parameters.")
@click.option("--allocate", type=click.Choice(["global", "uniform", "sensitivity"]), default="global",
              show_default=True, help="How a budget is spread over groups (sensitivity measures each group on --data).")
@click.option("--max-drop", type=float, default=None, metavar="POINTS",
              help="Find the largest MAC reduction whose accuracy on --eval-data drops at most POINTS "
                   "(agreement with the unpruned model when there are no labels; for a causal LM the largest "
                   "perplexity ratio, e.g. 1.15).")
@click.option("--eval-data", type=click.Path(), default=None,
              help="Held-out data for --max-drop and the report (default: half of --data, split off).")
@click.option("--mode", type=click.Choice(["structured", "unstructured"]), default="structured", show_default=True,
              help="unstructured: zero the smallest weights, same shapes (no speed-up in onnxruntime).")
@click.option("--threshold", type=float, default=None, help="Unstructured: zero weights with |w| below this.")
@click.option("--quantize", type=click.Choice(QUANTIZE), default=None,
              help="Quantize the pruned model (int8 calibrates on --data; int4: weight-only MatMulNBits, blocks "
                   "of 32).")
@click.option("--dry-run", is_flag=True, help="Print the plan; write nothing.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for random scores and test inputs.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the report as JSON here.")
@click.option("--all", "show_all", is_flag=True, help="List every group, not only the pruned ones.")
def prune(model: str, output: str | None, overwrite: bool, ratio: float | None, head_ratio: float | None,
          criterion: str, global_ranking: bool,
          round_to: int, exclude: tuple[str, ...], prune_hidden: bool, recover: str, target_macs: float | None,
          target_params: float | None, allocate: str, max_drop: float | None, eval_data: str | None, mode: str,
          threshold: float | None, quantize: str | None, dry_run: bool, seed: int, json_path: str | None,
          show_all: bool, gqa_mode: str = "kv-groups", keep_kv_cache: bool = False, **data_kwargs) -> None:
    """Prune MODEL structurally: remove RATIO of the channels of every prunable group."""
    out_path = Path(output) if output else default_output(model)
    if not dry_run:
        if out_path.resolve() == Path(model).resolve() and not overwrite:
            raise InputError(f"refusing to overwrite the input model {model} (pass --overwrite to replace it)")
        if out_path.exists() and not overwrite:
            raise InputError(f"output exists: {out_path} (pass --overwrite to replace it)")
    _check_options(ratio, target_macs, target_params, max_drop, mode, threshold, recover, criterion or "l1",
                   allocate)
    if prune_hidden:
        if mode == "unstructured":
            raise InputError("--prune-hidden is for structured pruning")
        click.echo("warning: --prune-hidden changes LayerNorm statistics: the result only approximates the "
                   "original, even where removed channels were zero", err=True)
    if head_ratio is not None and (mode == "unstructured" or max_drop is not None):
        raise InputError("--head-ratio goes with --ratio (structured), not with --max-drop or --mode unstructured")
    original = load_model(model)
    batch_size = data_kwargs.get("batch_size") or 32
    calib = dataset_from_options(original, data_kwargs)
    if criterion is None:
        # calibration data makes the scores data-aware: |W|·‖X‖ per channel, each head's output norm
        criterion = "hybrid" if calib is not None and mode == "structured" else "l1"
    needs_data = criterion in DATA_CRITERIA or recover != "none" or max_drop is not None or allocate == "sensitivity"
    if calib is None and needs_data:
        why = (f"--criterion {criterion}" if criterion in DATA_CRITERIA
               else "--recover/--max-drop/--allocate sensitivity")
        raise InputError(f"this needs calibration data: pass --data FILE ({why})")
    if quantize in ("int8", "static") and calib is None:
        raise InputError(f"--quantize {quantize} calibrates on data: pass --data FILE")
    held = None
    if eval_data is not None:
        if calib is None:
            raise InputError("--eval-data is compared with --data: pass --data too")
        from onnxprune.data import load_data

        held = load_data(eval_data, original, batch_size=batch_size)
    elif max_drop is not None:
        from onnxprune.data import split_dataset

        calib, held = split_dataset(calib, 0.5, seed)

    report: dict = {"model": model, "output": None if dry_run else str(out_path), "mode": mode, "seed": seed,
                    "calibration": None if calib is None else {"source": calib.source, "samples": len(calib)},
                    "evaluation": None if held is None else {"source": held.source, "samples": len(held)}}
    if mode == "unstructured":
        result_model = _unstructured(original, ratio, threshold, exclude, report)
        groups_rows = None
    else:
        result = _structured(original, ratio, criterion, global_ranking, round_to, exclude, seed, calib, held,
                             recover, target_macs, target_params, allocate, max_drop, head_ratio, prune_hidden,
                             gqa_mode, keep_kv_cache)
        result_model = result.model
        groups_rows = result.group_rows()
        shown = groups_rows if show_all else [r for r in groups_rows if r["kept"] != r["channels"]]
        console.print(summary_table(result.stats))
        console.print(groups_table(shown, f"{len(result.plan.kept)} of {len(groups_rows)} groups pruned"
                                          f" ({result.stats['channels_removed']} channels)"))
        no_budget = target_macs is None and target_params is None and max_drop is None
        report.update({"ratio": 0.5 if ratio is None and no_budget else ratio, "head_ratio": head_ratio,
                       "criterion": criterion, "global": global_ranking, "round_to": round_to,
                       "recover": recover, "target_macs": target_macs, "target_params": target_params,
                       "allocate": allocate, "max_drop": max_drop, "stats": result.stats, "groups": groups_rows,
                       "recovery": result.recovery, "search": result.search, "notes": result.notes,
                       "gqa_mode": gqa_mode, "keep_kv_cache": keep_kv_cache, "interface": result.interface})
        if result.interface:
            console.print(interface_table(result.interface))
        for note in result.notes:
            console.print(f"note: {note}")
    if quantize:
        result_model = _quantize(result_model, quantize, calib, report)
    if calib is not None or held is not None:
        report["quality"] = _quality(original, result_model, calib, held)
    if not dry_run:
        folder = mode == "structured" and has_config(model)
        if folder:
            check_targets(model, out_path, overwrite)
        save_model(result_model, out_path, overwrite=overwrite)
        console.print(f"wrote {out_path}")
        if folder:  # config.json / genai_config.json beside the model: the output folder gets updated copies
            report["model_folder"] = write_folder(model, out_path, result, overwrite)
            for note in report["model_folder"]:
                console.print(f"note: {note}")
    if json_path:
        write_json(json_path, report)


def _check_options(ratio, target_macs, target_params, max_drop, mode, threshold, recover, criterion, allocate):
    budgets = [name for name, v in (("--ratio", ratio), ("--target-macs", target_macs),
                                    ("--target-params", target_params), ("--max-drop", max_drop)) if v is not None]
    if mode == "structured" and len(budgets) > 1:
        raise InputError(f"give one of --ratio, --target-macs, --target-params, --max-drop (got {', '.join(budgets)})")
    for name, value in (("--target-macs", target_macs), ("--target-params", target_params)):
        if value is not None and not 0.0 < value <= 1.0:
            raise InputError(f"{name} is the fraction to keep, in (0, 1]; got {value}")
    if mode == "structured" and threshold is not None:
        raise InputError("--threshold is for --mode unstructured")
    if mode == "unstructured":
        extra = [n for n, bad in (("--recover", recover != "none"), ("--target-macs", target_macs is not None),
                                  ("--target-params", target_params is not None), ("--max-drop", max_drop is not None),
                                  ("--criterion", criterion != "l1"), ("--allocate", allocate != "global")) if bad]
        if extra:
            raise InputError(f"--mode unstructured prunes weights by magnitude only; drop {', '.join(extra)}")
        if ratio is not None and threshold is not None:
            raise InputError("give one of --ratio and --threshold with --mode unstructured")


def _structured(original, ratio, criterion, global_ranking, round_to, exclude, seed, calib, held, recover,
                target_macs, target_params, allocate, max_drop, head_ratio=None, prune_hidden=False,
                gqa_mode="kv-groups", keep_kv_cache=False):
    from onnxprune.prune import prepare, prune_model, prune_within_drop

    prep = prepare(original, exclude, prune_hidden, gqa_mode, keep_kv_cache)
    stats = None
    if criterion in DATA_CRITERIA or allocate == "sensitivity":
        from onnxprune.activations import channel_stats

        if criterion in DATA_CRITERIA:
            stats = channel_stats(prep, calib.feeds, source=calib.source)
    sens = None
    if allocate == "sensitivity":
        if target_macs is None and target_params is None and max_drop is None:
            raise InputError("--allocate sensitivity spreads a budget: add --target-macs, --target-params or "
                             "--max-drop")
        from onnxprune.scoring import score_groups
        from onnxprune.sensitivity import sensitivity

        scores = score_groups(prep.analysis, prep.view, criterion, seed, stats=stats)
        sens = sensitivity(prep, calib, scores).curves()
    kwargs = dict(criterion=criterion, global_ranking=global_ranking, round_to=round_to, seed=seed,
                  calibration=calib, recover=recover, allocate=allocate, sensitivity=sens, stats=stats)
    if max_drop is not None:
        return prune_within_drop(original, max_drop, held, prepared=prep, **kwargs)
    return prune_model(original, ratio=0.5 if ratio is None else ratio, prepared=prep, head_ratio=head_ratio,
                       target_macs=target_macs, target_params=target_params, **kwargs)


def _unstructured(original, ratio, threshold, exclude, report):
    from onnxprune.unstructured import prune_unstructured
    from onnxprune.validate import validate

    if ratio is None and threshold is None:
        ratio = 0.5
    result = prune_unstructured(original, ratio=ratio, threshold=threshold, exclude=exclude)
    validate(result.model, original, stage="unstructured")
    from rich.table import Table

    table = Table(title=f"unstructured sparsity {100 * result.stats['sparsity']:.1f}% of "
                        f"{result.stats['weights']:,} weights", title_justify="left")
    for col in ("layer", "op", "weights", "zeros", "sparsity"):
        table.add_column(col, justify="left" if col in ("layer", "op") else "right")
    for r in result.layers:
        table.add_row(r["node"], r["op_type"], f"{r['size']:,}", f"{r['zeros']:,}", f"{100 * r['sparsity']:.1f}%")
    console.print(table)
    s = result.stats
    console.print(f"file size {s['bytes_before']:,} -> {s['bytes_after']:,} bytes; gzip {s['gzip_before']:,} -> "
                  f"{s['gzip_after']:,} bytes ({s['gzip_after'] / max(s['gzip_before'], 1):.3f}x)")
    for note in result.notes:
        console.print(f"note: {note}")
    report.update({"ratio": ratio, "threshold": threshold, "stats": result.stats, "layers": result.layers,
                   "notes": result.notes})
    return result.model


def _quantize(model, mode, calib, report):
    try:
        from onnxprune.quantize import quantize_model
    except ImportError:  # pragma: no cover - the quantize module ships with onnxprune
        raise InputError("--quantize needs onnxprune.quantize, which this install lacks") from None
    from onnxprune.model_io import model_bytes

    result = quantize_model(model, mode, calibration=None if calib is None else calib.feeds)
    for note in result.notes:
        console.print(f"note: {note}")
    report["quantize"] = {"mode": result.mode, "notes": result.notes,
                          "size_bytes": {"before": model_bytes(model), "after": model_bytes(result.model)}}
    return result.model


def _quality(original, pruned, calib, held) -> dict:
    """Accuracy (or agreement) before and after on the calibration data and on the held-out data.

    A recovery fitted on the calibration set can look better there than it is: both are shown side by side.
    """
    from rich.table import Table

    from onnxprune.evaluate import run_model
    from onnxprune.prune import measure

    table = Table(title="quality (scores and recovery were fitted on the calibration data; judge by evaluation)",
                  title_justify="left")
    for col in ("role", "samples", "metric", "before", "after", "change"):
        table.add_column(col, justify="right" if col in ("samples", "before", "after", "change") else "left")
    rows = {}
    for role, ds in (("calibration", calib), ("evaluation", held)):
        if ds is None:
            continue
        ref = run_model(original, ds)
        before = measure(original, ds, reference_outputs=ref)
        after = measure(pruned, ds, reference_outputs=ref)
        rows[role] = {"source": ds.source, "samples": len(ds), "metric": after["metric"],
                      "before": before["value"], "after": after["value"]}
        console.print(f"{role} data: {ds.source}")
        if after["metric"] == "perplexity":  # a causal LM: lower is better, the change is a ratio
            rows[role].update(before=before["perplexity"], after=after["perplexity"])
            table.add_row(role, str(len(ds)), "perplexity", f"{before['perplexity']:.4g}",
                          f"{after['perplexity']:.4g}", f"x{after['perplexity'] / before['perplexity']:.4f}")
            continue
        table.add_row(role, str(len(ds)), f"{after['metric']} (%)", f"{before['value']:.2f}",
                      f"{after['value']:.2f}", f"{after['value'] - before['value']:+.2f}")
    console.print(table)
    return rows
