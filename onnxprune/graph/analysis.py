"""Walk the graph once, in topological order, and build the channel groups."""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, replace

import onnx

from onnxprune.graph.faults import Fault, describe
from onnxprune.graph.groups import ChannelGroup, HeadRepeat, Member, Repeat, SpaceSet
from onnxprune.graph.handlers import get_handler
from onnxprune.graph.ir import GraphView
from onnxprune.graph.layout import ChannelAxis, Segment

# onnxruntime's transformer optimizer (onnxruntime.transformers.optimizer) fuses these; their packed weights and
# head counts are attributes onnxprune does not rewrite
FUSED_TRANSFORMER_OPS = frozenset({
    "Attention", "MultiHeadAttention", "PackedAttention", "GroupQueryAttention", "DecoderAttention",
    "SkipLayerNormalization", "SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization",
    "EmbedLayerNormalization", "FastGelu", "BiasGelu", "Gelu", "QuickGelu", "BiasAdd", "BiasSplitGelu",
    "RotaryEmbedding", "GemmFastGelu"})


# How grouped-query attention prunes: "kv-groups" removes whole key/value groups (their query heads with them),
# "query-heads" keeps every k/v head and removes query heads evenly inside every group, "auto" picks per
# attention: whole groups when they can meet the share of heads to remove, else query heads (see gqa_mode_for).
# (the modes are declared in onnxprune/choices.py, GQA_MODES)


def gqa_mode_for(mode: str, kv_heads: int, head_share: float | None) -> str:
    """The mode an attention with `kv_heads` key/value heads prunes by. "auto" takes whole KV groups unless
    they cannot meet `head_share` (the share of heads to remove; None: unknown): a single KV head (multi-query
    attention) or fewer groups than 1 / head_share (3 groups at 20 % round down to none) prune query heads
    evenly inside the groups instead."""
    if mode != "auto":
        return mode
    if kv_heads <= 1:
        return "query-heads"
    if head_share and math.floor(kv_heads * head_share + 1e-9) < 1:
        return "query-heads"
    return "kv-groups"


