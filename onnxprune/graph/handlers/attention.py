"""Attention as one op: ONNX Attention (opset 23), com.microsoft GroupQueryAttention, RotaryEmbedding.

The ops take queries, keys and values as [batch, seq, heads·head_size] features (3-D, head counts in attributes)
or as [batch, heads, seq, head_size] (4-D, ONNX Attention only) and broadcast every key/value head over its
`heads / kv_heads` query heads internally, so they couple the query space with the key and value spaces (groups.py:
whole KV groups go, or query heads evenly inside every group, as `gqa_mode` says). Their output is the query
space (heads of the value size); the present key/value outputs and the past key/value inputs are the KV cache,
whose head axis follows the key/value heads unless `keep_kv_cache` keeps it (analysis.AnalysisContext.follow_cache).
After pruning, the head-count attributes are set to the heads kept. Head sizes never change, so neither does the
attention scale, nor the rotary caches (one row of head_size / 2 angles per position).
"""

from __future__ import annotations

import numpy as np

from onnxprune.graph.handlers import Handler, register
from onnxprune.graph.ir import attr, set_attr
from onnxprune.graph.layout import ChannelAxis, Segment


def heads_axis(features: ChannelAxis, head: int, axis: int = 1) -> ChannelAxis:
    """The layout of [.., H, ..] heads (on `axis`) made from the layout of H·head plain features."""
    segs = tuple(Segment(s.space, s.channels, offset=s.offset // head, divisor=head) for s in features.segments)
    return ChannelAxis(axis, features.length // head, segs)


def _plain(layout: ChannelAxis, head: int) -> bool:
    return all(s.inner == 1 and not (s.outers or s.modulo or s.divisor or s.fold) and s.offset % head == 0
               and s.channels % head == 0 for s in layout.segments)


def _heads(layout: ChannelAxis, head: int) -> bool:
    return all(s.divisor == head and s.inner == 1 and not (s.outers or s.modulo) for s in layout.segments)


def kept_count(ctx, seg: Segment) -> int:
    """Positions of one segment that survive the plan."""
    kept = ctx.plan.kept.get(ctx.find(seg.space))
    return seg.size if kept is None else len(np.unique(seg.positions(kept)))


def _input(node, index: int) -> str:
    return node.input[index] if index < len(node.input) else ""


class _HeadsOp(Handler):
    """Shared by the attention ops: couple q with k and v, give the outputs their layouts, follow the cache."""

    def _couple(self, node, ctx, q, k, v, q_heads: int, kv_heads: int, head: int) -> bool:
        if q_heads <= 0 or kv_heads <= 0 or q_heads % kv_heads:
            self._freeze(node, ctx, q, k, v, f"{q_heads} query heads cannot share {kv_heads} key/value heads")
            return False
        per_kv = q_heads // kv_heads
        ok = ctx.couple(node, q, k, per_kv, head)
        return ctx.couple(node, q, v, per_kv, head) and ok

    def _projected(self, node, ctx):
        """The axes of q, k and v (inputs 0-2); None when none has one, or when only some do (then frozen)."""
        q, k, v = (ctx.axis_of(_input(node, i)) for i in range(3))
        if q is None and k is None and v is None:
            return None
        if q is None or k is None or v is None:
            self._freeze(node, ctx, q, k, v, "queries, keys and values do not all come from projections")
            return None
        return q, k, v

    @staticmethod
    def _freeze(node, ctx, q, k, v, reason: str) -> None:
        for layout in (q, k, v):
            ctx.freeze(layout, f"{node.op_type} {node.name}: {reason}")

    @staticmethod
    def _cache(node, ctx, past: tuple[int, int], present: tuple[int, int], k_heads: ChannelAxis,
               v_heads: ChannelAxis) -> None:
        """Past key/value inputs and present key/value outputs ([batch, kv_heads, seq, head_size]): the cache."""
        for index, layout in zip(past, (k_heads, v_heads)):
            if _input(node, index):
                ctx.follow_cache(node, index, layout)
        for index, layout in zip(present, (k_heads, v_heads)):
            if index < len(node.output) and node.output[index]:
                ctx.set_axis(node.output[index], layout)
                ctx.mark_cache(node.output[index])

    @staticmethod
    def _per_head_input(node, ctx, index: int, q_heads_layout: ChannelAxis, rank_axis: int) -> bool:
        """An input broadcast against [batch, q_heads, seq, total] (a mask or bias): fine when it has one head;
        a constant with one entry per head is sliced with the query heads. False: frozen."""
        name = _input(node, index)
        if not name:
            return True
        rank = ctx.view.rank(name)
        if rank is None:
            ctx.freeze(q_heads_layout, f"{node.op_type} {node.name}: input {name} of unknown rank")
            return False
        axis = rank - rank_axis
        if axis < 0 or ctx.view.dim(name, axis) == 1:
            return True
        if ctx.view.is_const(name) and ctx.view.dim(name, axis) == q_heads_layout.length:
            return ctx.add_member(node, index, axis, q_heads_layout.with_axis(axis), "pass", scored=False)
        ctx.freeze(q_heads_layout, f"{node.op_type} {node.name}: input {name} differs per head")
        return False


@register("Attention")
class Attention(_HeadsOp):
    """ONNX Attention (opset 23): Q, K, V, attn_mask, past_key, past_value -> Y, present_key, present_value,
    qk_matmul_output."""

    def analyze(self, node, ctx):
        qkv = self._projected(node, ctx)
        if qkv is None:
            return
        q, k, v = qkv
        rank = ctx.view.rank(node.input[0])
        if rank == 4:
            q_heads, kv_heads = ctx.view.dim(node.input[0], 1), ctx.view.dim(node.input[1], 1)
            head, v_head = ctx.view.dim(node.input[0], 3), ctx.view.dim(node.input[2], 3)
            if q.axis != 1 or k.axis != 1 or v.axis != 1 or None in (q_heads, kv_heads, head) or \
                    not all(_heads(ax, head) for ax in (q, k, v)):
                self._freeze(node, ctx, q, k, v, "heads are not on axis 1 of [batch, heads, seq, head_size]")
                return
            q_heads_layout, k_heads, v_heads = q, k, v
            out = q
        elif rank == 3:
            q_heads, kv_heads = attr(node, "q_num_heads", 0), attr(node, "kv_num_heads", 0)
            width = ctx.view.dim(node.input[0], 2)
            head = width // q_heads if width and q_heads else None
            v_head = (ctx.view.dim(node.input[2], 2) or 0) // kv_heads if kv_heads else None
            if head is None or q.axis != 2 or k.axis != 2 or v.axis != 2 or \
                    not all(_plain(ax, head) for ax in (q, k, v)):
                self._freeze(node, ctx, q, k, v, "features are not [batch, seq, heads·head_size]")
                return
            q_heads_layout, k_heads, v_heads = heads_axis(q, head), heads_axis(k, head), heads_axis(v, head)
            out = q
        else:
            self._freeze(node, ctx, q, k, v, f"inputs of rank {rank}")
            return
        if v_head != head:
            self._freeze(node, ctx, q, k, v, f"value heads of {v_head} features, key heads of {head}")
            return
        if not self._per_head_input(node, ctx, 3, q_heads_layout, 3):
            return
        if not self._couple(node, ctx, q, k, v, q_heads, kv_heads, head):
            return
        ctx.set_axis(node.output[0], out)
        self._cache(node, ctx, (4, 5), (1, 2), k_heads, v_heads)
        if len(node.output) > 3 and node.output[3]:
            ctx.set_axis(node.output[3], q_heads_layout)

    def rewrite(self, node, ctx):
        q, k = ctx.axis_of(node.input[0]), ctx.axis_of(node.input[1])
        if q is None or k is None:
            return
        if ctx.view.rank(node.input[0]) == 4:
            q_heads, kv_heads = ctx.new_length(node.input[0]), ctx.new_length(node.input[1])
        else:
            head = ctx.view.dim(node.input[0], 2) // attr(node, "q_num_heads")
            q_heads, kv_heads = ctx.new_length(node.input[0]) // head, ctx.new_length(node.input[1]) // head
        for name, value in (("q_num_heads", q_heads), ("kv_num_heads", kv_heads)):
            if attr(node, name) is not None:
                set_attr(node, name, int(value))


@register("GroupQueryAttention", domain="com.microsoft")
class GroupQueryAttention(_HeadsOp):
    """com.microsoft GroupQueryAttention: query (or packed q|k|v when key and value are empty), key, value,
    past_key, past_value, seqlens_k, total_sequence_length, cos_cache, sin_cache, position_ids, attention_bias,
    head_sink -> output, present_key, present_value."""

    def analyze(self, node, ctx):
        q_heads, kv_heads = attr(node, "num_heads", 0), attr(node, "kv_num_heads", 0)
        packed = not _input(node, 1)
        x = ctx.axis_of(node.input[0])
        width = ctx.view.dim(node.input[0], 2)
        total_heads = q_heads + 2 * kv_heads if packed else q_heads
        head = width // total_heads if width and total_heads and width % total_heads == 0 else None
        if packed:
            if x is None:
                return
            parts = self._parts(x, head, q_heads, kv_heads)
            if parts is None:
                ctx.freeze(x, f"GroupQueryAttention {node.name}: packed q|k|v features are not split into their "
                              "query, key and value projections")
                return
            q, k, v = parts
        else:
            qkv = self._projected(node, ctx)
            if qkv is None:
                return
            q, k, v = qkv
        if head is None or not all(ax.axis == 2 and _plain(ax, head) for ax in (q, k, v)):
            self._freeze(node, ctx, q, k, v, "features are not [batch, seq, heads·head_size]")
            return
        q_heads_layout = heads_axis(q, head)
        if not self._per_head_input(node, ctx, 10, q_heads_layout, 3):
            return
        if _input(node, 11):  # head_sink: one value per query head
            if not ctx.view.is_const(node.input[11]) or not ctx.add_member(node, 11, 0, q_heads_layout.with_axis(0),
                                                                           "pass", scored=False):
                ctx.freeze(q, f"GroupQueryAttention {node.name}: head_sink is not a constant per head")
                return
        if not self._couple(node, ctx, q, k, v, q_heads, kv_heads, head):
            return
        ctx.set_axis(node.output[0], q)
        self._cache(node, ctx, (3, 4), (1, 2), heads_axis(k, head), heads_axis(v, head))

    @staticmethod
    def _parts(x: ChannelAxis, head, q_heads: int, kv_heads: int):
        """The query, key and value layouts of packed q|k|v features (three segments at their offsets)."""
        if head is None or len(x.segments) != 3:
            return None
        sizes = (q_heads * head, kv_heads * head, kv_heads * head)
        segs = sorted(x.segments, key=lambda s: s.offset)
        starts = (0, sizes[0], sizes[0] + sizes[1])
        if any(s.offset != o or s.size != n for s, o, n in zip(segs, starts, sizes)):
            return None
        return tuple(ChannelAxis(x.axis, n, (s.shifted(-o),)) for s, o, n in zip(segs, starts, sizes))

    def rewrite(self, node, ctx):
        x = ctx.axis_of(node.input[0])
        if x is None:
            return
        q_heads, kv_heads = attr(node, "num_heads"), attr(node, "kv_num_heads")
        packed = not _input(node, 1)
        head = ctx.view.dim(node.input[0], 2) // (q_heads + 2 * kv_heads if packed else q_heads)
        if packed:
            segs = sorted(x.segments, key=lambda s: s.offset)
            new_q, new_kv = kept_count(ctx, segs[0]), kept_count(ctx, segs[1])
        else:
            new_q, new_kv = ctx.new_length(node.input[0]), ctx.new_length(node.input[1])
        set_attr(node, "num_heads", int(new_q // head))
        set_attr(node, "kv_num_heads", int(new_kv // head))


@register("RotaryEmbedding")
@register("RotaryEmbedding", domain="com.microsoft")
class RotaryEmbedding(Handler):
    """Rotates every head's features by its position: heads pass whole. 3-D input [batch, seq, heads·head_size]
    (the head size from num_heads or from the caches: rotary_embedding_dim, else 2 × the cache width), 4-D input
    [batch, heads, seq, head_size]."""

    def analyze(self, node, ctx):
        x = ctx.axis_of(node.input[0])
        if x is None:
            return
        rank = ctx.view.rank(node.input[0])
        if rank == 4 and x.axis == 1:
            ctx.set_axis(node.output[0], x)
            return
        head = self._head(node, ctx)
        if rank != 3 or x.axis != 2 or head is None or not _plain(x, head):
            ctx.freeze(x, f"{node.op_type} {node.name}: channels are not whole heads of [batch, seq, heads·head_size]")
            return
        for seg in x.segments:
            ctx.spaces.constrain_unit(seg.space, head)
        ctx.set_axis(node.output[0], x)

    @staticmethod
    def _head(node, ctx) -> int | None:
        width, heads = ctx.view.dim(node.input[0], 2), attr(node, "num_heads", 0)
        if width and heads and width % heads == 0:
            return width // heads
        # ONNX puts the caches at inputs 1, 2; com.microsoft at 2, 3 (after position_ids)
        cache = node.input[2] if node.domain == "com.microsoft" else _input(node, 1)
        half = ctx.view.dim(cache, -1) if cache else None
        rotary = attr(node, "rotary_embedding_dim", 0) or (2 * half if half else 0)
        return rotary or None

    def rewrite(self, node, ctx):
        x = ctx.axis_of(node.input[0])
        if x is None or not attr(node, "num_heads", 0):
            return
        if ctx.view.rank(node.input[0]) == 4:
            set_attr(node, "num_heads", int(ctx.new_length(node.input[0])))
            return
        head = ctx.view.dim(node.input[0], 2) // attr(node, "num_heads")
        set_attr(node, "num_heads", int(ctx.new_length(node.input[0]) // head))
