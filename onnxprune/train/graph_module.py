"""The ONNX graph run in torch, op for op: `to_torch` builds the module, `write_back` puts its weights back.

Every float initializer read as a value becomes an `nn.Parameter` (float32 even in a float16 or bfloat16 model;
`GraphModule.dtypes` remembers each original type). Integer initializers, Constant nodes and float
initializers read only as shapes, indices or scales (a Resize's scales, a Reshape's shape: the `static` inputs
of the op table) stay constants (buffers). Nodes run in graph order with the functions of `onnxprune.train.ops`,
one per ONNX op type; an op without one raises `UnsupportedOpError` when the module is built, so a graph either
runs exactly or not at all.

A module can be any sub-graph: `to_torch(model, inputs=[...], outputs=[...])` holds only the nodes between
those tensors (a block of block-wise distillation, cut at the stage boundaries of runtime/stages.py), and
`module.outputs_of(names, inputs)` makes such a module from a built one that *shares* its parameters, so
training a block trains the whole model's weights and `write_back(model, whole)` writes them.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from onnxprune.errors import InputError, UnsupportedOpError, require_torch
from onnxprune.io.model_io import copy_without_initializers
from onnxprune.io.weights import (
    TensorWriter,
    Workspace,
    external_folder,
    is_external,
    is_lazy,
    keeps_data_files,
    tensor_array,
)
from onnxprune.train.ops import Node, get_op

torch = require_torch()
from onnxprune.train.ops.dtypes import supported as _dtype_supported
from onnxprune.train.ops.shape import _tensor_value

T = onnx.TensorProto
FLOAT_TYPES = (T.FLOAT, T.FLOAT16, T.BFLOAT16, T.DOUBLE)
TRAINABLE = ("float", "weights", "none")
_INLINE_ELEMENTS = 256  # tensors up to this size stay inline in the protobuf when written back


@dataclass
class _Graph:
    """The structure of a model without its weights: what sub-graph modules are planned from."""

    nodes: list[onnx.NodeProto]
    inits: dict[str, tuple[int, tuple[int, ...]]]  # name -> (element type, dims)
    inputs: list[str]
    outputs: list[str]
    types: dict[str, int]
    opsets: dict[str, int]

    @classmethod
    def of(cls, model: onnx.ModelProto) -> _Graph:
        g = model.graph
        types = {}
        for vi in list(g.input) + list(g.output) + list(g.value_info):
            if vi.type.HasField("tensor_type"):
                types[vi.name] = vi.type.tensor_type.elem_type
        inits = {t.name: (t.data_type, tuple(t.dims)) for t in g.initializer}
        opsets = {("" if o.domain == "ai.onnx" else o.domain): o.version for o in model.opset_import}
        return cls(list(g.node), inits, [i.name for i in g.input if i.name not in inits], [o.name for o in g.output],
                   types, opsets)


@dataclass
class _Step:
    fn: object
    node: Node
    inputs: list[str]
    outputs: list[str]


def _attrs(node: onnx.NodeProto) -> dict:
    out = {}
    for a in node.attribute:
        if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
            raise UnsupportedOpError(f"{node.op_type} (node {node.name!r}) holds a sub-graph; the training bridge "
                                     "runs no control flow")
        value = onnx.helper.get_attribute_value(a)
        if isinstance(value, bytes):
            value = value.decode()
        elif isinstance(value, list) and value and isinstance(value[0], bytes):
            value = [v.decode() for v in value]
        out[a.name] = value
    return out


def _label(node: onnx.NodeProto) -> str:
    return f"{node.domain + '::' if node.domain not in ('', 'ai.onnx') else ''}{node.op_type}"


def _plan(graph: _Graph, inputs: Sequence[str] | None, outputs: Sequence[str] | None):
    """The nodes that compute `outputs` from `inputs` (and initializers), in graph order, checked against the op
    table; the initializers they read, and which of those are read as values (not only as shapes)."""
    outputs = list(graph.outputs if outputs is None else outputs)
    given = set(graph.inputs if inputs is None else inputs)
    producer = {}
    for i, node in enumerate(graph.nodes):
        for o in node.output:
            if o:
                producer[o] = i
    needed, seen, missing = set(), set(), []
    feeds: list[str] = []
    stack = list(reversed(outputs))
    while stack:
        name = stack.pop()
        if not name or name in seen:
            continue
        seen.add(name)
        if name in given:
            feeds.append(name)
        elif name in producer:
            idx = producer[name]
            if idx not in needed:
                needed.add(idx)
                stack.extend(reversed(graph.nodes[idx].input))
        elif name not in graph.inits:
            missing.append(name)
    if missing:
        raise InputError(f"tensor {missing[0]!r} is needed for {', '.join(outputs)} but is neither an input "
                         f"({', '.join(sorted(given)) or 'none given'}), an initializer nor computed by a node")
    steps, value_inits, used_inits = [], set(), set()
    for idx in sorted(needed):
        node = graph.nodes[idx]
        domain = "" if node.domain == "ai.onnx" else node.domain
        spec = get_op(node.op_type, domain)
        if spec is None:
            raise UnsupportedOpError(f"{_label(node)} (node {node.name!r}) has no torch implementation in the "
                                     "training bridge (onnxprune.train.ops.supported_ops() lists those it has)")
        info = Node(node.op_type, node.name, _attrs(node), graph.opsets.get(domain, 1), len(node.output), domain)
        if spec.check is not None and (reason := spec.check(info)):
            raise UnsupportedOpError(f"{_label(node)} (node {node.name!r}): {reason} in the training bridge")
        for pos, name in enumerate(node.input):
            if name in graph.inits and name not in given:
                used_inits.add(name)
                if pos not in spec.static:
                    value_inits.add(name)
        steps.append(_Step(spec.fn, info, list(node.input), list(node.output)))
    order = {name: i for i, name in enumerate(graph.inputs)}
    feeds = sorted(feeds, key=lambda n: (order.get(n, len(order)), n))
    return steps, feeds, outputs, used_inits, value_inits


def _sanitize(name: str, taken: set[str]) -> str:
    key = re.sub(r"[^0-9A-Za-z_]", "_", name) or "_"
    if key[0].isdigit():
        key = "p_" + key
    base, k = key, 1
    while key in taken:
        k += 1
        key = f"{base}_{k}"
    taken.add(key)
    return key


def _to_torch_value(arr: np.ndarray):
    if arr.dtype.kind == "f" or arr.dtype.name == "bfloat16":
        arr = arr.astype(np.float64 if arr.dtype == np.float64 else np.float32)
    return torch.from_numpy(np.array(arr, copy=True))


def _constant(node: Node):
    a = node.attrs
    if "value" in a:
        return _tensor_value(a["value"])
    if "value_float" in a:
        return torch.tensor(a["value_float"], dtype=torch.float32)
    if "value_floats" in a:
        return torch.tensor(a["value_floats"], dtype=torch.float32)
    if "value_int" in a:
        return torch.tensor(a["value_int"], dtype=torch.int64)
    if "value_ints" in a:
        return torch.tensor(a["value_ints"], dtype=torch.int64)
    raise UnsupportedOpError(f"Constant (node {node.name!r}) of a sparse or string value is not supported by the "
                             "training bridge")


class GraphModule(torch.nn.Module):
    """An ONNX graph (or the part of it between `input_names` and `output_names`) as a torch module.

    `module(feeds)` maps {input name: tensor} to {output name: tensor}; `module.run` does the same with numpy
    arrays. `params` holds the trainable initializers under sanitized keys, `param_names` maps each key back to
    the initializer name and `dtypes` to its original ONNX element type.
    """

    def __init__(self, graph: _Graph, steps: list[_Step], inputs: list[str], outputs: list[str],
                 params: Mapping[str, torch.nn.Parameter], param_names: Mapping[str, str],
                 dtypes: Mapping[str, int], consts: Mapping[str, torch.Tensor]):
        super().__init__()
        self._graph = graph
        self._steps = steps
        self.input_names = list(inputs)
        self.output_names = list(outputs)
        self.params = torch.nn.ParameterDict(dict(params))
        self.param_names = dict(param_names)
        self.dtypes = dict(dtypes)
        self._const_keys: dict[str, str] = {}
        taken: set[str] = set()
        for name, value in consts.items():
            key = _sanitize(name, taken)
            self.register_buffer("c_" + key, value, persistent=False)
            self._const_keys[name] = "c_" + key
        self._by_tensor = {name: key for key, name in self.param_names.items()}
        # free every intermediate after its last reader: memory holds the live tensors only
        last = {}
        for i, step in enumerate(steps):
            for name in step.inputs:
                last[name] = i
        keep = set(outputs)
        self._frees = [[] for _ in steps]
        for name, i in last.items():
            if name not in keep and name not in self._by_tensor and name not in self._const_keys:
                self._frees[i].append(name)
        self._segments: list[tuple[int, int, list[str], list[str], list[str]]] = []

    def checkpoint(self, boundaries: Sequence[str]) -> GraphModule:
        """Recompute activations in the backward pass instead of keeping them (torch.utils.checkpoint): the
        forward is run in segments ending at `boundaries` (say `cut_points()`, a decoder's residual stream);
        training keeps only what crosses a boundary, and each segment's activations while its backward runs,
        for one more forward pass of compute. Without gradients nothing changes. Returns self."""
        where = {name: i for i, step in enumerate(self._steps) for name in step.outputs if name}
        ends = sorted({where[b] for b in boundaries if b in where})
        if not ends or ends[-1] < len(self._steps) - 1:
            ends.append(len(self._steps) - 1)
        fixed = set(self._by_tensor) | set(self._const_keys)
        later_reads: list[set[str]] = []
        bounds = list(zip([-1, *ends[:-1]], ends))
        for lo, hi in bounds:
            later_reads.append({n for step in self._steps[lo + 1:hi + 1] for n in step.inputs if n})
        segments = []
        for b, (lo, hi) in enumerate(bounds):
            made = {n for step in self._steps[lo + 1:hi + 1] for n in step.outputs if n}
            reads = [n for n in dict.fromkeys(n for step in self._steps[lo + 1:hi + 1] for n in step.inputs if n)
                     if n not in made and n not in fixed]
            after = set().union(*later_reads[b + 1:]) | set(self.output_names)
            outs = [n for n in dict.fromkeys(n for step in self._steps[lo + 1:hi + 1] for n in step.outputs if n)
                    if n in after]
            gone = [n for n in reads if n not in after]
            segments.append((lo + 1, hi + 1, reads, outs, gone))
        self._segments = segments
        return self

    @property
    def nodes(self) -> list[str]:
        """Names of the nodes this module runs, in order."""
        return [s.node.name for s in self._steps]

    def parameter_of(self, initializer: str) -> torch.nn.Parameter | None:
        key = self._by_tensor.get(initializer)
        return None if key is None else self.params[key]

    def forward(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        env: dict[str, torch.Tensor] = {}
        for key, name in self.param_names.items():
            env[name] = self.params[key]
        for name, key in self._const_keys.items():
            env[name] = getattr(self, key)
        for name in self.input_names:
            if name not in feeds:
                raise InputError(f"no value fed for input {name!r} (the module reads "
                                 f"{', '.join(self.input_names)})")
            value = feeds[name]
            if not isinstance(value, torch.Tensor):
                value = torch.as_tensor(np.asarray(value))
            if value.dtype in (torch.float16, torch.bfloat16):
                value = value.float()
            env[name] = value
        if self._segments and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            for lo, hi, reads, outs, gone in self._segments:
                def segment(*values, lo=lo, hi=hi, reads=reads, outs=outs):
                    local = {**{n: v for n, v in env.items() if n in self._by_tensor or n in self._const_keys},
                             **dict(zip(reads, values))}
                    self._run_steps(local, lo, hi)
                    return tuple(local[n] for n in outs)

                values = checkpoint(segment, *[env[n] for n in reads], use_reentrant=False)
                env.update(zip(outs, values))
                for name in gone:
                    env.pop(name, None)
            return {name: env[name] for name in self.output_names}
        self._run_steps(env, 0, len(self._steps))
        return {name: env[name] for name in self.output_names}

    def _run_steps(self, env: dict, lo: int, hi: int) -> None:
        for step, frees in zip(self._steps[lo:hi], self._frees[lo:hi]):
            args = [env[name] if name else None for name in step.inputs]
            out = step.fn(step.node, *args)
            if not isinstance(out, (tuple, list)):
                out = (out,)
            for name, value in zip(step.outputs, out):
                if name:
                    env[name] = value
            for name in frees:
                env.pop(name, None)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The module on numpy feeds, without gradients; outputs in their declared ONNX element types."""
        device = next(iter(self.parameters()), torch.empty(0)).device
        with torch.no_grad():
            out = self({k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in feeds.items()})
        result = {}
        for name, value in out.items():
            arr = value.detach().cpu().numpy()
            declared = self._graph.types.get(name)
            if declared in (T.FLOAT16, T.BFLOAT16):
                arr = arr.astype(onnx.helper.tensor_dtype_to_np_dtype(declared))
            result[name] = arr
        return result

    def outputs_of(self, names: Iterable[str], inputs: Iterable[str] | None = None) -> GraphModule:
        """A module computing the tensors `names` from `inputs` (default: the graph inputs), sharing this
        module's parameters and constants: the block of block-wise distillation."""
        steps, feeds, outputs, used, _ = _plan(self._graph, None if inputs is None else list(inputs), list(names))
        params = {k: p for k, p in self.params.items() if self.param_names[k] in used}
        consts = {n: getattr(self, key) for n, key in self._const_keys.items() if n in used}
        steps = _fold_constants(steps, consts)
        missing = used - {self.param_names[k] for k in params} - set(consts)
        if missing:
            raise InputError(f"initializer {min(missing)!r} is not held by this module; build the sub-graph "
                             "from the model with to_torch(model, inputs=..., outputs=...)")
        return GraphModule(self._graph, steps, feeds, outputs, params,
                           {k: self.param_names[k] for k in params}, {k: self.dtypes[k] for k in params}, consts)


    def _dependence(self) -> tuple[set[str], set[str]]:
        """(tensors depending on a module input, tensors depending on a parameter)."""
        dynamic, weighted = set(self.input_names), set(self.param_names.values())
        for step in self._steps:
            reads = [n for n in step.inputs if n]
            for flag in (dynamic, weighted):
                if any(n in flag for n in reads):
                    flag.update(n for n in step.outputs if n)
        return dynamic, weighted

    def cut_points(self) -> list[str]:
        """Tensors where the module can be cut into blocks (say for block-wise distillation): after the node
        computing each, it is the only tensor on the main path that later nodes still read — a residual stream
        between blocks, a decoder layer's output. The main path is what depends on a float input or on an
        embedding lookup (a Gather from a parameter), not through a Shape; side tensors computed from the inputs and constants or
        their own parameters (an attention mask, rotary angles from an inv_freq initializer) may cross a cut:
        `blocks` passes them on. In graph order; take every k-th for larger blocks."""
        main = {n for n in self.input_names if self._graph.types.get(n) in FLOAT_TYPES}
        params = set(self.param_names.values())
        last_read: dict[str, int] = {}
        for i, step in enumerate(self._steps):
            for name in step.inputs:
                last_read[name] = i
        live: set[str] = set()
        cuts = []
        for i, step in enumerate(self._steps):
            lookup = step.node.op_type == "Gather" and step.inputs[0] in params
            shape_only = step.node.op_type in ("Shape", "Size")  # a shape is no value on the main path
            if lookup or (not shape_only and any(n in main for n in step.inputs if n)):
                main.update(n for n in step.outputs if n)
            live = {n for n in live if last_read[n] > i}
            live |= {n for n in step.outputs if n in main and last_read.get(n, -1) > i}
            if live == {step.outputs[0]}:
                cuts.append(step.outputs[0])
        return cuts

    def blocks(self, boundaries: Sequence[str]) -> list[GraphModule]:
        """The module cut after each boundary tensor (say the residual stream after every decoder layer: the
        stage boundaries of runtime/stages.py) into consecutive blocks sharing its parameters.

        Block i runs the nodes after the previous boundary up to boundary i (the last block: up to the module's
        outputs). Its inputs are what it reads from earlier blocks or the module's inputs (a mask or positions
        computed once at the start are inputs of every block that reads them); its outputs are what it computes
        that later blocks or the module's outputs read (boundary i among them, or a KV cache's present tensors).
        """
        where = {}
        for i, step in enumerate(self._steps):
            for name in step.outputs:
                if name:
                    where[name] = i
        cuts = []
        for name in boundaries:
            if name not in where:
                raise InputError(f"boundary {name!r} is not computed by a node of this module")
            cuts.append(where[name])
        if cuts != sorted(set(cuts)):
            raise InputError("boundaries must be given in graph order, each computed by a different node")
        edges = [-1] + cuts + ([len(self._steps) - 1] if not cuts or cuts[-1] < len(self._steps) - 1 else [])
        dynamic, _ = self._dependence()  # the rest (constants, weights through Identity) each block recomputes
        fixed = set(self.param_names.values()) | set(self._const_keys)
        reads: list[set[str]] = []
        for lo, hi in itertools.pairwise(edges):
            reads.append({n for step in self._steps[lo + 1:hi + 1] for n in step.inputs if n and n not in fixed})
        out = []
        for b, (lo, hi) in enumerate(itertools.pairwise(edges)):
            made = {n for step in self._steps[lo + 1:hi + 1] for n in step.outputs if n}
            later = set().union(*reads[b + 1:]) | set(self.output_names)
            outputs = [n for step in self._steps[lo + 1:hi + 1] for n in step.outputs if n and n in later]
            inputs = sorted(n for n in reads[b] if n not in made and n in dynamic)
            out.append(self.outputs_of(outputs, inputs))
        return out


def _fold_constants(steps: list[_Step], consts: dict) -> list[_Step]:
    """Constant nodes become constants of the module (they read nothing)."""
    kept = []
    for step in steps:
        if step.node.op_type == "Constant" and not step.node.domain:
            consts[step.outputs[0]] = _constant(step.node)
        else:
            kept.append(step)
    return kept


def to_torch(model: onnx.ModelProto, *, trainable: str = "float", inputs: Sequence[str] | None = None,
             outputs: Sequence[str] | None = None) -> GraphModule:
    """The graph (or its part from `inputs` to `outputs`) as a torch module.

    trainable: "float" makes every float initializer read as a value a trainable parameter; "weights" only
    those with more than one element (scalar constants such as a Pow exponent stay fixed); "none" none (the
    parameters exist, without gradients).
    """
    if trainable not in TRAINABLE:
        raise InputError(f"trainable must be one of {', '.join(TRAINABLE)}, got {trainable!r}")
    graph = _Graph.of(model)
    steps, feeds, outs, used, value_inits = _plan(graph, inputs, outputs)
    params, names, dtypes, consts = {}, {}, {}, {}
    taken: set[str] = set()
    for t in model.graph.initializer:
        if t.name not in used:
            continue
        if not _dtype_supported(t.data_type):
            raise UnsupportedOpError(f"initializer {t.name!r} has element type {T.DataType.Name(t.data_type)}, "
                                     "which the training bridge cannot hold")
        value = _to_torch_value(tensor_array(t))
        if t.data_type in FLOAT_TYPES and t.name in value_inits:
            key = _sanitize(t.name, taken)
            grad = trainable == "float" or (trainable == "weights" and value.numel() > 1)
            params[key] = torch.nn.Parameter(value, requires_grad=grad)
            names[key] = t.name
            dtypes[key] = t.data_type
        else:
            consts[t.name] = value
    steps = _fold_constants(steps, consts)
    for name in feeds:
        if name in graph.types and not _dtype_supported(graph.types[name]):
            raise UnsupportedOpError(f"input {name!r} has element type {T.DataType.Name(graph.types[name])}, which "
                                     "the training bridge cannot hold")
    return GraphModule(graph, steps, feeds, outs, params, names, dtypes, consts)


def _same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()


def write_back(model: onnx.ModelProto, module: GraphModule, writer: TensorWriter | None = None) -> onnx.ModelProto:
    """A copy of `model` whose initializers hold the module's parameters, cast back to each original type.

    Nodes, names, inputs, outputs and element types are those of `model`; an initializer whose value did not
    change keeps its TensorProto as it was. Changed tensors of a lazily loaded model (external data) are streamed
    to `writer` (by default a workspace beside its data), one at a time, so no weight is held twice; in an
    in-memory model the changed ones over 256 elements go to `writer` when one is given.
    """
    values = {module.param_names[k]: p for k, p in module.params.items()}
    inits = {t.name for t in model.graph.initializer}
    unknown = sorted(set(values) - inits)
    if unknown:
        raise InputError(f"the module holds {unknown[0]!r}, which is not an initializer of this model")
    if writer is None and is_lazy(model):
        writer = Workspace(near=external_folder(model), one_file=not keeps_data_files(model)).writer()
    out = copy_without_initializers(model)
    for t in model.graph.initializer:
        param = values.get(t.name)
        if param is None:
            out.graph.initializer.append(t)
            continue
        old = tensor_array(t)
        new = param.detach().to("cpu", torch.float64 if t.data_type == T.DOUBLE else torch.float32).numpy()
        new = new.astype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).reshape(old.shape)
        if _same_bytes(old, new):
            out.graph.initializer.append(t)
        elif writer is not None and (is_external(t) or new.size > _INLINE_ELEMENTS):
            out.graph.initializer.append(writer.write(t.name, new))
        else:
            tensor = numpy_helper.from_array(new, t.name)
            if t.doc_string:
                tensor.doc_string = t.doc_string
            out.graph.initializer.append(tensor)
    return out


__all__ = ["GraphModule", "UnsupportedOpError", "to_torch", "write_back"]
