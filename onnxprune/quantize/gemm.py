"""A graph pass: Gemm nodes become MatMul (+ Add), so that onnxruntime's MatMul quantizers reach them."""

from __future__ import annotations

import numpy as np
import onnx


def gemm_to_matmul(model: onnx.ModelProto, keep: set[str] = frozenset()) -> int:
    """Rewrite Gemm(A, B, C) with constant B as MatMul(A, B') + C, in place, except nodes named in `keep`;
    returns how many.

    onnxruntime's dynamic quantizer covers MatMul but not Gemm, and torch exports every Linear as Gemm.
    Y = alpha * A @ op(B) + beta * C, so alpha and beta fold into the constants B' and C.
    """
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    used = {n.name for n in model.graph.node}
    nodes = []
    count = 0

    def fresh(base: str) -> str:
        name = base
        while name in used:
            name += "_"
        used.add(name)
        return name

    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type != "Gemm" or node.name in keep or attrs.get("transA", 0) or len(node.input) < 2
                or node.input[1] not in inits):
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(inits[node.input[1]])
        if attrs.get("transB", 0):
            weight = weight.T
        weight = np.ascontiguousarray(weight * np.float32(attrs.get("alpha", 1.0))).astype(weight.dtype)
        w_name = f"{node.input[1]}__matmul_{count}"
        model.graph.initializer.append(numpy_helper.from_array(weight, w_name))
        has_bias = len(node.input) > 2 and node.input[2]
        mm_out = f"{node.output[0]}__matmul" if has_bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], w_name], [mm_out],
                                      name=fresh(f"{node.name or node.output[0]}_MatMul")))
        if has_bias:
            bias_name = node.input[2]
            beta = attrs.get("beta", 1.0)
            if beta != 1.0:
                if bias_name not in inits:
                    nodes[-1] = node  # a computed bias scaled by beta: leave this Gemm alone
                    model.graph.initializer.pop()
                    continue
                bias = numpy_helper.to_array(inits[bias_name]) * np.float32(beta)
                bias_name = f"{bias_name}__beta_{count}"
                model.graph.initializer.append(numpy_helper.from_array(bias.astype(np.float32), bias_name))
            nodes.append(helper.make_node("Add", [mm_out, bias_name], [node.output[0]],
                                          name=fresh(f"{node.name or node.output[0]}_Add")))
        count += 1
    if count:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        _drop_unused_initializers(model)
    return count


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