class AnalysisContext:
    """What handlers read and write while the graph is walked."""

    def __init__(self, view: GraphView, prune_hidden: bool = False, gqa_mode: str = "kv-groups",
                 keep_kv_cache: bool = False, head_share: float | None = None):
        self.view = view
        self.prune_hidden = prune_hidden  # LayerNorm passes channels (approximate: its statistics change)
        self.gqa_mode = gqa_mode  # how grouped-query heads prune (see groups.py)
        self.head_share = head_share  # the share of heads a run removes, for gqa_mode "auto"
        self.keep_kv_cache = keep_kv_cache  # key/value cache inputs and outputs keep their shapes
        self.repeats: dict[str, Repeat] = {}  # Expand outputs that repeat an axis
        self.head_repeats: dict[str, HeadRepeat] = {}  # by Expand node
        self.cache: set[str] = set()  # graph inputs and outputs that are key/value cache following the heads
        self.approximate: set[int] = set()  # spaces whose pruning changes such statistics
        self._weight_uses: dict[tuple[str, int, str], list[Member]] = {}  # scored weights by (tensor, axis, role)
        self.spaces = SpaceSet()
        self.axes: dict[str, ChannelAxis] = {}
        self.members: list[Member] = []
        self.faults: list = []  # graph.faults.Fault: handler exceptions met while analysing, contained

    # -- reading ------------------------------------------------------------------------------
    def axis_of(self, name: str) -> ChannelAxis | None:
        return self.axes.get(name) if name else None

    # -- writing ------------------------------------------------------------------------------
    def set_axis(self, name: str, axis: ChannelAxis | None) -> None:
        if name and axis is not None:
            self.axes[name] = axis

    def open_space(self, node: onnx.NodeProto, axis: int, size: int) -> ChannelAxis:
        """A new space of `size` channels on `axis` of the node's first output."""
        space = self.spaces.new(size, node.name, node.op_type)
        return ChannelAxis(axis, size, (Segment(space, size),))

    def open_spaces(self, node: onnx.NodeProto, axis: int, sizes: list[int]) -> ChannelAxis:
        """Side-by-side spaces on one axis: a fused projection (GPT-2's c_attn: q, k, v in one weight) whose
        output is split again; each part prunes on its own."""
        if len(sizes) == 1:
            return self.open_space(node, axis, sizes[0])
        segs, offset = [], 0
        for size in sizes:
            segs.append(Segment(self.spaces.new(size, node.name, node.op_type), size, offset=offset))
            offset += size
        return ChannelAxis(axis, offset, tuple(segs))

    def frozen_axis(self, node: onnx.NodeProto, axis: int, length: int, reason: str) -> ChannelAxis:
        """A stretch of an axis whose channels cannot be pruned (a constant or a graph input in a Concat)."""
        space = self.spaces.new(length, node.name, node.op_type, reason)
        return ChannelAxis(axis, length, (Segment(space, length),))

    def add_member(self, node: onnx.NodeProto, input_index: int, axis: int, layout: ChannelAxis,
                   role: str, scored: bool = True) -> bool:
        """Record that constant input `input_index` of `node` is sliced along `axis` with `layout`.

        Returns False (and freezes the layout) when the input is not a constant or its length does not match.
        """
        name = node.input[input_index] if input_index < len(node.input) else ""
        arr = self.view.array(name) if name else None
        if arr is None:
            self.freeze(layout, f"{node.op_type} {node.name}: input {input_index} is not a constant")
            return False
        if arr.ndim <= axis or arr.shape[axis] != layout.length:
            self.freeze(layout, f"{node.op_type} {node.name}: constant {name} has shape {arr.shape}, "
                                f"expected {layout.length} on axis {axis}")
            return False
        member = Member(node.name, node.op_type, input_index, name, axis, layout, role, scored)
        if scored and role in ("in", "out"):
            # a weight shared by layers (ALBERT's repeated layer, tied projections): the layers lose the same
            # channels, so the weight stays one tensor instead of being copied per layer
            uses = self._weight_uses.setdefault((name, axis, role), [])
            for other in uses:
                if other.node != node.name:
                    self.union(other.layout, layout)
            uses.append(member)
        self.members.append(member)
        return True

    def freeze(self, layout: ChannelAxis | None, reason: str) -> None:
        if layout is None:
            return
        for seg in layout.segments:
            self.spaces.freeze(seg.space, reason)

    def freeze_inputs(self, node: onnx.NodeProto, reason: str) -> None:
        for name in node.input:
            self.freeze(self.axis_of(name), f"{node.op_type} {node.name}: {reason}")

    def fault(self, node: onnx.NodeProto, stage: str, error: BaseException) -> None:
        """A handler raised on `node`: freeze every channel that reaches or leaves it, with the error as reason."""
        fault = Fault(stage, node.name, node.op_type, describe(error))
        self.faults.append(fault)
        for name in list(node.input) + list(node.output):
            self.freeze(self.axis_of(name), fault.reason)
        for member in self.members:
            if member.node == node.name:
                self.freeze(member.layout, fault.reason)

    def couple(self, node: onnx.NodeProto, queries: ChannelAxis, kv: ChannelAxis, per_kv: int, head_dim: int) -> bool:
        """Query heads (layout `queries`) read key/value heads (`kv`), `per_kv` query heads per k/v head, both in heads
        of `head_dim` features. Each layout must be one space's whole axis; False (and both frozen) otherwise."""
        spaces = [{seg.space for seg in ax.segments} for ax in (queries, kv)]
        if any(len(s) != 1 for s in spaces) or len(queries.segments) != 1 or len(kv.segments) != 1:
            reason = f"{node.op_type} {node.name}: query or key/value heads are not one projection's"
            self.freeze(queries, reason)
            self.freeze(kv, reason)
            return False
        self.spaces.couple(queries.segments[0].space, kv.segments[0].space, per_kv, head_dim)
        return True

    def follow_cache(self, node: onnx.NodeProto, index: int, layout: ChannelAxis) -> bool:
        """Input `index` of `node` is a past key/value cache input that must hold `layout`'s heads: a graph input
        (or one passed on unchanged: Identity, Cast, a one-input Concat) whose head axis shrinks with them (the
        one change of the model's interface onnxprune makes), or, with `keep_kv_cache`, stays and freezes them.
        False (frozen) when the input is computed otherwise."""
        name = node.input[index]
        have = self.axis_of(name)
        where = f"{node.op_type} {node.name}"
        if have is not None:
            if self.union(have, layout):
                return True
            self.freeze(layout, f"{where}: cache input {name} holds other heads")
            self.freeze(have, f"{where}: cache input {name} holds other heads")
            return False
        chain = [name]
        while chain[-1] not in self.view.graph_inputs:
            producer = self.view.producer.get(chain[-1])
            if producer is None or producer.op_type not in ("Identity", "Cast", "Concat") or len(
                    [i for i in producer.input if i]) != 1:
                self.freeze(layout, f"{where}: cache input {name} is computed in the graph")
                return False
            chain.append(producer.input[0])
        if self.keep_kv_cache:  # the heads still flow on (so their coupling is known), frozen
            self.freeze(layout, f"the key/value cache ({chain[-1]}) is kept as it is (keep_kv_cache)")
        for tensor in chain:
            self.set_axis(tensor, layout.with_axis(layout.axis))
        self.cache.add(chain[-1])
        return True

    def mark_cache(self, name: str) -> None:
        """`name`, if a graph output, is key/value cache (present key or value): it may follow the heads."""
        if name in self.view.graph_outputs:
            self.cache.add(name)

    def union(self, a: ChannelAxis, b: ChannelAxis) -> bool:
        """Merge two layouts that must lose the same channels. False when their structures differ."""
        if a.length != b.length or len(a.segments) != len(b.segments) or not all(
                x.same_structure(y) for x, y in zip(a.segments, b.segments)):
            return False
        for x, y in zip(a.segments, b.segments):
            self.spaces.union(x.space, y.space)
        return True


