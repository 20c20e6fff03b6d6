"""Post-conditions of every rewrite: full onnx.checker, strict shape inference, onnxruntime load and run with
the original's output names and shapes."""

from __future__ import annotations

import numpy as np
import onnx

from onnxprune.errors import ValidationError, first_line
from onnxprune.graph.kvcache import interface_changes, sample_cache
from onnxprune.io.model_io import weightless
from onnxprune.report import progress
from onnxprune.runtime.feeds import declared_output_shapes, sample_feed
from onnxprune.runtime.session import SessionError, run


def validate(candidate: onnx.ModelProto, original: onnx.ModelProto, feed: dict[str, np.ndarray] | None = None,
             stage: str = "prune") -> None:
    """Raise ValidationError naming the failed check; returns None when every post-condition holds."""
    check_as_original(candidate, original, stage)
    if [(o.name) for o in candidate.graph.output] != [o.name for o in original.graph.output]:
        raise ValidationError(f"{stage}: output names changed")
    changed = {c["name"] for c in interface_changes(original, candidate)}  # key/value cache that followed heads
    if feed is None:  # a decoder's key/value cache starts empty, in each model's own shape
        feed = sample_cache(original, sample_feed(original))
    candidate_feed = sample_cache(candidate, feed) if changed else feed
    try:
        with progress(f"{stage}: checking the rewritten model in onnxruntime", None):
            got = run(candidate, candidate_feed)
    except SessionError as exc:  # a model onnxruntime cannot load is a failed check like any other
        raise ValidationError(f"{stage}: onnxruntime cannot run the rewritten model: {exc.detail}") from None
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
            error = first_line(exc)
        try:
            check(original)
        except Exception as exc:  # noqa: BLE001 - the original fails this level too: try the next
            original_error = first_line(exc)
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
