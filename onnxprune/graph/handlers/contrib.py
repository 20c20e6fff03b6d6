"""Normalisations and weights of onnxruntime-genai and onnxruntime's transformer optimizer (com.microsoft ops).

SimplifiedLayerNormalization (RMSNorm; onnxruntime registers it in the ONNX domain) and ONNX's own
RMSNormalization (opset 23) normalise over trailing axes like LayerNormalization (norm.py). The Skip* ops add a
residual first: input + skip (+ bias) is a residual join (their spaces merge), output 3 is that sum (the residual
stream onward), output 0 its normalisation. The hidden size is frozen there unless `prune_hidden` (approximate,
as for LayerNorm). MatMulNBits holds int4/int8 weights packed in blocks along K: it freezes what touches it.
"""

from __future__ import annotations

from onnxprune.graph.handlers import Handler, register
from onnxprune.graph.handlers.norm import LayerNorm


@register("SimplifiedLayerNormalization", "RMSNormalization")
@register("SimplifiedLayerNormalization", domain="com.microsoft")
class SimplifiedLayerNorm(LayerNorm):
    """X, scale -> Y (and inv_std_var): LayerNorm without the mean and bias."""


@register("SkipSimplifiedLayerNormalization", "SkipLayerNormalization", domain="com.microsoft")
class SkipNorm(Handler):
    """input, skip, gamma[, beta], bias -> output, mean, inv_std_var, input_skip_bias_sum."""

    def analyze(self, node, ctx):
        x, skip = ctx.axis_of(node.input[0]), ctx.axis_of(node.input[1])
        if x is None and skip is None:
            return
        if x is None or skip is None:
            other = node.input[0] if x is None else node.input[1]
            ctx.freeze_inputs(node, f"hidden size (residual stream through {node.op_type}) is frozen: input "
                                    f"{other} has no prunable channels")
            return
        rank = ctx.view.rank(node.input[0])
        if not ctx.union(x, skip) or rank is None or x.axis != rank - 1:
            ctx.freeze_inputs(node, "input and skip carry differently arranged channels")
            return
        bias = 4 if node.op_type == "SkipLayerNormalization" else 3
        if len(node.input) > bias and node.input[bias] and not ctx.add_member(node, bias, 0, x.with_axis(0), "pass",
                                                                               scored=False):
            return
        if len(node.output) > 3 and node.output[3]:
            ctx.set_axis(node.output[3], x)
        if not ctx.prune_hidden:
            ctx.freeze(x, f"hidden size (residual stream through {node.op_type}) is frozen; --prune-hidden prunes "
                          "it approximately")
            return
        params = (2, 3) if node.op_type == "SkipLayerNormalization" else (2,)
        for idx in params:
            if len(node.input) > idx and node.input[idx] and not ctx.add_member(node, idx, 0, x.with_axis(0), "pass",
                                                                                scored=False):
                return
        ctx.approximate.update(x.spaces())
        ctx.set_axis(node.output[0], x)


@register("MatMulNBits", domain="com.microsoft")
class MatMulNBits(Handler):
    def analyze(self, node, ctx):
        ctx.freeze_inputs(node, "MatMulNBits holds quantized weights packed in blocks along K; prune the float "
                                "model, then quantize it (onnxprune quantize --mode int4)")
