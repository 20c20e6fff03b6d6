"""A read-only index over an `onnx.ModelProto`: producers, consumers, constants and inferred shapes.

Handlers see the graph only through this view, so the rest of onnxprune does not depend on how onnx
stores attributes, initializers or value_info.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections import defaultdict

import numpy as np
import onnx
from onnx import numpy_helper

from onnxprune.io.model_io import weightless
from onnxprune.io.weights import is_external, tensor_array

Shape = tuple  # of int | None (None: unknown or symbolic)


class GraphView:
    def __init__(self, model: onnx.ModelProto, shapes: dict[str, Shape] | None = None):
        self.model = model
        graph = model.graph
        self.nodes: list[onnx.NodeProto] = list(graph.node)
        self.initializers = {t.name: t for t in graph.initializer}
        self.graph_inputs = [i.name for i in graph.input if i.name not in self.initializers]
        self.graph_outputs = [o.name for o in graph.output]
        # Initializers listed among the graph inputs (required before IR 4, common in older exports) are
        # weights with a default that nobody overrides in practice; they are treated as constants, and the
        # rewrite keeps the input list in step with the initializers it slices (see rewrite.py).
        self._overridable: set[str] = set()
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
        for node in self.nodes:
            for out in node.output:
                if out:
                    self.producer[out] = node
            for idx, name in enumerate(node.input):
                if name:
                    self.consumers[name].append((node, idx))
        self._arrays: dict[str, np.ndarray] = {}
        self.shapes = shapes if shapes is not None else infer_shapes(model)
        self._sym_shapes: dict[str, Shape] | None = None

    def is_const(self, name: str) -> bool:
        return name in self.initializers and name not in self._overridable

    def array(self, name: str) -> np.ndarray | None:
        """A constant's values (read-only). Weights in external files are memory-mapped afresh on each call
        and not kept, so a large model's weights are never all in memory at once (onnxprune/weights.py)."""
        if not self.is_const(name):
            return None
        if name in self._arrays:
            return self._arrays[name]
        tensor = self.initializers[name]
        value = tensor_array(tensor)
        if not is_external(tensor) or value.size <= 4096:
            self._arrays[name] = value
        return value

    def shape(self, name: str) -> Shape | None:
        if self.is_const(name):
            return tuple(self.initializers[name].dims)  # no need to decode the weights for their shape
        return self.shapes.get(name)

    def sym_shape(self, name: str) -> Shape | None:
        """Like `shape`, but a symbolic dim is an int standing for it (see `infer_symbolic_shapes`), so that
        Reshape mapping can match [batch, seq, 12, 64] against [batch, seq, 768] or [12·batch, seq, 64]."""
        arr = self.array(name)
        if arr is not None:
            return tuple(arr.shape)
        if self._sym_shapes is None:
            self._sym_shapes = infer_symbolic_shapes(self.model)
        sym = self._sym_shapes.get(name)
        plain = self.shapes.get(name)
        if sym is None or plain is not None and len(plain) != len(sym):
            return plain
        # a dim onnx knows as a number wins over the symbolic engine's guess
        if plain is not None:
            sym = tuple(p if p is not None else q for p, q in zip(plain, sym))
        return sym

    def dim(self, name: str, axis: int) -> int | None:
        """A static dim; where onnx's inference leaves it unknown, the symbolic engine's static value."""
        shape = self.shape(name)
        if shape is None or not -len(shape) <= axis < len(shape):
            shape = None
        value = shape[axis] if shape is not None else None
        if value is None:
            sym = self.sym_shape(name)
            if sym is not None and -len(sym) <= axis < len(sym) and sym[axis] is not None \
                    and sym[axis] < SYMBOL_BASE:
                value = sym[axis]
        return value

    def rank(self, name: str) -> int | None:
        shape = self.shape(name)
        if shape is None:
            shape = self.sym_shape(name)
        return None if shape is None else len(shape)

    def uses(self, name: str) -> int:
        return len(self.consumers.get(name, [])) + (1 if name in self.graph_outputs else 0)

    @property
    def opset(self) -> int:
        for imp in self.model.opset_import:
            if imp.domain in ("", "ai.onnx"):
                return imp.version
        return 0


def attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def set_attr(node: onnx.NodeProto, name: str, value) -> None:
    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    node.attribute.append(onnx.helper.make_attribute(name, value))


