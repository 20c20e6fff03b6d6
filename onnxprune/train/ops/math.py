"""Element-wise maths, activations, comparisons, casts, reductions and the matrix products."""

from __future__ import annotations

import functools
import math

import onnx
import torch
import torch.nn.functional as F

from onnxprune.errors import UnsupportedOpError
from onnxprune.train.ops import register
from onnxprune.train.ops.dtypes import torch_dtype

_UNARY = {
    "Abs": torch.abs, "Neg": torch.neg, "Exp": torch.exp, "Log": torch.log, "Sqrt": torch.sqrt,
    "Reciprocal": torch.reciprocal, "Floor": torch.floor, "Ceil": torch.ceil, "Round": torch.round,
    "Sign": torch.sign, "Sin": torch.sin, "Cos": torch.cos, "Tan": torch.tan, "Asin": torch.asin,
    "Acos": torch.acos, "Atan": torch.atan, "Sinh": torch.sinh, "Cosh": torch.cosh, "Asinh": torch.asinh,
    "Acosh": torch.acosh, "Atanh": torch.atanh, "Tanh": torch.tanh, "Erf": torch.erf, "Relu": torch.relu,
    "Sigmoid": torch.sigmoid, "Softsign": F.softsign, "Not": torch.logical_not, "IsNaN": torch.isnan,
    "Mish": F.mish, "BitwiseNot": torch.bitwise_not,
}


def _unary(fn):
    return lambda node, x: fn(x)


for _op, _fn in _UNARY.items():
    register(_op)(_unary(_fn))


@register("Identity")
def identity(node, x):
    return x


@register("Softplus")
def softplus(node, x):
    # log(1 + exp(x)), without torch's linear cut-off at x > 20 (that differs from onnxruntime by ~exp(-20))
    return torch.logaddexp(x, torch.zeros((), dtype=x.dtype, device=x.device))


@register("IsInf")
def isinf(node, x):
    pos, neg = node.get("detect_positive", 1), node.get("detect_negative", 1)
    return (torch.isposinf(x) if pos else torch.zeros_like(x, dtype=torch.bool)) | \
        (torch.isneginf(x) if neg else torch.zeros_like(x, dtype=torch.bool))


@register("LeakyRelu")
def leaky_relu(node, x):
    return F.leaky_relu(x, node.get("alpha", 0.01))


@register("Elu")
def elu(node, x):
    return F.elu(x, node.get("alpha", 1.0))


@register("Celu")
def celu(node, x):
    return F.celu(x, node.get("alpha", 1.0))


@register("Selu")
def selu(node, x):
    alpha, gamma = node.get("alpha", 1.67326319217681884765625), node.get("gamma", 1.05070102214813232421875)
    return gamma * torch.where(x > 0, x, alpha * (torch.exp(x) - 1))


@register("ThresholdedRelu")
def thresholded_relu(node, x):
    return torch.where(x > node.get("alpha", 1.0), x, torch.zeros_like(x))


@register("HardSigmoid")
def hard_sigmoid(node, x):
    return torch.clamp(x * node.get("alpha", 0.2) + node.get("beta", 0.5), 0, 1)


_SIXTH = 0.1666666716337204  # alpha = 1/6 as a float32 attribute, as onnxruntime holds it (float64 models see it)


@register("HardSwish")
def hard_swish(node, x):
    return x * torch.clamp(x * _SIXTH + 0.5, 0, 1)


@register("Gelu")
def gelu(node, x):
    return F.gelu(x, approximate=node.get("approximate", "none"))


@register("Gelu", domain="com.microsoft")
def gelu_ms(node, x):
    return F.gelu(x)


@register("FastGelu", domain="com.microsoft")
def fast_gelu(node, x, bias=None):
    return F.gelu(x if bias is None else x + bias, approximate="tanh")


@register("BiasGelu", domain="com.microsoft")
def bias_gelu(node, x, bias):
    return F.gelu(x + bias)


@register("QuickGelu", domain="com.microsoft")
def quick_gelu(node, x):
    return x * torch.sigmoid(node.get("alpha", 1.702) * x)


@register("PRelu")
def prelu(node, x, slope):
    return torch.where(x >= 0, x, x * slope)


@register("Clip", static=())
def clip(node, x, lo=None, hi=None):
    if node.opset < 11:
        lo, hi = node.get("min"), node.get("max")
    if lo is not None:
        x = torch.maximum(x, torch.as_tensor(lo, dtype=x.dtype, device=x.device))
    if hi is not None:
        x = torch.minimum(x, torch.as_tensor(hi, dtype=x.dtype, device=x.device))
    return x


@register("Add")
def add(node, a, b):
    return a + b


@register("Sub")
def sub(node, a, b):
    return a - b


@register("Mul")
def mul(node, a, b):
    return a * b


