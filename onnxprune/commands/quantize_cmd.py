"""`onnxprune quantize`: int8 (static QDQ or dynamic) or fp16 through onnxruntime, then a check against the input.

Exit codes: 0 on success, 2 for bad input or a model that cannot be quantized (InputError, UnsupportedModelError).
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from onnxprune.commands._output import creates_output_folders
from onnxprune.commands.options import (
    DATA_KEYS,
    data_options,
    dataset_from_options,
    parse_input_shapes,
    parse_providers,
    provider_options,
)
from onnxprune.errors import InputError
from onnxprune.io.model_io import load_model, model_bytes, save_model
from onnxprune.quantize.quantize import (
    METHODS,
    MODE_ALIASES,
    MODES,
    TARGETS,
    normalize_mode,
    provider_warnings,
    quantize_model,
)
from onnxprune.report import make_console, print_table, write_json

_SUFFIX = {"static": "int8", "dynamic": "int8-dynamic", "fp16": "fp16", "int4": "int4"}


def default_output(model: str, mode: str) -> Path:
    path = Path(model)
    return path.with_name(f"{path.stem}.{_SUFFIX[mode]}.onnx")


def split_exclude(values: tuple[str, ...]) -> list[str]:
    """--exclude may repeat and each value may hold a comma-separated list."""
    return [item.strip() for value in values for item in value.split(",") if item.strip()]


@click.command("quantize")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--mode", type=click.Choice(list(MODES) + list(MODE_ALIASES), case_sensitive=False), default="static",
              show_default=True, help="static: int8 QDQ calibrated on --data; dynamic: int8 weights, for "
                                      "MatMul/Gemm-heavy models; fp16: half precision with float32 inputs/outputs; "
                                      "int4: 4-bit MatMul weights in blocks (MatMulNBits), for decoders.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Where to write (default: MODEL.int8.onnx, MODEL.int8-dynamic.onnx or MODEL.fp16.onnx).")
@click.option("--overwrite", is_flag=True, help="Replace the output file if it exists.")
@click.option("--method", type=click.Choice(METHODS, case_sensitive=False), default="minmax", show_default=True,
              help="Static calibration method.")
@click.option("--per-channel/--per-tensor", default=True, show_default=True, help="Weight scales per output channel.")
@click.option("--target", type=click.Choice(TARGETS, case_sensitive=False), default="cpu", show_default=True,
              help="Where the model will run; picks symmetric or asymmetric activations.")
@click.option("--exclude", multiple=True, metavar="NAME|OP",
              help="Node names or op types to keep in float (repeatable, or comma-separated).")
@click.option("--no-preprocess", is_flag=True, help="Skip onnxruntime's quant_pre_process.")
@click.option("--block-size", type=int, default=32, show_default=True,
              help="int4: weights per scale along K (a power of two, at least 16).")
@click.option("--symmetric/--asymmetric", default=True, show_default=True,
              help="int4: symmetric weights, or asymmetric with a zero point per block.")
@click.option("--accuracy-level", type=click.IntRange(0, 4), default=None,
              help="int4: how MatMulNBits computes (0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 activations).")
@click.option("--reduce-range/--full-range", default=None,
              help="7-bit weights (default: on for per-channel int8 on CPU, to avoid saturation without VNNI).")
@data_options
@click.option("--eval-data", type=click.Path(), default=None,
              help="Held-out data for the check after quantizing (default: the --data used for calibration).")
@provider_options
@click.option("--runs", type=click.IntRange(min=1), default=50, show_default=True, help="Timed runs per model.")
@click.option("--warmup", type=click.IntRange(min=0), default=5, show_default=True, help="Untimed runs first.")
@click.option("--no-latency", is_flag=True, help="Skip the timing.")
@click.option("--no-eval", is_flag=True, help="Write the model without checking it against the input.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the report as JSON.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@creates_output_folders(output="-o", json_path="--json")
def quantize_command(model: str, mode: str, output: str | None, overwrite: bool, **kwargs) -> None:
    """Quantize MODEL to int8 (static or dynamic) or convert it to fp16, then compare it with MODEL."""
    mode = normalize_mode(mode)
    out_path = Path(output) if output else default_output(model, mode)
    if out_path.resolve() == Path(model).resolve() and not overwrite:
        raise InputError(f"refusing to overwrite the input model {model} (pass --overwrite to replace it)")
    if out_path.exists() and not overwrite:
        raise InputError(f"output exists: {out_path} (pass --overwrite to replace it)")
    providers = parse_providers(kwargs.pop("providers"))
    original = load_model(model)
    data_values = {key: kwargs.get(key) for key in DATA_KEYS}
    dataset = dataset_from_options(original, kwargs)
    result = quantize_model(original, mode, calibration=dataset.feeds if dataset is not None else None,
                            method=kwargs["method"], per_channel=kwargs["per_channel"], target=kwargs["target"],
                            exclude=split_exclude(kwargs["exclude"]), preprocess=not kwargs["no_preprocess"],
                            reduce_range=kwargs["reduce_range"], block_size=kwargs["block_size"],
                            symmetric=kwargs["symmetric"], accuracy_level=kwargs["accuracy_level"])
    warnings = provider_warnings(mode, providers)
    for warning in warnings:  # before the timing, which they are about
        click.echo(f"warning: {warning}", err=True)
    report = {"model": model, "output": str(out_path), "mode": mode, "target": kwargs["target"],
              "notes": result.notes, "warnings": warnings,
              "size_bytes": {"before": model_bytes(original), "after": model_bytes(result.model)}}
    if not kwargs["no_eval"]:
        # Evaluate before writing: a model that does not run never reaches the output path.
        check = _check_data(original, dataset, kwargs["eval_data"], data_values, result.notes)
        if check is not None:
            from onnxprune.evaluate.compare import evaluate

            report["evaluation"] = evaluate(
                result.model, check, original, providers, top_k=(1,), latency=not kwargs["no_latency"],
                warmup=kwargs["warmup"], runs=kwargs["runs"], threads=kwargs["threads"],
                opt_level=kwargs["opt_level"], show_progress=not kwargs["quiet"])
    save_model(result.model, out_path, overwrite=overwrite)
    show(report)
    if kwargs["json_path"]:
        write_json(Path(kwargs["json_path"]), report)


def _check_data(model, calibration, eval_data: str | None, data_values: dict, notes: list[str]):
    """The data the result is checked on: --eval-data, else the calibration data, else a few random samples."""
    from onnxprune.evaluate.data import load_data

    shapes = parse_input_shapes(data_values["input_shapes"], model)
    batch = data_values["batch_size"] or 32
    if eval_data is not None:
        return load_data(eval_data, model, labels=data_values["labels"], batch_size=batch, input_shapes=shapes,
                         limit=data_values["limit"])
    if calibration is not None:
        if data_values["data"] is not None:
            notes.append("checked on the calibration data, which flatters int8 accuracy; pass --eval-data for a "
                         "held-out figure")
        return calibration
    try:
        dataset = load_data(None, model, random=8, batch_size=8, input_shapes=shapes)
    except InputError as exc:
        notes.append(f"not checked against the input: no --data, and random inputs cannot be made ({exc})")
        return None
    notes.append("no --data: compared with the input on 8 random samples (agreement and latency only)")
    return dataset


def show(report: dict, console=None) -> None:
    """Sizes before and after and the notes, then the evaluation tables (as `eval` prints them)."""
    from onnxprune.commands.eval_cmd import show as show_evaluation

    console = console or make_console()
    before, after = report["size_bytes"]["before"], report["size_bytes"]["after"]
    print_table([{"": "serialized size (bytes)", "before": f"{before:,}", "after": f"{after:,}",
                  "smaller by": f"{before / after:.2f}x"}], title=f"{report['mode']}: {report['output']}",
                console=console)
    for note in report["notes"]:
        console.print(f"note: {note}")
    if "evaluation" in report:
        show_evaluation(report["evaluation"], console=console)
    console.print(f"wrote {report['output']}")
    sys.stdout.flush()
