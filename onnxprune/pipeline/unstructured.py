"""Unstructured magnitude pruning: zero the smallest weights, keep every shape.

The weights of Conv, ConvTranspose, Gemm and MatMul layers (constant inputs 1) are set to zero where
|w| is below a threshold: either a given `threshold`, or, with `ratio`, the per-layer quantile that zeroes that
fraction of each layer's weights. Biases and normalisation parameters are left alone.

onnxruntime runs the model at the same speed: it has no sparse kernels for these layers, so zeros cost as
much as any other value. What shrinks is the compressed file (zip/gzip of the .onnx), because runs of zeros
compress well; the report says how much.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from onnxprune.errors import InputError
from onnxprune.io.model_io import model_bytes
from onnxprune.io.weights import tensor_array

WEIGHTED_OPS = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}
SPEED_NOTE = ("unstructured sparsity keeps every shape: onnxruntime does not run this model faster "
              "(no sparse kernels); only the compressed file is smaller")


@dataclass
class UnstructuredResult:
    model: onnx.ModelProto
    layers: list[dict] = field(default_factory=list)  # node, tensor, size, zeros, sparsity
    stats: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def gzip_size(model: onnx.ModelProto) -> int:
    return len(gzip.compress(model.SerializeToString(), compresslevel=6, mtime=0))


def prune_unstructured(model: onnx.ModelProto, ratio: float | None = None, threshold: float | None = None,
                       exclude: tuple[str, ...] = ()) -> UnstructuredResult:
    """Zero weights by magnitude; exactly one of `ratio` (per layer) and `threshold` (absolute)."""
    import fnmatch

    if (ratio is None) == (threshold is None):
        raise InputError("unstructured pruning takes exactly one of --ratio and --threshold")
    if ratio is not None and not 0.0 <= ratio < 1.0:
        raise InputError(f"--ratio must be in [0, 1), got {ratio}")
    if threshold is not None and threshold < 0:
        raise InputError(f"--threshold must be >= 0, got {threshold}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name: t for t in out.graph.initializer}
    result = UnstructuredResult(out)
    done: set[str] = set()
    for node in out.graph.node:
        index = WEIGHTED_OPS.get(node.op_type)
        if index is None or len(node.input) <= index or node.input[index] not in inits:
            continue
        if any(fnmatch.fnmatchcase(node.name, pat) for pat in exclude):
            continue
        name = node.input[index]
        if name in done:
            continue
        done.add(name)
        w = tensor_array(inits[name])
        if not np.issubdtype(w.dtype, np.floating) or w.ndim < 2:
            continue
        mag = np.abs(w)
        if ratio is not None:
            n_zero = int(np.floor(w.size * ratio))
            mask = np.zeros(w.size, bool)
            mask[np.argsort(mag.ravel(), kind="stable")[:n_zero]] = True
            mask = mask.reshape(w.shape)
        else:
            mask = mag < threshold
        pruned = np.where(mask, np.zeros_like(w), w)
        inits[name].CopyFrom(numpy_helper.from_array(pruned, name))
        zeros = int((pruned == 0).sum())
        result.layers.append({"node": node.name, "op_type": node.op_type, "tensor": name, "size": int(w.size),
                              "zeros": zeros, "sparsity": zeros / w.size})
    total = sum(r["size"] for r in result.layers)
    zeros = sum(r["zeros"] for r in result.layers)
    result.stats = {"weights": total, "zeros": zeros, "sparsity": zeros / total if total else 0.0,
                    "bytes_before": model_bytes(model), "bytes_after": model_bytes(out),
                    "gzip_before": gzip_size(model), "gzip_after": gzip_size(out)}
    result.notes.append(SPEED_NOTE)
    return result
