"""Models from other libraries (issue 12): timm, Hugging Face transformers vision models, Ultralytics YOLOv8.

Every model is built from code with random weights (no download: timm's `pretrained=False`, transformers
configs, YOLOv8 from its yaml), randomised like tools/zoo.py does (BatchNorm statistics, constant-initialised
parameters such as ConvNeXt's layer scale of 1e-6), exported with the TorchScript exporter (opset 17, dynamic
batch) and cached beside the torchvision zoo. A random detector head barely depends on its weights, so tests
also check that the oracle is informative and re-draw the weights (`seed`) when it is not.

    python tools/zoo_libs.py list
    python tools/zoo_libs.py export [--names timm/resnet18 ...]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

if __package__ in (None, ""):  # run as `python tools/zoo_libs.py`: the checkout's root, for `tools.*` and onnxprune
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tools import zoo  # noqa: E402

REVISION = 1


@dataclass(frozen=True)
class LibSpec:
    name: str            # "library/model"
    library: str         # the package that builds it
    build: Callable      # () -> torch module returning one tensor
    size: int = 64
    ci: bool = False     # in the default test run (the rest with --runslow)
    frozen: tuple[str, ...] = field(default=())  # substrings of reasons this architecture explains


def _timm(name: str, **kwargs):
    def build():
        import timm

        return timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    return build


class _Logits:
    """A transformers model as a module of pixel values returning its logits."""

    def __new__(cls, model):
        import torch

        class Logits(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self, x):
                return self.model(pixel_values=x).logits
        return Logits()


def _hf(config_name: str, model_name: str, **config):
    def build():
        import transformers

        cfg = getattr(transformers, config_name)(**config)
        return _Logits(getattr(transformers, model_name)(cfg))
    return build


def _yolo(yaml: str):
    def build():
        import torch
        from ultralytics import YOLO

        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            detector = YOLO(yaml).model.eval()

        class Detections(torch.nn.Module):
            """The decoded output [batch, 4 + classes, anchors], as Ultralytics' own ONNX export gives it."""

            def __init__(self):
                super().__init__()
                self.model = detector

            def forward(self, x):
                return self.model(x)[0]
        return Detections()
    return build


_LN = ("LayerNormalization", "hidden size", "entries on the channel axis")


def _specs() -> dict[str, LibSpec]:
    specs = [
        LibSpec("timm/resnet18", "timm", _timm("resnet18"), ci=True),
        LibSpec("timm/mobilenetv3_small_100", "timm", _timm("mobilenetv3_small_100"), ci=True),
        LibSpec("timm/convnext_atto", "timm", _timm("convnext_atto"), ci=True, frozen=_LN),
        LibSpec("timm/vit_tiny_patch16", "timm", _timm("vit_tiny_patch16_224", img_size=64), ci=True, frozen=_LN),
        LibSpec("timm/ghostnet_100", "timm", _timm("ghostnet_100"), ci=True,
                frozen=("Concat", "Slice", "Add", "differently arranged")),
        LibSpec("timm/efficientnet_b0", "timm", _timm("efficientnet_b0")),
        LibSpec("timm/regnetx_002", "timm", _timm("regnetx_002")),
        LibSpec("timm/mobilevit_xxs", "timm", _timm("mobilevit_xxs"), frozen=_LN + ("Reshape", "Concat")),
        LibSpec("timm/repvgg_a0", "timm", _timm("repvgg_a0")),
        LibSpec("timm/rexnet_100", "timm", _timm("rexnet_100"), frozen=("Concat", "Add", "Slice")),
        LibSpec("timm/hrnet_w18_small", "timm", _timm("hrnet_w18_small")),
        LibSpec("timm/cspresnet50", "timm", _timm("cspresnet50"), frozen=("Slice", "Concat", "Add")),
        LibSpec("hf/vit", "transformers", _hf("ViTConfig", "ViTForImageClassification", image_size=32, patch_size=8,
                                              hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                              intermediate_size=64, num_labels=10), size=32, ci=True, frozen=_LN),
        LibSpec("hf/resnet", "transformers", _hf("ResNetConfig", "ResNetForImageClassification", embedding_size=16,
                                                 hidden_sizes=[16, 32, 64, 64], depths=[1, 1, 1, 1], num_labels=10),
                ci=True),
        LibSpec("hf/segformer", "transformers", _hf(
            "SegformerConfig", "SegformerForSemanticSegmentation", num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1],
            hidden_sizes=[16, 32], num_attention_heads=[1, 2], decoder_hidden_size=32, num_labels=5,
            patch_sizes=[7, 3], strides=[4, 2], mlp_ratios=[2, 2]), ci=True,
            frozen=_LN + ("contracted axis",)),
        LibSpec("hf/swin", "transformers", _hf("SwinConfig", "SwinForImageClassification", image_size=32, patch_size=4,
                                               embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4,
                                               num_labels=10), size=32, ci=True, frozen=_LN + ("contracted axis",)),
        LibSpec("hf/convnext", "transformers", _hf("ConvNextConfig", "ConvNextForImageClassification",
                                                   hidden_sizes=[16, 32, 64, 64], depths=[1, 1, 1, 1], num_labels=10),
                frozen=_LN),
        LibSpec("hf/mobilevit", "transformers", _hf("MobileViTConfig", "MobileViTForImageClassification", image_size=64,
                                                    hidden_sizes=[32, 48, 64], neck_hidden_sizes=[8, 16, 24, 24, 32, 32,
                                                                                                  64], num_labels=10),
                frozen=_LN + ("Reshape",)),
        LibSpec("ultralytics/yolov8n", "ultralytics", _yolo("yolov8n.yaml"), ci=True,
                frozen=("splits the channel axis", "Concat")),
    ]
    return {s.name: s for s in specs}


LIBS: dict[str, LibSpec] = _specs()


def build(name: str, seed: int = 0):
    import torch

    torch.manual_seed(seed)
    model = LIBS[name].build().eval()
    zoo.randomize_params(model, seed=seed)
    return model


def example_input(name: str, batch: int = 1) -> np.ndarray:
    size = LIBS[name].size
    return np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)


def cache_path(name: str, seed: int = 0) -> Path:
    import torch

    versions = f"torch-{torch.__version__}".replace("+", "_")
    library = LIBS[name].library
    try:
        from importlib.metadata import version

        versions += f"-{library}-{version(library)}"
    except Exception:  # noqa: BLE001
        pass
    return zoo.DEFAULT_CACHE / f"libs-{versions}" / f"{name.replace('/', '--')}-s{seed}-r{REVISION}.onnx"


def export(name: str, seed: int = 0) -> Path:
    """Export `name` with weights drawn from `seed` (or reuse the cached file); returns its path."""
    import torch

    path = cache_path(name, seed)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    model = build(name, seed)
    x = torch.from_numpy(example_input(name))
    fd, tmp = tempfile.mkstemp(suffix=".onnx", dir=path.parent)
    os.close(fd)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(model, x, tmp, dynamo=False, opset_version=17, input_names=["input"],
                              output_names=["output"], dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list")
    p = sub.add_parser("export")
    p.add_argument("--names", nargs="*", choices=list(LIBS))
    args = parser.parse_args(argv)
    if args.cmd == "list":
        for spec in LIBS.values():
            print(f"{spec.name:32s} {spec.library:14s} {spec.size:4d} {'ci' if spec.ci else 'slow'}")
        return 0
    for name in args.names or list(LIBS):
        print(name, export(name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
