"""Generated inputs at scale (issue 12): random models and mutated zoo models through the whole prune.

Every case is one seed. `random_model(seed)` builds a chain of supported ops (convolutions, normalisation,
activations, residual adds, squeeze-and-excitation gates, concat/split/slice branches, pooling, resize, pad,
NHWC transposes, channel shuffles, fully connected heads, LayerNorm/attention blocks on token tensors) with
random shapes, attributes, float dtypes and opsets. `mutate(model, seed)` changes a model the way exporters and
users do: a supported op swapped for one onnxprune has no handler for, a dim made symbolic or -1, value_info
dropped, an initializer moved into a Constant node, duplicate or missing node names, another opset, a Reshape
target computed at run time.

`check_case(seed)` prunes the case and returns a Case whose `problems` must be empty: no exception other than
onnxprune's own (exit 2), no contained fault (a contained fault is a bug, only hidden), the written model
passes the full checker and runs with the original's interface and output shapes, the zero-channel oracle
holds on every model that prunes, and ratio 0 leaves the outputs exactly as they were. The Case also keeps the
facts behind those verdicts (the refusal, output shapes, oracle error and tolerance, the ratio-0 difference)
for tests/test_fuzz.py to assert on directly.

    python tools/fuzz.py --cases 5000            # the count in docs/BENCHMARKS.md
    python tools/fuzz.py --seed 1234 --verbose   # one case again, with the traceback
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as `python tools/fuzz.py`: the checkout's root, for `tools.*` and onnxprune
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

FLOAT_TYPES = {  # onnx type: (numpy type, oracle tolerance, weight)
    TensorProto.FLOAT: (np.float32, 1e-4, 0.7),
    TensorProto.FLOAT16: (np.float16, 2e-2, 0.15),
    TensorProto.DOUBLE: (np.float64, 1e-9, 0.15),
}
OPSETS = (11, 13, 14, 15, 17, 18, 19, 21)
UNARY = ("Relu", "LeakyRelu", "Sigmoid", "Tanh", "Elu", "Softplus", "Identity", "Abs", "Neg", "HardSigmoid")


class Builder:
    """Nodes, initializers and the static shapes the generator keeps track of, so that it picks valid
    attributes; onnx's shape inference fills in value_info at the end."""

    def __init__(self, rng: np.random.Generator, elem: int, opset: int):
        self.rng, self.elem, self.opset = rng, elem, opset
        self.npdt = FLOAT_TYPES[elem][0]
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.shapes: dict[str, tuple] = {}
        self.n = 0

    def name(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}_{self.n}"

    def const(self, array, prefix="c") -> str:
        name = self.name(prefix)
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        self.shapes[name] = tuple(np.shape(array))
        return name

    def weight(self, shape, scale=None) -> str:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        scale = scale if scale is not None else 1.0 / np.sqrt(max(fan_in, 1))
        return self.const((scale * self.rng.standard_normal(shape)).astype(self.npdt), "w")

    def ints(self, values) -> str:
        return self.const(np.array(values, dtype=np.int64), "i")

    def node(self, op, inputs, shape, domain="", n_out=1, **attrs) -> str | list[str]:
        outs = [self.name(op.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=self.name("/" + op), domain=domain, **attrs))
        for o in outs:
            self.shapes[o] = shape
        return outs[0] if n_out == 1 else outs

    def pick(self, items):
        return items[int(self.rng.integers(len(items)))]


# ------------------------------------------------------------------------------------------------- image ops

