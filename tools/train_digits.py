"""Train the small digits CNN shipped in models/ and write its calibration and held-out splits.

Regenerates, deterministically:
  models/digits_cnn.onnx      float32 input `input` [N,1,8,8] -> logits `logits` [N,10], dynamic batch
  models/digits_calib.npz     ~300 samples (`input`, `labels`) for scoring/recovery/calibration
  models/digits_heldout.npz   ~450 samples (`input`, `labels`) for measuring accuracy

The three splits (train / calibration / held-out) come from scikit-learn's `digits` (1,797 real 8x8
handwritten digits) and never overlap. Pixels are scaled from 0..16 to 0..1 so the data files feed the
model as they are.

    python tools/train_digits.py [--out models] [--epochs 60]
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

SEED = 0
N_CALIB, N_HELDOUT = 300, 450


class DigitsCNN(nn.Module):
    """Conv-BN-ReLU stem, a residual block (an Add that couples channels), two pools, two Linear layers.

    The residual Add and the Flatten into a Linear are the two places where pruning must keep channels
    coupled, which is why they are here.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.conv2 = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.res = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32))
        self.pool1 = nn.MaxPool2d(2)  # 8x8 -> 4x4
        self.conv3 = nn.Sequential(nn.Conv2d(32, 64, 3, padding=1), nn.ReLU())
        self.pool2 = nn.MaxPool2d(2)  # 4x4 -> 2x2
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64 * 2 * 2, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(self.conv1(x))
        x = torch.relu(x + self.res(x))
        x = self.pool2(self.conv3(self.pool1(x)))
        return self.head(x)


def make_splits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    y = digits.target.astype(np.int64)
    x_rest, x_held, y_rest, y_held = train_test_split(
        x, y, test_size=N_HELDOUT, random_state=SEED, stratify=y)
    x_train, x_calib, y_train, y_calib = train_test_split(
        x_rest, y_rest, test_size=N_CALIB, random_state=SEED, stratify=y_rest)
    return {"train": (x_train, y_train), "calib": (x_calib, y_calib), "heldout": (x_held, y_held)}


def train(x: np.ndarray, y: np.ndarray, epochs: int, make_model=None, augment=None) -> nn.Module:
    """Adam + cosine schedule, deterministic. `make_model` builds the network (default DigitsCNN) after the
    seed is set; `augment(batch, generator)` may perturb each training batch."""
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    model = (make_model or DigitsCNN)()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(SEED)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(xt), generator=gen).split(64):
            opt.zero_grad()
            batch = xt[idx] if augment is None else augment(xt[idx], gen)
            loss = nn.functional.cross_entropy(model(batch), yt[idx])
            loss.backward()
            opt.step()
        sched.step()
    return model.eval()


def export(model: nn.Module, path: Path, shape: tuple[int, ...] = (1, 1, 8, 8)) -> None:
    """TorchScript, opset 17, input `input` of `shape` (dynamic batch) -> `logits`, BatchNormalization kept."""
    # PRESERVE keeps BatchNormalization nodes (EVAL would fold them into the convs); the model is in
    # eval mode, so they are exported as inference BN, which pruning's bn-scale importance can read.
    with warnings.catch_warnings():
        # the legacy-exporter deprecation notice, and a constant-folding warning that applies only to
        # models in training mode (this one is in eval mode)
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (torch.zeros(*shape),), str(path), dynamo=False, opset_version=17,
            input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "models")
    parser.add_argument("--epochs", type=int, default=60)
    args = parser.parse_args()
    torch.set_num_threads(1)  # fewer sources of run-to-run difference
    splits = make_splits()
    model = train(*splits["train"], epochs=args.epochs)
    args.out.mkdir(parents=True, exist_ok=True)
    export(model, args.out / "digits_cnn.onnx")
    for name in ("calib", "heldout"):
        x, y = splits[name]
        np.savez(args.out / f"digits_{name}.npz", input=x, labels=y)
    with torch.no_grad():
        for name, (x, y) in splits.items():
            acc = (model(torch.from_numpy(x)).argmax(1).numpy() == y).mean()
            print(f"{name:8s} {len(y):5d} samples  accuracy {100 * acc:.2f}% (torch)")
    import onnxruntime  # the exported file, not the torch module, is what ships

    session = onnxruntime.InferenceSession(str(args.out / "digits_cnn.onnx"), providers=["CPUExecutionProvider"])
    x, y = splits["heldout"]
    acc = (session.run(None, {"input": x})[0].argmax(1) == y).mean()
    print(f"heldout  {len(y):5d} samples  accuracy {100 * acc:.2f}% (onnxruntime, digits_cnn.onnx)")


if __name__ == "__main__":
    main()
