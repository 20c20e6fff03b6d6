"""Gemm and MatMul with a constant weight: a fully connected layer.

Input features (the last axis of A, or axis 1 of a 2-D Gemm input) are read through weight rows; output
features open a new space. Gemm stores B as [K, N] or, with transB=1, [N, K] (PyTorch's Linear). MatMul
weights are [K, N]; batch and row axes of A pass through unchanged.
"""

from __future__ import annotations

from onnxprune.graph.handlers import Handler, register
from onnxprune.graph.ir import attr


@register("Gemm")
class Gemm(Handler):
    def analyze(self, node, ctx):
        a = ctx.axis_of(node.input[0])
        weight = ctx.view.array(node.input[1])
        if weight is None or attr(node, "transA", 0) or ctx.axis_of(node.input[1]) is not None:
            ctx.freeze_inputs(node, "weight is not a constant or A is transposed")
            return
        trans_b = attr(node, "transB", 0)
        k_axis, n_axis = (1, 0) if trans_b else (0, 1)
        if a is not None:
            if a.axis != 1:
                ctx.freeze(a, f"Gemm {node.name}: features arrive on axis {a.axis}")
            else:
                ctx.add_member(node, 1, k_axis, a, "in")
        out = ctx.open_space(node, 1, weight.shape[n_axis])
        ctx.add_member(node, 1, n_axis, out, "out")
        if len(node.input) > 2 and node.input[2]:
            bias = ctx.view.array(node.input[2])
            if bias is None:
                ctx.freeze(out, f"Gemm {node.name}: bias is not a constant")
            elif bias.ndim >= 1 and bias.shape[-1] == out.length and bias.size > 1:
                ctx.add_member(node, 2, bias.ndim - 1, out, "out", scored=False)
            elif bias.size != 1 and bias.shape[-1] != 1:
                ctx.freeze(out, f"Gemm {node.name}: bias of shape {bias.shape}")
        ctx.set_axis(node.output[0], out)


@register("MatMul")
class MatMul(Handler):
    def analyze(self, node, ctx):
        a = ctx.axis_of(node.input[0])
        weight = ctx.view.array(node.input[1])
        rank = ctx.view.rank(node.input[0])
        if weight is None or weight.ndim != 2 or rank is None or rank < 2:
            # activation x activation (attention scores) or an unknown layout: nothing to follow here
            ctx.freeze_inputs(node, "MatMul without a 2-D constant weight")
            return
        if a is not None and a.axis == rank - 1:
            ctx.add_member(node, 1, 0, a, "in")
        elif a is not None:
            # rows and batch axes pass through; they cannot also be the output features
            ctx.set_axis(node.output[0], a)
            return
        out = ctx.open_space(node, rank - 1, weight.shape[1])
        ctx.add_member(node, 1, 1, out, "out")
        ctx.set_axis(node.output[0], out)
