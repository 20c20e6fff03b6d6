"""Layout ops: Transpose, Squeeze/Unsqueeze move the channel axis; Flatten and Reshape merge it with others.

When the channel axis is merged with `leading` dims before it and `trailing` dims after it, channel c becomes
the features { l * C * trailing + c * trailing + t }: every segment's `inner` is multiplied by `trailing` and a
block of `leading` repeats is added (NHWC → Flatten puts the spatial dims in front of the channels). A Reshape
that splits the channel axis itself (channel shuffle, attention heads) is followed only when the channels stay
whole on one output axis; otherwise it freezes.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from onnxprune.graph.groups import HeadRepeat
from onnxprune.graph.handlers import Handler, register
from onnxprune.graph.ir import attr
from onnxprune.graph.layout import ChannelAxis, Segment


@register("Transpose")
class Transpose(Handler):
    def analyze(self, node, ctx):
        x = ctx.axis_of(node.input[0])
        if x is None:
            return
        rank = ctx.view.rank(node.input[0])
        perm = attr(node, "perm", list(range(rank - 1, -1, -1)) if rank is not None else None)
        if perm is None:
            ctx.freeze(x, f"Transpose {node.name}: unknown rank")
            return
        ctx.set_axis(node.output[0], x.with_axis(list(perm).index(x.axis)))


def _axes(node, ctx):
    if ctx.view.opset >= 13 and len(node.input) > 1 and node.input[1]:
        arr = ctx.view.array(node.input[1])
        return None if arr is None else [int(a) for a in np.ravel(arr)]
    return attr(node, "axes")


@register("Squeeze")
class Squeeze(Handler):
    def analyze(self, node, ctx):
        x = ctx.axis_of(node.input[0])
        if x is None:
            return
        shape = ctx.view.shape(node.input[0]) or ctx.view.sym_shape(node.input[0])
        axes = _axes(node, ctx)
        if axes is None and shape is not None and all(d is not None for d in shape):
            axes = [i for i, d in enumerate(shape) if d == 1]
        if axes is None or shape is None:
            ctx.freeze(x, f"Squeeze {node.name}: axes unknown")
            return
        axes = [a + len(shape) if a < 0 else a for a in axes]
        if x.axis in axes:
            ctx.freeze(x, f"Squeeze {node.name}: squeezes the channel axis")
            return
        ctx.set_axis(node.output[0], x.with_axis(x.axis - sum(1 for a in axes if a < x.axis)))


@register("Unsqueeze")
class Unsqueeze(Handler):
    def analyze(self, node, ctx):
        x = ctx.axis_of(node.input[0])
        if x is None:
            return
        rank = ctx.view.rank(node.input[0])
        axes = _axes(node, ctx)
        if axes is None or rank is None:
            ctx.freeze(x, f"Unsqueeze {node.name}: axes unknown")
            return
        out_rank = rank + len(axes)
        axes = sorted(a + out_rank if a < 0 else a for a in axes)
        kept = [i for i in range(out_rank) if i not in axes]
        ctx.set_axis(node.output[0], x.with_axis(kept[x.axis]))


@register("Flatten")
class Flatten(Handler):
    def analyze(self, node, ctx):
        x = ctx.axis_of(node.input[0])
        if x is None:
            return
        shape = ctx.view.shape(node.input[0])
        if shape is None:
            ctx.freeze(x, f"Flatten {node.name}: unknown input shape")
            return
        k = attr(node, "axis", 1)
        k = k + len(shape) if k < 0 else k
        if x.axis < k:
            ctx.freeze(x, f"Flatten {node.name}: merges the channel axis into the batch axis")
            return
        merged = _merge(x, shape, k, len(shape), 1)
        if merged is None:
            ctx.freeze(x, f"Flatten {node.name}: dims next to the channel axis are not static")
            return
        ctx.set_axis(node.output[0], merged)


def _merge(x, shape, start, stop, new_axis):
    """The channel axis after dims [start, stop) of `shape` (which contain it) are merged into `new_axis`."""
    leading, trailing = shape[start:x.axis], shape[x.axis + 1:stop]
    if any(d is None for d in leading + trailing):
        return None
    return x.expanded(new_axis, trailing=math.prod(trailing), leading=math.prod(leading))


@register("Reshape")
class Reshape(Handler):
    """Follows the channel axis through merges and splits of neighbouring dims.

    Dims are compared as products of symbolic shapes (ir.sym_shape): [batch, seq, 768] → [batch, seq, 12, 64]
    matches because batch and seq stand for the same numbers on both sides. The output axis is found by
    inverting `Segment.expanded`; failing that, H·D plain features split into [H, D] become a head axis
    (`Segment.divisor`) and the space is constrained to whole heads.
    """

    def analyze(self, node, ctx):
        x = ctx.axis_of(node.input[0])
        if x is None:
            return
        if ctx.axis_of(node.input[1]) is not None:
            ctx.freeze_inputs(node, "shape input carries channels")
            return
        shape_in, shape_out = ctx.view.sym_shape(node.input[0]), ctx.view.sym_shape(node.output[0])
        repeat = ctx.repeats.get(node.input[0])
        if repeat is not None and repeat.axis == x.axis + 1 and self._repeated_heads(node, ctx, x, repeat, shape_in,
                                                                                     shape_out):
            return
        stacked = _stack_parts(x, shape_in, shape_out)
        if stacked is not None:
            # q, k and v viewed as [.., 3, E]: one tensor axis holds all three, so they lose the same channels
            for seg in x.segments[1:]:
                ctx.spaces.union(x.segments[0].space, seg.space)
            if stacked.segments[0].divisor:
                ctx.spaces.constrain_unit(x.segments[0].space, stacked.segments[0].divisor)
            ctx.set_axis(node.output[0], stacked)
            return
        mapped = self._map(x, shape_in, shape_out)
        if isinstance(mapped, str):
            ctx.freeze(x, f"Reshape {node.name}: {mapped}")
            return
        for seg in mapped.segments:
            if seg.divisor and not any(s.space == seg.space and s.divisor == seg.divisor for s in x.segments):
                ctx.spaces.constrain_unit(seg.space, seg.divisor)
        ctx.set_axis(node.output[0], mapped)

    def _repeated_heads(self, node, ctx, x, repeat, shape_in, shape_out) -> bool:
        """k/v heads [.., H_kv, g, ..] repeated by an Expand and merged into [.., H_kv·g, ..] (transformers'
        repeat_kv, torch's sdpa with enable_gqa): one head per query head. The merged axis opens a space of query
        heads coupled to the k/v heads, g query heads per k/v head (groups.py), so whatever reads it joins the
        query heads. False when the k/v heads are not one projection's whole head axis."""
        seg = x.segments[0] if len(x.segments) == 1 else None
        if seg is None or not seg.divisor or seg.inner != 1 or seg.outers or seg.offset or seg.modulo or \
                shape_in is None or len(shape_in) <= repeat.axis:
            return False
        head, count = seg.divisor, repeat.count
        merged = list(shape_in[:x.axis]) + [x.length * count] + list(shape_in[repeat.axis + 1:])
        queries = ctx.spaces.new(seg.channels * count, node.name, node.op_type)
        layout = ChannelAxis(x.axis, x.length * count, (Segment(queries, seg.channels * count, divisor=head),))
        mapped = self._map(layout, merged, shape_out)
        if isinstance(mapped, str):
            ctx.spaces.freeze(queries, f"Reshape {node.name}: {mapped}")
            return False
        ctx.spaces.constrain_unit(queries, head)
        ctx.spaces.couple(queries, seg.space, count, head)
        ctx.head_repeats[repeat.node] = HeadRepeat(repeat.node, x.axis, ctx.view.producer[node.input[0]].input[0],
                                                   node.output[0])
        ctx.set_axis(node.output[0], mapped)
        return True

    @staticmethod
    def _map(x, shape_in, shape_out):
        if shape_in is None or shape_out is None:
            return "unknown shapes"
        shape_in, shape_out = list(shape_in), list(shape_out)
        if not shape_in or not shape_out or x.axis >= len(shape_in):
            return "unknown shapes"
        tail = shape_in[x.axis:]
        if None not in tail and len(shape_out) >= len(tail) and shape_out[len(shape_out) - len(tail):] == tail:
            # the channel axis and every dim after it stay as they are, whatever happens in front (Swin's window
            # partition [B, H/7, 7, W/7, 7, C] -> [B·nW, 7, 7, C], whose leading dims are symbols that need not
            # line up): row-major order keeps each channel at the same index
            return x.with_axis(len(shape_out) - len(tail))
        # a leading dynamic batch dim on both sides maps to itself
        if shape_in and shape_out and shape_in[0] is None and shape_out[0] is None and x.axis > 0:
            shape_in[0] = shape_out[0] = 1
        # one dim the shape engines left unknown (a -1 target built from Shape slices) is what the other side's
        # product leaves: symbolic dims are primes, so the division is exact only for the right expression
        for known, unknown in ((shape_in, shape_out), (shape_out, shape_in)):
            if None not in known and unknown.count(None) == 1:
                rest = math.prod(d for d in unknown if d is not None)
                total = math.prod(known)
                if rest and total % rest == 0:
                    unknown[unknown.index(None)] = total // rest
        if any(d is None for d in shape_in + shape_out):
            return "dynamic dims besides the batch"
        pin = np.cumprod([1] + shape_in, dtype=object)
        pout = np.cumprod([1] + shape_out, dtype=object)
        common = sorted(set(pin.tolist()) & set(pout.tolist()))
        below = [p for p in common if p <= pin[x.axis]]
        above = [p for p in common if p >= pin[x.axis + 1]]
        if not below or not above:
            return "input and output dims do not line up around the channel axis"
        lo, hi = max(below), min(above)
        i0, i1 = pin.tolist().index(lo), len(pin) - 1 - pin.tolist()[::-1].index(hi)
        j0, j1 = pout.tolist().index(lo), len(pout) - 1 - pout.tolist()[::-1].index(hi)
        # skip size-1 dims at the group edges so [N,C,1,1] -> [N,C] maps one to one
        while j1 - j0 > 1 and shape_out[j1 - 1] == 1:
            j1 -= 1
        while j1 - j0 > 1 and shape_out[j0] == 1:
            j0 += 1
        while i1 - i0 > 1 and shape_in[i1 - 1] == 1 and i1 - 1 > x.axis:
            i1 -= 1
        while i1 - i0 > 1 and shape_in[i0] == 1 and i0 < x.axis:
            i0 += 1
        if j1 - j0 == 1:
            return _merge(x, shape_in, i0, i1, j0)
        features_last = i1 == len(shape_in) and j1 == len(shape_out)
        if features_last and i1 - i0 > 1 and x.axis == i1 - 1:
            # [.., B, H·D] -> [.., B·H, D]: heads split off and merged with the dims in front (torch's
            # nn.MultiheadAttention folds them into the batch)
            heads = _split_heads(x, shape_out, j0, j1, leading=math.prod(shape_in[i0:x.axis]))
            if heads is not None:
                return heads
        if i1 - i0 == 1:
            # the channel axis alone is split over several output axes: one of them holds the channels and
            # the others are what `expanded` once folded into it (batch in front, features behind)
            for j in range(j0, j1):
                leading, trailing = math.prod(shape_out[j0:j]), math.prod(shape_out[j + 1:j1])
                segs = [_unexpand(seg, leading, trailing, shape_out[j]) for seg in x.segments]
                if all(seg is not None for seg in segs):
                    return ChannelAxis(j, shape_out[j], tuple(segs))
            # heads only where features are the last axis, as in every transformer: a split of NCHW channels is
            # a channel shuffle, which stays frozen rather than pruned in whole shuffle groups
            heads = _split_heads(x, shape_out, j0, j1) if features_last else None
            if heads is not None:
                return heads
        return "splits the channel axis (channel shuffle or heads)"

    def rewrite(self, node, ctx):
        out = ctx.axis_of(node.output[0])
        if out is None:
            return
        shape_name = node.input[1]
        arr = ctx.view.array(shape_name)
        if arr is not None:
            if arr[out.axis] > 0 and ctx.new_length(node.output[0]) != arr[out.axis]:
                new = arr.copy()
                new[out.axis] = ctx.new_length(node.output[0])
                ctx.set_input_constant(node, 1, new)
            return
        producer = ctx.view.producer.get(shape_name)
        # a target built by Concat of pieces (TorchScript exports): fix the constant piece of the channel axis;
        # pieces read from Shape at run time follow the new length by themselves
        if producer is None or producer.op_type != "Concat":
            return
        pieces, pos = [], 0
        for idx, piece in enumerate(producer.input):
            n = ctx.view.dim(piece, 0) if ctx.view.rank(piece) == 1 else None
            if n is None:
                return
            pieces.append((idx, piece, pos, n))
            pos += n
        # edit the Concat of the model being rewritten, not the view's copy of it
        target = next(n for n in ctx.model.graph.node if n.name == producer.name)
        for idx, piece, pos, n in pieces:
            val = ctx.view.array(piece)
            static = [ctx.view.dim(node.output[0], k) for k in range(pos, pos + n)]
            if val is None and None not in static and ctx.plan.kept:
                # computed at run time from a tensor whose size pruning may change (TorchScript reads the hidden
                # size E for q/k/v's [3, E] and derives head_dim from it): these dims are static, so write
                # them down
                val = np.array(static, dtype=np.int64)
                ctx.set_input_constant(target, idx, val)
            if not pos <= out.axis < pos + n:
                continue
            if val is not None and val.ravel()[out.axis - pos] > 0:
                new_len = ctx.new_length(node.output[0])
                if new_len != val.ravel()[out.axis - pos]:
                    new = val.copy().ravel()
                    new[out.axis - pos] = new_len
                    ctx.set_input_constant(target, idx, new.reshape(val.shape))
            elif val is None:
                _rescale_head_count(ctx, piece, out)


def _rescale_head_count(ctx, name, out):
    """A target dim computed as rows × heads (TorchScript's `bsz * num_heads` for [S, B·H, D]): replace the
    head count H in the Mul by the number of heads kept."""
    seg = out.segments[0] if len(out.segments) == 1 else None
    if seg is None or not seg.divisor or len(seg.outers) != 1:
        return
    old = seg.outers[0][1]
    new = len(np.unique(replace(seg, outers=()).positions(ctx.plan.kept.get(ctx.find(seg.space)))))
    for _ in range(4):
        producer = ctx.view.producer.get(name)
        if producer is None:
            return
        if producer.op_type == "Mul":
            target = next(n for n in ctx.model.graph.node if n.name == producer.name)
            for idx, factor in enumerate(target.input):
                value = ctx.array(factor)
                if value is not None and value.size == 1 and int(value.ravel()[0]) == old and new != old:
                    ctx.set_input_constant(target, idx, np.full_like(value, new))
                    return
            return
        if producer.op_type not in ("Unsqueeze", "Squeeze", "Cast", "Reshape", "Identity"):
            return
        name = producer.input[0]


def _unexpand(seg, leading, trailing, length):
    """The segment `s` with s.expanded(trailing, leading, length) == seg, or None when there is none."""
    if seg.inner % trailing or seg.offset % trailing or any(s % trailing for _, s in seg.outers):
        return None
    outers = tuple((c, s // trailing) for c, s in seg.outers)
    if leading > 1:
        if not outers or outers[-1] != (leading, length):
            return None
        outers = outers[:-1]
    inner = seg.inner // trailing
    divisor = seg.divisor
    if divisor and trailing > 1:
        return None  # heads (divisor) merged with trailing dims cannot be undone here
    out = Segment(seg.space, seg.channels, inner, seg.offset // trailing, outers, seg.modulo, divisor, seg.fold)
    if out.span()[1] > length:
        return None
    return out


def _split_heads(x, shape_out, j0, j1, leading: int = 1):
    """H·D plain features split into [.., H, D] (D the product of the dims after H): a head axis.

    With `leading` > 1 the head axis also holds the `leading` dims that stood in front of the features
    ([B, H·D] -> [B·H, D]): head h of row b sits at b·H + h, one outer block of H per row.
    Each segment must be whole heads of plain features (one position per channel, aligned to D).
    """
    for j in range(j0, j1 - 1):
        if math.prod(shape_out[j0:j]) != 1:
            break
        head_dim = math.prod(shape_out[j + 1:j1])
        if shape_out[j] % leading or shape_out[j] // leading * head_dim != x.length:
            continue
        outers = ((leading, shape_out[j] // leading),) if leading > 1 else ()
        segs = []
        for seg in x.segments:
            if (seg.inner != 1 or seg.outers or seg.modulo or seg.divisor or seg.channels % head_dim
                    or seg.offset % head_dim):
                segs = None
                break
            segs.append(Segment(seg.space, seg.channels, 1, seg.offset // head_dim, outers, 0, head_dim))
        if segs:
            return ChannelAxis(j, shape_out[j], tuple(segs))
    return None


def _stack_parts(x, shape_in, shape_out):
    """The packed projection [.., k·E] (k side-by-side parts of E plain channels) viewed as [.., k, E] or, heads
    split at once, [.., k, H, D]: the channels after the k-axis, every part at offset 0 (the caller merges the
    parts' spaces and, for heads, keeps them whole). None otherwise."""
    if shape_in is None or shape_out is None or len(x.segments) < 2 or x.axis != len(shape_in) - 1:
        return None
    r = x.axis
    if len(shape_out) not in (r + 2, r + 3) or None in shape_out[r:] or list(shape_out[:r]) != list(shape_in[:r]):
        return None
    k, size = shape_out[r], math.prod(shape_out[r + 1:])
    segs = sorted(x.segments, key=lambda s: s.offset)
    if k != len(segs) or any(s.inner != 1 or s.outers or s.modulo or s.divisor or s.channels != size
                             or s.offset != i * size for i, s in enumerate(segs)):
        return None
    if len(shape_out) == r + 2:
        return ChannelAxis(r + 1, size, (Segment(segs[0].space, size),))
    return ChannelAxis(r + 1, shape_out[r + 1], (Segment(segs[0].space, size, divisor=shape_out[r + 2]),))
