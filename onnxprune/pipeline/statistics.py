"""Stage 2a, statistics: activation statistics of the calibration data, in one pass over the model.

Per channel position |x|, x² and zero counts of every tensor a prunable group's consumer reads, and the Gram
matrices of the inputs of fully connected layers (what `hybrid` scores refits by). The data-aware criteria
(pipeline/score.py) read them.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from onnxprune.errors import InputError
from onnxprune.graph.ir import ancestor_nodes
from onnxprune.io.weights import is_lazy
from onnxprune.pipeline.activations import (
    GRAM_ROWS,
    MAX_GRAM,
    ActivationStats,
    Probe,
    TensorStats,
    consumer_inputs,
    gram_bytes,
    gram_inputs,
    token_rows,
)
from onnxprune.pipeline.score import STATISTICS, reduce_grams
from onnxprune.runtime.stages import (
    FrontierStore,
    StagedRun,
    default_memory_budget,
    format_bytes,
)
from onnxprune.report import progress


def channel_stats(prep, feeds: Iterable[dict[str, np.ndarray]], tensors: Sequence[str] | None = None,
                  source: str = "", memory_budget: int | None = None, seed: int = 0,
                  staged: bool | None = None) -> ActivationStats:
    """Per-position |x|, x² and zero counts of `tensors` (default: every consumer input) over `feeds`, and
    the Gram matrix of those read by fully connected layers (see gram_inputs).

    Gram matrices up to MAX_GRAM positions are float64 sums over every row; wider ones are float32 sums over
    at most GRAM_ROWS rows drawn at random (the scores rank channels; a few thousand tokens per feature
    dimension settle that ranking). When all Gram matrices together would take more than half the memory
    budget, or when the model's weights are in external files (a large model), the model runs stage by stage
    (runtime/stages.py): each Gram matrix is complete once its stage has seen every batch, and is then reduced
    to the refit scores it serves and dropped, so only one stage's matrices (and weights) are ever held. Either
    way the model runs once over the data, and nodes no statistic needs (a language model's head, whose logits
    are tokens x vocabulary) not at all: only a small model whose every node feeds a statistic runs whole, in
    one session. `staged` forces one way or the other (None: as just said).
    """
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
    if staged is None:
        staged = total_gram > budget // 2 or is_lazy(prep.model) or not _needs_every_node(prep.model, names)
    if not staged:
        probe = Probe(prep.model, names)
        with progress("statistics: calibration batches", len(feeds)) as advance:
            for feed in feeds:
                _accumulate(stats, feed, probe.run(feed), axes, grams, rng, len(feeds))
                advance()
        stats.passes = probe.node_runs / max(len(prep.model.graph.node) * len(feeds), 1)
    else:
        requests = _stat_requests(prep.model, names, grams)
        store = FrontierStore(budget - max(gram_bytes(axes[n].length) for n in grams),
                              prep.workspace.path if getattr(prep, "workspace", None) is not None else None)
        run = StagedRun(prep.model, feeds, requests, store, "model (statistics)")
        try:
            with progress("statistics, stage by stage", len(requests)) as advance:
                for request in requests:
                    advance(0, step=request[-1])
                    for values, feed in zip(run.step(), feeds):  # the step first: it ends, and drops its frontier
                        _accumulate(stats, feed, values, axes, grams, rng, len(feeds))
                    reduce_grams(prep, stats, [n for n in request if n in grams])
                    advance()
            stats.frontier_peak_bytes = store.peak_in_memory
        finally:
            store.close()
        stats.passes = run.passes
    if stats.samples == 0:
        raise InputError("the calibration data has no samples")
    return stats


def _needs_every_node(model, names: list[str]) -> bool:
    """Whether every node of the model computes (an ancestor of) one of `names` or is needed for nothing
    but Constant values: only then does one whole-model session compute nothing in vain."""
    needed = ancestor_nodes(model.graph.node, names)
    return all(i in needed or n.op_type == "Constant" for i, n in enumerate(model.graph.node))


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
        entry = stats.tensors.get(name)
        if entry is None:
            entry = stats.tensors[name] = TensorStats(np.zeros(axis.length), np.zeros(axis.length),
                                                      np.zeros(axis.length), value_sum=np.zeros(axis.length))
        raw = np.asarray(raw)
        keep = token_rows(feed, raw.shape) if axis.axis == raw.ndim - 1 else None
        if keep is None and name not in grams and raw.dtype.kind == "f" and raw.ndim:
            if raw.dtype == np.float32 and raw.flags.c_contiguous and 0 < axis.axis < raw.ndim - 1:
                _add_spatial_sums(entry, raw, axis.axis)
            else:
                # a convolution's activations: summed in place over every axis but the channels' (float64
                # accumulators), without a float64 copy moved to channels-last
                others = tuple(i for i in range(raw.ndim) if i != axis.axis)
                step = max(1, (1 << 22) // max(raw[:1].size, 1)) if axis.axis != 0 else len(raw)
                for start in range(0, len(raw), step):  # float64 a few million values at a time
                    _add_sums(entry, raw[start:start + step].astype(np.float64), others)
            entry.count += raw.size // max(raw.shape[axis.axis], 1)
            continue
        value = raw.astype(np.float64, copy=False)
        x = np.moveaxis(value, axis.axis, -1).reshape(-1, axis.length)
        if keep is not None:  # padded tokens would otherwise set the statistics of short sentences
            x = x[keep]
        _add_sums(entry, x, 0)
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


def _add_spatial_sums(entry: TensorStats, raw: np.ndarray, axis: int) -> None:
    """`_add_sums` of a float32 activation whose channel axis has positions after it (NCHW and the like),
    without a float64 copy: each (leading index, channel)'s positions are summed in float32 along the
    contiguous last axis (numpy sums a contiguous axis pairwise: a relative error of about log2(H*W) float32
    roundings), and those partial sums are added up in float64: no float64 copy is ever made, so several
    times fewer bytes move than in `_add_sums` on float64 chunks."""
    c = raw.shape[axis]
    x = raw.reshape(int(np.prod(raw.shape[:axis])), c, -1)
    rows = max(1, (1 << 22) // max(x[:1].size, 1))
    for start in range(0, len(x), rows):  # a few million values at a time: the float32 temporaries stay small
        chunk = x[start:start + rows]
        entry.abs_sum += np.abs(chunk).sum(axis=-1).sum(axis=0, dtype=np.float64)
        entry.value_sum += chunk.sum(axis=-1).sum(axis=0, dtype=np.float64)
        entry.sq_sum += np.square(chunk).sum(axis=-1).sum(axis=0, dtype=np.float64)
        entry.zeros += (chunk == 0).sum(axis=(0, 2))


def _add_sums(entry: TensorStats, x: np.ndarray, axes) -> None:
    """Add |x|, x, x² and zero counts of float64 values `x`, summed over `axes`, to the entry's sums."""
    entry.abs_sum += np.abs(x).sum(axis=axes)
    entry.value_sum += x.sum(axis=axes)
    entry.sq_sum += np.square(x).sum(axis=axes)
    entry.zeros += (x == 0).sum(axis=axes)


def criterion_stats(name: str, prep, feeds, labels=None, **options):
    """The statistics data criterion `name` scores from: activation statistics (channel_stats), or
    what the criterion's own collector gathers; `options` go to it (memory_budget, seed, source)."""
    collect = STATISTICS.get(name)
    if collect is not None:
        return collect(prep, feeds, labels=labels, **options)
    return channel_stats(prep, feeds, **options)
