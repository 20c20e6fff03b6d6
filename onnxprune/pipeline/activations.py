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
from onnxprune.report import progress
from onnxprune.io.weights import is_lazy
from onnxprune.pipeline.validate import session


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
        from onnxprune.graph.kvcache import feed_adapter

        self.names = list(dict.fromkeys(names))
        probed = only_outputs(model, self.names) if only else with_outputs(model, self.names)
        self._nodes = len(probed.graph.node)
        self.node_runs = 0  # node evaluations, for pass counts
        self._session = session(probed)
        self._adapt = feed_adapter(self._session)  # an empty key/value cache in this model's shape

    def run(self, feed: dict[str, np.ndarray], names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        wanted = list(names) if names is not None else self.names
        self.node_runs += self._nodes
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
    total: np.ndarray | None = None  # Σ x over the same rows (to centre it)
    gram_rows: int = 0  # rows in the Gram matrix (all of them up to MAX_GRAM features, else a sample)
    # refit scores already computed from the Gram matrix (which is then dropped), by (reader node, input index)
    refit: dict = field(default_factory=dict)

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


def channel_stats(prep, feeds: Iterable[dict[str, np.ndarray]], tensors: Sequence[str] | None = None,
                  source: str = "", memory_budget: int | None = None, seed: int = 0) -> ActivationStats:
    """Per-position |x|, x² and zero counts of `tensors` (default: every consumer input) over `feeds`, and
    the Gram matrix of those read by fully connected layers (see gram_inputs).

    Gram matrices up to MAX_GRAM positions are float64 sums over every row; wider ones are float32 sums over
    at most GRAM_ROWS rows drawn at random (the scores rank channels; a few thousand tokens per feature
    dimension settle that ranking). When all Gram matrices together would take more than half the memory
    budget, or when the model's weights are in external files (a large model), the model runs stage by stage
    (pipeline/stages.py): each Gram matrix is complete once its stage has seen every batch, and is then reduced
    to the refit scores it serves and dropped, so only one stage's matrices (and weights) are ever held. Either
    way the model runs once over the data.
    """
    from onnxprune.pipeline.stages import default_memory_budget, format_bytes

    feeds = list(feeds)
    names = list(tensors) if tensors is not None else consumer_inputs(prep)
    grams = gram_inputs(prep) & set(names)
    stats = ActivationStats(source=source)
    if not names:
        return stats
    stats.samples = sum(next((v.shape[0] for v in feed.values() if v.ndim), 1) for feed in feeds)
    axes = prep.analysis.context.axes
    budget = default_memory_budget() if memory_budget is None else memory_budget
    rng = np.random.default_rng(seed)
    total_gram = sum(gram_bytes(axes[n].length) for n in grams)
    for name in grams:
        if gram_bytes(axes[name].length) > budget:
            raise InputError(f"--memory-budget {format_bytes(budget)} is too small: the Gram matrix of {name} "
                             f"({axes[name].length} features) needs {format_bytes(gram_bytes(axes[name].length))}")
    # a model whose weights live in external files is large: one session over all of it would keep every weight
    # mapped beside every Gram matrix, so it always runs stage by stage (each stage maps only its own weights)
    if total_gram <= budget // 2 and not is_lazy(prep.model):
        probe = Probe(prep.model, names)
        with progress("statistics: calibration batches", len(feeds)) as advance:
            for feed in feeds:
                _accumulate(stats, feed, probe.run(feed), axes, grams, rng, len(feeds))
                advance()
        stats.passes = probe.node_runs / max(len(prep.model.graph.node) * len(feeds), 1)
    else:
        from onnxprune.pipeline.stages import FrontierStore, StagedRun
        from onnxprune.pipeline.score import reduce_grams

        requests = _stat_requests(prep.model, names, grams)
        store = FrontierStore(budget - max(gram_bytes(axes[n].length) for n in grams),
                              prep.workspace.path if getattr(prep, "workspace", None) is not None else None)
        run = StagedRun(prep.model, feeds, requests, store, "model (statistics)")
        try:
            with progress("statistics, stage by stage", len(requests)) as advance:
                for request in requests:
                    advance(0, step=request[-1])
                    for feed, values in zip(feeds, run.step()):
                        _accumulate(stats, feed, values, axes, grams, rng, len(feeds))
                    reduce_grams(prep, stats, [n for n in request if n in grams])
                    advance()
        finally:
            store.close()
        stats.passes = run.passes
    if stats.samples == 0:
        raise InputError("the calibration data has no samples")
    return stats


def _stat_requests(model, names: list[str], grams: set[str]) -> list[list[str]]:
    """The tensors in graph order, cut after each one that has a Gram matrix (so it completes alone)."""
    order = {o: i for i, n in enumerate(model.graph.node) for o in n.output}
    requests, current = [], []
    for name in sorted(names, key=lambda n: order.get(n, -1)):
        current.append(name)
        if name in grams:
            requests.append(current)
            current = []
    if current:
        requests.append(current)
    return requests


def _accumulate(stats: ActivationStats, feed, values, axes, grams, rng, n_batches: int) -> None:
    for name, raw in values.items():
        axis = axes[name]
        value = np.asarray(raw, dtype=np.float64)
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
            if axis.length > MAX_GRAM:
                cap = -(-GRAM_ROWS // n_batches)
                rows = x if len(x) <= cap else x[np.sort(rng.choice(len(x), cap, replace=False))]
                rows = rows.astype(np.float32)
                entry.gram = (np.zeros((axis.length, axis.length), np.float32) if entry.gram is None
                              else entry.gram)
                for start in range(0, len(rows), 4096):
                    chunk = rows[start:start + 4096]
                    entry.gram += chunk.T @ chunk
                entry.total = (0.0 if entry.total is None else entry.total) + rows.sum(axis=0, dtype=np.float64)
                entry.gram_rows += len(rows)
            else:
                entry.gram = (0.0 if entry.gram is None else entry.gram) + x.T @ x
                entry.total = (0.0 if entry.total is None else entry.total) + x.sum(axis=0)
                entry.gram_rows += len(x)


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