def infer_shapes(model: onnx.ModelProto) -> dict[str, Shape]:
    """Shapes of every tensor onnx's shape inference can reach (symbolic dims become None)."""
    try:
        # on a weightless copy: inference needs shapes and small shape constants, not megabytes of weights
        inferred = onnx.shape_inference.infer_shapes(_dynamic_as_symbols(weightless(model)), data_prop=True)
    except Exception:  # noqa: BLE001 - inference is best effort here; missing shapes freeze groups
        inferred = model
    return _tensor_shapes(inferred.graph, lambda d: d.dim_value if d.HasField("dim_value") and d.dim_value >= 0
                          else None)


def _dynamic_as_symbols(light: onnx.ModelProto) -> onnx.ModelProto:
    """`light` (a copy) with input and output dims stored as -1 or 0 (paddle2onnx's way of saying dynamic)
    turned into unnamed symbolic dims, so that inference does not compute with them as sizes; -1 in the
    model's value_info is dropped the same way."""
    for values, lowest in ((light.graph.input, 1), (light.graph.output, 1), (light.graph.value_info, 0)):
        for value in values:
            for d in value.type.tensor_type.shape.dim:
                if d.HasField("dim_value") and d.dim_value < lowest:
                    d.Clear()
    return light


def _tensor_shapes(graph: onnx.GraphProto, dim) -> dict[str, Shape]:
    """name -> shape of every typed tensor of `graph`, each dim turned into a value by `dim`."""
    shapes: dict[str, Shape] = {}
    for vi in list(graph.value_info) + list(graph.input) + list(graph.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            shapes[vi.name] = tuple(dim(d) for d in t.shape.dim)
    return shapes


SYMBOL_BASE = 10007  # symbolic dims become distinct primes from here: larger than any static dim they could
#                      be confused with, and a product of them identifies the symbols it came from


@contextlib.contextmanager
def _in_temp_dir():
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="onnxprune-shapes-") as tmp:
        os.chdir(tmp)
        try:
            yield
        finally:
            os.chdir(cwd)


@contextlib.contextmanager
def _quiet(logger_name: str):
    import logging

    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def infer_symbolic_shapes(model: onnx.ModelProto) -> dict[str, Shape]:
    """Shapes with symbolic dims kept: each symbol (batch, seq, ...) stands for its own prime, and an expression
    of symbols (4*batch, seq + 1) is evaluated with them, so equal expressions give equal ints and products
    line up across a Reshape. onnxruntime's symbolic shape inference follows the Shape→Gather→Concat arithmetic
    exporters put around attention; without it (or where it fails) onnx's own dim_param names are used."""
    light = _dynamic_as_symbols(weightless(model))
    del light.graph.value_info[:]
    _fold_shape_constants(light)
    inferred = None
    try:
        SymbolicShapeInference = _symbolic_shape_inference()
        # on failure it saves "sym_shape_infer_temp.onnx" into the working directory: keep that out of the user's;
        # its warnings ("Unable to determine if ... treat as equal") are about its guesses, not the user's model
        with _in_temp_dir(), _quiet("onnxruntime.tools.symbolic_shape_infer"):
            inferred = SymbolicShapeInference.infer_shapes(light, auto_merge=True, guess_output_rank=False)
    except Exception:  # noqa: BLE001 - best effort: missing symbolic shapes only freeze what needs them
        inferred = None
    if inferred is None:
        try:
            inferred = onnx.shape_inference.infer_shapes(_dynamic_as_symbols(weightless(model)), data_prop=True)
        except Exception:  # noqa: BLE001
            return {}
    codes: dict[str, int | None] = {}

    def dim(d):
        if d.HasField("dim_value"):
            return d.dim_value if d.dim_value >= 0 else None
        if d.dim_param and not d.dim_param.startswith("unk__"):
            return _symbol_code(d.dim_param, codes)
        return None

    return _tensor_shapes(inferred.graph, dim)


_FOLDABLE = {"Constant", "Add", "Sub", "Mul", "Div", "Mod", "Neg", "Min", "Max", "Reshape", "Concat", "Unsqueeze",
             "Squeeze", "Cast", "Gather", "Slice", "Equal", "Where", "ConstantOfShape", "Range", "Expand"}


