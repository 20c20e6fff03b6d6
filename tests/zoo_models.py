"""Zoo models that do not come from PyTorch (issue 2): NHWC graphs as TF exporters emit them, and a
scikit-learn MLP exported with skl2onnx.

The NHWC builders write the graph with `onnx.helper`, the way tf2onnx leaves a Keras CNN after its
transpose optimiser: the model's input and output stay NHWC, a `Transpose` moves the activations to NCHW
for `Conv`, and either a `Transpose` back or a channel-first pooling ends the conv stack. Dense layers are
`MatMul` with `[in, out]` weights plus an `Add` (Keras' layout), or `Gemm` with `transB=1`.

Every builder is seeded and returns a checked `onnx.ModelProto`; the model's float input is named "input".
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
NHWC_SHAPE = (2, 16, 16, 3)  # batch, height, width, channels


class _Graph:
    """A little builder: named initializers and nodes, so each model below reads top to bottom."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0
        self._convs = 0

    def init(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def rand(self, name: str, shape: tuple[int, ...], scale: float | None = None) -> str:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
        scale = scale if scale is not None else 1.0 / np.sqrt(fan_in)
        return self.init(name, (scale * self.rng.standard_normal(shape)).astype(np.float32))

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        self._n += 1
        out = f"{op.lower()}_{self._n}"
        self.nodes.append(helper.make_node(op, inputs, [out], name=f"{op}_{self._n}", **attrs))
        return out

    def conv(self, x: str, cin: int, cout: int, k: int = 3, stride: int = 1, bias: bool = True) -> str:
        self._convs += 1
        i = self._convs
        inputs = [x, self.rand(f"conv{i}.weight", (cout, cin, k, k))]
        if bias:
            inputs.append(self.rand(f"conv{i}.bias", (cout,), scale=0.1))
        return self.node("Conv", inputs, kernel_shape=[k, k], pads=[k // 2] * 4, strides=[stride, stride])

    def model(self, x: str, out_shape: list, name: str) -> onnx.ModelProto:
        _, h, w, c = NHWC_SHAPE
        # The last node's output is renamed to the graph output.
        self.nodes[-1].output[0] = "output"
        graph = helper.make_graph(
            self.nodes,
            name,
            [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", h, w, c])],
            [helper.make_tensor_value_info("output", TensorProto.FLOAT, out_shape)],
            self.inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        model.ir_version = 8
        onnx.checker.check_model(model, full_check=True)
        return model


def nhwc_gap_gemm(seed: int = 0) -> onnx.ModelProto:
    """NHWC input → Transpose → Conv → Relu → Conv(stride 2) → Relu → Conv → Relu →
    GlobalAveragePool → Flatten → Gemm(transB=1) → Relu → Gemm → output [N, 10]."""
    g = _Graph(seed)
    x = g.node("Transpose", ["input"], perm=[0, 3, 1, 2])
    x = g.node("Relu", [g.conv(x, 3, 16)])
    x = g.node("Relu", [g.conv(x, 16, 32, stride=2)])
    x = g.node("Relu", [g.conv(x, 32, 32)])
    x = g.node("Flatten", [g.node("GlobalAveragePool", [x])], axis=1)
    x = g.node("Gemm", [x, g.rand("fc1.weight", (24, 32)), g.rand("fc1.bias", (24,), 0.1)], transB=1)
    x = g.node("Relu", [x])
    g.node("Gemm", [x, g.rand("fc2.weight", (10, 24)), g.rand("fc2.bias", (10,), 0.1)], transB=1)
    return g.model("input", ["N", 10], "nhwc_gap_gemm")


def nhwc_wrapped_matmul(seed: int = 0) -> onnx.ModelProto:
    """Each Conv wrapped in Transposes, bias+activation on the NHWC (last) axis, Keras-style dense layers.

    NHWC input → [Transpose → Conv(no bias) → Transpose back → Add(bias [C]) → Relu] x2 →
    ReduceMean over H, W (keepdims=0) → MatMul W[in, out] → Add → Relu → MatMul W[in, out] → Add → output.
    """
    g = _Graph(seed)
    x = "input"
    for i, (cin, cout) in enumerate([(3, 16), (16, 24)]):
        x = g.node("Transpose", [x], perm=[0, 3, 1, 2])
        x = g.conv(x, cin, cout, bias=False)
        x = g.node("Transpose", [x], perm=[0, 2, 3, 1])
        x = g.node("Add", [x, g.rand(f"block{i}.bias", (cout,), 0.1)])
        x = g.node("Relu", [x])
    x = g.node("ReduceMean", [x], axes=[1, 2], keepdims=0)
    x = g.node("MatMul", [x, g.rand("dense1.kernel", (24, 20), 1 / np.sqrt(24))])
    x = g.node("Relu", [g.node("Add", [x, g.rand("dense1.bias", (20,), 0.1)])])
    x = g.node("MatMul", [x, g.rand("dense2.kernel", (20, 10), 1 / np.sqrt(20))])
    g.node("Add", [x, g.rand("dense2.bias", (10,), 0.1)])
    return g.model("input", ["N", 10], "nhwc_wrapped_matmul")


def nhwc_transpose_back_flatten(seed: int = 0) -> onnx.ModelProto:
    """Keras Flatten after an NHWC conv stack: the dense input index is (h*W + w)*C + c, so a channel is a
    stride-C comb of dense features, not a block.

    NHWC input → Transpose → Conv → Relu → Conv(stride 2) → Relu → Transpose back to NHWC →
    Reshape [-1, H*W*C] → MatMul W[in, out] → Add → output [N, 10].
    """
    _, h, w, _ = NHWC_SHAPE
    g = _Graph(seed)
    x = g.node("Transpose", ["input"], perm=[0, 3, 1, 2])
    x = g.node("Relu", [g.conv(x, 3, 8)])
    x = g.node("Relu", [g.conv(x, 8, 12, stride=2)])
    x = g.node("Transpose", [x], perm=[0, 2, 3, 1])
    feat = (h // 2) * (w // 2) * 12
    x = g.node("Reshape", [x, g.init("flatten.shape", np.array([-1, feat], dtype=np.int64))])
    x = g.node("MatMul", [x, g.rand("dense.kernel", (feat, 10), 1 / np.sqrt(feat))])
    g.node("Add", [x, g.rand("dense.bias", (10,), 0.1)])
    return g.model("input", ["N", 10], "nhwc_transpose_back_flatten")


NHWC_MODELS: dict[str, Callable[[], onnx.ModelProto]] = {
    "nhwc_gap_gemm": nhwc_gap_gemm,
    "nhwc_wrapped_matmul": nhwc_wrapped_matmul,
    "nhwc_transpose_back_flatten": nhwc_transpose_back_flatten,
}


def nhwc_input(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(NHWC_SHAPE).astype(np.float32)


def sklearn_mlp(hidden: tuple[int, ...] = (64, 32), seed: int = 0):
    """An MLPClassifier trained on sklearn's digits (8x8 images, 64 features), exported with skl2onnx.

    Returns (model, X_test, y_test, test accuracy of the sklearn model). ZipMap is disabled, so the outputs
    are `label` (int64, from ArgMax) and `probabilities` (float, from Softmax).
    """
    import warnings

    from skl2onnx import to_onnx
    from sklearn.datasets import load_digits
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier
    from threadpoolctl import threadpool_limits

    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, random_state=seed)
    clf = MLPClassifier(hidden_layer_sizes=hidden, max_iter=300, random_state=seed)
    # one BLAS thread: these matrices are tiny, and threaded BLAS on a busy machine is 10x slower
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(X_train, y_train)
    model = to_onnx(clf, X_train[:1], options={id(clf): {"zipmap": False}}, target_opset=OPSET)
    return model, X_test, y_test, float(clf.score(X_test, y_test))
