"""Retraining-free recovery of a pruned model from calibration data.

`bias` (FLAP, An et al., AAAI'24): a removed input channel c of a linear layer y = W x + b contributed
W[:, c] x_c; replacing x_c by its calibration mean keeps the layer's expected output, so

    b' = b + sum over removed columns j of W[:, j] * mean(x_j)

where, for a Conv, the columns are im2col patch entries (channel, kernel offset) and the means include padding.

`lstsq` (He et al., ICCV'17; ThiNet; Kwon et al., NeurIPS'22): every affected Conv/Gemm/MatMul is refit, in
graph order, so that on calibration data its output from the *pruned* model's input (earlier layers already
refit, so errors do not accumulate) matches the unpruned model's output:

    min_{W, b}  || [X_p 1] [W; b] - Y ||^2 + lambda || W - W0 ||^2

W0 being the pruned layer's own weights, so lambda -> infinity keeps them and fits only the bias (the best
bias compensation for the pruned inputs) and lambda -> 0 is plain least squares. A layer whose (biased) output
is added to a residual stream r (a transformer's attention output projection and second MLP layer) is fit to
the original *sum* instead, Y = (y + r)_original - r_now: it then also absorbs the drift that earlier pruning
left in the stream, which the LayerNorm after the sum would otherwise pass on. Rows at padded token
positions (attention mask 0 in the feed) are left out of every fit. Only the Gram matrices
A = X^T X and B = X^T Y are accumulated, in float64, so memory does not grow with the calibration set;
lambda is chosen on a held-out quarter of the calibration samples (scaled by the mean diagonal of A), and the
final fit uses all samples; the alphas share one eigendecomposition (`solve_path`). Layers that read the same
tensor are fit from one capture of it, and each capture runs only the nodes it needs. For a Conv the rows
of X are im2col patches of its input (subsampled positions, fixed seed); all output channels share A, so one
solve per layer and lambda.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import onnx
from numpy.lib.stride_tricks import sliding_window_view
from onnx import numpy_helper

from onnxprune.choices import RECOVERIES
from onnxprune.errors import InputError
from onnxprune.graph.ir import attr
from onnxprune.io.weights import tensor_array
from onnxprune.pipeline.activations import Probe, token_rows
from onnxprune.pipeline.stages import FrontierStore, StagedRun
from onnxprune.report import progress

MODES = RECOVERIES
# lambda = alpha * mean(diag(A)); inf keeps W0 and refits the bias only
ALPHAS = (1e-8, 1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, float("inf"))


@dataclass
class RecoveryResult:
    model: onnx.ModelProto
    mode: str
    layers: list[dict] = field(default_factory=list)  # per layer: node, method, alpha, holdout errors
    notes: list[str] = field(default_factory=list)
    passes: dict = field(default_factory=dict)  # model passes of the staged runs (see pipeline/stages.py)


@dataclass
class Layer:
    """One linear layer of the original model, seen as rows x (features) -> y (outputs)."""

    node: onnx.NodeProto
    kind: str                 # conv, gemm, matmul
    in_kept: np.ndarray       # kept positions of the input channel axis
    out_kept: np.ndarray      # kept positions of the output axis
    in_length: int
    bias_add: tuple | None = None  # MatMul: (Add node, constant input index) that holds its bias
    # (Add node, index of its other input) when the layer's (biased) output is added to a residual stream
    residual: tuple | None = None

    @property
    def kernel(self) -> int:
        return int(np.prod(attr(self.node, "kernel_shape", []) or [1])) if self.kind == "conv" else 1

    def kept_columns(self) -> np.ndarray:
        k = self.kernel
        return (self.in_kept[:, None] * k + np.arange(k)[None, :]).ravel()

    def removed_columns(self) -> np.ndarray:
        return np.setdiff1d(np.arange(self.in_length * self.kernel), self.kept_columns())


# ---- rows ---------------------------------------------------------------------------------------------------

def _conv_geometry(node, x_shape):
    spatial = len(x_shape) - 2
    kernel = list(attr(node, "kernel_shape", []))
    strides = list(attr(node, "strides", [1] * spatial))
    dil = list(attr(node, "dilations", [1] * spatial))
    pads = list(attr(node, "pads", [0] * 2 * spatial))
    return kernel, strides, dil, pads


def conv_rows(node, x: np.ndarray, y: np.ndarray | None, sample_rows: np.ndarray | None):
    """im2col rows of a (1-D or 2-D) Conv input [N, C, ...] and the matching output rows.

    Returns (X [R, C * prod(kernel)], Y [R, O] or None, sample index of each row).
    """
    if x.ndim == 3:
        x = x[:, :, None, :]
        y = None if y is None else y[:, :, None, :]
        kernel, strides, dil, pads = _conv_geometry(node, x.shape[:-2] + x.shape[-1:])
        kernel, strides, dil = [1] + kernel, [1] + strides, [1] + dil
        pads = [0, pads[0], 0, pads[1]]
    else:
        kernel, strides, dil, pads = _conv_geometry(node, x.shape)
    n, c = x.shape[:2]
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    span = [(k - 1) * d + 1 for k, d in zip(kernel, dil)]
    win = sliding_window_view(xp, span, axis=(2, 3))[:, :, ::strides[0], ::strides[1], ::dil[0], ::dil[1]]
    ho, wo = win.shape[2], win.shape[3]
    rows = np.arange(n * ho * wo) if sample_rows is None else sample_rows
    ni, rem = np.divmod(rows, ho * wo)
    hi, wi = np.divmod(rem, wo)
    cols = win[ni, :, hi, wi].reshape(len(rows), -1)
    ys = None if y is None else y[ni, :, hi, wi]
    return cols, ys, ni


def layer_rows(layer: Layer, x: np.ndarray, y: np.ndarray | None, rng: np.random.Generator, cap: int,
               keep: np.ndarray | None = None):
    """Rows (features, outputs, sample of each row) of one batch, at most `cap` rows picked at random.

    `keep` (MatMul/Gemm only): a boolean per flattened row; rows where it is False (padding) are dropped.
    """
    x = np.asarray(x, dtype=np.float64)
    y = None if y is None else np.asarray(y, dtype=np.float64)
    if layer.kind == "conv":
        n = x.shape[0]
        per_sample = int(np.prod(y.shape[2:])) if y is not None else None
        if per_sample is None:
            _, _, probe = conv_rows(layer.node, x[:1], None, None)
            per_sample = len(probe)
        total = n * per_sample
        pick = None if total <= cap else np.sort(rng.choice(total, cap, replace=False))
        return conv_rows(layer.node, x, y, pick)
    k = x.shape[-1]
    n = x.shape[0]
    xs = x.reshape(-1, k)
    ys = None if y is None else y.reshape(-1, y.shape[-1])
    sample = np.repeat(np.arange(n), len(xs) // max(n, 1))
    if keep is not None and len(keep) == len(xs):
        xs, sample = xs[keep], sample[keep]
        ys = None if ys is None else ys[keep]
    if len(xs) > cap:
        pick = np.sort(rng.choice(len(xs), cap, replace=False))
        xs, sample = xs[pick], sample[pick]
        ys = None if ys is None else ys[pick]
    return xs, ys, sample


# ---- finding the layers -------------------------------------------------------------------------------------

def _linear_kind(node, view) -> str | None:
    if len(node.input) < 2 or view.array(node.input[1]) is None:
        return None
    if node.op_type == "Conv":
        rank = view.rank(node.input[0])
        if rank in (3, 4) and attr(node, "auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET"):
            return "conv"
    elif node.op_type == "Gemm":
        if not attr(node, "transA", 0) and attr(node, "alpha", 1.0) == 1.0 and attr(node, "beta", 1.0) == 1.0:
            bias = view.array(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            if len(node.input) < 3 or not node.input[2] or (bias is not None and bias.ndim == 1):
                return "gemm"
    elif node.op_type == "MatMul" and view.array(node.input[1]).ndim == 2:
        return "matmul"
    return None


def find_layers(prep, plan, all_affected: bool) -> tuple[list[Layer], list[str]]:
    """Linear layers that read pruned channels and, with `all_affected`, every one downstream of them."""
    view, analysis = prep.view, prep.analysis
    find = analysis.find
    pruned = set(plan.kept)
    reads: dict[str, list] = {}
    for m in analysis.context.members:
        if m.role == "in" and any(find(s.space) in pruned for s in m.layout.segments):
            reads.setdefault(m.node, []).append(m)
    affected: set[str] = set()
    layers, notes = [], []
    for node in view.nodes:
        changed_input = bool(node.input) and node.input[0] in affected
        if node.name in reads or changed_input:
            affected.update(o for o in node.output if o)
        if node.name not in reads and not (all_affected and changed_input):
            continue
        kind = _linear_kind(node, view)
        if kind == "conv" and attr(node, "group", 1) != 1:
            kind = None
        if kind is None:
            if node.name in reads:
                notes.append(f"{node.op_type} {node.name}: not refit (only plain Conv, Gemm and MatMul layers are)")
            continue
        weight = view.array(node.input[1])
        in_axis = {"conv": 1, "gemm": 1 if attr(node, "transB", 0) else 0, "matmul": 0}[kind]
        in_len = weight.shape[in_axis]
        in_kept = np.arange(in_len)
        if node.name in reads:
            member = next(m for m in reads[node.name] if m.input_index == 1)
            in_kept = member.layout.kept_positions(plan.kept, find)
        out_axis = analysis.context.axes.get(node.output[0])
        out_len = weight.shape[0] if kind == "conv" or (kind == "gemm" and attr(node, "transB", 0)) else weight.shape[1]
        out_kept = out_axis.kept_positions(plan.kept, find) if out_axis is not None else np.arange(out_len)
        layer = Layer(node, kind, in_kept, out_kept, in_len)
        if kind == "matmul":
            layer.bias_add = _matmul_bias(node, view, out_len)
        if len(out_kept) == out_len:
            layer.residual = _residual_add(layer, view)
        layers.append(layer)
    return layers, notes


def _matmul_bias(node, view, n: int):
    users = view.consumers.get(node.output[0], [])
    if len(users) == 1 and users[0][0].op_type == "Add":
        add = users[0][0]
        other = 1 - users[0][1]
        arr = view.array(add.input[other])
        if arr is not None and arr.shape[-1:] == (n,) and arr.size == n:
            return add, other
    return None


def _residual_add(layer: Layer, view):
    """(Add, other input index) when the layer's output, after its bias, joins a residual stream of its shape."""
    out = layer.bias_add[0].output[0] if layer.bias_add is not None else layer.node.output[0]
    users = view.consumers.get(out, [])
    if len(users) != 1 or users[0][0].op_type != "Add":
        return None
    add, index = users[0]
    other = add.input[1 - index]
    if view.array(other) is not None or view.shape(other) != view.shape(out):
        return None
    return add, 1 - index


