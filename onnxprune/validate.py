"""Post-conditions of every rewrite: full onnx.checker, strict shape inference, onnxruntime load and run with
the original's output names and shapes."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import onnx

from onnxprune.errors import OnnxPruneError, ValidationError, require_onnxruntime
from onnxprune.model_io import weightless

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
    if _weight_bytes(model) < _INLINE_LIMIT:
        return ort.InferenceSession(model.SerializeToString(), sess_options=opts, providers=list(providers))
    # past protobuf's 2 GB limit the model has to go through a file with external data
    with tempfile.TemporaryDirectory(prefix="onnxprune-") as tmp:
        path = os.path.join(tmp, "model.onnx")
        onnx.save_model(model, path, save_as_external_data=True, location="model.onnx.data", size_threshold=1024)
        try:
            return ort.InferenceSession(path, sess_options=opts, providers=list(providers))
        finally:
            # save_model moved the tensors out of `model`; bring them back so the caller's model is unchanged
            from onnx.external_data_helper import load_external_data_for_model

            load_external_data_for_model(model, tmp)


_INLINE_LIMIT = 2**31 - 256 * 2**20


def _weight_bytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) or 4 * len(t.float_data) for t in model.graph.initializer)


def run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    return session(model).run(None, feed)


def validate(candidate: onnx.ModelProto, original: onnx.ModelProto, feed: dict[str, np.ndarray] | None = None,
             stage: str = "prune") -> None:
    """Raise ValidationError naming the failed check; returns None when every post-condition holds."""
    check_as_original(candidate, original, stage)
    if [(o.name) for o in candidate.graph.output] != [o.name for o in original.graph.output]:
        raise ValidationError(f"{stage}: output names changed")
    from onnxprune.kvcache import interface_changes, sample_cache

    changed = {c["name"] for c in interface_changes(original, candidate)}  # key/value cache that followed heads
    candidate_feed = feed
    if feed is None:  # a decoder's key/value cache starts empty, in each model's own shape
        feed = sample_cache(original, sample_feed(original))
        candidate_feed = sample_cache(candidate, feed) if changed else feed
    try:
        got = run(candidate, candidate_feed)
    except OnnxPruneError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ValidationError(f"{stage}: onnxruntime cannot run the rewritten model: {_first_line(exc)}") from None
    # The original's declared output shapes settle the comparison when they are static apart from the dims
    # the sample feed sets; only otherwise is the original run too.
    want = declared_output_shapes(original, feed)
    if want is None:
        want = [np.shape(w) for w in run(original, feed)]
    if changed:
        now = declared_output_shapes(candidate, candidate_feed) or [np.shape(g) for g in got]
        want = [n if o.name in changed else w for o, n, w in zip(original.graph.output, now, want)]
    for o, g, w in zip(original.graph.output, got, want):
        if np.shape(g) != tuple(w):
            raise ValidationError(f"{stage}: output {o.name} has shape {np.shape(g)}, expected {tuple(w)}")


def check_as_original(candidate: onnx.ModelProto, original: onnx.ModelProto, stage: str = "prune") -> None:
    """onnx.checker, never stricter than what the original passes.

    The full check (strict shape inference included) runs on weightless copies (large initializers become typed
    inputs of the same shape: milliseconds on a 100 MB model, and past 2 GB). A model with onnxruntime's contrib
    ops (com.microsoft, or SimplifiedLayerNormalization registered in the ONNX domain), as onnxruntime-genai
    writes them, may fail it as exported; it is then held to the structural check (nodes onnx has no schema for
    set aside), and to nothing more than onnxruntime's own loading and run if the original fails that too."""
    levels = (("onnx.checker", lambda m: onnx.checker.check_model(weightless(m), full_check=True)),
              ("onnx.checker (structure; contrib ops as onnxruntime defines them)",
               lambda m: onnx.checker.check_model(_contrib_aside(weightless(m)))))
    for name, check in levels:
        try:
            check(candidate)
            return
        except Exception as exc:  # noqa: BLE001 - checker raises several types
            error = _first_line(exc)
        try:
            check(original)
        except Exception:  # noqa: BLE001 - the original fails this level too: try the next
            continue
        raise ValidationError(f"{stage}: the rewritten model fails {name}: {error}") from None


def _contrib_aside(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` (a copy) with ONNX-domain nodes onnx has no schema for (onnxruntime's contrib ops there) moved to
    the com.microsoft domain, which the checker leaves to onnxruntime."""
    moved = False
    for node in model.graph.node:
        if node.domain in ("", "ai.onnx") and not onnx.defs.has(node.op_type):
            node.domain = "com.microsoft"
            moved = True
    if moved and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return model


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
