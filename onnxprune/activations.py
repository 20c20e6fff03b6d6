"""Intermediate activations on calibration data, and per-channel statistics of them.

A `Probe` is a copy of a model with chosen intermediate tensors added as graph outputs, run by onnxruntime;
nothing is stored beyond one batch at a time. `channel_stats` reduces each tensor that carries channels to
per-position sums along its channel axis (|x|, x², zero count), from which the data-aware scores are built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import onnx

from onnxprune.errors import InputError
from onnxprune.graph.layout import ChannelAxis
from onnxprune.validate import session


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
    producer = {o: i for i, n in enumerate(model.graph.node) for o in n.output if o}
    needed, stack = set(), [producer[n] for n in names if n in producer]
    while stack:
        i = stack.pop()
        if i in needed:
            continue
        needed.add(i)
        stack.extend(producer[x] for x in model.graph.node[i].input if x in producer)
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
        from onnxprune.kvcache import feed_adapter

        self.names = list(dict.fromkeys(names))
        self._session = session(only_outputs(model, self.names) if only else with_outputs(model, self.names))
        self._adapt = feed_adapter(self._session)  # an empty key/value cache in this model's shape

    def run(self, feed: dict[str, np.ndarray], names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        wanted = list(names) if names is not None else self.names
        try:
            values = self._session.run(wanted, self._adapt(feed))
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises several types for bad feeds
            raise InputError(f"onnxruntime failed on a calibration batch: {str(exc).strip().splitlines()[0]}") from None
        return dict(zip(wanted, values))


@dataclass
class TensorStats:
    """Sums over every sample and every non-channel position, one entry per position of the channel axis."""

    abs_sum: np.ndarray
    sq_sum: np.ndarray
    zeros: np.ndarray
    count: int = 0  # values summed per position
    gram: np.ndarray | None = None  # Σ xᵀx over the channel axis, for inputs of fully connected readers
    total: np.ndarray | None = None  # Σ x, with the Gram matrix (to centre it)

    def covariance(self) -> np.ndarray | None:
        """Σ (x - mean)ᵀ(x - mean): the Gram matrix of the centred values (None without a Gram matrix)."""
        if self.gram is None or not self.count:
            return None
        return self.gram - np.outer(self.total, self.total) / self.count

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


MAX_GRAM = 3072  # positions: a float64 Gram matrix of at most 72 MiB per tensor


def gram_inputs(prep) -> set[str]:
    """Inputs of the fully connected layers (MatMul, Gemm) that read prunable channels, on at most MAX_GRAM
    positions: their Gram matrices let `hybrid` score channels by what a least-squares refit of the layer
    cannot bring back (scoring._refit_losses)."""
    axes = prep.analysis.context.axes
    return {name for m, name in _readers(prep)
            if m.op_type in ("MatMul", "Gemm") and axes[name].length <= MAX_GRAM}


def channel_stats(prep, feeds: Iterable[dict[str, np.ndarray]], tensors: Sequence[str] | None = None,
                  source: str = "") -> ActivationStats:
    """Per-position |x|, x² and zero counts of `tensors` (default: every consumer input) over `feeds`, and
    the Gram matrix of those read by fully connected layers (see gram_inputs)."""
    names = list(tensors) if tensors is not None else consumer_inputs(prep)
    grams = gram_inputs(prep) & set(names)
    stats = ActivationStats(source=source)
    if not names:
        return stats
    axes = prep.analysis.context.axes
    probe = Probe(prep.model, names)
    for feed in feeds:
        values = probe.run(feed)
        stats.samples += next((v.shape[0] for v in feed.values() if v.ndim), 1)
        for name in names:
            axis = axes[name]
            value = np.asarray(values[name], dtype=np.float64)
            keep = token_rows(feed, value.shape) if axis.axis == value.ndim - 1 else None
            x = np.moveaxis(value, axis.axis, -1).reshape(-1, axis.length)
            if keep is not None:  # padded tokens would otherwise set the statistics of short sentences
                x = x[keep]
            entry = stats.tensors.get(name)
            if entry is None:
                entry = stats.tensors[name] = TensorStats(np.zeros(axis.length), np.zeros(axis.length),
                                                          np.zeros(axis.length))
            entry.abs_sum += np.abs(x).sum(axis=0)
            entry.sq_sum += (x * x).sum(axis=0)
            entry.zeros += (x == 0).sum(axis=0)
            entry.count += x.shape[0]
            if name in grams:
                entry.gram = (0.0 if entry.gram is None else entry.gram) + x.T @ x
                entry.total = (0.0 if entry.total is None else entry.total) + x.sum(axis=0)
    if stats.samples == 0:
        raise InputError("the calibration data has no samples")
    return stats


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
