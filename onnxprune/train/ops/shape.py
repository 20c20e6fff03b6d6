"""Shapes, indexing and data movement: Shape, Reshape, Transpose, Concat, Split, Slice, Gather, Pad, Expand ...

Shape tensors are ordinary int64 tensors; an op that needs one as Python ints reads it with `.tolist()`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from onnxprune.errors import UnsupportedOpError
from onnxprune.train.ops import register
from onnxprune.train.ops.dtypes import torch_dtype


def ints(t) -> list[int]:
    return [int(v) for v in t.reshape(-1).tolist()]


def _norm(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


@register("Shape")
def shape(node, x):
    dims = list(x.shape)
    start, end = node.get("start", 0), node.get("end", None)
    return torch.tensor(dims[start:end] if end is not None else dims[start:], dtype=torch.int64, device=x.device)


@register("Size")
def size(node, x):
    return torch.tensor(x.numel(), dtype=torch.int64, device=x.device)


@register("Reshape", static=(1,))
def reshape(node, x, shape):
    target = ints(shape)
    if not node.get("allowzero", 0):
        target = [x.shape[i] if d == 0 else d for i, d in enumerate(target)]
    return x.reshape(target)


@register("Flatten")
def flatten(node, x):
    axis = _norm(node.get("axis", 1), x.dim())
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


@register("Transpose")
def transpose(node, x):
    perm = node.get("perm") or list(range(x.dim()))[::-1]
    return x.permute(perm)


@register("Squeeze", static=(1,))
def squeeze(node, x, axes=None):
    axes = node.get("axes") if node.opset < 13 else (None if axes is None else ints(axes))
    if axes is None:
        return x.reshape([d for d in x.shape if d != 1])
    axes = {_norm(a, x.dim()) for a in axes}
    return x.reshape([d for i, d in enumerate(x.shape) if i not in axes])


@register("Unsqueeze", static=(1,))
def unsqueeze(node, x, axes=None):
    axes = node.get("axes") if node.opset < 13 else ints(axes)
    rank = x.dim() + len(axes)
    axes = sorted(_norm(a, rank) for a in axes)
    out = list(x.shape)
    for a in axes:
        out.insert(a, 1)
    return x.reshape(out)


@register("Concat")
def concat(node, *xs):
    xs = [x for x in xs if x is not None]
    axis = _norm(node.get("axis"), xs[0].dim())
    # an empty 1-D tensor may join anything (exporters emit it for shapes); torch.cat accepts that too
    return torch.cat(xs, axis)


@register("Split", static=(1,))
def split(node, x, sizes=None):
    axis = _norm(node.get("axis", 0), x.dim())
    if node.opset < 13:
        sizes = node.get("split")
    elif sizes is not None:
        sizes = ints(sizes)
    if not sizes:
        n = node.get("num_outputs", node.n_outputs) if node.opset >= 18 else node.n_outputs
        dim = x.shape[axis]
        chunk = -(-dim // n)
        sizes = [min(chunk, max(dim - i * chunk, 0)) for i in range(n)]
    return tuple(torch.split(x, sizes, axis))


def _slice_axis(x, axis, start, end, step):
    dim = x.shape[axis]
    if start < 0:
        start += dim
    if end < 0:
        end += dim
    if step > 0:
        start, end = min(max(start, 0), dim), min(max(end, 0), dim)
        if step == 1:
            return x.narrow(axis, start, max(end - start, 0))
        index = torch.arange(start, end, step, device=x.device)
    else:
        start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
        index = torch.arange(start, end, step, device=x.device)
    return x.index_select(axis, index)


@register("Slice", static=(1, 2, 3, 4))
def slice_(node, x, starts=None, ends=None, axes=None, steps=None):
    if node.opset < 10:
        starts, ends, axes, steps = node.get("starts"), node.get("ends"), node.get("axes"), None
    else:
        starts, ends = ints(starts), ints(ends)
        axes = None if axes is None else ints(axes)
        steps = None if steps is None else ints(steps)
    axes = list(range(len(starts))) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    for s, e, a, st in zip(starts, ends, axes, steps):
        x = _slice_axis(x, _norm(a, x.dim()), s, e, st)
    return x


def _index(indices, dim):
    return torch.where(indices < 0, indices + dim, indices)


@register("Gather", static=(1,))
def gather(node, x, indices):
    axis = _norm(node.get("axis", 0), x.dim())
    idx = _index(indices.to(torch.int64), x.shape[axis])
    out = x.index_select(axis, idx.reshape(-1))
    return out.reshape(tuple(x.shape[:axis]) + tuple(idx.shape) + tuple(x.shape[axis + 1:]))


@register("GatherElements", static=(1,))
def gather_elements(node, x, indices):
    axis = _norm(node.get("axis", 0), x.dim())
    return torch.gather(x, axis, _index(indices.to(torch.int64), x.shape[axis]))


@register("GatherND", static=(1,))
def gather_nd(node, x, indices):
    b = node.get("batch_dims", 0)
    indices = indices.to(torch.int64)
    k = indices.shape[-1]
    batch = x.shape[:b]
    xb = x.reshape((math.prod(batch),) + tuple(x.shape[b:]))
    ib = indices.reshape((math.prod(batch), -1, k))
    outs = []
    for i in range(xb.shape[0]):
        idx = _index(ib[i], torch.tensor(xb.shape[1:1 + k], device=x.device))
        outs.append(xb[i][tuple(idx.unbind(-1))])
    out = torch.stack(outs)
    return out.reshape(tuple(indices.shape[:-1]) + tuple(x.shape[b + k:]))


@register("ScatterND", static=(1,))
def scatter_nd(node, x, indices, updates):
    if node.get("reduction", "none") != "none":
        raise UnsupportedOpError("the training bridge does not run ScatterND reduction")
    out = x.clone()
    idx = _index(indices.to(torch.int64), torch.tensor(x.shape[:indices.shape[-1]], device=x.device))
    out[tuple(idx.unbind(-1))] = updates
    return out


@register("ScatterElements", static=(1,), check=lambda n: None if n.get("reduction", "none") == "none"
          else "reduction is not implemented")
def scatter_elements(node, x, indices, updates):
    axis = _norm(node.get("axis", 0), x.dim())
    return torch.scatter(x, axis, _index(indices.to(torch.int64), x.shape[axis]), updates)


@register("Expand", static=(1,))
def expand(node, x, shape):
    return x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(ints(shape))))


@register("Tile", static=(1,))
def tile(node, x, repeats):
    return x.repeat(ints(repeats))


@register("ConstantOfShape", static=(0,))
def constant_of_shape(node, shape):
    value = node.get("value")
    dtype = torch.float32 if value is None else torch_dtype(value.data_type)
    fill = 0 if value is None else _tensor_value(value).reshape(-1)[0].item()
    return torch.full(ints(shape), fill, dtype=dtype, device=shape.device)


def _tensor_value(t):
    from onnx import numpy_helper

    arr = numpy_helper.to_array(t)
    if arr.dtype.kind == "f" or arr.dtype.name == "bfloat16":
        arr = arr.astype(np.float64 if arr.dtype == np.float64 else np.float32)
    return torch.from_numpy(np.array(arr))


@register("Range", static=(0, 1, 2))
def range_(node, start, limit, delta):
    n = max(math.ceil((limit.item() - start.item()) / delta.item()), 0)
    return start + torch.arange(n, dtype=start.dtype, device=start.device) * delta


@register("Pad", static=(1, 2, 3))
def pad(node, x, pads=None, value=None, axes=None):
    mode = node.get("mode", "constant")
    if node.opset < 11:
        pads, value = node.get("pads"), node.get("value", 0.0)
    else:
        pads = ints(pads)
        value = 0 if value is None or value.numel() == 0 else value.reshape(-1)[0]
    rank = x.dim()
    axes = list(range(rank)) if axes is None else [_norm(a, rank) for a in ints(axes)]
    n = len(axes)
    begin, end = dict(zip(axes, pads[:n])), dict(zip(axes, pads[n:]))
    if mode == "constant":
        flat = []
        for a in reversed(range(rank)):
            flat += [begin.get(a, 0), end.get(a, 0)]
        if isinstance(value, torch.Tensor):
            value = value.item()
        return F.pad(x, flat, mode="constant", value=value)
    for a in axes:
        b, e = begin[a], end[a]
        if b == 0 and e == 0:
            continue
        dim = x.shape[a]
        pos = torch.arange(-b, dim + e, device=x.device)
        if mode == "edge":
            pos = pos.clamp(0, dim - 1)
        elif mode == "reflect":
            period = 2 * (dim - 1)
            pos = pos.abs() % period if period else torch.zeros_like(pos)
            pos = torch.where(pos >= dim, period - pos, pos)
        elif mode == "wrap":
            pos = pos % dim
        else:
            raise UnsupportedOpError(f"the training bridge does not run Pad mode {mode}")
        x = x.index_select(a, pos)
    return x


@register("Constant")
def constant(node):
    raise AssertionError("Constant nodes are evaluated when the module is built")


@register("NonZero")
def nonzero(node, x):
    return torch.nonzero(x).T.contiguous()


@register("Trilu", static=(1,))
def trilu(node, x, k=None):
    k = 0 if k is None else int(k.reshape(-1)[0])
    return torch.triu(x, k) if node.get("upper", 1) else torch.tril(x, k)


@register("TopK", static=(1,))
def topk(node, x, k):
    axis = _norm(node.get("axis", -1), x.dim())
    values, indices = torch.topk(x, int(k.reshape(-1)[0]), axis, largest=bool(node.get("largest", 1)),
                                 sorted=bool(node.get("sorted", 1)))
    return values, indices


@register("OneHot", static=(0, 1))
def one_hot(node, indices, depth, values):
    d = int(depth.reshape(-1)[0])
    axis = node.get("axis", -1)
    idx = torch.where(indices < 0, indices + d, indices).to(torch.int64)
    hot = F.one_hot(idx.clamp(0, d - 1), d) * ((idx >= 0) & (idx < d)).unsqueeze(-1)
    out = torch.where(hot.bool(), values[1], values[0])
    return out.movedim(-1, _norm(axis, out.dim()))


@register("DepthToSpace")
def depth_to_space(node, x):
    b = node.get("blocksize")
    n, c, h, w = x.shape
    if node.get("mode", "DCR") == "DCR":
        y = x.reshape(n, b, b, c // (b * b), h, w).permute(0, 3, 4, 1, 5, 2)
    else:
        y = x.reshape(n, c // (b * b), b, b, h, w).permute(0, 1, 4, 2, 5, 3)
    return y.reshape(n, c // (b * b), h * b, w * b)


@register("SpaceToDepth")
def space_to_depth(node, x):
    b = node.get("blocksize")
    n, c, h, w = x.shape
    y = x.reshape(n, c, h // b, b, w // b, b).permute(0, 3, 5, 1, 2, 4)
    return y.reshape(n, c * b * b, h // b, w // b)
