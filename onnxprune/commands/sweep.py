"""`onnxprune sweep`: prune by many recipes, measure each on held-out data, show the Pareto front.

Recipe options take comma lists (`--ratio 0.25,0.5 --criterion l1,hybrid --recover none,lstsq`); every
combination is a candidate (budgets are alternatives, not combined). `--grid FILE` gives the lists in a
file, `--recipe FILE` the fields every candidate shares. Exit codes: 0, 1 when --max-drop finds no
candidate within the drop, 2 for bad input.
"""

from __future__ import annotations

from pathlib import Path

import click

from onnxprune.commands._output import creates_output_folders
from onnxprune.commands.options import data_options, dataset_from_options, tracking_option
from onnxprune.errors import GateFailed, InputError
from onnxprune.io.model_io import load_model
from onnxprune.recipe import Recipe, field_names, load_recipe, option_name
from onnxprune.report import make_console

# recipe fields a sweep varies from the command line (exclude stays one list for all: --exclude, repeatable)
LIST_FIELDS = [f for f in field_names() if f != "exclude"]


def list_options(f):
    """One comma-list option per recipe field, named as prune's option is."""
    for name in reversed(LIST_FIELDS):
        f = click.option(option_name(name), name, default=None, metavar="V[,V...]",
                         help=f"Values of the recipe's {name} to try.")(f)
    return f


@click.command("sweep")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "outdir", type=click.Path(file_okay=False), required=True,
              help="Folder for results, Pareto members' models and the plot; a rerun skips what it holds.")
@click.option("--eval-data", type=click.Path(), required=True, help="Held-out data every candidate is measured on.")
@data_options
@click.option("--recipe", "recipe_path", type=click.Path(dir_okay=False), default=None,
              help="Recipe every candidate starts from (TOML or JSON).")
@click.option("--grid", "grid_path", type=click.Path(dir_okay=False), default=None,
              help="Grid file: [base], [grid] lists, [[candidate]] entries (TOML or JSON). Lists given as "
                   "options replace its lists of the same name.")
@list_options
@click.option("--exclude", multiple=True, help="Node-name glob whose output channels stay, in every candidate.")
@click.option("--max-drop", type=float, default=None, metavar="POINTS",
              help="Write OUTDIR/selected.onnx: the candidate with the fewest MACs whose metric drops at most "
                   "POINTS below the original's (exit 1 when none does).")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: this machine (--jobs processes); ray: tasks on the Ray cluster at --address.")
@click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Local worker processes.")
@click.option("--address", default=None, metavar="HOST:PORT", help="Ray: the cluster's head (ray start --head).")
@click.option("--retries", type=click.IntRange(min=0), default=2, show_default=True,
              help="Times a candidate whose worker died is run again before it is reported failed.")
@click.option("--provider", default="cpu", show_default=True, help="Execution provider candidates are timed on.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="onnxruntime intra-op threads.")
@click.option("--warmup", type=click.IntRange(min=0), default=10, show_default=True, help="Untimed runs first.")
@click.option("--runs", type=click.IntRange(min=1), default=100, show_default=True, help="Timed runs.")
@click.option("--latency-batch-size", type=click.IntRange(min=1), default=None,
              help="Batch size to time (default: the evaluation data's).")
@click.option("--no-latency", is_flag=True, help="Skip the timing (the front is then over metric, MACs, bytes).")
@click.option("--keep-models", is_flag=True, help="Keep every candidate's model, not only the Pareto members'.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the sweep's JSON here (it is always in OUTDIR/sweep.json).")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the table as CSV here (it is always in OUTDIR/sweep.csv).")
@tracking_option
@click.option("--mlflow-experiment", default="onnxprune", show_default=True, help="MLflow experiment name.")
@creates_output_folders(folders={"outdir": "-o"}, json_path="--json", csv_path="--csv")
def sweep_command(model: str, outdir: str, eval_data: str, recipe_path: str | None, grid_path: str | None,
                  exclude: tuple[str, ...], max_drop: float | None, executor: str, jobs: int, address: str | None,
                  retries: int, provider: str, threads: int | None, warmup: int, runs: int,
                  latency_batch_size: int | None, no_latency: bool, keep_models: bool, json_path: str | None,
                  csv_path: str | None, mlflow_uri: str | None, mlflow_experiment: str, **params) -> None:
    """Prune MODEL by every recipe of a grid and measure each on --eval-data: table, Pareto front, files."""
    console = make_console()
    from onnxprune.evaluate.data import load_data
    from onnxprune.runtime.session import check_providers, provider_name
    from onnxprune.sweep import Measure, run_sweep
    from onnxprune.sweep.grid import Grid, expand, load_grid, parse_list

    if executor == "ray":
        from onnxprune.sweep.executors import require_ray

        require_ray()
        if not address:
            raise InputError("--executor ray needs --address HOST:PORT of the cluster's head")
    elif address:
        raise InputError("--address is for --executor ray")
    if mlflow_uri:
        from onnxprune.sweep.tracking import require_mlflow

        require_mlflow()
    if max_drop is not None and max_drop < 0:
        raise InputError(f"--max-drop is in points and must be >= 0, got {max_drop}")
    if executor == "local":
        check_providers([provider])  # a Ray cluster's nodes may have providers this machine lacks
    else:
        provider_name(provider)
    lists = {name: parse_list(name, params.pop(name)) for name in LIST_FIELDS if params.get(name) is not None}
    for name in LIST_FIELDS:
        params.pop(name, None)
    grid = load_grid(grid_path) if grid_path else Grid()
    grid.lists.update(lists)
    base = load_recipe(recipe_path) if recipe_path else Recipe()
    if exclude:
        base = base.replace(exclude=exclude)

    original = load_model(model)
    batch_size = params.get("batch_size") or 32
    calibration = dataset_from_options(original, params)
    evaluation = load_data(eval_data, original, batch_size=batch_size)
    recipes, skipped = expand(base, grid, has_data=calibration is not None)
    for reason in skipped[:5]:
        console.print(f"skipped {reason}")
    if len(skipped) > 5:
        console.print(f"... and {len(skipped) - 5} more combinations that are not valid recipes")
    console.print(f"{len(recipes)} candidates; evaluation data: {evaluation.source} ({len(evaluation)} samples)")
    measure = Measure(provider=provider, threads=threads, warmup=warmup, runs=runs, latency=not no_latency,
                      latency_batch=latency_batch_size)
    result = run_sweep(model, recipes, outdir, calibration=calibration, evaluation=evaluation, measure=measure,
                       executor=executor, jobs=jobs, address=address, retries=retries, max_drop=max_drop,
                       keep_models=keep_models, skipped=skipped, report=console.print)
    from onnxprune.report import write_json
    from onnxprune.sweep import output

    with_marks = [{**c, "selected": c["id"] == result.selected, "resumed": c["id"] in result.resumed}
                  for c in result.candidates]
    output.print_table({"metrics": result.baseline}, with_marks, result.labels, console)
    for note in result.notes:
        console.print(f"note: {note}")
    if json_path:
        write_json(json_path, result.payload)
    if csv_path:
        output.write_csv(csv_path, {"metrics": result.baseline}, with_marks, result.labels)
    console.print(f"wrote {Path(outdir) / 'sweep.json'}, sweep.csv, pareto.png")
    if mlflow_uri:
        from onnxprune.sweep.tracking import log_sweep

        log_sweep(mlflow_uri, result, Path(outdir), experiment=mlflow_experiment)
    if max_drop is not None and result.selected is None:
        raise GateFailed(f"no candidate stays within --max-drop {max_drop:g} points")
