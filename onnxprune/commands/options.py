"""Option groups shared by the commands that take data or run models, defined once.

    @click.command("mycmd")
    @click.argument("model")
    @data_options
    @provider_options
    def mycmd(model, **kwargs):
        proto = load_model(model)
        dataset = dataset_from_options(proto, kwargs)   # pops the data keys out of kwargs
        providers = parse_providers(kwargs.pop("providers"))
"""

from __future__ import annotations

from typing import Any

import click
import onnx

from onnxprune.errors import InputError
from onnxprune.evaluate.data import Dataset, ImageOptions, load_data
from onnxprune.runtime.session import OPT_LEVELS, PROVIDERS

DATA_KEYS = ("data", "labels", "batch_size", "input_shapes", "random", "resize", "crop", "mean", "std", "layout",
             "limit")


def data_options(f):
    """Add --data, --labels, --batch-size, --input-shapes, --random, --resize, --crop, --mean, --std, --layout,
    --limit; `dataset_from_options` turns their values into a Dataset."""
    options = [
        click.option("--data", type=click.Path(), default=None,
                     help="Data: .npz/.npy file, a folder of them, a Polygraphy JSON feed list, or an image folder "
                          "with one sub-folder per class."),
        click.option("--labels", type=click.Path(), default=None,
                     help="Integer class labels (.npy) when the data has no 'labels' array."),
        click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
                     help="Samples per batch (a model with a fixed batch dimension uses its own)."),
        click.option("--input-shapes", default=None, metavar="NAME:1x3x224x224[,...]",
                     help="Fix dynamic dimensions, batch included; a single-input model may omit NAME:."),
        click.option("--random", type=click.IntRange(min=1), default=None, metavar="N",
                     help="N synthetic samples instead of --data (latency-only runs)."),
        click.option("--resize", default=None, metavar="S|H,W", help="Images: shorter side to S, or exactly HxW."),
        click.option("--crop", default=None, metavar="S|H,W", help="Images: centre crop."),
        click.option("--mean", default=None, metavar="M[,M,M]", help="Images: per-channel mean, pixels in 0..1."),
        click.option("--std", default=None, metavar="S[,S,S]", help="Images: per-channel std, pixels in 0..1."),
        click.option("--layout", type=click.Choice(["NCHW", "NHWC"], case_sensitive=False), default="NCHW",
                     show_default=True, help="Images: tensor layout of the model input."),
        click.option("--limit", type=click.IntRange(min=1), default=None, metavar="N", help="Use the first N samples."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def provider_options(f):
    """Add --providers, --threads and --opt-level (onnxruntime session settings)."""
    options = [
        click.option("--providers", default="cpu", show_default=True, metavar="P[,P...]",
                     help=f"Execution providers: {', '.join(PROVIDERS)} (or full onnxruntime names)."),
        click.option("--threads", type=click.IntRange(min=1), default=None, help="onnxruntime intra-op threads."),
        click.option("--opt-level", type=click.Choice(OPT_LEVELS), default="all", show_default=True,
                     help="onnxruntime graph optimization level."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def finetune_options(f):
    """Add the recipe's re-training options: --finetune [MODE], --finetune-steps, --finetune-lr,
    --finetune-batch-size, --finetune-temperature, --finetune-loss (defaults are the Recipe's), and
    --finetune-device (where it runs: not a recipe field, the result does not depend on it)."""
    from onnxprune.recipe import FINETUNE_LOSSES, FINETUNE_MODES, default

    options = [
        click.option("--finetune", type=click.Choice(FINETUNE_MODES), default=default("finetune"), is_flag=False,
                     flag_value="blockwise", show_default=True,
                     help="Re-train by distillation from the original (needs torch: onnxprune[train]): each block "
                          "against the original's block output, end to end on the outputs, or both; a bare "
                          "--finetune means blockwise. Held-out data decides what is kept."),
        click.option("--finetune-steps", type=click.IntRange(min=1), default=default("finetune_steps"),
                     show_default=True, help="Optimizer steps per block (blockwise) and in all (end-to-end)."),
        click.option("--finetune-lr", type=float, default=default("finetune_lr"), show_default=True,
                     help="AdamW learning rate (cosine schedule to zero)."),
        click.option("--finetune-batch-size", type=click.IntRange(min=1), default=default("finetune_batch_size"),
                     show_default=True, help="Samples per training step."),
        click.option("--finetune-temperature", type=float, default=default("finetune_temperature"),
                     show_default=True, help="Temperature of the KL loss on logits."),
        click.option("--finetune-loss", type=click.Choice(FINETUNE_LOSSES), default=default("finetune_loss"),
                     show_default=True, help="End-to-end loss: auto is KL on logits or class scores (+ "
                                             "cross-entropy with labels), else MSE."),
        click.option("--finetune-device", default="auto", show_default=True, metavar="auto|cpu|cuda[:N]",
                     help="Torch device re-training runs on: auto is CUDA when torch sees a GPU, else the CPU "
                          "(the original model stays in onnxruntime)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def tracking_option(f):
    """Add --mlflow URI: log the run to MLflow (onnxprune.sweep.tracking)."""
    return click.option("--mlflow", "mlflow_uri", default=None, metavar="URI",
                        help="Log this run to MLflow: a tracking server (http://HOST:PORT) or a file store "
                             "(file:./mlruns). Needs onnxprune[mlflow].")(f)


def dataset_from_options(model: onnx.ModelProto, kwargs: dict[str, Any] | None = None, /,
                         **options: Any) -> Dataset | None:
    """Load the Dataset the data options describe, or None when neither --data nor --random was given.

    Pass a command's kwargs dict positionally, `dataset_from_options(model, kwargs)`, and the data keys
    (DATA_KEYS) are popped from it, leaving the command's own options; or pass them as keywords,
    `dataset_from_options(model, **kwargs)`, where keys that are not data options are ignored.
    """
    source = kwargs if kwargs is not None else options
    values = {key: source.pop(key, None) for key in DATA_KEYS}
    if values["data"] is None and values["random"] is None:
        return None
    # image options only matter for image folders, but bad values are reported whatever the data is
    image = ImageOptions(resize=parse_size(values["resize"], "--resize"), crop=parse_size(values["crop"], "--crop"),
                         mean=parse_floats(values["mean"], "--mean") or (0.0,),
                         std=parse_floats(values["std"], "--std") or (1.0,),
                         layout=(values["layout"] or "NCHW").upper())
    return load_data(values["data"], model, labels=values["labels"], batch_size=values["batch_size"] or 32,
                     input_shapes=parse_input_shapes(values["input_shapes"], model), random=values["random"],
                     image=image, limit=values["limit"])


def parse_providers(text: str | None) -> tuple[str, ...]:
    """'cpu,cuda' -> ('cpu', 'cuda')."""
    names = tuple(p.strip() for p in (text or "cpu").split(",") if p.strip())
    if not names:
        raise InputError("--providers is empty; give e.g. cpu or cpu,cuda")
    return names


def parse_input_shapes(text: str | None, model: onnx.ModelProto | None = None) -> dict[str, tuple[int, ...]] | None:
    """'a:1x3x224x224,b:1x128' -> {'a': (1, 3, 224, 224), 'b': (1, 128)}; a bare '1x3x8x8' names the only input."""
    if not text:
        return None
    shapes = {}
    for item in text.split(","):
        name, sep, dims = item.strip().rpartition(":")
        if not sep:
            name = _only_input(model, item)
        try:
            shape = tuple(int(d) for d in dims.lower().split("x"))
        except ValueError:
            raise InputError(f"--input-shapes entry {item!r} is not NAME:DxDxD (e.g. input:1x3x224x224)") from None
        if any(d < 1 for d in shape):
            raise InputError(f"--input-shapes entry {item!r} has a dimension below 1")
        shapes[name] = shape
    return shapes


def parse_size(text: str | None, option: str) -> tuple[int, ...] | None:
    """'224' -> (224,); '224,256' or '224x256' -> (224, 256)."""
    if text is None:
        return None
    try:
        size = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise InputError(f"{option} takes S or H,W in pixels, got {text!r}") from None
    if len(size) not in (1, 2) or min(size) < 1:
        raise InputError(f"{option} takes S or H,W in pixels, got {text!r}")
    return size


def parse_floats(text: str | None, option: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise InputError(f"{option} takes comma-separated numbers, got {text!r}") from None


def _only_input(model: onnx.ModelProto | None, item: str) -> str:
    initializers = {t.name for t in model.graph.initializer} if model is not None else set()
    names = [i.name for i in model.graph.input if i.name not in initializers] if model is not None else []
    if len(names) != 1:
        raise InputError(f"--input-shapes entry {item!r} needs NAME: (the model has inputs: {', '.join(names)})")
    return names[0]
