"""Key/value cache inputs and outputs of decoders: past_key_values.N.key/value in, present.N.key/value out.

Hugging Face optimum and onnxruntime-genai export decoders with their cache as graph inputs and outputs shaped
[batch, kv_heads, sequence, head_size]. They are state, not user data: when key/value heads are pruned their
head axis follows (analysis.AnalysisContext.follow_cache records which), the one change of a model's interface
onnxprune makes; `keep_kv_cache` keeps them instead. Here: the rewrite of their declared shapes, the list of
interface changes for reports, and feeds that give a cache model an empty past (validation, calibration,
perplexity), so data never has to hold cache arrays.
"""

from __future__ import annotations

import re

import numpy as np
import onnx

from onnxprune.graph.ir import attr, infer_shapes

_PAST = re.compile(r"past", re.IGNORECASE)
_NP = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16, onnx.TensorProto.DOUBLE: np.float64,
       onnx.TensorProto.BFLOAT16: np.float32}


def update_interface(model: onnx.ModelProto, ctx) -> None:
    """Set the declared head axis of every cache input and output that follows pruned heads (in place)."""
    cache = ctx.analysis.context.cache
    if not cache:
        return
    for value in list(model.graph.input) + list(model.graph.output):
        layout = ctx.axis_of(value.name)
        if value.name not in cache or layout is None:
            continue
        dims = value.type.tensor_type.shape.dim
        if layout.axis < len(dims) and dims[layout.axis].HasField("dim_value"):
            dims[layout.axis].dim_value = ctx.new_length(value.name)


def _declared(values) -> dict[str, list]:
    return {v.name: [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                     for d in v.type.tensor_type.shape.dim] for v in values}


def interface_changes(before: onnx.ModelProto, after: onnx.ModelProto) -> list[dict]:
    """Every graph input and output whose declared shape differs between the models: name, kind, old, new."""
    changes = []
    for kind, a, b in (("input", before.graph.input, after.graph.input),
                       ("output", before.graph.output, after.graph.output)):
        old, new = _declared(a), _declared(b)
        inits = {t.name for t in before.graph.initializer}
        for name, shape in old.items():
            if name in new and name not in inits and new[name] != shape:
                changes.append({"name": name, "kind": kind, "before": shape, "after": new[name]})
    return changes


def cache_inputs(model: onnx.ModelProto) -> list[str]:
    """Graph inputs that are a key/value cache: named past..., rank 4 ([batch, heads, past, head_size])."""
    inits = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits and _PAST.search(i.name)
            and len(i.type.tensor_type.shape.dim) == 4]


def _width(model: onnx.ModelProto, name: str, shapes: dict) -> int | None:
    """The last dim of tensor `name`: inferred, or that of the weight of the MatMul/Gemm that makes it (shape
    inference stops at the first contrib op)."""
    shape = shapes.get(name)
    if shape and shape[-1]:
        return shape[-1]
    producer = next((n for n in model.graph.node if name in n.output), None)
    weights = {t.name: t for t in model.graph.initializer}
    if producer is not None and producer.op_type in ("MatMul", "Gemm") and producer.input[1] in weights:
        dims = weights[producer.input[1]].dims
        return dims[0] if producer.op_type == "Gemm" and attr(producer, "transB", 0) else dims[-1]
    return None


def _head_size(model: onnx.ModelProto, name: str, shapes: dict) -> int | None:
    """head_size of cache input `name` when its declaration leaves it symbolic: from the op reading it."""
    for node in model.graph.node:
        if name not in node.input:
            continue
        width = _width(model, node.input[0], shapes) if node.input else None
        if node.op_type == "GroupQueryAttention" and width:
            heads = attr(node, "num_heads", 0) + (2 * attr(node, "kv_num_heads", 0)
                                                  if len(node.input) < 2 or not node.input[1] else 0)
            return width // heads if heads else None
        if node.op_type == "Attention" and node.domain in ("", "ai.onnx"):
            q = shapes.get(node.input[0])
            if q is not None and len(q) == 4:
                return q[3]
            return width // attr(node, "q_num_heads") if width and attr(node, "q_num_heads") else None
        if node.op_type == "Concat":
            for other in node.input:
                shape = shapes.get(other)
                if other != name and shape and len(shape) == 4 and shape[3]:
                    return shape[3]
    return None


