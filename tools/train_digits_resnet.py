"""Train the residual digits CNN used by the recovery benchmark (tools/bench_recovery.py).

Regenerates, deterministically, from the same train / calibration / held-out split as tools/train_digits.py:
  models/digits_resnet.onnx   float32 input `input` [N,1,8,8] -> logits `logits` [N,10], dynamic batch,
                              TorchScript exporter, opset 17, BatchNormalization nodes kept
  models/digits_resnet.pt     its PyTorch state_dict (for Torch-Pruning on the same weights in the benchmark)

    python tools/train_digits_resnet.py [--out models] [--epochs 40]
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import numpy as np
import torch
from torch import nn

TOOLS = Path(__file__).resolve().parent


def _train_digits():
    """tools/train_digits.py, for its data split and its export settings."""
    spec = importlib.util.spec_from_file_location("train_digits", TOOLS / "train_digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def digits_splits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The split of tools/train_digits.py (train 1,047 / calibration 300 / held-out 450)."""
    return _train_digits().make_splits()


class Block(nn.Module):
    """conv-BN-ReLU-conv-BN plus a shortcut (identity, or a strided 1x1 conv-BN when the shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class DigitsResNet(nn.Module):
    """A ResNet-style stem and three residual blocks (32, 32, 64 channels), global pooling, one Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.layer1 = nn.Sequential(Block(32, 32), Block(32, 32))
        self.layer2 = nn.Sequential(Block(32, 64, stride=2), Block(64, 64))  # 8x8 -> 4x4
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def shift(batch: torch.Tensor, gen: torch.Generator, pixels: int = 1) -> torch.Tensor:
    """Small random shifts (+-`pixels`) make up for the tiny training set."""
    offsets = torch.randint(-pixels, pixels + 1, (2,), generator=gen).tolist()
    return torch.roll(batch, shifts=offsets, dims=(2, 3))


def train(x: np.ndarray, y: np.ndarray, epochs: int) -> DigitsResNet:
    """The digits CNN's training loop (tools/train_digits.py) with shift augmentation."""
    return _train_digits().train(x, y, epochs, make_model=DigitsResNet, augment=shift)


def export(model: nn.Module, path: Path) -> None:
    """Exported exactly as the digits CNN is (TorchScript, opset 17, BatchNormalization kept)."""
    _train_digits().export(model, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=TOOLS.parent / "models")
    parser.add_argument("--epochs", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(1)
    splits = digits_splits()
    model = train(*splits["train"], epochs=args.epochs)
    args.out.mkdir(parents=True, exist_ok=True)
    export(model, args.out / "digits_resnet.onnx")
    torch.save(model.state_dict(), args.out / "digits_resnet.pt")
    with torch.no_grad():
        for name, (x, y) in splits.items():
            acc = (model(torch.from_numpy(x)).argmax(1).numpy() == y).mean()
            print(f"{name:8s} {len(y):5d} samples  accuracy {100 * acc:.2f}% (torch)")


if __name__ == "__main__":
    main()