@dataclass
class Analysis:
    groups: list[ChannelGroup]
    context: AnalysisContext

    @property
    def prunable(self) -> list[ChannelGroup]:
        return [g for g in self.groups if g.prunable]

    @property
    def faults(self) -> list:
        """Faults contained while analysing (graph.faults.Fault): handler exceptions. Faults met while a plan is applied are returned by pipeline/apply.py, not kept here."""
        return self.context.faults

    def find(self, space: int) -> int:
        return self.context.spaces.find(space)


def analyze_graph(view: GraphView, exclude: tuple[str, ...] = (), prune_hidden: bool = False,
                  gqa_mode: str = "kv-groups", keep_kv_cache: bool = False,
                  head_share: float | None = None) -> Analysis:
    ctx = AnalysisContext(view, prune_hidden, gqa_mode, keep_kv_cache, head_share)
    for node in view.nodes:
        handler = get_handler(node.op_type, node.domain)
        if handler is None:
            if node.domain == "com.microsoft" and node.op_type in FUSED_TRANSFORMER_OPS:
                reason = (f"{node.op_type} is fused by onnxruntime's transformer optimizer; prune the unfused "
                          "export, then optimise")
            else:
                reason = f"no handler for op {node.domain + '::' if node.domain else ''}{node.op_type}"
            ctx.freeze_inputs(node, reason)
            continue
        try:
            handler.analyze(node, ctx)
        except (MemoryError, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001 - a handler bug costs the groups at this node, not the run
            ctx.fault(node, "analyze", exc)
    for name in view.graph_outputs:
        if name in ctx.cache and not ctx.keep_kv_cache:
            continue  # present key/value: follows the heads, as its past input does
        reason = (f"the key/value cache ({name}) is kept as it is (keep_kv_cache)" if name in ctx.cache
                  else f"reaches graph output {name}")
        ctx.freeze(ctx.axis_of(name), reason)
    for i, space in enumerate(ctx.spaces.spaces):
        if any(fnmatch.fnmatchcase(space.source, pat) for pat in exclude):
            ctx.spaces.freeze(i, f"excluded by pattern ({space.source})")
    _resolve_couplings(ctx)
    groups = _build_groups(ctx)
    for fault in ctx.faults:
        fault.groups = [g.id for g in groups if fault.reason in g.reasons]
    return Analysis(groups, ctx)


def _resolve_couplings(ctx: AnalysisContext) -> None:
    """Settle every grouped-query coupling by the mode: fold the k/v heads into the query space (kv-groups), or
    freeze them and prune the query heads evenly per KV group (query-heads); "auto" decides per attention."""
    spaces = ctx.spaces
    for q in [r for r in spaces.roots() if spaces.spaces[r].kv is not None]:
        space = spaces.spaces[q]
        kv, group, head = spaces.find(space.kv), space.per_kv, space.head_dim
        space.kv = None
        kv_heads = spaces.spaces[kv].size // head
        if spaces.spaces[kv].size * group != space.size:
            reason = f"{space.size // head} query heads do not read {kv_heads} key/value heads {group} per head"
            spaces.freeze(q, reason)
            spaces.freeze(kv, reason)
            continue
        mode = gqa_mode_for(ctx.gqa_mode, kv_heads, ctx.head_share)
        space.kv_groups, space.gqa_mode, space.gqa_auto = kv_heads, mode, ctx.gqa_mode == "auto"
        if mode == "query-heads":
            spaces.freeze(kv, "key/value heads stay (gqa_mode query-heads: query heads go evenly inside every "
                              "KV group)")
            spaces.constrain(q, kv_heads, tied=False)
            continue
        if kv_heads == 1:
            spaces.freeze(q, "one KV group (multi-query attention) cannot go; gqa_mode query-heads prunes its "
                             "query heads")
        _fold_layouts(ctx, kv, q, group, head)
        spaces.constrain_unit(q, group * head)
        spaces.fold(kv, q)


def _fold_layouts(ctx: AnalysisContext, kv: int, q: int, group: int, head: int) -> None:
    """Rewrite every layout segment of the k/v space `kv` as a folded segment of the query space `q`."""
    find = ctx.spaces.find

    def fold(layout: ChannelAxis) -> ChannelAxis:
        if not any(find(seg.space) == kv for seg in layout.segments):
            return layout
        return replace(layout, segments=tuple(seg.folded(q, group, head) if find(seg.space) == kv else seg
                                              for seg in layout.segments))

    for name, layout in list(ctx.axes.items()):
        ctx.axes[name] = fold(layout)
    for member in ctx.members:
        member.layout = fold(member.layout)


def _build_groups(ctx: AnalysisContext) -> list[ChannelGroup]:
    find = ctx.spaces.find
    by_root: dict[int, dict] = {}
    for i, space in enumerate(ctx.spaces.spaces):
        entry = by_root.setdefault(find(i), {"spaces": [], "sources": [], "members": [], "tensors": []})
        entry["spaces"].append(i)
        if space.source not in entry["sources"]:
            entry["sources"].append(space.source)
    for member in ctx.members:
        for root in {find(seg.space) for seg in member.layout.segments}:
            by_root[root]["members"].append(member)
    for tensor, axis in ctx.axes.items():
        for root in {find(seg.space) for seg in axis.segments}:
            by_root[root]["tensors"].append(tensor)
    groups = []
    for gid, (root, entry) in enumerate(sorted(by_root.items())):
        space = ctx.spaces.spaces[root]
        reasons = list(space.reasons)
        if not any(m.role == "in" for m in entry["members"]) and not reasons:
            reasons.append("no layer reads these channels")
        groups.append(ChannelGroup(gid, space.size, entry["spaces"], entry["sources"], entry["members"],
                                   reasons, entry["tensors"], space.blocks, space.tied, space.unit,
                                   space.head_dim if space.kv_groups else 0, space.kv_groups, space.gqa_mode,
                                   space.gqa_auto))
    return groups
