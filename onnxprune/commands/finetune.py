"""`onnxprune finetune`: re-train a pruned model by distillation from the original, on the same graph.

Only initializer values change. Held-out data (--eval-data, or a share of --data kept out of training) decides
what is kept: a block or a stage that made it worse is rolled back, and when nothing helped the output is the
input model, byte for byte.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import click
from click.core import ParameterSource

from onnxprune.commands._output import console, show_finetune, write_json
from onnxprune.commands.options import (
    data_options,
    dataset_from_options,
    finetune_options,
)
from onnxprune.errors import InputError
from onnxprune.io.model_io import load_model, save_model
from onnxprune.runtime.stages import parse_bytes
from onnxprune.recipe import FINETUNE_MODES, Recipe, load_recipe

FIELDS = ("finetune", "finetune_steps", "finetune_lr", "finetune_batch_size", "finetune_temperature", "finetune_loss")


@click.command("finetune")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--teacher", type=click.Path(dir_okay=False), required=True,
              help="The original (unpruned) model the pruned MODEL learns to reproduce.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Where to write (default: MODEL.tuned.onnx).")
@click.option("--overwrite", is_flag=True, help="Replace the output file if it exists.")
@click.option("--recipe", "recipe_path", type=click.Path(dir_okay=False), default=None,
              help="Recipe file (or a prune --json report) whose finetune settings to use; options override it.")
@finetune_options
@data_options
@click.option("--eval-data", type=click.Path(), default=None,
              help="Held-out data that decides what is kept (default: a fifth of --data, never trained on).")
@click.option("--memory-budget", default=None, metavar="SIZE",
              help="Most memory block-wise distillation keeps for activations (e.g. 8G); past it they spill to "
                   "disk. [default: a quarter of the machine's memory]")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the report as JSON here.")
def finetune_command(model: str, teacher: str, output: str | None, overwrite: bool, recipe_path: str | None,
                     eval_data: str | None, memory_budget: str | None, json_path: str | None, **params) -> None:
    """Distil the pruned MODEL from --teacher on --data and write the re-trained model."""
    from onnxprune.pipeline.finetune import finetune

    out_path = Path(output) if output else Path(model).with_name(f"{Path(model).stem}.tuned.onnx")
    if out_path.resolve() == Path(model).resolve() and not overwrite:
        raise InputError(f"refusing to overwrite the input model {model} (pass --overwrite to replace it)")
    if out_path.exists() and not overwrite:
        raise InputError(f"output exists: {out_path} (pass --overwrite to replace it)")
    if not out_path.parent.exists():
        raise InputError(f"output folder does not exist: {out_path.parent}")
    ctx = click.get_current_context()
    device = params.pop("finetune_device")
    given = {k: params.pop(k) for k in FIELDS}
    given = {k: v for k, v in given.items() if ctx.get_parameter_source(k) == ParameterSource.COMMANDLINE}
    recipe = load_recipe(recipe_path) if recipe_path else Recipe()
    if recipe.finetune == "none" and "finetune" not in given:
        given["finetune"] = FINETUNE_MODES[1]  # this command re-trains: block-wise unless told otherwise
    recipe = recipe.replace(**given)
    if recipe.finetune != "none":
        from onnxprune.train.distill import resolve_device

        device = resolve_device(device)  # before the models load
    pruned = load_model(model)
    original = load_model(teacher)
    batch_size = params.get("batch_size") or 32
    calib = dataset_from_options(original, params)
    if calib is None:
        raise InputError("finetune trains on data: pass --data FILE")
    held = None
    if eval_data is not None:
        from onnxprune.evaluate.data import load_data

        held = load_data(eval_data, original, batch_size=batch_size)
    result = finetune(pruned, original, calib, recipe, eval_data=held, memory_budget=parse_bytes(memory_budget),
                      show_progress=True, device=device)
    show_finetune(result.report)
    for note in result.notes:
        console.print(f"note: {note}")
    if result.rolled_back and not _external(pruned):
        _copy_bytes(Path(model), out_path)  # the input model, byte for byte
    else:
        save_model(result.model, out_path, overwrite=overwrite)
    console.print(f"wrote {out_path}")
    if json_path:
        write_json(json_path, {"model": model, "teacher": teacher, "output": str(out_path),
                               "recipe": recipe.to_dict(), "finetune": result.report, "notes": result.notes})


def _external(model) -> bool:
    return any(t.data_location == 1 for t in model.graph.initializer)  # TensorProto.EXTERNAL


def _copy_bytes(source: Path, target: Path) -> None:
    """Copy a file atomically (a temporary file in the target folder, then a rename)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(source.read_bytes())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