def empty_cache(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`feed` with every cache input an empty past ([batch, kv_heads, 0, head_size]); the batch is that of the
    feed's other inputs. Feeds without cache inputs come back unchanged."""
    names = cache_inputs(model)
    if not names:
        return feed
    batch = next((np.shape(v)[0] for k, v in feed.items() if k not in names and np.ndim(v)), 1)
    values = {i.name: i for i in model.graph.input}
    shapes = None
    out = dict(feed)
    for name in names:
        t = values[name].type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        if dims[3] is None:
            if shapes is None:
                shapes = infer_shapes(model)
            dims[3] = _head_size(model, name, shapes)
        if dims[3] is None and name in feed and np.ndim(feed[name]) == 4:
            dims[3] = np.shape(feed[name])[3]  # the head size never changes: the feed's
        if dims[1] is None or dims[3] is None:
            continue  # unknown: left to the caller's data
        out[name] = np.zeros((batch, dims[1], 0, dims[3]), dtype=_NP.get(t.elem_type, np.float32))
    return out


def sample_cache(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A validation feed for a cache model: empty past, and attention masks of ones (a mask of zeros gives
    onnxruntime's GroupQueryAttention a sequence length of -1)."""
    if not cache_inputs(model):
        return feed
    out = empty_cache(model, feed)
    for name, value in out.items():
        if "mask" in name.lower() and np.asarray(value).dtype.kind in "iub":
            out[name] = np.ones_like(value)
    return out


def kept_heads(result, name: str) -> tuple[int, np.ndarray] | None:
    """(axis, kept positions) of cache input or output `name` in a prune result, or None if it did not change."""
    context = result.analysis.context
    layout = context.axes.get(name)
    if name not in context.cache or layout is None:
        return None
    kept = layout.kept_positions(result.plan.kept, result.analysis.find)
    return None if len(kept) == layout.length else (layout.axis, kept)


def follow(result, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Cache arrays of the original model (a past feed, present outputs) as the pruned model holds them: the
    pruned key/value heads dropped. Other arrays pass unchanged."""
    out = dict(values)
    for name, value in values.items():
        cut = kept_heads(result, name)
        if cut is not None:
            out[name] = np.take(value, cut[1], axis=cut[0])
    return out


def feed_adapter(session):
    """A function that gives a feed's empty past key/value inputs the shapes `session`'s model declares.

    Data read for one model starts its cache empty in that model's shape; a pruned model (fewer key/value heads)
    takes the same data, so its empty past is reshaped on the way in. A non-empty past is left alone. The past of
    a layer the model no longer has (depth pruning dropped it) is left out."""
    wanted = {}
    if not hasattr(session, "get_inputs"):  # onnx's reference evaluator (validate._ReferenceSession)
        return lambda feed: feed
    names = {arg.name for arg in session.get_inputs()}
    for arg in session.get_inputs():
        if _PAST.search(arg.name) and len(arg.shape) == 4:
            wanted[arg.name] = [d if isinstance(d, int) else None for d in arg.shape]
    if not wanted:
        return lambda feed: feed

    def adapt(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = None
        gone = [k for k in feed if k not in names and _PAST.search(k) and np.ndim(feed[k]) == 4]
        if gone:
            out = {k: v for k, v in feed.items() if k not in gone}
        for name, want in wanted.items():
            value = feed.get(name)
            if value is None or np.ndim(value) != 4 or np.shape(value)[2] != 0:
                continue
            shape = tuple(h if w is None else w for w, h in zip(want, np.shape(value)))
            if shape != np.shape(value):
                out = dict(feed) if out is None else out
                out[name] = np.zeros(shape, np.asarray(value).dtype)
        return feed if out is None else out

    return adapt
