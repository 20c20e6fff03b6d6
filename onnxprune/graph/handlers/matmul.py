"""Gemm and MatMul with a constant weight: a fully connected layer.

Input features (the last axis of A, or axis 1 of a 2-D Gemm input) are read through weight rows; output
features open a new space. Gemm stores B as [K, N] or, with transB=1, [N, K] (PyTorch's Linear). MatMul
weights are [K, N]; batch and row axes of A pass through unchanged.

A MatMul of two activations (attention: Q·Kᵀ and P·V) carries channels on its batch axes: [B, H, S, D] ×
[B, H, D, S] keeps the heads on axis 1, and both operands must lose the same heads, so their spaces merge.
Channels on the contracted axis (head_dim) cannot be followed and freeze.
"""

from __future__ import annotations

import math

import numpy as np

from onnxprune.graph.handlers import Handler, register
from onnxprune.graph.ir import attr


def fused_parts(ctx, name: str, n: int) -> list[int]:
    """Sizes of the parts a fused projection's n output features are split into right after it ([n] if none).

    Looks through the bias Add and the Reshapes TorchScript puts around a 2-D Gemm to the Split on the feature
    axis (GPT-2's c_attn → q, k, v), or to a GroupQueryAttention that reads packed q|k|v. Opening one space per
    part lets each part lose its own channels.
    """
    for _ in range(4):
        # a Shape reads no values (TorchScript takes the Reshape target from it)
        uses = [u for u in ctx.view.consumers.get(name, []) if u[0].op_type != "Shape"]
        if len(uses) != 1 or name in ctx.view.graph_outputs:
            return [n]
        node, index = uses[0]
        rank = ctx.view.rank(name)
        if node.op_type == "GroupQueryAttention" and node.domain == "com.microsoft" and index == 0 and (
                len(node.input) < 2 or not node.input[1]):
            # onnxruntime-genai's packed q|k|v projection, its head counts in the op's attributes
            q, kv = attr(node, "num_heads", 0), attr(node, "kv_num_heads", 0)
            if q and kv and n % (q + 2 * kv) == 0:
                head = n // (q + 2 * kv)
                return [q * head, kv * head, kv * head]
            return [n]
        if node.op_type == "Split" and index == 0 and rank is not None:
            axis = attr(node, "axis", 0)
            if (axis + rank if axis < 0 else axis) != rank - 1:
                return [n]
            if len(node.input) > 1 and node.input[1]:
                arr = ctx.view.array(node.input[1])
                sizes = None if arr is None else [int(v) for v in arr.ravel()]
            elif ctx.view.opset < 13 and attr(node, "split") is not None:
                sizes = list(attr(node, "split"))
            else:
                k = len(node.output)
                sizes = [n // k] * k if n % k == 0 else None
            return sizes if sizes and sum(sizes) == n and len(sizes) > 1 else [n]
        if node.op_type == "Add" and all(ctx.view.is_const(i) for i in node.input if i != name):
            name = node.output[0]
        elif node.op_type == "Reshape" and (ctx.view.sym_shape(node.output[0]) or (None,))[-1] == n:
            name = node.output[0]
        elif node.op_type == "Reshape" and index == 0:
            # a packed q/k/v projection viewed as [.., 3, E] (torch's nn.MultiheadAttention) or [.., 3, H, D]
            # (timm's Attention), q, k and v then picked along the 3-axis (Gather, or Split/Slice + Squeeze)
            out, before = ctx.view.sym_shape(node.output[0]), ctx.view.sym_shape(name)
            r = len(before) - 1 if before else -1
            if r < 0 or out is None or len(out) < r + 2 or None in out[r:] or list(out[:r]) != list(before[:r]):
                return [n]
            k, size = out[r], math.prod(out[r + 1:])
            if 1 < k < n and k * size == n and _picks_parts(ctx, node.output[0], r, k):
                return [size] * k
            return [n]
        else:
            return [n]
    return [n]


def _picks_parts(ctx, name: str, axis: int, k: int) -> bool:
    """Whether axis `axis` (length k) of `name` is only ever cut into single entries (after axis moves): Gather of
    constant scalars, a Split into k parts, or Slices one entry wide."""
    for _ in range(4):
        uses = ctx.view.consumers.get(name, [])
        if not uses or name in ctx.view.graph_outputs:
            return False
        rank = ctx.view.rank(name)
        if rank is not None and all(u.op_type in ("Gather", "Split", "Slice") and i == 0 for u, i in uses):
            return all(_picks_one(ctx, use, axis, k, rank) for use, _ in uses)
        if len(uses) != 1:
            return False
        node, _ = uses[0]
        out_rank = ctx.view.rank(node.output[0])
        if out_rank is None or rank is None:
            return False
        if node.op_type == "Transpose":
            perm = attr(node, "perm", list(range(rank - 1, -1, -1)))
            axis = list(perm).index(axis)
        elif node.op_type in ("Unsqueeze", "Squeeze"):
            axes = attr(node, "axes") if ctx.view.opset < 13 else (
                ctx.view.array(node.input[1]) if len(node.input) > 1 and node.input[1] else None)
            if axes is None:
                return False
            if node.op_type == "Unsqueeze":
                axes = sorted(int(a) % out_rank for a in np.ravel(axes))
                axis = [i for i in range(out_rank) if i not in axes][axis]
            else:
                axes = {int(a) % rank for a in np.ravel(axes)}
                if axis in axes:
                    return False
                axis -= sum(1 for a in axes if a < axis)
        else:
            return False
        name = node.output[0]
    return False


def _picks_one(ctx, node, axis: int, k: int, rank: int) -> bool:
    if node.op_type == "Gather":
        along, index = attr(node, "axis", 0), ctx.view.array(node.input[1])
        return (along % rank == axis and index is not None and index.ndim == 0 and -k <= int(index) < k)
    if node.op_type == "Split":
        sizes = ctx.view.array(node.input[1]) if len(node.input) > 1 and node.input[1] else attr(node, "split")
        return attr(node, "axis", 0) % rank == axis and len(node.output) == k and (
            sizes is None or all(int(s) == 1 for s in np.ravel(sizes)))
    if ctx.view.opset < 10 or len(node.input) < 4 or not node.input[3]:
        return False
    starts, ends, axes = (ctx.view.array(node.input[i]) for i in (1, 2, 3))
    steps = ctx.view.array(node.input[4]) if len(node.input) > 4 and node.input[4] else np.ones(1)
    if starts is None or ends is None or axes is None or steps is None or np.size(axes) != 1:
        return False
    lo, hi, step = slice(int(np.ravel(starts)[0]), int(np.ravel(ends)[0]), int(np.ravel(steps)[0])).indices(k)
    return int(np.ravel(axes)[0]) % rank == axis and step == 1 and hi - lo == 1


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
        out = ctx.open_spaces(node, 1, fused_parts(ctx, node.output[0], weight.shape[n_axis]))
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
        if weight is None and ctx.view.array(node.input[1]) is None and not ctx.view.is_const(node.input[1]):
            self._activations(node, ctx)
            return
        if weight is None or weight.ndim != 2 or rank is None or rank < 2:
            ctx.freeze_inputs(node, "MatMul without a 2-D constant weight")
            return
        if a is not None and a.axis == rank - 1:
            ctx.add_member(node, 1, 0, a, "in")
        elif a is not None:
            # rows and batch axes pass through; they cannot also be the output features
            ctx.set_axis(node.output[0], a)
            return
        out = ctx.open_spaces(node, rank - 1, fused_parts(ctx, node.output[0], weight.shape[1]))
        ctx.add_member(node, 1, 1, out, "out")
        ctx.set_axis(node.output[0], out)

    @staticmethod
    def _activations(node, ctx):
        a, b = ctx.axis_of(node.input[0]), ctx.axis_of(node.input[1])
        if a is None and b is None:
            return
        ra, rb = ctx.view.rank(node.input[0]), ctx.view.rank(node.input[1])
        if ra is None or rb is None or ra < 2 or rb < 2:
            ctx.freeze_inputs(node, "MatMul of activations with unknown or 1-D operands")
            return
        ro = max(ra, rb)
        # output axis of each operand's channels: batch axes align from the right; A's rows and B's columns
        # become the output's last two axes; the contracted axis has no output axis
        placed = []
        for ax, rank, contracted, own in ((a, ra, ra - 1, ra - 2), (b, rb, rb - 2, rb - 1)):
            if ax is None:
                placed.append(None)
            elif ax.axis == contracted:
                ctx.freeze_inputs(node, "channels on the contracted axis of a MatMul of activations")
                return
            elif ax.axis == own:
                placed.append(ro - 2 if own == ra - 2 else ro - 1)
            else:
                placed.append(ax.axis + ro - rank)
        if a is not None and b is not None:
            if placed[0] != placed[1] or placed[0] >= ro - 2:
                ctx.freeze_inputs(node, "operands carry channels on different axes")
                return
            if not ctx.union(a, b):
                ctx.freeze_inputs(node, "the operands' heads are arranged differently (grouped-query attention, "
                                        "where each k/v head serves several q heads, is not pruned)")
                return
            ctx.set_axis(node.output[0], a.with_axis(placed[0]))
            return
        ax, out_axis = (a, placed[0]) if a is not None else (b, placed[1])
        if out_axis < ro - 2:
            # a batch axis: the other operand must broadcast there (length 1 or missing)
            other = node.input[1] if a is not None else node.input[0]
            other_rank = rb if a is not None else ra
            k = out_axis - (ro - other_rank)
            if k >= 0 and ctx.view.dim(other, k) != 1:
                ctx.freeze_inputs(node, f"the other operand of a MatMul of activations has {ctx.view.dim(other, k)} "
                                        "entries on the channel axis")
                return
        ctx.set_axis(node.output[0], ax.with_axis(out_axis))