@register("Div")
def div(node, a, b):
    if a.dtype.is_floating_point:
        return a / b
    return torch.div(a, b, rounding_mode="trunc")


@register("Pow", static=(1,))  # an exponent is no weight: its gradient is log(base), NaN for negative bases
def pow_(node, a, b):
    return torch.pow(a, b).to(a.dtype)


@register("Mod")
def mod(node, a, b):
    return torch.fmod(a, b) if node.get("fmod", 0) else torch.remainder(a, b)


_BINARY = {
    "Equal": torch.eq, "Less": torch.lt, "LessOrEqual": torch.le, "Greater": torch.gt, "GreaterOrEqual": torch.ge,
    "And": torch.logical_and, "Or": torch.logical_or, "Xor": torch.logical_xor, "BitwiseAnd": torch.bitwise_and,
    "BitwiseOr": torch.bitwise_or, "BitwiseXor": torch.bitwise_xor,
}


def _binary(fn):
    return lambda node, a, b: fn(a, b)


for _op, _fn in _BINARY.items():
    register(_op)(_binary(_fn))


def _variadic(fn):
    return lambda node, *xs: functools.reduce(fn, xs)


register("Max")(_variadic(torch.maximum))
register("Min")(_variadic(torch.minimum))
register("Sum")(_variadic(torch.add))


@register("Mean")
def mean(node, *xs):
    return functools.reduce(torch.add, xs) / len(xs)


@register("Where")
def where(node, cond, a, b):
    return torch.where(cond, a, b)


_ROUND = {onnx.TensorProto.FLOAT16: torch.float16, onnx.TensorProto.BFLOAT16: torch.bfloat16}


@register("Cast")
def cast(node, x):
    to = node.get("to")
    if to in _ROUND and x.dtype.is_floating_point:
        # the values are rounded as the graph says, and stay float32 for training (the gradient passes through)
        return x.to(_ROUND[to]).to(torch.float32)
    return x.to(torch_dtype(to))


@register("CastLike")
def cast_like(node, x, like):
    return x.to(like.dtype)


def _softmax_like(fn):
    def run(node, x):
        axis = node.get("axis", -1 if node.opset >= 13 else 1)
        if node.opset >= 13:
            return fn(x, axis)
        # before opset 13 the input is seen as 2-D: [prod(shape[:axis]), prod(shape[axis:])]
        axis = axis % max(x.dim(), 1)
        shape = x.shape
        flat = x.reshape(math.prod(shape[:axis]), -1)
        return fn(flat, 1).reshape(shape)
    return run


def _hardmax(x, axis):
    return F.one_hot(torch.argmax(x, axis), x.shape[axis]).movedim(-1, axis).to(x.dtype)


register("Softmax")(_softmax_like(lambda x, a: torch.softmax(x, a)))
register("LogSoftmax")(_softmax_like(lambda x, a: torch.log_softmax(x, a)))
register("Hardmax")(_softmax_like(_hardmax))


# -- reductions: axes an attribute before opset 18 (ReduceSum: 13), an input from then on
def _axes(node, x, axes_input, attr_until: int):
    if node.opset < attr_until:
        axes = node.get("axes")
    else:
        axes = None if axes_input is None else [int(a) for a in axes_input.reshape(-1).tolist()]
    if axes is None or len(axes) == 0:
        if node.get("noop_with_empty_axes", 0) and node.opset >= attr_until:
            return None
        return list(range(x.dim()))
    return [a % max(x.dim(), 1) for a in axes]


def _reduce(fn, attr_until: int = 18):
    def run(node, x, axes=None):
        dims = _axes(node, x, axes, attr_until)
        if dims is None:
            return x
        keep = bool(node.get("keepdims", 1))
        if x.dim() == 0:
            return fn(x, [], True)
        return fn(x, dims, keep)
    return run


def _amax(x, dims, keep):
    return torch.amax(x, dims, keepdim=keep) if dims else x


def _amin(x, dims, keep):
    return torch.amin(x, dims, keepdim=keep) if dims else x


def _prod(x, dims, keep):
    for d in sorted(dims, reverse=True):
        x = torch.prod(x, d, keepdim=keep)
    return x


register("ReduceMean", static=(1,))(_reduce(lambda x, d, k: torch.mean(x, d, keepdim=k) if d else x))
register("ReduceSum", static=(1,))(_reduce(lambda x, d, k: torch.sum(x, d, keepdim=k) if d else x, 13))
register("ReduceMax", static=(1,))(_reduce(_amax))
register("ReduceMin", static=(1,))(_reduce(_amin))
register("ReduceProd", static=(1,))(_reduce(_prod))
register("ReduceL1", static=(1,))(_reduce(lambda x, d, k: torch.sum(x.abs(), d, keepdim=k) if d else x.abs()))
register("ReduceL2", static=(1,))(_reduce(
    lambda x, d, k: torch.sqrt(torch.sum(x * x, d, keepdim=k)) if d else x.abs()))
