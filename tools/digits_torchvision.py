"""A torchvision architecture with real accuracy: torchvision's ResNet-18, trained on scikit-learn's digits.

No pretrained torchvision weights can be downloaded here, and a random-weight model has no accuracy to keep,
so this trains `torchvision.models.resnet18(num_classes=10)` (unchanged: 3-channel stem, four stages, 11.2 M
parameters) on the digits training split of tools/train_digits.py, each 8x8 digit upsampled bilinearly to
32x32 and repeated over the three channels. Writes, into --out (44 MB of weights: never committed):

  digits_resnet18.onnx     input `input` float32 [N,3,32,32] -> `logits` [N,10], dynamic batch, TorchScript
                           exporter, opset 17, BatchNormalization kept (as the shipped digits CNNs)
  calib.npz, heldout.npz   the calibration (300) and held-out (450) splits in that layout, with `labels`

    python tools/digits_torchvision.py [--out /work/cache/digits_resnet18] [--epochs 30]
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
from pathlib import Path

import numpy as np
import torch

TOOLS = Path(__file__).resolve().parent
SIZE = 32


def _digits_resnet():
    """tools/train_digits_resnet.py: the digits split, its training loop with shift augmentation, the export."""
    spec = importlib.util.spec_from_file_location("train_digits_resnet", TOOLS / "train_digits_resnet.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def to_rgb32(x: np.ndarray) -> np.ndarray:
    """[N,1,8,8] pixels in 0..1 -> [N,3,32,32] (bilinear), float32."""
    up = torch.nn.functional.interpolate(torch.from_numpy(x), size=(SIZE, SIZE), mode="bilinear",
                                         align_corners=False)
    return up.repeat(1, 3, 1, 1).numpy().astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/work/cache/digits_resnet18"))
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args()
    import torchvision

    torch.set_num_threads(2)
    resnet = _digits_resnet()
    digits = resnet._train_digits()
    splits = {name: (to_rgb32(x), y) for name, (x, y) in resnet.digits_splits().items()}
    # shifts of up to 4 pixels: one pixel of the 8x8 digit, as train_digits_resnet.py shifts it
    model = digits.train(*splits["train"], epochs=args.epochs,
                         make_model=lambda: torchvision.models.resnet18(num_classes=10),
                         augment=functools.partial(resnet.shift, pixels=4))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "digits_resnet18.onnx"
    digits.export(model, path, shape=(1, 3, SIZE, SIZE))
    for name in ("calib", "heldout"):
        x, y = splits[name]
        np.savez(args.out / f"{name}.npz", input=x, labels=y)
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for name, (x, y) in splits.items():
        logits = session.run(None, {"input": x})[0]
        print(f"{name:8s} {len(y):5d} samples  accuracy {100 * (logits.argmax(1) == y).mean():.2f}% (onnxruntime)")


if __name__ == "__main__":
    main()
