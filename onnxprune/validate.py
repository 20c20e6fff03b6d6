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
from onnxprune.weights import is_external, is_lazy, nbytes, session_source, tensor_array


def sample_feed(model: onnx.ModelProto, seed: int = 0, batch: int = 1,
                input_shapes: dict[str, tuple[int, ...]] | None = None) -> dict[str, np.ndarray]:
    """One random input per graph input; dynamic dims (symbolic, missing, 0 or -1) become `batch` (first) or 1,
    unless `input_shapes` gives them (see onnxprune.feeds)."""
    from onnxprune.feeds import graph_inputs, random_feed, resolve_shapes

    shapes, _ = resolve_shapes(model, input_shapes)
    if batch != 1:
        for inp in graph_inputs(model):
            if inp.dims and inp.dims[0] is None and inp.name not in (input_shapes or {}):
                shapes[inp.name] = (batch,) + shapes[inp.name][1:]
    return random_feed(model, shapes, seed)


def session(model: onnx.ModelProto, providers=("CPUExecutionProvider",), threads: int | None = None,
            extended_only: bool = False):
    """An onnxruntime session; `extended_only` leaves out the layout optimisations of ORT_ENABLE_ALL, which
    crash onnxruntime 1.32's CPU provider on some float16 graphs (a converted ViT): checks use it."""
    ort = require_onnxruntime()
    opts = ort.SessionOptions()
    opts.log_severity_level = 4  # errors reach the caller as exceptions, reported in one line
    if threads:
        opts.intra_op_num_threads = threads
    if extended_only:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    if is_lazy(model) or _weight_bytes(model) < _INLINE_LIMIT:
        # external weights are memory-mapped by onnxruntime from their files (weights.session_source)
        try:
            return ort.InferenceSession(session_source(model, opts), sess_options=opts, providers=list(providers))
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
            if "NOT_IMPLEMENTED" not in str(exc):
                raise
            return _ReferenceSession(model)
    # past protobuf's 2 GB limit an in-memory model has to go through a file with external data
    with tempfile.TemporaryDirectory(prefix="onnxprune-") as tmp:
        path = os.path.join(tmp, "model.onnx")
        save_model(model, path, external_data=True)
        return ort.InferenceSession(path, sess_options=opts, providers=list(providers))


_INLINE_LIMIT = 2**31 - 256 * 2**20


def _weight_bytes(model: onnx.ModelProto) -> int:
    return sum(nbytes(t) for t in model.graph.initializer)


def run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    return session(model, extended_only=_half(model)).run(None, feed)


class _ReferenceSession:
    """onnx's reference evaluator behind the two calls onnxprune makes of a session: for models whose types
    onnxruntime's CPU provider has no kernel for (bfloat16 anything, float64 Conv). Slow, but exact."""

    def __init__(self, model: onnx.ModelProto):
        from onnx.reference import ReferenceEvaluator

        if is_lazy(model):  # the evaluator reads weights from the protobuf: give it a copy with them inline
            inline = onnx.ModelProto()
            inline.CopyFrom(model)
            for t in inline.graph.initializer:
                if is_external(t):
                    t.CopyFrom(onnx.numpy_helper.from_array(np.asarray(tensor_array(t)), t.name))
            model = inline
        self._evaluator = ReferenceEvaluator(model)
        self._model = model

    def run(self, names, feed):
        return self._evaluator.run(list(names) if names else None, feed)

    def get_outputs(self):
        return self._model.graph.output


def _half(model: onnx.ModelProto) -> bool:
    """Whether the model computes in float16 or bfloat16 (weights or inputs/outputs)."""
    half = (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
    return any(t.data_type in half for t in model.graph.initializer) or any(
        v.type.tensor_type.elem_type in half for v in list(model.graph.input) + list(model.graph.output))


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
            if d.HasField("dim_value") and d.dim_value > 0:
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