# ---- editing the pruned model -------------------------------------------------------------------------------

class Params:
    """Reads and writes the constants of the pruned model's nodes, copying a shared initializer on write."""

    def __init__(self, model: onnx.ModelProto, writer=None):
        self.model = model
        self.writer = writer  # lazy models: new values go to the workspace's data file (weights.TensorWriter)
        self.nodes = {n.name: n for n in model.graph.node}
        self.inits = {t.name: t for t in model.graph.initializer}

    def get(self, node_name: str, index: int) -> np.ndarray | None:
        node = self.nodes[node_name]
        if index >= len(node.input) or not node.input[index] or node.input[index] not in self.inits:
            return None
        return tensor_array(self.inits[node.input[index]])

    def set(self, node_name: str, index: int, value: np.ndarray, base: str) -> None:
        node = self.nodes[node_name]
        current = node.input[index] if index < len(node.input) else ""
        uses = sum(1 for n in self.model.graph.node for i in n.input if current and i == current)
        if current in self.inits and uses == 1 and current not in {o.name for o in self.model.graph.output}:
            tensor = self.inits[current]
            if self.writer is not None and self.writer.overwrite(tensor, value):
                return
            self.inits[current].CopyFrom(self._tensor(value, current))
            return
        name = f"{base}__recovered"
        k = 1
        while name in self.inits:
            k += 1
            name = f"{base}__recovered{k}"
        tensor = self._tensor(value, name)
        self.model.graph.initializer.append(tensor)
        self.inits[name] = tensor
        while len(node.input) <= index:
            node.input.append("")
        node.input[index] = name

    def _tensor(self, value: np.ndarray, name: str) -> onnx.TensorProto:
        if self.writer is not None and value.size > 256:
            return self.writer.write(name, value)
        return numpy_helper.from_array(value, name)


