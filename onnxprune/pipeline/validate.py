"""Post-conditions of every rewrite: full onnx.checker, strict shape inference, onnxruntime load and run with
the original's output names and shapes."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import onnx

from onnxprune.errors import OnnxPruneError, ValidationError, require_onnxruntime
from onnxprune.io.model_io import save_model, weightless
from onnxprune.report import progress
from onnxprune.io.weights import is_external, is_lazy, nbytes, session_source, tensor_array


def sample_feed(model: onnx.ModelProto, seed: int = 0, batch: int = 1,
                input_shapes: dict[str, tuple[int, ...]] | None = None) -> dict[str, np.ndarray]:
    """One random input per graph input; dynamic dims (symbolic, missing, 0 or -1) become `batch` (first) or 1,
    unless `input_shapes` gives them (see onnxprune.runtime.feeds)."""
    from onnxprune.runtime.feeds import graph_inputs, random_feed, resolve_shapes

    shapes, _ = resolve_shapes(model, input_shapes)
    if batch != 1:
        for inp in graph_inputs(model):
            if inp.dims and inp.dims[0] is None and inp.name not in (input_shapes or {}):
                shapes[inp.name] = (batch,) + shapes[inp.name][1:]
    return random_feed(model, shapes, seed)


def session(model: onnx.ModelProto, providers=("CPUExecutionProvider",), threads: int | None = None,
            extended_only: bool = False, prepack: bool = True):
    """An onnxruntime session; `extended_only` leaves out the layout optimisations of ORT_ENABLE_ALL, which
    crash onnxruntime 1.32's CPU provider on some float16 graphs (a converted ViT): checks use it."""
    ort = require_onnxruntime()
    opts = ort.SessionOptions()
    opts.log_severity_level = 4  # errors reach the caller as exceptions, reported in one line
    # onnxprune's sessions alternate with numpy's linear algebra and with each other (the pruned and the
    # original model, batch by batch): threads left spinning after a run take the cores those need. Off, a
    # data-aware prune of MiniLM took 105 s instead of 162 s (docs/BENCHMARKS.md, "scale engine").
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not prepack:  # a session run once: a packed copy of every MatMul weight would only add its size to RSS
        opts.add_session_config_entry("session.disable_prepacking", "1")
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
    return session(model, extended_only=_half(model), prepack=False).run(None, feed)


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
    check_as_original(candidate, original, stage)
    if [(o.name) for o in candidate.graph.output] != [o.name for o in original.graph.output]:
        raise ValidationError(f"{stage}: output names changed")
    from onnxprune.graph.kvcache import interface_changes, sample_cache

    changed = {c["name"] for c in interface_changes(original, candidate)}  # key/value cache that followed heads
    if feed is None:  # a decoder's key/value cache starts empty, in each model's own shape
        feed = sample_cache(original, sample_feed(original))
    candidate_feed = sample_cache(candidate, feed) if changed else feed
    try:
        with progress(f"{stage}: checking the rewritten model in onnxruntime", None):
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
        except Exception as exc:  # noqa: BLE001 - the original fails this level too: try the next
            original_error = _first_line(exc)
            continue
        raise ValidationError(f"{stage}: the rewritten model fails {name}: {error}") from None
    # both fail even the structural check: acceptable only where onnx lacks the schemas onnxruntime has
    # (ops or domains it does not know), never for a defect of the graph itself that a rewrite could carry on
    if not any(mark in original_error for mark in _SCHEMA_GAPS):
        raise ValidationError(f"{stage}: the rewritten model fails onnx.checker: {error}") from None


_SCHEMA_GAPS = ("No Op registered", "No opset import for domain", "opset_import", "is not a registered",
                "Unrecognized attribute")


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
