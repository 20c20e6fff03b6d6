"""Apply a plan: slice every member constant, then let each op's handler fix its attributes and shape constants.

A constant shared by several node inputs (exporters deduplicate equal tensors) is copied on write: a use whose
slicing differs from the others gets its own initializer, so no other node sees a changed shape.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import numpy_helper

from onnxprune.graph.analysis import Analysis
from onnxprune.graph.faults import RewriteFault
from onnxprune.graph.handlers import get_handler
from onnxprune.graph.ir import GraphView
from onnxprune.graph.kvcache import update_interface
from onnxprune.io.model_io import copy_without_initializers
from onnxprune.io.weights import TensorWriter, tensor_array
from onnxprune.pipeline.plan import Plan
from onnxprune.report import progress

# constants this small stay in the protobuf; larger ones go to the writer's data file when there is one
INLINE_ELEMENTS = 256


class RewriteContext:
    def __init__(self, model: onnx.ModelProto, view: GraphView, analysis: Analysis, plan: Plan,
                 writer: TensorWriter | None = None):
        self.model = model
        self.view = view
        self.analysis = analysis
        self.plan = plan
        self.find = analysis.find
        self.opset = view.opset
        # `model` starts without initializers: the originals are looked up here and copied over at the end
        # only where still used, so weights that get sliced are never copied whole first
        self._inits = dict(view.initializers)
        self._arrays: dict[str, np.ndarray] = {}
        self._counter = 0
        self.writer = writer

    def axis_of(self, name: str):
        return self.analysis.context.axes.get(name)

    def kept_positions(self, name: str) -> np.ndarray | None:
        axis = self.axis_of(name)
        if axis is None:
            return None
        return axis.kept_positions(self.plan.kept, self.find)

    def new_length(self, name: str) -> int:
        kept = self.kept_positions(name)
        return self.axis_of(name).length if kept is None else len(kept)

    def array(self, name: str) -> np.ndarray | None:
        if name not in self._inits:
            return None
        if name in self._arrays:
            return self._arrays[name]
        value = tensor_array(self._inits[name])
        if value.size <= INLINE_ELEMENTS:
            self._arrays[name] = value
        return value

    def set_input_constant(self, node: onnx.NodeProto, index: int, value: np.ndarray) -> None:
        """Give input `index` of `node` a new constant of its own (never edits a shared one in place)."""
        old = node.input[index]
        value = np.asarray(value)
        if old in self._inits:  # a float16 model gets float16 constants, an int32 one int32 (dtype read, not data)
            before = onnx.helper.tensor_dtype_to_np_dtype(self._inits[old].data_type)
            if before != value.dtype and np.dtype(before).kind == value.dtype.kind:
                value = value.astype(before)
        self._counter += 1
        name = f"{old}__pruned{self._counter}"
        while name in self._inits:
            self._counter += 1
            name = f"{old}__pruned{self._counter}"
        value = np.asarray(value)
        if self.writer is not None and value.size > INLINE_ELEMENTS:
            tensor = self.writer.write(name, value)  # streamed to disk: the pruned weights are not held
        else:
            tensor = numpy_helper.from_array(value, name)
            self._arrays[name] = value
        self.model.graph.initializer.append(tensor)
        self._inits[name] = tensor
        node.input[index] = name


def apply_plan(model: onnx.ModelProto, view: GraphView, analysis: Analysis, plan: Plan,
               writer: TensorWriter | None = None, skip: frozenset[str] = frozenset()) -> onnx.ModelProto:
    """A pruned copy of `model` (the normalised model `view` and `analysis` were built from); the handlers of
    nodes named in `skip` (whose rewrite raised with nothing of theirs pruned) are not asked to rewrite.

    With a `writer` (lazy models, see onnxprune/weights.py) every sliced weight is written to its data file as
    soon as it is made, and the copy references it there; weights kept whole are never read."""
    out = copy_without_initializers(model)
    ctx = RewriteContext(out, view, analysis, plan, writer)
    nodes = {n.name: n for n in out.graph.node}
    pruned_roots = set(plan.kept)

    slices: dict[tuple[str, int], list] = defaultdict(list)
    for m in analysis.context.members:
        if any(ctx.find(s.space) in pruned_roots for s in m.layout.segments):
            slices[(m.node, m.input_index)].append(m)
    sliced: dict[tuple, str] = {}  # (tensor, its slicing) -> the new tensor: a shared weight stays shared
    with progress("rewriting: slicing weights", len(slices)) as advance:
        for (node_name, index), members in slices.items():
            _slice_input(nodes[node_name], index, members, view, plan, ctx, sliced)
            advance()

    for node in out.graph.node:
        handler = get_handler(node.op_type, node.domain)
        if handler is not None and node.name not in skip:
            try:
                handler.rewrite(node, ctx)
            except (MemoryError, KeyboardInterrupt):
                raise
            except Exception as exc:  # noqa: BLE001 - contained: the caller freezes this node's groups
                raise RewriteFault(node, exc) from exc

    update_interface(out, ctx)  # key/value cache inputs and outputs follow their heads
    _copy_used_initializers(out.graph, view)
    del out.graph.value_info[:]
    return out


def _slice_input(node, index: int, members, view: GraphView, plan: Plan, ctx: RewriteContext,
                 sliced: dict[tuple, str]) -> None:
    """Give input `index` of `node` its weight sliced along every member's axis (one copy per distinct
    slicing of a tensor, so layers sharing a weight and its slicing keep sharing it)."""
    source = node.input[index]
    value = view.array(source)
    done_axes, cuts = set(), []
    for m in members:
        if m.axis in done_axes:
            continue  # the same axis reached twice (x + x): one slicing serves both
        done_axes.add(m.axis)
        kept = m.layout.kept_positions(plan.kept, ctx.find)
        value = np.take(value, kept, axis=m.axis)
        cuts.append((m.axis, kept.tobytes()))
    key = (source, tuple(sorted(cuts)))
    if key in sliced:
        node.input[index] = sliced[key]
        return
    ctx.set_input_constant(node, index, value)
    sliced[key] = node.input[index]


def _copy_used_initializers(graph: onnx.GraphProto, view: GraphView) -> None:
    """Keep new initializers that are used; bring over the original ones still used (and never-used ones
    that the graph lists as inputs)."""
    used = {name for node in graph.node for name in node.input}
    used |= {o.name for o in graph.output} | {i.name for i in graph.input}
    keep = [t for t in graph.initializer if t.name in used]
    present = {t.name for t in keep}
    del graph.initializer[:]
    graph.initializer.extend(keep)
    for name, tensor in view.initializers.items():
        if name in used and name not in present:
            graph.initializer.add().CopyFrom(tensor)
    _sync_initializer_inputs(graph, view)


def _sync_initializer_inputs(graph: onnx.GraphProto, view: GraphView) -> None:
    """Where the model lists its initializers as graph inputs (IR < 4 requires it), list the sliced ones
    under their new names and shapes, and drop the entries of weights no node reads any more."""
    listed = [i for i in graph.input if i.name in view.initializers]
    if not listed:
        return
    names = {t.name for t in graph.initializer}
    keep = [i for i in graph.input if i.name not in view.initializers or i.name in names]
    have = {i.name for i in keep}
    for t in graph.initializer:
        if t.name not in have and t.name not in view.initializers:
            keep.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    del graph.input[:]
    graph.input.extend(keep)