def _theta0(layer: Layer, params: Params) -> tuple[np.ndarray, np.ndarray | None]:
    """The pruned layer's weights as [features, outputs] and its bias (None when it has none)."""
    w = params.get(layer.node.name, 1).astype(np.float64)
    if layer.kind == "conv":
        wt = w.reshape(w.shape[0], -1).T
        bias = params.get(layer.node.name, 2)
    elif layer.kind == "gemm":
        wt = w.T if attr(layer.node, "transB", 0) else w
        bias = params.get(layer.node.name, 2)
    else:
        wt = w
        bias = None
        if layer.bias_add is not None:
            add, idx = layer.bias_add
            bias = params.get(add.name, idx)
    return wt, None if bias is None else bias.astype(np.float64).reshape(-1)


def _write(layer: Layer, params: Params, wt: np.ndarray, bias: np.ndarray | None, dtype) -> None:
    node = layer.node
    old = params.get(node.name, 1)
    if layer.kind == "conv":
        w = wt.T.reshape(old.shape)
    elif layer.kind == "gemm" and attr(node, "transB", 0):
        w = wt.T
    else:
        w = wt
    params.set(node.name, 1, w.astype(dtype), node.input[1].split("__")[0])
    if bias is None:
        return
    if layer.kind == "matmul":
        add, idx = layer.bias_add
        old_b = params.get(add.name, idx)
        params.set(add.name, idx, bias.reshape(old_b.shape).astype(old_b.dtype), add.input[idx].split("__")[0])
    else:
        params.set(node.name, 2, bias.astype(dtype), (node.input[2] if len(node.input) > 2 and node.input[2]
                                                       else node.name.strip("/").replace("/", "_") + "_bias"))


