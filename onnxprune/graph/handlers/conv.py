"""Conv and ConvTranspose: open a space of output channels, read the input's channels.

Depthwise convolutions (group == input channels) carry their input's channels instead of opening a new space:
output channel `c * m + j` belongs to input channel `c` (m = channel multiplier), so the output layout is the
input's with `inner` multiplied by m, and the `group` attribute is set to the new channel count.
"""

from __future__ import annotations

from dataclasses import replace

from onnxprune.graph.handlers import Handler, register
from onnxprune.graph.handlers.concat import _slice_params, _split_sizes
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
            out = ctx.open_spaces(node, 1, output_parts(ctx, node.output[0], c_out))
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


_CARRY = frozenset({"Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu", "Celu",
                    "Mish", "Softplus", "Clip", "Identity", "BatchNormalization"})


def output_parts(ctx, name: str, channels: int) -> list[int]:
    """Sizes of the parts a conv's output channels are cut into right after it, or [channels].

    YOLOv8's C2f (and CSP blocks) run `conv(x).chunk(2, 1)`: the activated output is cut by Slices (or a Split)
    into halves that go their own ways. Each half then is a space of its own, so that a cut at the boundary is
    followed instead of freezing the conv. Looks through activations, SiLU (x·sigmoid(x)) and BatchNorm.
    """
    for _ in range(4):
        uses = [(u, i) for u, i in ctx.view.consumers.get(name, []) if u.op_type not in ("Shape", "Size")]
        if name in ctx.view.graph_outputs or not uses:
            return [channels]
        silu = [u for u, _ in uses if u.op_type == "Sigmoid"]
        if len(uses) == 2 and len(silu) == 1:
            mul = [u for u, _ in uses if u.op_type == "Mul" and set(u.input) == {name, silu[0].output[0]}]
            if mul and ctx.view.uses(silu[0].output[0]) == 1:
                name = mul[0].output[0]
                continue
        if len(uses) == 1 and uses[0][0].op_type in _CARRY and uses[0][1] == 0:
            name = uses[0][0].output[0]
            continue
        return _cut_sizes(ctx, name, uses, channels)
    return [channels]


def _cut_sizes(ctx, name, uses, channels):
    rank = ctx.view.rank(name)
    if rank is None or rank < 2:
        return [channels]
    if len(uses) == 1 and uses[0][0].op_type == "Split" and uses[0][1] == 0:
        split = uses[0][0]
        if attr(split, "axis", 0) % rank != 1:
            return [channels]
        sizes = _split_sizes(split, ctx, channels)
        return sizes if sizes and sum(sizes) == channels and len(sizes) > 1 else [channels]
    spans = []
    for use, index in uses:
        params = _slice_params(use, ctx) if use.op_type == "Slice" and index == 0 else None
        if params is None:
            return [channels]
        starts, ends, axes, steps = params
        axes = [a % rank for a in axes]
        if axes != [1] or steps[0] != 1:
            return [channels]
        start, stop, _ = slice(starts[0], ends[0]).indices(channels)
        spans.append((start, stop))
    spans = sorted(set(spans))
    if len(spans) < 2 or spans[0][0] != 0 or spans[-1][1] != channels or any(
            a[1] != b[0] for a, b in zip(spans, spans[1:])):
        return [channels]
    return [stop - start for start, stop in spans]


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
