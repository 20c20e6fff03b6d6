"""`onnxprune prune`: remove channels and write a smaller model with the same interface."""

from __future__ import annotations

from pathlib import Path

import click

from onnxprune.commands._output import console, groups_table, summary_table, write_json
from onnxprune.errors import InputError
from onnxprune.model_io import load_model, save_model
from onnxprune.scoring import CRITERIA


def default_output(model: str, suffix: str = "pruned") -> Path:
    path = Path(model)
    return path.with_name(f"{path.stem}.{suffix}.onnx")


@click.command("prune")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Where to write (default: MODEL.pruned.onnx).")
@click.option("--overwrite", is_flag=True, help="Replace the output file if it exists.")
@click.option("--ratio", type=float, default=0.5, show_default=True, help="Fraction of channels to remove, in [0, 1).")
@click.option("--criterion", type=click.Choice(sorted(CRITERIA)), default="l1", show_default=True,
              help="How channels are scored.")
@click.option("--global", "global_ranking", is_flag=True, help="Rank channels across groups instead of per group.")
@click.option("--round-to", type=click.IntRange(min=1), default=1, show_default=True,
              help="Keep channel counts at a multiple of N (8 suits most hardware).")
@click.option("--exclude", multiple=True, help="Node-name glob whose output channels stay (repeatable).")
@click.option("--dry-run", is_flag=True, help="Print the plan; write nothing.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for random scores and test inputs.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the report as JSON here.")
@click.option("--all", "show_all", is_flag=True, help="List every group, not only the pruned ones.")
def prune(model: str, output: str | None, overwrite: bool, ratio: float, criterion: str, global_ranking: bool,
          round_to: int, exclude: tuple[str, ...], dry_run: bool, seed: int, json_path: str | None,
          show_all: bool) -> None:
    """Prune MODEL structurally: remove RATIO of the channels of every prunable group."""
    from onnxprune.prune import prune_model

    out_path = Path(output) if output else default_output(model)
    if not dry_run:
        if out_path.resolve() == Path(model).resolve() and not overwrite:
            raise InputError(f"refusing to overwrite the input model {model} (pass --overwrite to replace it)")
        if out_path.exists() and not overwrite:
            raise InputError(f"output exists: {out_path} (pass --overwrite to replace it)")
    original = load_model(model)
    result = prune_model(original, ratio=ratio, criterion=criterion, global_ranking=global_ranking,
                         round_to=round_to, exclude=exclude, seed=seed)
    rows = result.group_rows()
    shown = rows if show_all else [r for r in rows if r["kept"] != r["channels"]]
    console.print(summary_table(result.stats))
    console.print(groups_table(shown, f"{len(result.plan.kept)} of {len(rows)} groups pruned"
                                      f" ({result.stats['channels_removed']} channels)"))
    if not dry_run:
        save_model(result.model, out_path, overwrite=overwrite)
        console.print(f"wrote {out_path}")
    if json_path:
        write_json(json_path, {"model": model, "output": None if dry_run else str(out_path), "ratio": ratio,
                               "criterion": criterion, "global": global_ranking, "round_to": round_to,
                               "stats": result.stats, "groups": rows})