# ---- recovery ----------------------------------------------------------------------------------------------

def recover(prep, plan, pruned: onnx.ModelProto, feeds: Sequence[dict[str, np.ndarray]], mode: str = "lstsq", *,
            seed: int = 0, holdout: float = 0.25, max_rows: int = 2048, staged: bool = True,
            memory_budget: int | None = None) -> RecoveryResult:
    """Recover `pruned` (made from `prep` by `plan`) on calibration `feeds`; returns a new model."""
    if mode not in MODES:
        raise InputError(f"unknown recovery {mode!r} (choose from {', '.join(MODES)})")
    out = onnx.ModelProto()
    out.CopyFrom(pruned)
    result = RecoveryResult(out, mode)
    if mode == "none" or not plan.kept:
        return result
    feeds = list(feeds)
    if not feeds:
        raise InputError(f"--recover {mode} needs calibration data (--data)")
    layers, notes = find_layers(prep, plan, all_affected=(mode == "lstsq"))
    result.notes.extend(notes)
    params = Params(out, prep.writer())
    if mode == "bias":
        _bias(prep, layers, params, feeds, seed, max_rows, result)
    else:
        _lstsq(prep, layers, params, feeds, seed, holdout, max_rows, result, staged, memory_budget)
    return result


def _bias(prep, layers, params, feeds, seed, max_rows, result) -> None:
    """FLAP: one pass over the original model, means of the removed columns folded into the biases."""
    layers = [l for l in layers if len(l.removed_columns())]
    probe = Probe(prep.model, [l.node.input[0] for l in layers])
    rng = np.random.default_rng(seed)
    sums = {l.node.name: 0.0 for l in layers}
    counts = {l.node.name: 0 for l in layers}
    with progress("recovery (bias): calibration batches", len(feeds)) as advance:
        for feed in feeds:
            _bias_sums(probe.run(feed), feed, layers, rng, max_rows, sums, counts)
            advance()
    result.passes = {"original": probe.node_runs / max(len(prep.model.graph.node) * len(feeds), 1)}
    for l in layers:
        if l.kind == "matmul" and l.bias_add is None:
            result.notes.append(f"MatMul {l.node.name}: no bias Add to fold the removed channels into")
            continue
        mean = sums[l.node.name] / max(counts[l.node.name], 1)
        removed = l.removed_columns()
        w_full = _original_wt(prep, l)
        shift = (mean[removed] @ w_full[removed])[l.out_kept]
        wt, bias = _theta0(l, params)
        bias = (np.zeros(wt.shape[1]) if bias is None else bias) + shift
        _write(l, params, wt, bias, params.get(l.node.name, 1).dtype)
        result.layers.append({"node": l.node.name, "method": "bias", "alpha": None,
                              "shift": float(np.abs(shift).max()) if shift.size else 0.0})


