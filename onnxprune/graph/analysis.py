"""Walk the graph once, in topological order, and build the channel groups."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import onnx

from onnxprune.graph.groups import ChannelGroup, Member, SpaceSet
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


class AnalysisContext:
    """What handlers read and write while the graph is walked."""

    def __init__(self, view: GraphView, prune_hidden: bool = False):
        self.view = view
        self.prune_hidden = prune_hidden  # LayerNorm passes channels (approximate: its statistics change)
        self.approximate: set[int] = set()  # spaces whose pruning changes such statistics
        self._weight_uses: dict[tuple[str, int, str], list[Member]] = {}  # scored weights by (tensor, axis, role)
        self.spaces = SpaceSet()
        self.axes: dict[str, ChannelAxis] = {}
        self.members: list[Member] = []
        self.faults: list = []  # containment.Fault: handler exceptions, contained (see onnxprune/containment.py)

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
        from onnxprune.containment import Fault, describe

        fault = Fault(stage, node.name, node.op_type, describe(error))
        self.faults.append(fault)
        for name in list(node.input) + list(node.output):
            self.freeze(self.axis_of(name), fault.reason)
        for member in self.members:
            if member.node == node.name:
                self.freeze(member.layout, fault.reason)

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
        """Contained faults (containment.Fault): handler exceptions and groups that failed validation."""
        return self.context.faults

    def find(self, space: int) -> int:
        return self.context.spaces.find(space)


def analyze_graph(view: GraphView, exclude: tuple[str, ...] = (), prune_hidden: bool = False) -> Analysis:
    ctx = AnalysisContext(view, prune_hidden)
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
        ctx.freeze(ctx.axis_of(name), f"reaches graph output {name}")
    for i, space in enumerate(ctx.spaces.spaces):
        if any(fnmatch.fnmatchcase(space.source, pat) for pat in exclude):
            ctx.spaces.freeze(i, f"excluded by pattern ({space.source})")
    groups = _build_groups(ctx)
    for fault in ctx.faults:
        fault.groups = [g.id for g in groups if fault.reason in g.reasons]
    return Analysis(groups, ctx)


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
                                   reasons, entry["tensors"], space.blocks, space.tied, space.unit))
    return groups