def _fold_shape_constants(model: onnx.ModelProto, max_elements: int = 64) -> None:
    """Evaluate, in place, nodes that compute small tensors from constants only (TorchScript's `Mod(2, 3)`
    feeding a Slice that builds a Reshape target), so symbolic inference sees the target's length."""
    graph = model.graph
    consts = {t.name: t for t in graph.initializer}
    keep = []
    for node in graph.node:
        inputs = [i for i in node.input if i]
        values = None
        if node.op_type in _FOLDABLE and node.domain in ("", "ai.onnx") and (inputs or node.op_type == "Constant") \
                and all(i in consts for i in inputs):
            values = _evaluate(model, node, [consts[i] for i in inputs])
        if values is None or any(np.asarray(v).size > max_elements for v in values):
            keep.append(node)
            continue
        for name, value in zip(node.output, values):
            consts[name] = numpy_helper.from_array(np.asarray(value), name)
            graph.initializer.append(consts[name])
    if len(keep) != len(graph.node):
        del graph.node[:]
        graph.node.extend(keep)


def _evaluate(model: onnx.ModelProto, node: onnx.NodeProto, inputs: list) -> list | None:
    """The outputs of one node on constant inputs (None when onnx's reference evaluator cannot run it)."""
    value = [a for a in node.attribute if a.name == "value"] if node.op_type == "Constant" else []
    if value:  # the common case, read directly: an evaluator costs a millisecond or two per node
        return [numpy_helper.to_array(value[0].t)]
    from onnx.reference import ReferenceEvaluator

    try:
        single = onnx.helper.make_model(
            onnx.helper.make_graph([node], "fold", [], [onnx.helper.make_tensor_value_info(o, 0, None)
                                                     for o in node.output], inputs),
            opset_imports=model.opset_import, ir_version=model.ir_version)
        return ReferenceEvaluator(single).run(None, {})
    except Exception:  # noqa: BLE001 - a node we cannot evaluate simply stays
        return None


def _symbol_code(expr: str, codes: dict) -> int | None:
    if expr in codes:
        return codes[expr]
    try:
        import sympy

        parsed = sympy.sympify(expr.replace("//", "/"), locals={})
        subs = {}
        for sym in sorted(parsed.free_symbols, key=str):
            key = "$" + str(sym)
            if key not in codes:
                n = sum(1 for k in codes if k.startswith("$"))
                codes[key] = int(sympy.prime(sympy.primepi(SYMBOL_BASE) + 1 + n))
            subs[sym] = codes[key]
        value = parsed.subs(subs)
        code = int(value) if value.is_integer else None
        if code is not None and parsed.free_symbols and code < SYMBOL_BASE:
            code = None  # (H + pad) // 7 of a symbol H: no longer tells symbols apart, and not a static dim either
    except Exception:  # noqa: BLE001 - an expression we cannot evaluate is an unknown dim
        code = None
    codes[expr] = code
    return code


def ancestor_nodes(nodes, names, producer: dict[str, int] | None = None, done: set[int] = frozenset()) -> set[int]:
    """Indices of the nodes (of the list `nodes`) that tensors `names` depend on, themselves included; nodes
    in `done` (already run) and what only they need are left out. `producer` (tensor -> node index) may be
    passed when the caller has it."""
    if producer is None:
        producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    needed, stack = set(), [producer[n] for n in names if n in producer]
    while stack:
        i = stack.pop()
        if i in needed or i in done:
            continue
        needed.add(i)
        stack.extend(producer[x] for x in nodes[i].input if x in producer)
    return needed


_SYMBOLIC = None


def _symbolic_shape_inference():
    """onnxruntime's SymbolicShapeInference, loaded from its file: importing it as `onnxruntime.tools.
    symbolic_shape_infer` runs `onnxruntime/tools/__init__.py`, which imports torch when torch is installed
    (half a gigabyte of memory and seconds of time for a helper that does not use it)."""
    global _SYMBOLIC
    if _SYMBOLIC is None:
        import importlib.util

        import onnxruntime

        path = os.path.join(os.path.dirname(onnxruntime.__file__), "tools", "symbolic_shape_infer.py")
        spec = importlib.util.spec_from_file_location("onnxruntime.tools.symbolic_shape_infer", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _SYMBOLIC = module.SymbolicShapeInference
    return _SYMBOLIC