def _bias_sums(values, feed, layers, rng, max_rows, sums, counts) -> None:
    for l in layers:
        x_in = values[l.node.input[0]]
        x, _, _ = layer_rows(l, x_in, None, rng, max_rows, token_rows(feed, x_in.shape))
        sums[l.node.name] = sums[l.node.name] + x.sum(axis=0)
        counts[l.node.name] += len(x)


def _original_wt(prep, layer: Layer) -> np.ndarray:
    w = prep.view.array(layer.node.input[1]).astype(np.float64)
    if layer.kind == "conv":
        return w.reshape(w.shape[0], -1).T
    if layer.kind == "gemm" and attr(layer.node, "transB", 0):
        return w.T
    return w


@dataclass
class Gram:
    a: np.ndarray
    b: np.ndarray
    yy: float = 0.0
    rows: int = 0

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        self.a += x.T @ x
        self.b += x.T @ y
        self.yy += float((y * y).sum())
        self.rows += len(x)

    def error(self, theta: np.ndarray) -> float:
        """||X theta - Y||^2 from the accumulated sums."""
        return float(((self.a @ theta) * theta).sum() - 2 * (self.b * theta).sum() + self.yy)


def solve(a: np.ndarray, b: np.ndarray, theta0: np.ndarray, alpha: float, intercept: bool) -> np.ndarray:
    """argmin ||X t - Y||^2 + lam ||t_w - t0_w||^2, lam = alpha * mean diag(A); the intercept row is free."""
    d = a.shape[0]
    nw = d - 1 if intercept else d
    if np.isinf(alpha):
        theta = theta0.copy()
        if intercept:  # weights fixed: the best bias for them
            n = a[-1, -1]
            theta[-1] = (b[-1] - a[-1, :nw] @ theta0[:nw]) / max(n, 1e-12)
        return theta
    lam = alpha * max(float(np.trace(a[:nw, :nw])) / max(nw, 1), 1e-12)
    reg = np.zeros(d)
    reg[:nw] = lam
    lhs = a + np.diag(reg)
    rhs = b + reg[:, None] * theta0
    try:
        return np.linalg.solve(lhs, rhs)
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(lhs, rhs, rcond=None)[0]


def solve_path(a: np.ndarray, b: np.ndarray, theta0: np.ndarray, alphas: Sequence[float],
               intercept: bool) -> list[np.ndarray]:
    """`solve` for every alpha from one eigendecomposition.

    The free intercept is eliminated by centring: with n rows, column sums s_x, s_y,
    A_c = A_ww - s_x s_x^T / n and B_c = B_w - s_x s_y^T / n, the weights solve (A_c + lam I) W = B_c + lam W0
    and the intercept is (s_y - s_x^T W) / n. With A_c = V diag(e) V^T, W = V diag(1 / (e + lam)) V^T
    (B_c + lam W0): a matrix product per alpha instead of a factorisation.
    """
    d = a.shape[0]
    nw = d - 1 if intercept else d
    scale = max(float(np.trace(a[:nw, :nw])) / max(nw, 1), 1e-12)
    if intercept:
        n = max(a[-1, -1], 1e-12)
        sx, sy = a[:nw, -1], b[-1]
        ac = a[:nw, :nw] - np.outer(sx, sx) / n
        bc = b[:nw] - np.outer(sx, sy) / n
    else:
        ac, bc = a, b
    e, v = np.linalg.eigh(ac)
    e = np.maximum(e, 0.0)
    p, q = v.T @ bc, v.T @ theta0[:nw]
    thetas = []
    for alpha in alphas:
        if np.isinf(alpha):
            w = theta0[:nw]
        else:
            lam = alpha * scale
            w = v @ ((p + lam * q) / np.maximum(e + lam, 1e-300)[:, None])
        thetas.append(np.vstack([w, ((sy - sx @ w) / n)[None, :]]) if intercept else w)
    return thetas


def select_alpha(fit: Gram, held: Gram, theta0: np.ndarray, intercept: bool,
                 alphas: Sequence[float] = ALPHAS) -> tuple[float, list[float]]:
    """The alpha whose fit on `fit` has the smallest error on `held` (ties go to the larger alpha)."""
    errors = [held.error(t) for t in solve_path(fit.a, fit.b, theta0, alphas, intercept)]
    lowest = min(errors)
    best = max(i for i, e in enumerate(errors) if e <= lowest + 1e-9 * abs(lowest))
    return alphas[best], errors


