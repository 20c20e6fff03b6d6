"""Intermediate activations on calibration data, and per-channel statistics of them.

A `Probe` is a copy of a model with chosen intermediate tensors added as graph outputs, run by onnxruntime;
nothing is stored beyond one batch at a time. `channel_stats` reduces each tensor that carries channels to
per-position sums along its channel axis (|x|, x², zero count), from which the data-aware scores are built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import onnx

from onnxprune.graph.ir import ancestor_nodes
from onnxprune.graph.layout import ChannelAxis
from onnxprune.runtime.session import Runner, internal_session


def with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of `model` whose graph also outputs `names` (onnxruntime infers their types)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    present = {o.name for o in out.graph.output}
    for name in dict.fromkeys(names):
        if name not in present:
            out.graph.output.append(onnx.ValueInfoProto(name=name))
    return out


def only_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of `model` that computes just `names`: their ancestor nodes, with `names` as the only outputs.

    onnxruntime runs every node of a session whatever is fetched, so a probe of an early layer would otherwise
    pay for the whole model. Graphs with subgraphs (If, Loop, Scan) are left whole.
    """
    names = list(dict.fromkeys(names))
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in model.graph.node
           for a in n.attribute):
        return with_outputs(model, names)
    needed = ancestor_nodes(model.graph.node, names)
    used = {x for i in needed for x in model.graph.node[i].input}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    kept = [n for i, n in enumerate(graph.node) if i in needed]
    del graph.node[:]
    graph.node.extend(kept)
    inits = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    declared = {o.name: o for o in graph.output}
    outputs = [declared.get(n) or onnx.ValueInfoProto(name=n) for n in names]
    del graph.output[:]
    graph.output.extend(outputs)
    return out


class Probe:
    """Runs a model and returns chosen intermediate tensors, one batch at a time.

    With `only`, the session holds just the nodes that compute `names` (see `only_outputs`).
    """

    def __init__(self, model: onnx.ModelProto, names: Sequence[str], only: bool = False):
        self.names = list(dict.fromkeys(names))
        probed = only_outputs(model, self.names) if only else with_outputs(model, self.names)
        self._nodes = len(probed.graph.node)
        self.node_runs = 0  # node evaluations, for pass counts
        self._runner = Runner(internal_session(probed), "a calibration batch")

    def run(self, feed: dict[str, np.ndarray], names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        self.node_runs += self._nodes
        return self._runner.run(feed, list(names) if names is not None else self.names)


@dataclass
class TensorStats:
    """Sums over every sample and every non-channel position, one entry per position of the channel axis."""

    abs_sum: np.ndarray
    sq_sum: np.ndarray
    zeros: np.ndarray
    count: int = 0  # values summed per position
    gram: np.ndarray | None = None  # Σ xᵀx over the channel axis, for inputs of fully connected readers
    total: np.ndarray | None = None  # Σ x over the same rows (to centre it)
    gram_rows: int = 0  # rows in the Gram matrix (all of them up to MAX_GRAM features, else a sample)
    # refit scores already computed from the Gram matrix (which is then dropped), by (reader node, input index)
    refit: dict = field(default_factory=dict)
    value_sum: np.ndarray | None = None  # Σ x per position (with sq_sum: the variance, Gram matrix or not)

    @property
    def variance(self) -> np.ndarray | None:
        """Per-position variance over every value summed (None when the sums were not recorded)."""
        if self.value_sum is None or not self.count:
            return None
        mean = self.value_sum / self.count
        return np.maximum(self.sq_sum / self.count - mean * mean, 0.0)

    def covariance(self) -> np.ndarray | None:
        """Σ (x - mean)ᵀ(x - mean): the Gram matrix of the centred values (None without a Gram matrix)."""
        if self.gram is None or not self.gram_rows:
            return None
        return self.gram.astype(np.float64) - np.outer(self.total, self.total) / self.gram_rows

    @property
    def abs_mean(self) -> np.ndarray:
        return self.abs_sum / max(self.count, 1)

    @property
    def zero_fraction(self) -> np.ndarray:
        return self.zeros / max(self.count, 1)

    @property
    def norm(self) -> np.ndarray:
        return np.sqrt(self.sq_sum)


@dataclass
class ActivationStats:
    tensors: dict[str, TensorStats] = field(default_factory=dict)
    samples: int = 0
    source: str = ""
    passes: float = 0.0  # model passes over the calibration data it took
    frontier_peak_bytes: int = 0  # the most activations a staged run held at once between its stages


def _readers(prep):
    """(member, activation tensor) for every consumer ("in" member) of a prunable group whose input carries
    channels."""
    nodes = {n.name: n for n in prep.view.nodes}
    prunable = {g.spaces[0] for g in prep.analysis.prunable}
    for m in prep.analysis.context.members:
        if m.role == "in" and any(prep.analysis.find(s.space) in prunable for s in m.layout.segments):
            name = nodes[m.node].input[0]
            if name in prep.analysis.context.axes:
                yield m, name


def consumer_inputs(prep) -> list[str]:
    """The activation tensors read by the consumers ("in" members) of every prunable group."""
    return list(dict.fromkeys(name for _, name in _readers(prep)))


def token_rows(feed: dict[str, np.ndarray], shape: tuple) -> np.ndarray | None:
    """Which rows of a [batch, seq, features] activation are real tokens, from the feed's attention mask.

    Padded positions carry no meaning (the model masks them out of attention and callers out of pooling); a
    short sentence in a batch padded to a long one would otherwise contribute mostly padding to the fit.
    Returns a boolean per row of the flattened [batch * seq] axis, or None when the feed has no such mask.
    """
    if len(shape) != 3:
        return None
    for name, value in feed.items():
        if "mask" in name.lower() and value.ndim == 2 and tuple(value.shape) == tuple(shape[:2]) and \
                value.dtype.kind in "iub":
            return value.reshape(-1) != 0
    return None


MAX_GRAM = 3072  # positions: up to here a float64 Gram matrix (72 MiB) over every calibration row
GRAM_ROWS = 16384  # wider inputs (LLM MLPs: 5,504 to 14,336 features): float32, at most this many random rows


def gram_inputs(prep) -> set[str]:
    """Inputs of the fully connected layers (MatMul, Gemm) that read prunable channels: their Gram matrices
    let `hybrid` score channels by what a least-squares refit of the layer cannot bring back
    (scoring._refit_losses)."""
    return {name for m, name in _readers(prep) if m.op_type in ("MatMul", "Gemm")}


def gram_bytes(length: int) -> int:
    return length * length * (8 if length <= MAX_GRAM else 4)


def per_channel(axis: ChannelAxis, values: np.ndarray, root: int, find, size: int, how: str = "mean") -> np.ndarray:
    """Reduce per-position `values` of a tensor to one value per channel of space `root` (mean or sum)."""
    total = np.zeros(size)
    count = np.zeros(size)
    for seg in axis.segments:
        if find(seg.space) != root:
            continue
        pos = seg.positions()
        total += values[pos].sum(axis=1)
        count += pos.shape[1]
    if how == "sum":
        return total
    return total / np.maximum(count, 1)