register("ReduceSumSquare", static=(1,))(_reduce(lambda x, d, k: torch.sum(x * x, d, keepdim=k) if d else x * x))
register("ReduceLogSum", static=(1,))(_reduce(lambda x, d, k: torch.log(torch.sum(x, d, keepdim=k)) if d
                                               else torch.log(x)))
register("ReduceLogSumExp", static=(1,))(_reduce(lambda x, d, k: torch.logsumexp(x, d, keepdim=k) if d else x))


def _arg(fn):
    def run(node, x):
        axis = node.get("axis", 0) % max(x.dim(), 1)
        keep = bool(node.get("keepdims", 1))
        if node.get("select_last_index", 0):
            flipped = torch.flip(x, [axis])
            return (x.shape[axis] - 1 - fn(flipped, axis, keepdim=keep)).to(torch.int64)
        return fn(x, axis, keepdim=keep)
    return run


register("ArgMax")(_arg(torch.argmax))
register("ArgMin")(_arg(torch.argmin))


@register("CumSum", static=(1,))
def cumsum(node, x, axis):
    axis = int(axis.reshape(-1)[0]) % x.dim()
    if node.get("reverse", 0):
        x = torch.flip(x, [axis])
    out = torch.cumsum(x, axis).to(x.dtype)
    if node.get("exclusive", 0):
        out = out - x
    return torch.flip(out, [axis]) if node.get("reverse", 0) else out


@register("MatMul")
def matmul(node, a, b):
    return torch.matmul(a, b)


@register("Gemm")
def gemm(node, a, b, c=None):
    if node.get("transA", 0):
        a = a.transpose(0, 1)
    if node.get("transB", 0):
        b = b.transpose(0, 1)
    y = a @ b
    alpha, beta = node.get("alpha", 1.0), node.get("beta", 1.0)
    if alpha != 1.0:
        y = y * alpha
    if c is not None:
        y = y + (c if beta == 1.0 else beta * c)
    return y


@register("Einsum")
def einsum(node, *xs):
    return torch.einsum(node.get("equation").replace(" ", ""), *xs)


@register("Dropout")
def dropout(node, x, ratio=None, training=None):
    if node.n_outputs > 1:
        return x, torch.ones_like(x, dtype=torch.bool)
    return x


def _unpack(q, bits: int):
    """uint8 bytes -> their `bits`-bit values, low bits first (MatMulNBits' packing)."""
    if bits == 8:
        return q.to(torch.int32)
    q = q.to(torch.int32)
    return torch.stack([q & 0xF, q >> 4], -1).flatten(-2)


@register("MatMulNBits", domain="com.microsoft", static=(1, 3, 4),
          check=lambda n: None if n.get("bits", 4) in (4, 8) else f"bits={n.get('bits')} is not implemented")
def matmul_nbits(node, a, b, scales, zero_points=None, g_idx=None, bias=None):
    """Y = A W^T with W [N, K] dequantized block-wise from int4/int8 (a frozen weight: B is not trained)."""
    if g_idx is not None:
        raise UnsupportedOpError("the training bridge does not run MatMulNBits g_idx")
    bits, block, k, n = node.get("bits", 4), node.get("block_size"), node.get("K"), node.get("N")
    blocks = -(-k // block)
    q = _unpack(b.reshape(n, blocks, -1), bits)[..., :block]  # [N, blocks, block]
    scales = scales.reshape(n, blocks, 1)
    if zero_points is None:
        zp = torch.full((), 2 ** (bits - 1), dtype=scales.dtype, device=a.device)
    elif zero_points.dtype == torch.uint8:
        zp = _unpack(zero_points.reshape(n, -1), bits)[:, :blocks].reshape(n, blocks, 1).to(scales.dtype)
    else:
        zp = zero_points.reshape(n, blocks, 1)
    w = ((q.to(scales.dtype) - zp) * scales).reshape(n, blocks * block)[:, :k]
    y = torch.matmul(a, w.T)
    return y if bias is None else y + bias


@register("Shrink")
def shrink(node, x):
    lambd, bias = node.get("lambd", 0.5), node.get("bias", 0.0)
    return torch.where(x < -lambd, x + bias, torch.where(x > lambd, x - bias, torch.zeros_like(x)))


@register("Swish")
def swish(node, x):
    return x * torch.sigmoid(node.get("alpha", 1.0) * x)


@register("BitShift")
def bit_shift(node, x, y):
    return torch.bitwise_left_shift(x, y) if node.get("direction") == "LEFT" else torch.bitwise_right_shift(x, y)
