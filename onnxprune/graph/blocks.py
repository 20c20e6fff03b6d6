"""Residual blocks: the units depth pruning removes whole.

A residual sub-block is an `Add` whose one input is the residual stream `x` (read directly, or through no-op
`Cast`/`Identity` nodes) and whose other input, of the same shape, is computed from `x` by layers with weights:
out = x + f(x). (The same-shape rule keeps out an attention mask added to the scores of every later layer.)
Consecutive sub-blocks chained on one stream form the blocks depth pruning sees: a decoder layer is an
attention sub-block followed by its MLP sub-block (a block starts at every sub-block that holds attention);
without attention (a ResNet), every identity-skip sub-block is a block of its own.

onnxruntime's fused `SkipSimplifiedLayerNormalization` / `SkipLayerNormalization` (onnxruntime-genai's model
builder adds the residual inside the next norm) are first split into the `Add` and the norm they fuse
(`unfuse_skip_norms`), so the residual stream has a tensor at every block boundary.

Dropping a block lets the stream pass through: readers of its output read its input, and what only the block
computed goes (nodes, initializers, and a decoder's key/value cache inputs and outputs of that layer: graph
outputs computed from the block's input but not from its output, and the cache inputs nothing reads any more).
The remaining layers' cache entries are renumbered 0, 1, ... (`renumber_cache`), as runtimes that loop over
`num_hidden_layers` (onnxruntime-genai, optimum) name them.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass

import onnx
from onnx import helper

from onnxprune.graph.ir import infer_shapes
from onnxprune.graph.kvcache import cache_inputs

_PASS = {"Cast", "Identity"}  # no-op hops on the residual stream (HF exports cast it to float32 before a norm)
_WEIGHTED = {"MatMul", "Gemm", "Conv", "ConvTranspose", "MatMulNBits", "MatMulInteger", "QLinearMatMul",
             "QLinearConv", "FusedMatMul"}
_ATTENTION = {"Softmax", "Attention", "GroupQueryAttention", "MultiHeadAttention", "PackedAttention",
              "SparseAttention"}


@dataclass(frozen=True)
class Block:
    """One droppable block: the stream tensor in and out, its residual Add nodes, whether it holds attention, and
    the graph inputs and outputs (a decoder's key/value cache) that go with it."""

    index: int
    input: str
    output: str
    adds: tuple[str, ...]
    attention: bool
    cache_inputs: tuple[str, ...] = ()
    cache_outputs: tuple[str, ...] = ()

    def as_dict(self) -> dict:
        return {"block": self.index, "input": self.input, "output": self.output, "adds": list(self.adds),
                "attention": self.attention, "cache_inputs": list(self.cache_inputs),
                "cache_outputs": list(self.cache_outputs)}


class _Graph:
    def __init__(self, graph: onnx.GraphProto):
        self.nodes = list(graph.node)
        self.producer = {o: i for i, n in enumerate(self.nodes) for o in n.output if o}
        self.inits = {t.name for t in graph.initializer}
        self._ancestors: dict[str, frozenset[int]] = {}

    def root(self, name: str) -> str:
        """The tensor `name` is a no-op copy of (through Cast/Identity)."""
        while name in self.producer and self.nodes[self.producer[name]].op_type in _PASS:
            name = self.nodes[self.producer[name]].input[0]
        return name

    def ancestors(self, name: str) -> frozenset[int]:
        """Indices of the nodes `name` is computed by (memoised per tensor)."""
        if name in self._ancestors:
            return self._ancestors[name]
        seen: set[int] = set()
        stack = [name]
        while stack:
            cur = stack.pop()
            if cur in self._ancestors:
                seen |= self._ancestors[cur]
                continue
            i = self.producer.get(cur)
            if i is None or i in seen:
                continue
            seen.add(i)
            stack.extend(x for x in self.nodes[i].input if x)
        result = frozenset(seen)
        self._ancestors[name] = result
        return result

    def depends(self, name: str, on: str) -> bool:
        """Whether tensor `name` is computed from tensor `on`."""
        if name == on:
            return True
        if on in self.producer:
            return self.producer[on] in self.ancestors(name)
        return any(on in self.nodes[i].input for i in self.ancestors(name))


def find_blocks(model: onnx.ModelProto) -> list[Block]:
    """The residual blocks of `model`'s main graph, in order (see the module docstring); [] when none."""
    g = _Graph(model.graph)
    shapes = infer_shapes(model)
    subs = []  # (stream in, Add node index, stream out, holds attention)
    for i, node in enumerate(g.nodes):
        if node.op_type != "Add" or node.domain not in ("", "ai.onnx") or len(node.input) != 2 or not node.output[0]:
            continue
        for x, y in ((node.input[0], node.input[1]), (node.input[1], node.input[0])):
            stream = g.root(x)
            if stream in g.inits or not _same_shape(shapes.get(x), shapes.get(y)) or not _from_weights(g, y) \
                    or not g.depends(y, stream) or g.depends(stream, y):
                continue
            branch = g.ancestors(y) - g.ancestors(stream)
            ops = {g.nodes[j].op_type for j in branch}
            if ops & _WEIGHTED:
                subs.append((stream, i, node.output[0], bool(ops & _ATTENTION)))
                break
    blocks: list[list] = []
    stream_end: dict[str, int] = {}  # stream tensor out of the last sub-block of a block -> block index
    for stream, i, out, attention in subs:
        b = stream_end.pop(stream, None)
        extend = b is not None and not attention and blocks[b][3] and not blocks[b][4]
        if extend:  # the MLP after an attention sub-block: the same decoder layer
            blocks[b][1] = out
            blocks[b][2].append(g.nodes[i].name)
            blocks[b][4] = True
            stream_end[out] = b
            continue
        blocks.append([stream, out, [g.nodes[i].name], attention, False])
        stream_end[out] = len(blocks) - 1
    return _with_cache(model, g, [Block(k, s, o, tuple(adds), att) for k, (s, o, adds, att, _) in enumerate(blocks)])


_AFTER_WEIGHTS = {"BatchNormalization", "Cast", "Identity", "Dropout", "Add", "Mul", "Div"}


def _from_weights(g: _Graph, name: str) -> bool:
    """Whether `name` is the output of a layer with weights (MatMul/Gemm/Conv reading a constant), possibly
    through a bias, a scale or a BatchNormalization: a residual branch ends so; scores plus a mask do not."""
    for _ in range(8):
        i = g.producer.get(name)
        if i is None:
            return False
        node = g.nodes[i]
        if node.op_type in _WEIGHTED:
            return len(node.input) > 1 and _constant(g, node.input[1])
        if node.op_type not in _AFTER_WEIGHTS:
            return False
        rest = [x for x in node.input[1:] if x]
        if node.op_type in ("Add", "Mul", "Div") and not all(_constant(g, x) for x in rest):
            return False
        name = node.input[0]
    return False


def _constant(g: _Graph, name: str) -> bool:
    """An initializer, or one seen through Cast/Transpose/DequantizeLinear/Identity."""
    for _ in range(4):
        if name in g.inits:
            return True
        i = g.producer.get(name)
        if i is None or g.nodes[i].op_type not in ("Cast", "Transpose", "DequantizeLinear", "Identity"):
            return False
        name = g.nodes[i].input[0]
    return False


def _same_shape(a, b) -> bool:
    """Whether two inferred shapes can be equal (a residual adds two tensors of one shape; an attention mask
    broadcast over the heads, [B, 1, S, S] + [B, H, S, S], is no residual). Unknown shapes pass."""
    if a is None or b is None:
        return True
    return len(a) == len(b) and all(x is None or y is None or x == y for x, y in zip(a, b))


def _with_cache(model: onnx.ModelProto, g: _Graph, blocks: list[Block]) -> list[Block]:
    """Each block with the graph outputs only it computes (computed from its input, not from its output: a
    layer's present key/value) and the cache inputs only those outputs' nodes read (its past key/value)."""
    if not blocks:
        return blocks
    outputs = [o.name for o in model.graph.output]
    inputs = set(cache_inputs(model))  # only state goes with a block; an attention mask first read in it stays
    out = []
    for block in blocks:
        own = tuple(o for o in outputs if o != block.output and g.depends(o, block.input)
                    and not g.depends(o, block.output))
        nodes = set().union(*(g.ancestors(o) for o in own)) if own else set()
        nodes -= g.ancestors(block.input)
        read = {x for j in nodes for x in g.nodes[j].input if x in inputs}
        elsewhere = {x for j, n in enumerate(g.nodes) if j not in nodes for x in n.input if x in read}
        out.append(Block(block.index, block.input, block.output, block.adds, block.attention,
                         tuple(sorted(read - elsewhere)), own))
    return out


def drop_blocks(model: onnx.ModelProto, blocks: list[Block]) -> onnx.ModelProto:
    """A copy of `model` without `blocks`: readers of a block's output read its input, its cache inputs and
    outputs go, and every node and initializer nothing reads any more is removed."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    rename: dict[str, str] = {}
    for block in sorted(blocks, key=lambda b: b.index, reverse=True):
        rename[block.output] = block.input

    def final(name: str) -> str:
        while name in rename:
            name = rename[name]
        return name

    drop_outputs = {o for b in blocks for o in b.cache_outputs}
    drop_inputs = {i for b in blocks for i in b.cache_inputs}
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name in rename:
                node.input[k] = final(name)
    kept_outputs = [o for o in graph.output if o.name not in drop_outputs]
    extra = []
    for o in kept_outputs:  # a dropped block's output that is a graph output keeps its name
        if o.name in rename:
            extra.append(onnx.helper.make_node("Identity", [final(o.name)], [o.name + "__depth"],
                                               name=f"depth_passthrough_{o.name}"))
    del graph.output[:]
    graph.output.extend(kept_outputs)
    _remove_dead(graph, extra)
    kept_inputs = [i for i in graph.input if i.name not in drop_inputs]
    del graph.input[:]
    graph.input.extend(kept_inputs)
    return out


def _remove_dead(graph: onnx.GraphProto, extra: list[onnx.NodeProto]) -> None:
    """Keep the nodes graph outputs need (with `extra` pass-through Identity nodes renamed onto the outputs),
    the initializers they read, and value_info of tensors still produced."""
    for node in extra:  # Identity(input) -> output name, replacing the dropped producer of that name
        node.output[0] = node.output[0][:-len("__depth")]
    nodes = [n for n in graph.node if not (set(n.output) & {e.output[0] for e in extra})] + extra
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    needed: set[int] = set()
    stack = [o.name for o in graph.output]
    subgraph_reads = _subgraph_reads(nodes)
    while stack:
        name = stack.pop()
        i = producer.get(name)
        if i is None or i in needed:
            continue
        needed.add(i)
        stack.extend(x for x in nodes[i].input if x)
        stack.extend(subgraph_reads.get(i, ()))
    kept = [n for i, n in enumerate(nodes) if i in needed]
    order = {id(n): k for k, n in enumerate(graph.node)}
    kept.sort(key=lambda n: order.get(id(n), len(order)))  # pass-throughs go where the producer was: at the end
    kept = _topological(kept, {i.name for i in graph.input} | {t.name for t in graph.initializer})
    del graph.node[:]
    graph.node.extend(kept)
    read = {x for n in kept for x in n.input} | set().union(*(_subgraph_reads([n]).get(0, set()) for n in kept))
    inits = [t for t in graph.initializer if t.name in read]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    produced = {o for n in kept for o in n.output}
    infos = [v for v in graph.value_info if v.name in produced]
    del graph.value_info[:]
    graph.value_info.extend(infos)


def _subgraph_reads(nodes) -> dict[int, set[str]]:
    """Outer-scope names read inside the subgraphs (If/Loop/Scan) of each node, by node position."""
    reads: dict[int, set[str]] = defaultdict(set)
    for i, node in enumerate(nodes):
        for a in node.attribute:
            graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
            for sub in graphs:
                for n in sub.node:
                    reads[i].update(x for x in n.input if x)
    return reads


def _topological(nodes: list[onnx.NodeProto], available: set[str]) -> list[onnx.NodeProto]:
    """`nodes` in an order where every input is produced first (stable: the given order where it already is)."""
    available = set(available) | {""}
    pending, out = list(nodes), []
    produced_by = {o for n in nodes for o in n.output}
    while pending:
        rest = []
        for n in pending:
            if all(x in available or x not in produced_by for x in n.input):
                out.append(n)
                available.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            return out + rest  # a cycle cannot come from dropping blocks; keep what is there
        pending = rest
    return out


_SKIP_NORMS = {"SkipSimplifiedLayerNormalization": "SimplifiedLayerNormalization",
               "SkipLayerNormalization": "LayerNormalization"}


def unfuse_skip_norms(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """`model` with every fused skip norm (com.microsoft Skip[Simplified]LayerNormalization) written as
    Add (input + skip [+ bias]) and the plain norm, and how many were split. Its sum output keeps its name; an
    unnamed sum gets one. Nodes that also output their mean or inverse deviation stay fused."""
    if not any(n.op_type in _SKIP_NORMS and n.domain == "com.microsoft" for n in model.graph.node):
        return model, 0  # nothing fused: no copy (a model can be a third of the machine's memory)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes, count = [], 0
    for node in out.graph.node:
        plain = _SKIP_NORMS.get(node.op_type) if node.domain == "com.microsoft" else None
        extra = [o for o in node.output[1:3] if o]
        if plain is None or extra:
            nodes.append(node)
            continue
        count += 1
        ins = list(node.input) + [""] * (5 - len(node.input))
        x, skip, gamma = ins[0], ins[1], ins[2]
        beta, bias = (ins[3], ins[4]) if plain == "LayerNormalization" else ("", ins[3])
        total = node.output[3] if len(node.output) > 3 and node.output[3] else f"{node.name}/residual_sum"
        if bias:
            nodes.append(helper.make_node("Add", [skip, bias], [f"{node.name}/skip_bias"], name=f"{node.name}/bias"))
            skip = f"{node.name}/skip_bias"
        nodes.append(helper.make_node("Add", [x, skip], [total], name=f"{node.name}/residual"))
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        norm_inputs = [total, gamma] + ([beta] if beta else [])
        nodes.append(helper.make_node(plain, norm_inputs, [node.output[0]], name=f"{node.name}/norm", axis=-1,
                                      epsilon=eps, stash_type=1))
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out, count


def renumber_cache(model: onnx.ModelProto, blocks: list[Block], dropped: list[int]) -> dict[str, str]:
    """Rename the cache inputs and outputs of the blocks that stay so that their layer numbers run 0, 1, ...
    (in place); returns old name -> new name. Nothing is renamed unless every block's cache names hold its own
    index as a number (past_key_values.3.key)."""
    cached = [b for b in blocks if b.cache_inputs or b.cache_outputs]
    if not cached or len(cached) != len(blocks) or not all(
            re.search(rf"(?<![0-9]){b.index}(?![0-9])", n) for b in cached for n in (*b.cache_inputs,
                                                                                 *b.cache_outputs)):
        return {}
    rename: dict[str, str] = {}
    new = 0
    for b in blocks:
        if b.index in dropped:
            continue
        if new != b.index:
            for name in (*b.cache_inputs, *b.cache_outputs):
                rename[name] = re.sub(rf"(?<![0-9]){b.index}(?![0-9])", str(new), name, count=1)
        new += 1
    graph = model.graph
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        if value.name in rename:
            value.name = rename[value.name]
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name in rename:
                node.input[k] = rename[name]
        for k, name in enumerate(node.output):
            if name in rename:
                node.output[k] = rename[name]
    return rename
