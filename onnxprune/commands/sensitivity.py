"""`onnxprune sensitivity`: prune each channel group alone at several ratios and report the drop.

With labels the drop is in top-1 accuracy points; without, in top-1 agreement with the unpruned model.
Writes a table, optionally JSON and a PNG plot (one line per group).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import click

from onnxprune.commands._output import console, creates_output_folders, show_faults, write_json
from onnxprune.commands.options import data_options, dataset_from_options
from onnxprune.errors import InputError
from onnxprune.io.model_io import load_model
from onnxprune.names import ShortNames
from onnxprune.pipeline.score import DATA_CRITERIA, all_criteria


def _ratios(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise InputError(f"--ratios takes comma-separated fractions, got {text!r}") from None
    if not values or not all(0.0 < v < 1.0 for v in values):
        raise InputError(f"--ratios must be fractions in (0, 1), got {text!r}")
    return values


@click.command("sensitivity")
@click.argument("model", type=click.Path(dir_okay=False))
@data_options
@click.option("--ratios", default="0.25,0.5,0.75", show_default=True, metavar="R[,R...]",
              help="Fractions of each group's channels to remove.")
@click.option("--criterion", type=click.Choice(all_criteria()), default="l1", show_default=True,
              help="Which channels go first within a group.")
@click.option("--no-labels", is_flag=True, help="Measure agreement with the unpruned model even when labels exist.")
@click.option("--exclude", multiple=True, help="Node-name glob whose output channels stay (repeatable).")
@click.option("--plot", type=click.Path(dir_okay=False), default=None, help="Write a PNG plot here.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the table as JSON.")
@click.option("--seed", type=int, default=0, show_default=True)
@creates_output_folders(plot="--plot", json_path="--json")
def sensitivity_command(model: str, ratios: str, criterion: str, no_labels: bool, exclude: tuple[str, ...],
                        plot: str | None, json_path: str | None, seed: int, **data_kwargs) -> None:
    """Drop in accuracy (or fidelity) of MODEL when each channel group alone is pruned."""
    from rich.table import Table

    from onnxprune.pipeline.prepare import prepare
    from onnxprune.pipeline.score import score_groups
    from onnxprune.pipeline.sensitivity import plot_sensitivity, sensitivity

    values = _ratios(ratios)
    original = load_model(model)
    dataset = dataset_from_options(original, data_kwargs)
    if dataset is None:
        raise InputError("sensitivity needs data: pass --data FILE (or --random N to measure fidelity)")
    # heads of grouped-query attention are measured in the mode the smallest ratio prunes them by
    prep = prepare(original, exclude, gqa_mode="auto", head_share=min(values))
    stats = None
    if criterion in DATA_CRITERIA:
        from onnxprune.pipeline.statistics import criterion_stats

        stats = criterion_stats(criterion, prep, dataset.feeds, labels=dataset.labels, source=dataset.source)
    scores = score_groups(prep.analysis, prep.view, criterion, seed, stats=stats)
    result = sensitivity(prep, dataset, scores, values, use_labels=not no_labels)
    unit = "accuracy points" if result.metric == "accuracy" else f"{result.metric} points"
    table = Table(title=f"drop in {unit} when one group is pruned (baseline {result.baseline:.2f}%)",
                  title_justify="left")
    for col in ("group", "channels", "opened by", *[f"{int(100 * r)}%" for r in result.ratios]):
        table.add_column(col, justify="left" if col == "opened by" else "right")
    names = ShortNames(s for row in result.rows for s in row["sources"])
    for row in result.rows:
        table.add_row(str(row["group"]), str(row["channels"]), names.listing(row["sources"]),
                      *[f"{d:+.2f}" for d in row["drops"]])
    console.print(f"data: {dataset.source} ({len(dataset)} samples)")
    console.print(table)
    show_faults([f.as_dict() for f in list(prep.analysis.faults) + result.faults])
    if plot is not None:
        fd, tmp = tempfile.mkstemp(prefix=".sensitivity.", suffix=".png", dir=Path(plot).parent)
        os.close(fd)
        try:
            plot_sensitivity(result, tmp)
            os.replace(tmp, plot)
        finally:
            Path(tmp).unlink(missing_ok=True)
        console.print(f"wrote {plot}")
    if json_path:
        write_json(json_path, {"model": model, "data": dataset.source, "samples": len(dataset),
                               "metric": result.metric, "baseline": result.baseline, "ratios": result.ratios,
                               "criterion": criterion, "rows": result.rows})
