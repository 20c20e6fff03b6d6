"""Post-conditions of every rewrite: full onnx.checker, strict shape inference, onnxruntime load and run with
the original's output names and shapes."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import onnx

from onnxprune.errors import OnnxPruneError, ValidationError, require_onnxruntime
from onnxprune.model_io import save_model, weightless
from onnxprune.report import progress
from onnxprune.weights import is_lazy, nbytes, session_source

_NP = {
    onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16, onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.INT64: np.int64, onnx.TensorProto.INT32: np.int32, onnx.TensorProto.BOOL: np.bool_,
    onnx.TensorProto.UINT8: np.uint8, onnx.TensorProto.INT8: np.int8,
}


def sample_feed(model: onnx.ModelProto, seed: int = 0, batch: int = 1) -> dict[str, np.ndarray]:
    """One random input per graph input; dynamic dims become `batch` (first) or 1."""
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    feed = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        t = inp.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else (batch if i == 0 else 1)
                 for i, d in enumerate(t.shape.dim)]
        dtype = _NP.get(t.elem_type)
        if dtype is None:
            raise ValidationError(f"input {inp.name!r} has a type onnxprune cannot generate data for")
        if np.issubdtype(dtype, np.floating):
            feed[inp.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            feed[inp.name] = rng.random(shape) > 0.5
        else:
            feed[inp.name] = rng.integers(0, 2, size=shape).astype(dtype)
    return feed


def session(model: onnx.ModelProto, providers=("CPUExecutionProvider",), threads: int | None = None):
    ort = require_onnxruntime()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    if is_lazy(model) or _weight_bytes(model) < _INLINE_LIMIT:
        # external weights are memory-mapped by onnxruntime from their files (weights.session_source)
        return ort.InferenceSession(session_source(model, opts), sess_options=opts, providers=list(providers))
    # past protobuf's 2 GB limit an in-memory model has to go through a file with external data
    with tempfile.TemporaryDirectory(prefix="onnxprune-") as tmp:
        path = os.path.join(tmp, "model.onnx")
        save_model(model, path, external_data=True)
        return ort.InferenceSession(path, sess_options=opts, providers=list(providers))


_INLINE_LIMIT = 2**31 - 256 * 2**20


def _weight_bytes(model: onnx.ModelProto) -> int:
    return sum(nbytes(t) for t in model.graph.initializer)


def run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    return session(model).run(None, feed)


def validate(candidate: onnx.ModelProto, original: onnx.ModelProto, feed: dict[str, np.ndarray] | None = None,
             stage: str = "prune") -> None:
    """Raise ValidationError naming the failed check; returns None when every post-condition holds."""
    try:
        # full_check includes strict shape inference. It runs on a weightless copy (large initializers become
        # typed inputs of the same shape) so it costs milliseconds on a 100 MB model and works past 2 GB; the
        # weights themselves are exercised by the onnxruntime run below.
        onnx.checker.check_model(weightless(candidate), full_check=True)
    except Exception as exc:  # noqa: BLE001 - checker raises several types
        raise ValidationError(f"{stage}: the rewritten model fails onnx.checker: {_first_line(exc)}") from None
    if [(o.name) for o in candidate.graph.output] != [o.name for o in original.graph.output]:
        raise ValidationError(f"{stage}: output names changed")
    feed = feed if feed is not None else sample_feed(original)
    try:
        with progress(f"{stage}: checking the rewritten model in onnxruntime", None):
            got = run(candidate, feed)
    except OnnxPruneError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ValidationError(f"{stage}: onnxruntime cannot run the rewritten model: {_first_line(exc)}") from None
    # The original's declared output shapes settle the comparison when they are static apart from the dims
    # the sample feed sets; only otherwise is the original run too.
    want = declared_output_shapes(original, feed)
    if want is None:
        want = [np.shape(w) for w in run(original, feed)]
    for o, g, w in zip(original.graph.output, got, want):
        if np.shape(g) != tuple(w):
            raise ValidationError(f"{stage}: output {o.name} has shape {np.shape(g)}, expected {tuple(w)}")


def declared_output_shapes(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[tuple] | None:
    """Output shapes from the model's declarations, with symbolic dims bound by the feed; None if unknowable."""
    bound: dict[str, int] = {}
    for inp in model.graph.input:
        if inp.name not in feed:
            continue
        for d, n in zip(inp.type.tensor_type.shape.dim, np.shape(feed[inp.name])):
            if d.dim_param:
                bound[d.dim_param] = n
    shapes = []
    for out in model.graph.output:
        t = out.type.tensor_type
        if not t.HasField("shape"):
            return None
        dims = []
        for d in t.shape.dim:
            if d.HasField("dim_value"):
                dims.append(d.dim_value)
            elif d.dim_param in bound:
                dims.append(bound[d.dim_param])
            else:
                return None
        shapes.append(tuple(dims))
    return shapes


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
