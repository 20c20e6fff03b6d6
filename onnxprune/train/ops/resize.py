"""Resize (and Upsample): separable, one axis at a time, with ONNX's own coordinate transforms, so every
coordinate_transformation_mode and nearest_mode is the formula of the spec rather than torch's nearest choice.
Coordinates are computed in float32, as onnxruntime does."""

from __future__ import annotations

import numpy as np
import torch

from onnxprune.train.ops import register

_MODES = ("half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric", "tf_half_pixel_for_nn",
          "half_pixel_symmetric")


def _check(node):
    mode = node.get("coordinate_transformation_mode", "half_pixel" if node.op_type == "Resize" else "asymmetric")
    if node.op_type == "Resize" and node.opset < 11:
        mode = "asymmetric"
    if mode not in _MODES:
        return f"coordinate_transformation_mode={mode} is not implemented"
    if node.get("mode", "nearest") not in ("nearest", "linear", "cubic"):
        return f"mode={node.get('mode')} is not implemented"
    if node.get("keep_aspect_ratio_policy", "stretch") != "stretch":
        return "keep_aspect_ratio_policy other than stretch is not implemented"
    if node.get("antialias", 0):
        return "antialias=1 is not implemented"
    return None


def _coords(mode, out_len, in_len, scale):
    x = np.arange(out_len, dtype=np.float32)
    scale = np.float32(scale)
    if mode == "half_pixel":
        return (x + 0.5) / scale - 0.5
    if mode == "pytorch_half_pixel":
        return (x + 0.5) / scale - 0.5 if out_len > 1 else np.zeros_like(x)
    if mode == "align_corners":
        return x * np.float32(in_len - 1) / np.float32(out_len - 1) if out_len > 1 else np.zeros_like(x)
    if mode == "asymmetric":
        return x / scale
    if mode == "tf_half_pixel_for_nn":
        return (x + 0.5) / scale
    adjustment = np.float32(out_len) / (scale * np.float32(in_len))  # half_pixel_symmetric
    center = np.float32(in_len) / 2
    offset = center * (1 - adjustment)
    return offset + (x + 0.5) / scale - 0.5


def _nearest(coords, mode, in_len):
    if mode == "floor":
        idx = np.floor(coords)
    elif mode == "ceil":
        idx = np.ceil(coords)
    elif mode == "round_prefer_ceil":
        idx = np.floor(coords + 0.5)
    else:  # round_prefer_floor
        idx = np.ceil(coords - 0.5)
    return np.clip(idx, 0, in_len - 1).astype(np.int64)


def _cubic_weights(t, a):
    # taps at offsets -1, 0, 1, 2 from floor(x); t = x - floor(x)
    def k(s):
        s = np.abs(s)
        return np.where(s <= 1, ((a + 2) * s - (a + 3)) * s * s + 1,
                        np.where(s < 2, ((a * s - 5 * a) * s + 8 * a) * s - 4 * a, 0))
    return np.stack([k(t + 1), k(t), k(1 - t), k(2 - t)], -1)


def _axis(x, axis, out_len, scale, node, cmode):
    in_len = x.shape[axis]
    coords = _coords(cmode, out_len, in_len, scale)
    mode = node.get("mode", "nearest")
    if mode == "nearest":
        idx = _nearest(coords, node.get("nearest_mode", "round_prefer_floor"), in_len)
        return x.index_select(axis, torch.from_numpy(idx).to(x.device))
    shape = [1] * x.dim()
    shape[axis] = out_len
    if mode == "linear":
        c = np.clip(coords, 0, in_len - 1)
        lo = np.floor(c).astype(np.int64)
        hi = np.minimum(lo + 1, in_len - 1)
        w = torch.from_numpy((c - lo).astype(np.float32)).to(x.device, x.dtype).reshape(shape)
        a = x.index_select(axis, torch.from_numpy(lo).to(x.device))
        b = x.index_select(axis, torch.from_numpy(hi).to(x.device))
        return a + (b - a) * w
    base = np.floor(coords).astype(np.int64)
    weights = _cubic_weights(coords - base, node.get("cubic_coeff_a", -0.75))
    taps = base[:, None] + np.arange(-1, 3)[None, :]
    if node.get("exclude_outside", 0):
        weights = np.where((taps >= 0) & (taps < in_len), weights, 0)
        weights = weights / weights.sum(-1, keepdims=True)
    taps = np.clip(taps, 0, in_len - 1)
    out = 0
    for j in range(4):
        w = torch.from_numpy(weights[:, j].astype(np.float32)).to(x.device, x.dtype).reshape(shape)
        out = out + x.index_select(axis, torch.from_numpy(taps[:, j]).to(x.device)) * w
    return out


def _resize(node, x, scales, sizes):
    cmode = node.get("coordinate_transformation_mode", "half_pixel")
    if node.op_type == "Upsample" or node.opset < 11:
        cmode = "asymmetric"
    axes = node.get("axes")
    rank = x.dim()
    axes = list(range(rank)) if axes is None else [a % rank for a in axes]
    if sizes is not None and sizes.numel():
        sizes = [int(s) for s in sizes.reshape(-1).tolist()]
        scales = [s / x.shape[a] for a, s in zip(axes, sizes)]
    else:
        scales = [float(s) for s in scales.reshape(-1).tolist()]
        sizes = [int(np.floor(np.float32(x.shape[a]) * np.float32(s))) for a, s in zip(axes, scales)]
    for a, size, scale in zip(axes, sizes, scales):
        if size != x.shape[a] or scale != 1.0:
            x = _axis(x, a, size, scale, node, cmode)
    return x


@register("Resize", static=(1, 2, 3), check=_check)
def resize(node, x, roi=None, scales=None, sizes=None):
    if node.opset < 11:
        return _resize(node, x, roi, None)  # opset 10: (X, scales)
    return _resize(node, x, scales, sizes)


@register("Upsample", static=(1,), check=_check)
def upsample(node, x, scales=None):
    if node.opset < 9:
        scales = torch.tensor(node.get("scales"))
    return _resize(node, x, scales, None)