def _stages(layers: list[Layer]) -> list[list[Layer]]:
    """Layers grouped by the tensor they read, in graph order: one capture of that tensor serves them all."""
    stages: dict[str, list[Layer]] = {}
    for layer in layers:
        stages.setdefault(layer.node.input[0], []).append(layer)
    return list(stages.values())


def _lstsq(prep, layers, params, feeds, seed, holdout, max_rows, result, staged=True, budget=None) -> None:
    """Refit `layers` in graph order, one stage (the layers reading one tensor) at a time.

    Each stage's input X comes from the model as recovered so far (so earlier refits are seen) and its
    targets Y from the original. With `staged` both models run stage by stage (pipeline/stages.py): every
    node once, so the whole recovery costs one pass of each whatever the depth. Without it, every stage
    re-runs the recovered model from the inputs up to X (the reference the staged run is tested against).
    Rows at padded token positions are dropped (`token_rows`).
    """
    n_samples = sum(next((v.shape[0] for v in f.values() if v.ndim), 1) for f in feeds)
    if n_samples < 4:
        result.notes.append(f"only {n_samples} calibration samples: lambda is not validated (alpha=inf)")
    source = (_StagedSource if staged else _RerunSource)(prep, params, layers, feeds, budget)
    try:
        with progress("recovery (least squares)", len(source.stages)) as advance:
            for stage in source.stages:
                advance(0, step=", ".join(l.node.name for l in stage[:2]) + (" ..." if len(stage) > 2 else ""))
                _refit_stage(stage, source, params, seed, holdout, max_rows, n_samples, result)
                advance()
    finally:
        source.close()
    result.passes = source.passes()


def _refit_stage(stage, source, params, seed, holdout, max_rows, n_samples, result) -> None:
    """Accumulate the Gram matrices of one stage's layers over every batch, then solve and write them."""
    fits = []
    for layer in stage:
        intercept = not (layer.kind == "matmul" and layer.bias_add is None)
        wt, bias = _theta0(layer, params)
        theta0 = np.vstack([wt, (np.zeros((1, wt.shape[1])) if bias is None else bias[None, :])]) \
            if intercept else wt
        d, o = theta0.shape
        fits.append((layer, intercept, theta0, Gram(np.zeros((d, d)), np.zeros((d, o))),
                     Gram(np.zeros((d, d)), np.zeros((d, o)))))
    rng = np.random.default_rng(seed)
    split = np.random.default_rng(seed + 1)
    for feed, now, targets in source.batches(stage):
        x_now = now[stage[0].node.input[0]]
        n = x_now.shape[0] if x_now.ndim else 1
        is_held = split.random(n) < holdout
        keep = token_rows(feed, x_now.shape)
        for layer, intercept, _, fit, held in fits:
            y_full = targets[_target(layer)]
            if layer.residual:  # the sum the original model fed its LayerNorm, less the current residual
                add, other = layer.residual
                y_full = y_full.astype(np.float64) - now[add.input[other]]
            y_kept = np.take(y_full, layer.out_kept, axis=1 if layer.kind != "matmul" else -1)
            x, y, sample = layer_rows(layer, x_now, y_kept, rng, max_rows, keep)
            if intercept:
                x = np.hstack([x, np.ones((len(x), 1))])
            mask = is_held[sample] if n_samples >= 4 else np.zeros(len(x), bool)
            fit.add(x[~mask], y[~mask])
            if mask.any():
                held.add(x[mask], y[mask])
    for layer, intercept, theta0, fit, held in fits:
        _solve_and_write(layer, params, intercept, theta0, fit, held, result)


def _current_names(stage: list[Layer]) -> list[str]:
    """What a stage reads from the model being recovered: its input, and the residuals its layers join."""
    return [stage[0].node.input[0]] + [l.residual[0].input[l.residual[1]] for l in stage if l.residual]


