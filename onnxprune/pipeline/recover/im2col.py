"""Rows of a layer's least-squares problem: a Conv's input as im2col patches (channel, kernel offset), a
linear layer's as token rows, subsampled with a fixed seed and without padded tokens."""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from onnxprune.graph.ir import attr
from onnxprune.pipeline.recover.layers import Layer


def _conv_geometry(node, x_shape):
    spatial = len(x_shape) - 2
    kernel = list(attr(node, "kernel_shape", []))
    strides = list(attr(node, "strides", [1] * spatial))
    dil = list(attr(node, "dilations", [1] * spatial))
    pads = list(attr(node, "pads", [0] * 2 * spatial))
    return kernel, strides, dil, pads


def conv_rows(node, x: np.ndarray, y: np.ndarray | None, sample_rows: np.ndarray | None):
    """im2col rows of a (1-D or 2-D) Conv input [N, C, ...] and the matching output rows.

    Returns (X [R, C * prod(kernel)], Y [R, O] or None, sample index of each row).
    """
    if x.ndim == 3:
        x = x[:, :, None, :]
        y = None if y is None else y[:, :, None, :]
        kernel, strides, dil, pads = _conv_geometry(node, x.shape[:-2] + x.shape[-1:])
        kernel, strides, dil = [1] + kernel, [1] + strides, [1] + dil
        pads = [0, pads[0], 0, pads[1]]
    else:
        kernel, strides, dil, pads = _conv_geometry(node, x.shape)
    n, c = x.shape[:2]
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    span = [(k - 1) * d + 1 for k, d in zip(kernel, dil)]
    win = sliding_window_view(xp, span, axis=(2, 3))[:, :, ::strides[0], ::strides[1], ::dil[0], ::dil[1]]
    ho, wo = win.shape[2], win.shape[3]
    rows = np.arange(n * ho * wo) if sample_rows is None else sample_rows
    ni, rem = np.divmod(rows, ho * wo)
    hi, wi = np.divmod(rem, wo)
    cols = win[ni, :, hi, wi].reshape(len(rows), -1)
    ys = None if y is None else y[ni, :, hi, wi]
    return cols, ys, ni


def layer_rows(layer: Layer, x: np.ndarray, y: np.ndarray | None, rng: np.random.Generator, cap: int,
               keep: np.ndarray | None = None):
    """Rows (features, outputs, sample of each row) of one batch, at most `cap` rows picked at random.

    `keep` (MatMul/Gemm only): a boolean per flattened row; rows where it is False (padding) are dropped.
    """
    x = np.asarray(x, dtype=np.float64)
    y = None if y is None else np.asarray(y, dtype=np.float64)
    if layer.kind == "conv":
        n = x.shape[0]
        per_sample = int(np.prod(y.shape[2:])) if y is not None else None
        if per_sample is None:
            _, _, probe = conv_rows(layer.node, x[:1], None, None)
            per_sample = len(probe)
        total = n * per_sample
        pick = None if total <= cap else np.sort(rng.choice(total, cap, replace=False))
        return conv_rows(layer.node, x, y, pick)
    rows, sample = token_pick(x.shape, rng, cap, keep)
    xs = x.reshape(-1, x.shape[-1])[rows]
    ys = None if y is None else y.reshape(-1, y.shape[-1])[rows]
    return xs, ys, sample


def token_pick(shape: tuple, rng: np.random.Generator, cap: int, keep: np.ndarray | None = None):
    """(rows, sample of each row) a linear layer's fit takes from an input of `shape` [N, ..., features]
    flattened to rows: at most `cap` picked at random, none where `keep` is False. Layers that read the same
    input share the pick (and so their Gram matrix)."""
    n = shape[0] if len(shape) else 1
    total = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    rows = np.arange(total)
    sample = np.repeat(np.arange(n), total // max(n, 1))
    if keep is not None and len(keep) == total:
        rows, sample = rows[keep], sample[keep]
    if len(rows) > cap:
        pick = np.sort(rng.choice(len(rows), cap, replace=False))
        rows, sample = rows[pick], sample[pick]
    return rows, sample
