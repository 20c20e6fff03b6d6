"""Conv and ConvTranspose: open a space of output channels, read the input's channels.

Depthwise convolutions (group == input channels) carry their input's channels instead of opening a new space:
output channel `c * m + j` belongs to input channel `c` (m = channel multiplier), so the output layout is the
input's with `inner` multiplied by m, and the `group` attribute is set to the new channel count.
"""

from __future__ import annotations

from dataclasses import replace

from onnxprune.graph.handlers import Handler, register
from onnxprune.graph.ir import attr, set_attr


def _weight_or_freeze(node, ctx):
    weight = ctx.view.array(node.input[1])
    if weight is None:
        ctx.freeze_inputs(node, "weight is not a constant")
    return weight


@register("Conv")
class Conv(Handler):
    def analyze(self, node, ctx):
        weight = _weight_or_freeze(node, ctx)
        if weight is None:
            return
        x = ctx.axis_of(node.input[0])
        group = attr(node, "group", 1)
        c_out, c_in_per_group = weight.shape[0], weight.shape[1]
        c_in = c_in_per_group * group
        if x is not None and x.axis != 1:
            ctx.freeze(x, f"Conv {node.name}: channels arrive on axis {x.axis}, not 1")
            x = None
        if group == 1:
            if x is not None:
                ctx.add_member(node, 1, 1, x, "in")
            out = ctx.open_space(node, 1, c_out)
            self._out_members(node, ctx, out, "out")
            ctx.set_axis(node.output[0], out)
        elif c_in_per_group == 1 and group == c_in and x is not None:
            out = x.expanded(1, trailing=c_out // c_in, leading=1)
            self._out_members(node, ctx, out, "pass")
            ctx.set_axis(node.output[0], out)
        else:
            self._grouped(node, ctx, x, group, c_in, c_out)

    def _grouped(self, node, ctx, x, group, c_in, c_out):
        """Grouped convolution: every group must keep as many input and output channels as the others.

        Output channels may differ per group (each group owns its filters). Input channels are read through
        one weight axis of length C_in / group shared by all groups, so every group must keep the same local
        indices: the input space is tied to `group` blocks and the weight is sliced at c % (C_in / group).
        """
        if x is not None:
            seg = x.segments[0]
            if len(x.segments) == 1 and not seg.outers and seg.offset == 0 and seg.inner == 1 and not seg.modulo:
                ctx.spaces.constrain(seg.space, group, tied=True)
                local = x.__class__(1, c_in // group, (replace(seg, modulo=c_in // group),))
                ctx.add_member(node, 1, 1, local, "in")
            else:
                ctx.freeze(x, f"Conv {node.name}: grouped convolution (group={group}) over mixed channels")
        out = ctx.open_space(node, 1, c_out)
        ctx.spaces.constrain(out.segments[0].space, group, tied=False)
        self._out_members(node, ctx, out, "out")
        ctx.set_axis(node.output[0], out)

    @staticmethod
    def _out_members(node, ctx, out, role):
        ctx.add_member(node, 1, 0, out, role)
        if len(node.input) > 2 and node.input[2]:
            ctx.add_member(node, 2, 0, out, role, scored=False)

    def rewrite(self, node, ctx):
        group = attr(node, "group", 1)
        if group > 1:
            x = ctx.axis_of(node.input[0])
            weight = ctx.array(node.input[1])
            if x is not None and weight is not None and weight.shape[1] == 1:
                set_attr(node, "group", ctx.new_length(node.input[0]))


@register("ConvTranspose")
class ConvTranspose(Handler):
    """Weight layout [C_in, C_out / group, k...]: the input channels are axis 0, output channels axis 1."""

    def analyze(self, node, ctx):
        weight = _weight_or_freeze(node, ctx)
        if weight is None:
            return
        x = ctx.axis_of(node.input[0])
        group = attr(node, "group", 1)
        if x is not None and x.axis != 1:
            ctx.freeze(x, f"ConvTranspose {node.name}: channels arrive on axis {x.axis}, not 1")
            x = None
        c_in, per_group = weight.shape[0], weight.shape[1]
        if group == 1:
            if x is not None:
                ctx.add_member(node, 1, 0, x, "in")
            out = ctx.open_space(node, 1, per_group)
            ctx.add_member(node, 1, 1, out, "out")
            if len(node.input) > 2 and node.input[2]:
                ctx.add_member(node, 2, 0, out, "out", scored=False)
            ctx.set_axis(node.output[0], out)
        elif group == c_in and x is not None:
            out = x.expanded(1, trailing=per_group, leading=1)
            ctx.add_member(node, 1, 0, x, "pass")
            if len(node.input) > 2 and node.input[2]:
                ctx.add_member(node, 2, 0, out, "pass", scored=False)
            ctx.set_axis(node.output[0], out)
        elif x is not None:
            ctx.freeze(x, f"ConvTranspose {node.name}: grouped convolution (group={group})")

    def rewrite(self, node, ctx):
        if attr(node, "group", 1) > 1 and ctx.axis_of(node.input[0]) is not None:
            set_attr(node, "group", ctx.new_length(node.input[0]))