class _StagedSource:
    """X and Y of every stage from two staged runs (pruned and original), each node of each run once."""

    def __init__(self, prep, params, layers, feeds, budget):
        self.feeds = feeds
        self.store = FrontierStore(budget, prep.workspace.path if prep.workspace is not None else None)
        while True:
            self.stages = _stages(layers)
            self.current = StagedRun(params.model, feeds, [_current_names(s) for s in self.stages], self.store,
                                     "pruned model")
            late = _run_before_refit(self.current, self.stages)
            if not late:
                break
            # a residual computed through a layer refit at this stage or later would be read before its refit
            for layer in late:
                layer.residual = None
        self.original = StagedRun(prep.model, feeds, [[_target(l) for l in s] for s in self.stages], self.store,
                                  "original model")

    def batches(self, stage):
        current, original = self.current.step(), self.original.step()
        for feed in self.feeds:
            yield feed, next(current), next(original)
        for rest in (current, original):  # run both to their end: the frontier drops what no stage reads again
            collections.deque(rest, maxlen=0)

    def passes(self) -> dict:
        return {"pruned": self.current.passes, "original": self.original.passes,
                "sessions": self.current.sessions + self.original.sessions,
                "frontier_peak_bytes": self.store.peak_in_memory, "spilled_bytes": self.store.spilled}

    def close(self) -> None:
        self.store.close()


def _run_before_refit(run, stages) -> list[Layer]:
    """Layers whose residual input would make their stage run a layer that is refit at that stage or later."""
    late = []
    refit_at = {l.node.name: k for k, stage in enumerate(stages) for l in stage}
    for k, stage in enumerate(stages):
        ran = {n.name for n in run.stage_nodes(k)}
        if any(refit_at[name] >= k for name in ran if name in refit_at):
            late.extend(l for l in stage if l.residual)
    return late


class _RerunSource:
    """X of every stage from a run of the recovered model up to it; Y from one pass of the original."""

    def __init__(self, prep, params, layers, feeds, budget):
        self.prep, self.params, self.feeds = prep, params, feeds
        self.stages = _stages(layers)
        self.cached = _original_targets(prep, layers, feeds)
        self.node_runs = {"pruned": 0, "original": 0 if self.cached is None else len(prep.model.graph.node)}

    def batches(self, stage):
        current = Probe(self.params.model, _current_names(stage), only=True)
        original = None if self.cached is not None else Probe(self.prep.model, [_target(l) for l in stage],
                                                             only=True)
        for i, feed in enumerate(self.feeds):
            targets = self.cached[i] if self.cached is not None else original.run(feed)
            yield feed, current.run(feed), targets

    def passes(self) -> dict:
        return {}

    def close(self) -> None:
        """Nothing to release: each stage's probes go with the stage."""


TARGET_CACHE_BYTES = 1 << 30


def _original_targets(prep, layers, feeds) -> list[dict[str, np.ndarray]] | None:
    """Every layer's target on every feed from one pass of the original model, or None when the first batch
    says they would take more than TARGET_CACHE_BYTES."""
    probe = Probe(prep.model, [_target(l) for l in layers], only=True)
    out = []
    for feed in feeds:
        values = probe.run(feed)
        if not out and sum(v.nbytes for v in values.values()) * len(feeds) > TARGET_CACHE_BYTES:
            return None
        out.append(values)
    return out


def _target(layer: Layer) -> str:
    """The original tensor a layer is fit to: the residual sum it joins, else its own output."""
    return layer.residual[0].output[0] if layer.residual else layer.node.output[0]


def _solve_and_write(layer, params, intercept, theta0, fit, held, result) -> None:
    name = layer.node.name
    dtype = params.get(name, 1).dtype
    if held.rows == 0:
        alpha, errors = float("inf"), []
    else:
        alpha, errors = select_alpha(fit, held, theta0, intercept)
    total = Gram(fit.a + held.a, fit.b + held.b, fit.yy + held.yy, fit.rows + held.rows)
    theta = solve(total.a, total.b, theta0, alpha, intercept)
    if intercept:
        _write(layer, params, theta[:-1], theta[-1], dtype)
    else:
        _write(layer, params, theta, None, dtype)
    before = held.error(theta0) if held.rows else total.error(theta0)
    after = min(errors) if errors else total.error(theta)
    scale = max(held.yy if held.rows else total.yy, 1e-30)
    result.layers.append({"node": name, "method": "lstsq", "alpha": alpha, "rows": total.rows,
                          "rel_err_before": before / scale, "rel_err_after": after / scale})