def _conv(b: Builder, x: str, cout: int | None = None, k: int | None = None, stride: int = 1, group: int = 1,
          bias: bool | None = None) -> str:
    n, c, h, w = b.shapes[x]
    cout = cout or int(b.rng.integers(2, 9))
    k = k if k is not None else int(b.pick([1, 3]))
    if h < k or w < k:
        k = 1
    pad = k // 2 if b.rng.random() < 0.8 else 0
    h2, w2 = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    if h2 < 1 or w2 < 1:
        stride, h2, w2 = 1, h + 2 * pad - k + 1, w + 2 * pad - k + 1
    inputs = [x, b.weight((cout, c // group, k, k))]
    if bias if bias is not None else b.rng.random() < 0.6:
        inputs.append(b.weight((cout,), 0.1))
    return b.node("Conv", inputs, (n, cout, h2, w2), kernel_shape=[k, k], pads=[pad] * 4, strides=[stride] * 2,
                  group=group)


def img_conv(b, x):
    return _conv(b, x, stride=int(b.pick([1, 1, 2])))


def img_depthwise(b, x):
    c = b.shapes[x][1]
    mult = int(b.pick([1, 1, 2]))
    return _conv(b, x, cout=c * mult, k=3, group=c)


def img_grouped(b, x):
    c = b.shapes[x][1]
    if c % 2:
        return img_conv(b, x)
    return _conv(b, x, cout=2 * int(b.rng.integers(1, 4)), group=2)


def img_bn(b, x):
    c = b.shapes[x][1]
    var = (np.abs(b.rng.standard_normal(c)) + 0.5).astype(b.npdt)
    return b.node("BatchNormalization", [x, b.weight((c,), 1.0), b.weight((c,), 0.1), b.weight((c,), 0.1),
                                         b.const(var)], b.shapes[x])


def img_instnorm(b, x):
    c = b.shapes[x][1]
    return b.node("InstanceNormalization", [x, b.weight((c,), 1.0), b.weight((c,), 0.1)], b.shapes[x])


def unary(b, x):
    op = b.pick(UNARY)
    if op == "HardSigmoid" or (op == "Relu" and b.opset >= 14 and b.rng.random() < 0.2):
        op = "HardSwish" if b.opset >= 14 else "HardSigmoid"
    if op == "Clip":
        return b.node("Clip", [x, b.const(np.array(-1, b.npdt)), b.const(np.array(1, b.npdt))], b.shapes[x])
    return b.node(op, [x], b.shapes[x])


def img_residual(b, x):
    y = _conv(b, x, cout=b.shapes[x][1], k=3)
    y = unary(b, y)
    y = _conv(b, y, cout=b.shapes[x][1], k=1)
    if b.shapes[y] != b.shapes[x]:
        return y
    return b.node(b.pick(["Add", "Add", "Sub", "Mul"]), [x, y] if b.rng.random() < 0.5 else [y, x], b.shapes[x])


def img_se(b, x):
    n, c, h, w = b.shapes[x]
    g = b.node("GlobalAveragePool", [x], (n, c, 1, 1)) if b.rng.random() < 0.7 else b.node(
        "ReduceMean", [x] + ([b.ints([2, 3])] if b.opset >= 18 else []), (n, c, 1, 1),
        **({} if b.opset >= 18 else {"axes": [2, 3]}), keepdims=1)
    r = max(1, c // 2)
    g = b.node("Relu", [_conv(b, g, cout=r, k=1, bias=True)], (n, r, 1, 1))
    g = b.node("Sigmoid", [_conv(b, g, cout=c, k=1, bias=True)], (n, c, 1, 1))
    return b.node("Mul", [x, g], b.shapes[x])


def img_concat(b, x):
    y1, y2 = _conv(b, x, k=1), _conv(b, x, k=1)
    if b.rng.random() < 0.3:
        y2 = x  # DenseNet: the input itself is concatenated
        y1 = _conv(b, x, k=3) if b.shapes[y1][2:] != b.shapes[x][2:] else y1
    if b.shapes[y1][2:] != b.shapes[y2][2:]:
        return y1
    n, _, h, w = b.shapes[y1]
    return b.node("Concat", [y1, y2], (n, b.shapes[y1][1] + b.shapes[y2][1], h, w), axis=1)


def img_split(b, x):
    n, c, h, w = b.shapes[x]
    if c < 2:
        return unary(b, x)
    first = int(b.rng.integers(1, c))
    sizes = [first, c - first]
    if b.opset >= 13:
        parts = b.node("Split", [x, b.ints(sizes)], None, n_out=2, axis=1)
    else:
        parts = b.node("Split", [x], None, n_out=2, axis=1, split=sizes)
    for p, s in zip(parts, sizes):
        b.shapes[p] = (n, s, h, w)
    a = _conv(b, parts[0], k=1, stride=1)
    d = unary(b, parts[1])
    return b.node("Concat", [a, d], (n, b.shapes[a][1] + sizes[1], h, w), axis=1)


def img_slice(b, x):
    n, c, h, w = b.shapes[x]
    start = int(b.rng.integers(0, c))
    stop = int(b.rng.integers(start + 1, c + 1))
    if b.opset < 10:
        return unary(b, x)
    return b.node("Slice", [x, b.ints([start]), b.ints([stop]), b.ints([1])], (n, stop - start, h, w))


def img_pool(b, x):
    n, c, h, w = b.shapes[x]
    if h < 2 or w < 2:
        return unary(b, x)
    op = b.pick(["MaxPool", "AveragePool"])
    return b.node(op, [x], (n, c, h // 2, w // 2), kernel_shape=[2, 2], strides=[2, 2])


def img_resize(b, x):
    n, c, h, w = b.shapes[x]
    if b.opset < 11 or h * w > 64:
        return unary(b, x)
    mode = b.pick(["nearest", "linear"])
    if b.rng.random() < 0.5:
        scales = b.const(np.array([1, 1, 2, 2], np.float32))
        return b.node("Resize", [x, "", scales], (n, c, 2 * h, 2 * w), mode=mode)
    # sizes computed at run time: N and C from the input itself, H and W doubled
    shape = b.node("Shape", [x], (4,))
    nc = b.node("Slice", [shape, b.ints([0]), b.ints([2])], (2,))
    hw = b.node("Mul", [b.node("Slice", [shape, b.ints([2]), b.ints([4])], (2,)), b.ints([2, 2])], (2,))
    sizes = b.node("Concat", [nc, hw], (4,), axis=0)
    return b.node("Resize", [x, "", "", sizes], (n, c, 2 * h, 2 * w), mode=mode)


def img_pad(b, x):
    n, c, h, w = b.shapes[x]
    if b.opset < 11:
        return unary(b, x)
    return b.node("Pad", [x, b.ints([0, 0, 1, 1, 0, 0, 1, 1])], (n, c, h + 2, w + 2), mode="constant")


def img_nhwc(b, x):
    """Transpose to NHWC, a per-channel bias and a MatMul on the last axis, Transpose back."""
    n, c, h, w = b.shapes[x]
    t = b.node("Transpose", [x], (n, h, w, c), perm=[0, 2, 3, 1])
    t = b.node("Add", [t, b.weight((c,), 0.1)], (n, h, w, c))
    c2 = int(b.rng.integers(2, 9))
    t = b.node("MatMul", [t, b.weight((c, c2))], (n, h, w, c2))
    return b.node("Transpose", [t], (n, c2, h, w), perm=[0, 3, 1, 2])


def img_shuffle(b, x):
    n, c, h, w = b.shapes[x]
    if c % 2 or n is None:
        return unary(b, x)
    r = b.node("Reshape", [x, b.ints([n, 2, c // 2, h, w])], (n, 2, c // 2, h, w))
    t = b.node("Transpose", [r], (n, c // 2, 2, h, w), perm=[0, 2, 1, 3, 4])
    return b.node("Reshape", [t, b.ints([n, c, h, w])], (n, c, h, w))


def img_softmax(b, x):
    return b.node("Softmax", [x], b.shapes[x], axis=int(b.pick([1, -1])))


def img_convtranspose(b, x):
    n, c, h, w = b.shapes[x]
    if h * w > 64:
        return unary(b, x)
    cout = int(b.rng.integers(2, 7))
    return b.node("ConvTranspose", [x, b.weight((c, cout, 2, 2))], (n, cout, 2 * h, 2 * w), kernel_shape=[2, 2],
                  strides=[2, 2])


def img_conv_odd(b, x):
    """Dilations, asymmetric pads or auto_pad."""
    n, c, h, w = b.shapes[x]
    cout = int(b.rng.integers(2, 7))
    form = b.pick(["dilated", "asym", "same"])
    if form == "dilated" and h >= 5 and w >= 5:
        return b.node("Conv", [x, b.weight((cout, c, 3, 3))], (n, cout, h, w), kernel_shape=[3, 3], dilations=[2, 2],
                      pads=[2, 2, 2, 2])
    if form == "asym" and h >= 2 and w >= 2:
        return b.node("Conv", [x, b.weight((cout, c, 2, 2))], (n, cout, h, w), kernel_shape=[2, 2],
                      pads=[0, 0, 1, 1])
    return b.node("Conv", [x, b.weight((cout, c, 3, 3)), b.weight((cout,), 0.1)], (n, cout, h, w),
                  kernel_shape=[3, 3], auto_pad="SAME_UPPER")


def img_prelu(b, x):
    n, c, h, w = b.shapes[x]
    slope = b.weight((c, 1, 1), 0.2) if b.rng.random() < 0.7 else b.weight((1,), 0.2)
    return b.node("PRelu", [x, slope], b.shapes[x])


def img_const_binary(b, x):
    """A per-channel or scalar constant in a binary op (either side), or a three-input Sum/Max."""
    n, c, h, w = b.shapes[x]
    op = b.pick(["Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Pow"])
    shape = b.pick([(c, 1, 1), (1, c, 1, 1), (1,), ()])
    k = b.const((np.abs(b.rng.standard_normal(shape)) + 0.5).astype(b.npdt))
    if op == "Pow":
        return b.node("Pow", [b.node("Abs", [x], b.shapes[x]), b.const(np.array(2, b.npdt))], b.shapes[x])
    if op == "Sum":
        return b.node("Sum", [x, k, x], b.shapes[x])
    return b.node(op, [x, k] if b.rng.random() < 0.6 else [k, x], b.shapes[x])


def img_squeeze(b, x):
    """GlobalAveragePool, Squeeze the 1x1, Unsqueeze it back, multiply (an SE gate without convs)."""
    n, c, h, w = b.shapes[x]
    g = b.node("GlobalAveragePool", [x], (n, c, 1, 1))
    if b.opset >= 13:
        sq = b.node("Squeeze", [g, b.ints([2, 3])], (n, c))
        un = b.node("Unsqueeze", [b.node("Sigmoid", [sq], (n, c)), b.ints([2, 3])], (n, c, 1, 1))
    else:
        sq = b.node("Squeeze", [g], (n, c), axes=[2, 3])
        un = b.node("Unsqueeze", [b.node("Sigmoid", [sq], (n, c))], (n, c, 1, 1), axes=[2, 3])
    return b.node("Mul", [x, un], b.shapes[x])


def img_concat_spatial(b, x):
    """Concat along H with itself, or along C with a constant (a frozen stretch)."""
    n, c, h, w = b.shapes[x]
    if b.rng.random() < 0.5:
        return b.node("Concat", [x, unary(b, x)], (n, c, 2 * h, w), axis=2)
    if n is None:
        return unary(b, x)
    k = b.const(b.rng.standard_normal((n, 1, h, w)).astype(b.npdt))
    return b.node("Concat", [x, k], (n, c + 1, h, w), axis=1)


def img_split3(b, x):
    n, c, h, w = b.shapes[x]
    if c < 3 or b.opset < 18 or c % 3:
        return img_split(b, x)
    parts = b.node("Split", [x], None, n_out=3, axis=1, num_outputs=3)
    for p in parts:
        b.shapes[p] = (n, c // 3, h, w)
    return b.node("Concat", [parts[2], parts[0], parts[1]], (n, c, h, w), axis=1)


def img_slice_odd(b, x):
    """Negative bounds, a step on a spatial axis, or an end past the axis."""
    n, c, h, w = b.shapes[x]
    if b.opset < 10 or c < 2:
        return unary(b, x)
    form = b.pick(["negative", "step", "past"])
    if form == "negative":
        return b.node("Slice", [x, b.ints([-(c - 1)]), b.ints([c]), b.ints([-3])], (n, c - 1, h, w))
    if form == "step" and h >= 2:
        return b.node("Slice", [x, b.ints([0]), b.ints([h]), b.ints([2]), b.ints([2])], (n, c, (h + 1) // 2, w))
    return b.node("Slice", [x, b.ints([1]), b.ints([2 ** 31 - 1]), b.ints([1])], (n, c - 1, h, w))


def img_reduce(b, x):
    n, c, h, w = b.shapes[x]
    op = b.pick(["ReduceMean", "ReduceMax", "ReduceSum", "ReduceL2"])
    axes = b.pick([[2], [3], [2, 3], [1]])
    shape = tuple(1 if i in axes else d for i, d in enumerate((n, c, h, w)))
    if op == "ReduceSum" and b.opset >= 13 or b.opset >= 18:
        return b.node(op, [x, b.ints(axes)], shape, keepdims=1)
    return b.node(op, [x], shape, axes=axes, keepdims=1)


def img_cast(b, x):
    """A round trip through another float type (float16 islands in float32 models, as mixed exports have)."""
    other = TensorProto.FLOAT16 if b.elem != TensorProto.FLOAT16 else TensorProto.FLOAT
    y = b.node("Cast", [x], b.shapes[x], to=other)
    y = b.node("Relu", [y], b.shapes[x])
    return b.node("Cast", [y], b.shapes[x], to=b.elem)


def img_groupnorm(b, x):
    n, c, h, w = b.shapes[x]
    if b.opset < 21 or c % 2:
        return img_instnorm(b, x)
    return b.node("GroupNormalization", [x, b.weight((c,), 1.0), b.weight((c,), 0.1)], b.shapes[x], num_groups=2)


def img_expand(b, x):
    n, c, h, w = b.shapes[x]
    if n is None:
        return unary(b, x)
    g = b.node("ReduceMean", [x] + ([b.ints([3])] if b.opset >= 18 else []), (n, c, h, 1),
               **({} if b.opset >= 18 else {"axes": [3]}), keepdims=1)
    return b.node("Add", [x, b.node("Expand", [g, b.ints([n, c, h, w])], (n, c, h, w))], b.shapes[x])


def img_gather(b, x):
    """Gather rows of H (not channels), or a channel (which freezes)."""
    n, c, h, w = b.shapes[x]
    axis = int(b.pick([2, 2, 1]))
    size = (h, c)[axis == 1]
    idx = b.ints(sorted(b.rng.choice(size, max(1, size // 2), replace=False).tolist()))
    shape = list(b.shapes[x])
    shape[axis] = max(1, size // 2)
    return b.node("Gather", [x, idx], tuple(shape), axis=axis)


def img_flatten_axis2(b, x):
    """Flatten from axis 2 and Reshape back: the channel axis stays in front."""
    n, c, h, w = b.shapes[x]
    f = b.node("Flatten", [x], (n * c if n else None, h * w), axis=2) if n else None
    if f is None:
        return unary(b, x)
    return b.node("Reshape", [f, b.ints([n, c, h, w])], b.shapes[x])


IMAGE_OPS = (img_conv, img_conv, img_depthwise, img_grouped, img_bn, img_instnorm, unary, unary, img_residual,
             img_se, img_concat, img_split, img_slice, img_pool, img_resize, img_pad, img_nhwc, img_shuffle,
             img_softmax, img_convtranspose, img_conv_odd, img_prelu, img_const_binary, img_squeeze,
             img_concat_spatial, img_split3, img_slice_odd, img_reduce, img_cast, img_groupnorm, img_expand,
             img_gather, img_flatten_axis2)


def img_head(b, x):
    n, c, h, w = b.shapes[x]
    kind = b.rng.random()
    if kind < 0.3:
        return x
    if kind < 0.65:
        g = b.node("GlobalAveragePool", [x], (n, c, 1, 1))
        f = b.node("Flatten", [g], (n, c), axis=1)
    else:
        f = b.node("Flatten", [x], (n, c * h * w), axis=1)
    return dense_chain(b, f, int(b.rng.integers(1, 3)))


# ------------------------------------------------------------------------------------------------- dense ops

def dense(b, x, out=None):
    n, k = b.shapes[x]
    out = out or int(b.rng.integers(2, 10))
    if b.rng.random() < 0.5:
        trans = int(b.rng.random() < 0.6)
        w = b.weight((out, k) if trans else (k, out))
        inputs = [x, w] + ([b.weight((out,), 0.1)] if b.rng.random() < 0.7 else [])
        return b.node("Gemm", inputs, (n, out), transB=trans)
    y = b.node("MatMul", [x, b.weight((k, out))], (n, out))
    return b.node("Add", [y, b.weight((out,), 0.1)], (n, out)) if b.rng.random() < 0.7 else y


def dense_chain(b, x, layers):
    for _ in range(layers):
        x = dense(b, x)
        r = b.rng.random()
        if r < 0.5:
            x = unary(b, x)
        elif r < 0.6:
            n, f = b.shapes[x]
            var = (np.abs(b.rng.standard_normal(f)) + 0.5).astype(b.npdt)
            x = b.node("BatchNormalization", [x, b.weight((f,), 1.0), b.weight((f,), 0.1), b.weight((f,), 0.1),
                                              b.const(var)], (n, f))
        elif r < 0.7:
            y1, y2 = dense(b, x), dense(b, x)
            n = b.shapes[x][0]
            x = b.node("Concat", [y1, y2], (n, b.shapes[y1][1] + b.shapes[y2][1]), axis=1)
    return dense(b, x)


# ------------------------------------------------------------------------------------------------ token ops

def tok_linear(b, x, out=None):
    n, s, e = b.shapes[x]
    out = out or int(b.rng.integers(4, 17))
    y = b.node("MatMul", [x, b.weight((e, out))], (n, s, out))
    return b.node("Add", [y, b.weight((out,), 0.1)], (n, s, out)) if b.rng.random() < 0.8 else y


def tok_mlp(b, x):
    e = b.shapes[x][2]
    y = tok_linear(b, x, int(b.rng.integers(4, 17)))
    y = b.node("Relu" if b.opset < 20 or b.rng.random() < 0.5 else "Gelu", [y], b.shapes[y])
    y = tok_linear(b, y, e)
    return b.node("Add", [x, y], b.shapes[x])


def tok_layernorm(b, x):
    e = b.shapes[x][2]
    if b.opset < 17:
        return unary(b, x)
    return b.node("LayerNormalization", [x, b.weight((e,), 1.0), b.weight((e,), 0.1)], b.shapes[x], axis=-1)


def tok_attention(b, x):
    """q, k, v projections split into heads, softmax(q kᵀ / √d) v, heads merged, output projection."""
    n, s, e = b.shapes[x]
    heads = int(b.pick([1, 2, 4]))
    d = int(b.pick([2, 4]))
    hd = heads * d
    proj = []
    for _ in range(3):
        p = tok_linear(b, x, hd)
        p = b.node("Reshape", [p, b.ints([0, s, heads, d])], (n, s, heads, d))
        proj.append(b.node("Transpose", [p], (n, heads, s, d), perm=[0, 2, 1, 3]))
    q, k, v = proj
    kt = b.node("Transpose", [k], (n, heads, d, s), perm=[0, 1, 3, 2])
    a = b.node("MatMul", [q, kt], (n, heads, s, s))
    a = b.node("Mul", [a, b.const(np.array(1 / np.sqrt(d), b.npdt))], (n, heads, s, s))
    a = b.node("Softmax", [a], (n, heads, s, s), axis=-1)
    o = b.node("MatMul", [a, v], (n, heads, s, d))
    o = b.node("Transpose", [o], (n, s, heads, d), perm=[0, 2, 1, 3])
    o = b.node("Reshape", [o, b.ints([0, s, hd])], (n, s, hd))
    o = tok_linear(b, o, e)
    return b.node("Add", [x, o], b.shapes[x])


TOKEN_OPS = (tok_mlp, tok_mlp, tok_layernorm, tok_attention, tok_attention, unary)


# ----------------------------------------------------------------------------------------------- the models

def random_model(seed: int) -> tuple[onnx.ModelProto, dict[str, tuple]]:
    """A random valid-looking model and the static input shapes it was built for."""
    rng = np.random.default_rng(seed)
    types = list(FLOAT_TYPES)
    elem = types[int(rng.choice(len(types), p=[FLOAT_TYPES[t][2] for t in types]))]
    opset = int(rng.choice(OPSETS))
    b = Builder(rng, elem, opset)
    kind = rng.choice(["image", "image", "dense", "tokens"])
    batch = int(rng.choice([1, 2]))
    if kind == "image":
        shape = (batch, int(rng.integers(1, 5)), int(rng.choice([4, 6, 8])), int(rng.choice([4, 5, 8])))
        b.shapes["x"] = shape
        x = "x"
        for _ in range(int(rng.integers(1, 7))):
            x = rng.choice(IMAGE_OPS)(b, x)
        outs = [img_head(b, x)]
    elif kind == "dense":
        shape = (batch, int(rng.integers(2, 12)))
        b.shapes["x"] = shape
        outs = [dense_chain(b, "x", int(rng.integers(1, 5)))]
    else:
        shape = (batch, int(rng.integers(2, 6)), int(rng.choice([4, 8])))
        b.shapes["x"] = shape
        x = tok_linear(b, "x", int(rng.choice([8, 12, 16])))
        for _ in range(int(rng.integers(1, 4))):
            x = rng.choice(TOKEN_OPS)(b, x)
        outs = [tok_linear(b, x, int(rng.integers(2, 6)))]
    if len(b.nodes) > 2 and rng.random() < 0.2:
        outs.append(b.nodes[int(rng.integers(len(b.nodes) - 1))].output[0])  # an inner tensor as a second output
    dims = ["batch" if rng.random() < 0.6 else batch] + list(shape[1:])
    graph = helper.make_graph(b.nodes, f"fuzz_{seed}", [helper.make_tensor_value_info("x", elem, dims)],
                              [helper.make_tensor_value_info(o, elem, None) for o in dict.fromkeys(outs)],
                              b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8 if opset < 21 else 10
    try:
        model = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - an invalid generated model is a case too (it must fail cleanly)
        pass
    return model, {"x": shape}


def zoo_models() -> dict[str, onnx.ModelProto]:
    """Small real models to mutate: the shipped digits CNNs and the NHWC graphs of tests/zoo_models.py."""
    out = {p.stem: onnx.load(p) for p in sorted((ROOT / "models").glob("*.onnx"))}
    from tests import zoo_models as zm

    out.update({name: build() for name, build in zm.NHWC_MODELS.items()})
    return out


_ZOO: dict[str, onnx.ModelProto] | None = None


def input_shapes(model: onnx.ModelProto) -> dict[str, tuple]:
    from onnxprune.runtime.feeds import resolve_shapes

    return resolve_shapes(model)[0]


def mutate(model: onnx.ModelProto, seed: int, shapes: dict[str, tuple]) -> tuple[onnx.ModelProto, str]:
    """A copy of `model` changed in one way chosen by `seed`; returns it and what was done."""
    rng = np.random.default_rng(seed)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    kinds = ["unknown_op", "dynamic_dim", "drop_value_info", "constant_node", "node_names", "opset",
             "computed_reshape"]
    first = int(rng.integers(len(kinds)))
    for kind in kinds[first:] + kinds[:first]:
        out = _mutate(m, kind, rng, shapes)
        if out is not None:
            return out
    return m, "none"


def _mutate(m: onnx.ModelProto, kind: str, rng, shapes) -> tuple[onnx.ModelProto, str] | None:
    g = m.graph
    if kind == "unknown_op":
        candidates = [n for n in g.node if n.op_type in UNARY + ("Relu", "HardSwish")]
        if candidates:
            node = candidates[int(rng.integers(len(candidates)))]
            if rng.random() < 0.5:
                # a standard op onnxprune has no handler for (Tile by ones keeps the tensor as it is)
                rank = len(shapes.get(node.input[0], ())) or _rank(m, node.input[0])
                if rank:
                    reps = numpy_helper.from_array(np.ones(rank, np.int64), f"{node.name}_reps")
                    g.initializer.append(reps)
                    node.op_type = "Tile"
                    del node.attribute[:]
                    del node.input[1:]
                    node.input.append(reps.name)
                    return m, "unknown_op:Tile"
            # an op of another domain that onnxruntime runs (com.microsoft's Gelu)
            node.op_type, node.domain = "Gelu", "com.microsoft"
            del node.attribute[:]
            del node.input[1:]
            if not any(o.domain == "com.microsoft" for o in m.opset_import):
                m.opset_import.append(helper.make_opsetid("com.microsoft", 1))
            return m, "unknown_op:com.microsoft.Gelu"
    if kind == "dynamic_dim":
        inp = g.input[0]
        dims = inp.type.tensor_type.shape.dim
        if dims:
            i = int(rng.integers(len(dims)))
            how = str(rng.choice(["-1", "symbol", "0", "missing"]))
            d = dims[i]
            d.Clear()
            if how == "-1":
                d.dim_value = -1
            elif how == "0":
                d.dim_value = 0
            elif how == "symbol":
                d.dim_param = f"dyn{i}"
            del g.value_info[:]
            return m, f"dynamic_dim:{i}:{how}"
    if kind == "drop_value_info":
        if len(g.value_info):
            if rng.random() < 0.5:
                del g.value_info[int(rng.integers(len(g.value_info)))]
            else:
                del g.value_info[:]
            for out in g.output:
                if rng.random() < 0.5:
                    out.type.tensor_type.ClearField("shape")
            return m, "drop_value_info"
    if kind == "constant_node":
        if len(g.initializer):
            t = g.initializer[int(rng.integers(len(g.initializer)))]
            if t.name not in {i.name for i in g.input}:
                node = helper.make_node("Constant", [], [t.name], value=t, name=f"const_{t.name}")
                g.initializer.remove(t)
                g.node.insert(0, node)
                return m, "constant_node"
    if kind == "node_names":
        if len(g.node) > 1:
            if rng.random() < 0.5:
                a, b = rng.choice(len(g.node), 2, replace=False)
                g.node[int(b)].name = g.node[int(a)].name
                return m, "node_names:duplicate"
            for n in g.node:
                if rng.random() < 0.5:
                    n.name = ""
            return m, "node_names:empty"
    if kind == "opset":
        current = next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
        target = int(rng.choice([v for v in OPSETS if v != current]))
        try:
            from onnx import version_converter

            converted = version_converter.convert_version(m, target)
            return converted, f"opset:{current}->{target}:converted"
        except Exception:  # noqa: BLE001 - the raw change may leave an invalid model: that is a case too
            for o in m.opset_import:
                if o.domain in ("", "ai.onnx"):
                    o.version = target
            return m, f"opset:{current}->{target}:raw"
    if kind == "computed_reshape":
        done = _computed_reshape(m, rng)
        if done:
            return m, "computed_reshape"
    return None


def _rank(model, name):
    for v in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        if v.name == name and v.type.tensor_type.HasField("shape"):
            return len(v.type.tensor_type.shape.dim)
    return 0


def _computed_reshape(m: onnx.ModelProto, rng) -> bool:
    """Replace a Flatten (or a Reshape's constant target) by a target computed at run time:
    Concat(Shape(x)[:1], -1), as TorchScript writes x.view(x.size(0), -1)."""
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    for i, node in enumerate(g.node):
        flatten = node.op_type == "Flatten" and next((a.i for a in node.attribute if a.name == "axis"), 1) == 1
        reshape = node.op_type == "Reshape" and node.input[1] in inits and len(inits[node.input[1]].dims) == 1
        if not (flatten or reshape) or rng.random() < 0.3:
            continue
        x = node.input[0]
        base = f"{node.name or 'n'}_{i}"
        if flatten:
            rest = numpy_helper.from_array(np.array([-1], np.int64), f"{base}_rest")
            count = 1
        else:
            target = numpy_helper.to_array(inits[node.input[1]])
            if target.size < 2 or target[0] <= 0 and target[0] != 0:
                continue
            rest = numpy_helper.from_array(target[1:].astype(np.int64), f"{base}_rest")
            count = 1
        g.initializer.append(rest)
        starts = numpy_helper.from_array(np.array([0], np.int64), f"{base}_s0")
        ends = numpy_helper.from_array(np.array([count], np.int64), f"{base}_s1")
        g.initializer.extend([starts, ends])
        new = [helper.make_node("Shape", [x], [f"{base}_shape"], name=f"{base}_Shape"),
               helper.make_node("Slice", [f"{base}_shape", starts.name, ends.name], [f"{base}_lead"],
                                name=f"{base}_Slice"),
               helper.make_node("Concat", [f"{base}_lead", rest.name], [f"{base}_target"], axis=0,
                                name=f"{base}_Concat")]
        reshaped = helper.make_node("Reshape", [x, f"{base}_target"], list(node.output), name=node.name or base)
        g.node.remove(node)
        for k, n in enumerate(new + [reshaped]):
            g.node.insert(i + k, n)
        del g.value_info[:]
        return True
    return False


# ------------------------------------------------------------------------------------------------ the check

@dataclass
class Case:
    seed: int
    source: str
    outcome: str = ""  # "pruned", "unchanged" (nothing prunable), "refused" (exit 2), "invalid" (generated),
    # "mended" (an invalid model that onnxprune wrote out valid)
    problems: list[str] = field(default_factory=list)
    oracle: float | None = None  # the zero-channel oracle's relative error, on pruned cases
    tol: float = 0.0  # the oracle's tolerance for the case's float type
    vacuous: bool = False
    error: Exception | None = None  # what prune_model raised: an OnnxPruneError on a refusal
    shapes: tuple[list, list] | None = None  # output shapes of the original and the pruned model, on the feed
    ratio0_err: float | None = None  # max |original - prune at ratio 0| over all outputs, on valid cases
    seconds: float = 0.0


def make_case(seed: int) -> tuple[onnx.ModelProto, dict, str]:
    """The model of case `seed`: 60% generated, 25% a generated model mutated, 15% a zoo model mutated."""
    global _ZOO
    pick = seed % 20
    model, shapes = random_model(seed)
    if pick < 12:
        return model, shapes, "generated"
    if pick < 17:
        mutated, how = mutate(model, seed, shapes)
        return mutated, shapes, f"generated+{how}"
    if _ZOO is None:
        _ZOO = zoo_models()
    name = sorted(_ZOO)[seed % len(_ZOO)]
    base = _ZOO[name]
    mutated, how = mutate(base, seed, input_shapes(base))
    return mutated, input_shapes(base), f"{name}+{how}"


def _valid(model: onnx.ModelProto, feed: dict) -> bool:
    """Whether the case is a valid model: the full checker passes and it runs on its feed."""
    from onnxprune.runtime.session import run

    try:
        onnx.checker.check_model(model, full_check=True)
        run(model, feed)
    except Exception:  # noqa: BLE001
        return False
    return True


def check_case(seed: int, verbose: bool = False) -> Case:
    """Prune case `seed` and collect every way it went wrong (see the module docstring)."""
    from onnxprune.errors import OnnxPruneError
    from onnxprune.pipeline.prune import RunSettings, prune_model
    from onnxprune.recipe import Recipe
    from onnxprune.runtime.feeds import random_feed
    from onnxprune.runtime.session import run
    from onnxprune.testing import zero_channel_oracle

    start = time.perf_counter()
    case = Case(seed, "")
    try:
        model, shapes, case.source = make_case(seed)
    except Exception as exc:  # noqa: BLE001 - a generator bug, reported like any other
        case.problems.append(f"generator raised {type(exc).__name__}: {exc}")
        return case
    rng = np.random.default_rng(seed + 1)
    give_shapes = rng.random() < 0.5
    feed = None
    try:
        feed = random_feed(model, shapes, seed)
    except Exception:  # noqa: BLE001
        pass
    valid = feed is not None and _valid(model, feed)
    recipe = Recipe(ratio=float(rng.choice([0.25, 0.5, 0.7])), criterion=str(rng.choice(["l1", "l2", "random"])),
                    global_ranking=bool(rng.random() < 0.2), round_to=int(rng.choice([1, 1, 2])), seed=seed)
    try:
        result = prune_model(model, recipe, RunSettings(input_shapes=shapes if give_shapes else None))
    except OnnxPruneError as exc:
        case.outcome = "refused" if valid else "invalid"
        case.error = exc
        if valid and not _expected_refusal(exc, give_shapes):
            case.problems.append(f"valid model refused: {exc}")
        case.seconds = time.perf_counter() - start
        return case
    except Exception as exc:  # noqa: BLE001 - an internal error: exit 3 in the CLI
        case.error = exc
        case.problems.append(f"internal error {type(exc).__name__}: {exc}"
                             + ("\n" + traceback.format_exc() if verbose else ""))
        case.seconds = time.perf_counter() - start
        return case
    if not valid:
        # onnxprune may mend what made the model invalid (normalisation names every node): the model it
        # writes must then be valid
        case.outcome = "mended"
        try:
            onnx.checker.check_model(result.model, full_check=True)
        except Exception as exc:  # noqa: BLE001
            case.problems.append(f"an invalid model was written: {str(exc)[:200]}")
        case.seconds = time.perf_counter() - start
        return case
    for fault in result.faults:
        case.problems.append(f"contained fault: {fault['reason']}")
    case.outcome = "pruned" if result.plan.kept else "unchanged"
    try:
        onnx.checker.check_model(result.model, full_check=True)
        got, want = run(result.model, feed), run(model, feed)
        case.shapes = ([np.shape(a) for a in want], [np.shape(a) for a in got])
        if case.shapes[0] != case.shapes[1]:
            case.problems.append("output shapes changed")
        if [(i.name, i.type.tensor_type.elem_type) for i in result.model.graph.input] != \
                [(i.name, i.type.tensor_type.elem_type) for i in model.graph.input]:
            case.problems.append("inputs changed")
    except Exception as exc:  # noqa: BLE001
        case.problems.append(f"written model is invalid: {type(exc).__name__}: {str(exc)[:300]}")
    try:  # ratio 0 changes nothing (round_to 1: rounding kept counts to a multiple prunes by itself; not
        # validated again: the comparison here is the validation)
        same = prune_model(model, recipe.replace(ratio=0.0, round_to=1),
                           RunSettings(input_shapes=shapes if give_shapes else None, validate=False))
        case.ratio0_err = max((float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
                               for a, b in zip(run(model, feed), run(same.model, feed)) if np.size(a)), default=0.0)
        if case.ratio0_err != 0:
            case.problems.append(f"ratio 0 changed the outputs by {case.ratio0_err:.3g}")
    except Exception as exc:  # noqa: BLE001
        case.problems.append(f"ratio 0 failed: {type(exc).__name__}: {str(exc)[:300]}")
    if case.outcome == "pruned":
        try:
            r = zero_channel_oracle(model, seed=seed, feed=feed)
            tol = case.tol = FLOAT_TYPES.get(model.graph.input[0].type.tensor_type.elem_type, (None, 1e-4))[1]
            case.oracle, case.vacuous = r.max_rel_err, not r.informative(tol, factor=10)
            if r.max_rel_err > tol:
                case.problems.append(f"zero-channel oracle: relative error {r.max_rel_err:.3g} > {tol:g}")
            for fault in r.faults:
                case.problems.append(f"contained fault in the oracle's prune: {fault['reason']}")
        except OnnxPruneError as exc:
            case.problems.append(f"oracle refused: {exc}")
        except Exception as exc:  # noqa: BLE001
            case.problems.append(f"oracle raised {type(exc).__name__}: {exc}"
                                 + ("\n" + traceback.format_exc() if verbose else ""))
    case.seconds = time.perf_counter() - start
    return case


def check_cli(seed: int, folder: Path) -> list[str]:
    """Case `seed` through the command line (`prune` with a JSON report, then `analyze`): exit 0 or 2 only, one
    line on stderr for an error, nothing written on an error, and a valid model written otherwise."""
    import contextlib
    import io

    from onnxprune.cli import main

    problems = []
    model, shapes, _ = make_case(seed)
    path, out, report = folder / f"case{seed}.onnx", folder / f"case{seed}.pruned.onnx", folder / f"case{seed}.json"
    onnx.save(model, path)
    argv = ["prune", str(path), "-o", str(out), "--json", str(report), "--ratio", "0.5"]
    if seed % 2:
        argv += ["--input-shapes", ",".join(f"{k}:{'x'.join(map(str, v))}" for k, v in shapes.items())]
    for args in (argv, ["analyze", str(path)]):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(args)
        text = err.getvalue().strip()
        # warnings before the run (a data-free prune of a transformer) are not part of the error
        errors = [line for line in text.splitlines() if not line.startswith("warning: ")]
        if code not in (0, 2):
            problems.append(f"{args[0]} exited {code}: {text[-300:]}")
        if code == 2 and (len(errors) != 1 or "Traceback" in text):
            problems.append(f"{args[0]}: error is not one line: {text[-300:]}")
        if args[0] == "prune" and code == 2 and out.exists():
            problems.append("prune failed but wrote its output")
        if args[0] == "prune" and code == 0:
            try:
                onnx.checker.check_model(onnx.load(out), full_check=True)
            except Exception as exc:  # noqa: BLE001
                problems.append(f"prune wrote an invalid model: {str(exc)[:200]}")
    return problems


def _expected_refusal(exc, gave_shapes: bool) -> bool:
    """Refusals of valid models that are the user's to fix: a dynamic dim that cannot be guessed (without
    --input-shapes), control flow or an opset out of range."""
    text = str(exc)
    return ("--input-shapes" in text and not gave_shapes) or "opset" in text or "control flow" in text


def run_cases(seeds, verbose: bool = False, progress: bool = False) -> list[Case]:
    cases = []
    for i, seed in enumerate(seeds):
        cases.append(check_case(seed, verbose))
        if progress and (i + 1) % 250 == 0:
            bad = sum(1 for c in cases if c.problems)
            print(f"{i + 1} cases, {bad} with problems", flush=True)
    return cases


def summary(cases: list[Case]) -> str:
    outcomes = Counter(c.outcome or "error" for c in cases)
    sources = Counter(c.source.split("+")[0] if "+" not in c.source else "mutated " + c.source.split("+")[1].split(":")[0]
                      for c in cases)
    errs = [c.oracle for c in cases if c.oracle is not None]
    bad = [c for c in cases if c.problems]
    lines = [f"{len(cases)} cases: " + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())),
             "sources: " + ", ".join(f"{k} {v}" for k, v in sorted(sources.items())),
             f"oracle on {len(errs)} pruned models: max relative error {max(errs) if errs else 0:.2g}; "
             f"{sum(c.vacuous for c in cases)} where zeroing moved the outputs by less than 10x the tolerance",
             f"{len(bad)} cases with problems" + (": seeds " + ", ".join(str(c.seed) for c in bad[:20]) if bad else "")]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=5000)
    parser.add_argument("--start", type=int, default=0, help="first seed")
    parser.add_argument("--seed", type=int, default=None, help="run this one case")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    if args.seed is not None:
        case = check_case(args.seed, verbose=True)
        print(case.source, case.outcome, case.oracle)
        for p in case.problems:
            print("  ", p)
        return 1 if case.problems else 0
    t0 = time.perf_counter()
    cases = run_cases(range(args.start, args.start + args.cases), args.verbose, progress=True)
    print(summary(cases))
    for c in [c for c in cases if c.problems][:50]:
        print(f"seed {c.seed} ({c.source}): {c.problems[0][:300]}")
    print(f"{time.perf_counter() - t0:.0f} s")
    return 1 if any(c.problems for c in cases) else 0


if __name__ == "__main__":
    sys.exit(main())
