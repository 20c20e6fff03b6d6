"""Normalisation layers.

BatchNormalization and InstanceNormalization work per channel: they carry the channel axis and their
per-channel parameters are sliced with it. LayerNormalization normalises over the trailing axes, so channels on
those axes are frozen (removing one would change every other channel's statistics); channels on a leading axis
pass through. With `prune_hidden` (the CLI's --prune-hidden) a LayerNorm over the last axis alone passes them
and its scale and bias are sliced: the pruned model then normalises over fewer features, an approximation.
LRN and GroupNormalization mix channels and freeze them.
"""

from __future__ import annotations

from onnxprune.graph.handlers import Handler, register
from onnxprune.graph.ir import attr


@register("BatchNormalization", "InstanceNormalization")
class PerChannelNorm(Handler):
    def analyze(self, node, ctx):
        x = ctx.axis_of(node.input[0])
        if x is None:
            return
        if x.axis != 1:
            ctx.freeze(x, f"{node.op_type} {node.name}: channels on axis {x.axis}, not 1")
            return
        if any(out and ctx.view.uses(out) for out in node.output[1:]):
            ctx.freeze(x, f"{node.op_type} {node.name}: training-mode statistics outputs are used")
            return
        for idx in range(1, len(node.input)):
            # scale (gamma) is what bn-scale scores; B, mean and var are carried along
            if not ctx.add_member(node, idx, 0, x, "pass", scored=(idx == 1)):
                return
        ctx.set_axis(node.output[0], x)


@register("LayerNormalization")
class LayerNorm(Handler):
    def analyze(self, node, ctx):
        x = ctx.axis_of(node.input[0])
        if x is None:
            return
        rank = ctx.view.rank(node.input[0])
        axis = attr(node, "axis", -1)
        if rank is None:
            ctx.freeze(x, f"LayerNormalization {node.name}: unknown rank")
            return
        axis = axis + rank if axis < 0 else axis
        if x.axis >= axis:
            if not (ctx.prune_hidden and axis == x.axis == rank - 1):
                ctx.freeze(x, f"LayerNormalization {node.name}: normalises over the channel axis")
                return
            for idx in (1, 2):
                if len(node.input) > idx and node.input[idx] and not ctx.add_member(node, idx, 0, x.with_axis(0),
                                                                                     "pass", scored=False):
                    return
            ctx.approximate.update(x.spaces())
        ctx.set_axis(node.output[0], x)


@register("LRN", "GroupNormalization", "MeanVarianceNormalization", "LpNormalization")
class ChannelMixingNorm(Handler):
    def analyze(self, node, ctx):
        ctx.freeze_inputs(node, "normalisation mixes channels")
