"""Convolutions, pooling and normalisations. Asymmetric or automatic (SAME_*) padding is applied with an explicit
pad before the torch op, which then runs unpadded."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from onnxprune.errors import UnsupportedOpError
from onnxprune.train.ops import register

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_MAXPOOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVGPOOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _pads(node, spatial, kernel, strides, dilations) -> list[int]:
    """[begin_1, ..., begin_n, end_1, ..., end_n] after auto_pad."""
    n = len(kernel)
    auto = node.get("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for size, k, s, d in zip(spatial, kernel, strides, dilations):
            total = max(0, (math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size)
            small, big = total // 2, total - total // 2
            begin.append(small if auto == "SAME_UPPER" else big)
            end.append(big if auto == "SAME_UPPER" else small)
        return begin + end
    if auto == "VALID":
        return [0] * (2 * n)
    return list(node.get("pads") or [0] * (2 * n))


def _explicit(x, pads, value=0.0):
    n = len(pads) // 2
    flat = []
    for i in reversed(range(n)):
        flat += [pads[i], pads[n + i]]
    return F.pad(x, flat, value=value)


def _spatial_check(node):
    return None


@register("Conv")
def conv(node, x, w, b=None):
    n = w.dim() - 2
    if n not in _CONV:
        raise UnsupportedOpError(f"the training bridge does not run Conv{n}d")
    kernel = list(w.shape[2:])
    strides = node.get("strides") or [1] * n
    dilations = node.get("dilations") or [1] * n
    pads = _pads(node, x.shape[2:], kernel, strides, dilations)
    if pads[:n] == pads[n:]:
        padding = pads[:n]
    else:
        x, padding = _explicit(x, pads), [0] * n
    return _CONV[n](x, w, b, strides, padding, dilations, node.get("group", 1))


@register("ConvTranspose")
def conv_transpose(node, x, w, b=None):
    n = w.dim() - 2
    group = node.get("group", 1)
    kernel = node.get("kernel_shape") or list(w.shape[2:])
    strides = node.get("strides") or [1] * n
    dilations = node.get("dilations") or [1] * n
    out_pad = node.get("output_padding") or [0] * n
    y = _CONV_T[n](x, w, None, strides, 0, 0, group, dilations)
    full = [(i - 1) * s + (k - 1) * d + 1 + op for i, s, k, d, op in
            zip(x.shape[2:], strides, kernel, dilations, out_pad)]
    if any(out_pad):
        y = _explicit(y, [0] * n + list(out_pad))
    output_shape = node.get("output_shape")
    auto = node.get("auto_pad", "NOTSET")
    target = None
    if output_shape or auto in ("SAME_UPPER", "SAME_LOWER"):
        # onnxruntime: total padding = full - target, at least 0; SAME_UPPER puts the odd pixel at the end, the
        # others at the start; a target larger than the full result gets zeros at the end
        target = list(output_shape)[-n:] if output_shape else [i * s for i, s in zip(x.shape[2:], strides)]
        total = [max(f - t, 0) for f, t in zip(full, target)]
        begin = [t // 2 if auto == "SAME_UPPER" else t - t // 2 for t in total]
        end = [t - bgn for t, bgn in zip(total, begin)]
    elif auto == "VALID":
        begin, end = [0] * n, [0] * n
    else:
        pads = node.get("pads") or [0] * (2 * n)
        begin, end = pads[:n], pads[n:]
    for i in range(n):
        y = y.narrow(2 + i, begin[i], y.shape[2 + i] - begin[i] - end[i])
    if target is not None and list(y.shape[2:]) != target:
        y = _explicit(y, [0] * n + [t - d for t, d in zip(target, y.shape[2:])])
    if b is not None:
        y = y + b.reshape((1, -1) + (1,) * n)
    return y


def _pool_geometry(node, x):
    kernel = node.get("kernel_shape")
    n = len(kernel)
    strides = node.get("strides") or [1] * n
    dilations = node.get("dilations") or [1] * n
    pads = _pads(node, x.shape[2:], kernel, strides, dilations)
    return n, kernel, strides, dilations, pads


def _torch_padding_ok(kernel, pads, dilations):
    n = len(kernel)
    return pads[:n] == pads[n:] and all(p <= ((k - 1) * d + 1) // 2 for p, k, d in zip(pads[:n], kernel, dilations))


@register("MaxPool", check=lambda n: "storage_order=1 is not implemented" if n.get("storage_order", 0) else None)
def max_pool(node, x):
    n, kernel, strides, dilations, pads = _pool_geometry(node, x)
    ceil = bool(node.get("ceil_mode", 0))
    want_indices = node.n_outputs > 1
    if _torch_padding_ok(kernel, pads, dilations):
        out = _MAXPOOL[n](x, kernel, strides, pads[:n], dilations, ceil_mode=ceil, return_indices=want_indices)
    else:
        if want_indices:
            raise UnsupportedOpError("the training bridge does not run MaxPool indices with asymmetric padding")
        out = _MAXPOOL[n](_explicit(x, pads, float("-inf")), kernel, strides, 0, dilations, ceil_mode=ceil)
    if want_indices:
        values, idx = out
        # torch: index within each (batch, channel) plane; ONNX: into the flattened NC... tensor
        plane = math.prod(x.shape[2:])
        offset = torch.arange(x.shape[0] * x.shape[1], device=x.device).reshape(x.shape[0], x.shape[1],
                                                                                  *([1] * n)) * plane
        return values, idx + offset
    return out


@register("AveragePool")
def average_pool(node, x):
    n, kernel, strides, dilations, pads = _pool_geometry(node, x)
    if any(d != 1 for d in dilations):
        raise UnsupportedOpError("the training bridge does not run AveragePool with dilations")
    ceil = bool(node.get("ceil_mode", 0))
    include = bool(node.get("count_include_pad", 0))
    if _torch_padding_ok(kernel, pads, dilations):
        return _AVGPOOL[n](x, kernel, strides, pads[:n], ceil_mode=ceil, count_include_pad=include)
    padded = _explicit(x, pads)
    sums = _AVGPOOL[n](padded, kernel, strides, 0, ceil_mode=ceil) * math.prod(kernel)
    if include:
        return sums / math.prod(kernel)
    ones = _explicit(torch.ones((1, 1) + tuple(x.shape[2:]), dtype=x.dtype, device=x.device), pads)
    counts = _AVGPOOL[n](ones, kernel, strides, 0, ceil_mode=ceil) * math.prod(kernel)
    return sums / counts


@register("GlobalAveragePool")
def global_average_pool(node, x):
    return torch.mean(x, list(range(2, x.dim())), keepdim=True)


@register("GlobalMaxPool")
def global_max_pool(node, x):
    return torch.amax(x, list(range(2, x.dim())), keepdim=True)


@register("BatchNormalization",
          check=lambda n: "training_mode=1 is not implemented" if n.get("training_mode", 0) else None)
def batch_norm(node, x, scale, bias, mean, var):
    # written out rather than F.batch_norm: that gives the running statistics no gradient, and here they are
    # initializers like any other (trainable, written back)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    inv = torch.rsqrt(var + node.get("epsilon", 1e-5)) * scale
    y = (x - mean.reshape(shape)) * inv.reshape(shape) + bias.reshape(shape)
    if node.n_outputs > 1:
        return (y, mean, var)[:node.n_outputs]
    return y


@register("InstanceNormalization")
def instance_norm(node, x, scale, bias):
    return F.instance_norm(x, weight=scale, bias=bias, eps=node.get("epsilon", 1e-5))


@register("GroupNormalization")
def group_norm(node, x, scale, bias):
    groups = node.get("num_groups")
    c = x.shape[1]
    if scale.numel() == groups and groups != c:  # opset 18: one scale per group
        scale = scale.repeat_interleave(c // groups)
        bias = bias.repeat_interleave(c // groups)
    return F.group_norm(x, groups, scale, bias, node.get("epsilon", 1e-5))


@register("LayerNormalization")
def layer_norm(node, x, scale, bias=None):
    axis = node.get("axis", -1)
    axis = axis + x.dim() if axis < 0 else axis
    eps = node.get("epsilon", 1e-5)
    shape = tuple(x.shape[axis:])
    if node.n_outputs == 1 and tuple(scale.shape) == shape and (bias is None or tuple(bias.shape) == shape):
        return F.layer_norm(x, shape, scale, bias, eps)
    dims = list(range(axis, x.dim()))
    mean = x.mean(dims, keepdim=True)
    inv = torch.rsqrt(((x - mean) ** 2).mean(dims, keepdim=True) + eps)
    y = (x - mean) * inv * scale
    if bias is not None:
        y = y + bias
    return (y, mean, inv)[:node.n_outputs] if node.n_outputs > 1 else y


def rms_norm(x, scale, axis: int, eps: float):
    dims = list(range(axis, x.dim()))
    inv = torch.rsqrt((x * x).mean(dims, keepdim=True) + eps)
    return x * inv * scale, inv


@register("RMSNormalization")
@register("SimplifiedLayerNormalization")
@register("SimplifiedLayerNormalization", domain="com.microsoft")
def simplified_layer_norm(node, x, scale):
    axis = node.get("axis", -1)
    axis = axis + x.dim() if axis < 0 else axis
    y, inv = rms_norm(x, scale, axis, node.get("epsilon", 1e-5))
    return (y, inv)[:node.n_outputs] if node.n_outputs > 1 else y


@register("SkipLayerNormalization", domain="com.microsoft")
@register("SkipSimplifiedLayerNormalization", domain="com.microsoft")
def skip_layer_norm(node, x, skip, gamma, beta_or_bias=None, bias=None):
    simplified = node.op_type == "SkipSimplifiedLayerNormalization"
    if simplified:
        bias, beta = beta_or_bias, None
    else:
        beta = beta_or_bias
    s = x + skip
    if bias is not None:
        s = s + bias
    eps = node.get("epsilon", 1e-12)
    if simplified:
        y, inv = rms_norm(s, gamma, s.dim() - 1, eps)
        mean = torch.zeros_like(inv)
    else:
        mean = s.mean(-1, keepdim=True)
        inv = torch.rsqrt(((s - mean) ** 2).mean(-1, keepdim=True) + eps)
        y = F.layer_norm(s, (s.shape[-1],), gamma, beta, eps)
    return (y, mean, inv, s)[:node.n_outputs] if node.n_outputs > 1 else y


@register("LpNormalization")
def lp_norm(node, x):
    return F.normalize(x, p=node.get("p", 2), dim=node.get("axis", -1), eps=0.0)


@register("LpPool")
def lp_pool(node, x):
    n, kernel, strides, dilations, pads = _pool_geometry(node, x)
    if any(d != 1 for d in dilations):
        raise UnsupportedOpError("the training bridge does not run LpPool with dilations")
    p = node.get("p", 2)
    powered = _explicit(x.abs() ** p, pads)
    sums = _AVGPOOL[n](powered, kernel, strides, 0, ceil_mode=bool(node.get("ceil_mode", 0))) * math.prod(kernel)
    return sums ** (1.0 / p)


@register("GlobalLpPool")
def global_lp_pool(node, x):
    p = node.get("p", 2)
    return (x.abs() ** p).sum(list(range(2, x.dim())), keepdim=True) ** (1.0 / p)


@register("LRN")
def lrn(node, x):
    """x / (bias + alpha / size * sum of squares over the channel window)^beta; the window runs from
    c - floor((size-1)/2) to c + ceil((size-1)/2), as the spec says (torch centres even windows the other way)."""
    size = node.get("size")
    alpha, beta, bias = node.get("alpha", 1e-4), node.get("beta", 0.75), node.get("bias", 1.0)
    sq = x * x
    before, after = (size - 1) // 2, size - 1 - (size - 1) // 2
    padded = F.pad(sq.movedim(1, -1), (before, after)).movedim(-1, 1)
    c = x.shape[1]
    window = sum(padded.narrow(1, i, c) for i in range(size))
    return x / (bias + alpha / size * window) ** beta


@register("MeanVarianceNormalization")
def mean_variance_norm(node, x):
    axes = node.get("axes", [0, 2, 3])
    mean = x.mean(axes, keepdim=True)
    var = (x * x).mean(axes, keepdim=True) - mean * mean
    return (x - mean) / (torch.sqrt(var) + 1e-9)
