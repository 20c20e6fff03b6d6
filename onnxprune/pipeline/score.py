"""Channel importance: one score per channel of each group, from the group's members.

Each member (a weight sliced with the group) gives per-channel norms, normalised by their mean so that a
wide layer does not outvote a narrow one; a group's score is the mean over its members. Criteria are
registered by name; the CLI's `--criterion` choices come from this registry.

Data-aware criteria (`DATA_CRITERIA`) read activation statistics of calibration data instead (see
onnxprune/activations.py), taken at the inputs of the layers that read the group's channels:
  activation  mean |x| per channel (channels that are small on real data matter little);
  apoz        1 - average percentage of zeros after a ReLU (Hu et al., 2016);
  hybrid      sum over the weights that read a channel of |W| * ||X|| (Wanda's per-weight score, summed per
              channel), so a channel counts when both its activations and the weights reading it are large.
  taylor      first-order Taylor (Molchanov et al., 2019): |g·w| summed over every weight the channel's group
              removes, g the gradient of a loss on calibration data (onnxprune/train/taylor.py; needs torch).
  fluctuation FLAP's (An et al., AAAI'24) score: the variance of a channel's input to its reader over the
              calibration tokens times the squared norm of the weights reading it, the part of the reader's
              output that a constant (its mean, folded into the bias by --recover bias) cannot stand in for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from onnxprune.errors import InputError
from onnxprune.graph.analysis import Analysis
from onnxprune.graph.groups import ChannelGroup, Member
from onnxprune.graph.ir import GraphView
from onnxprune.pipeline.activations import ActivationStats, per_channel
from onnxprune.train.taylor import gradient_stats
from onnxprune.runtime import linalg

Criterion = Callable[[ChannelGroup, GraphView, Callable[[int], int], np.random.Generator], np.ndarray]
CRITERIA: dict[str, Criterion] = {}


def criterion(name: str):
    def deco(fn: Criterion) -> Criterion:
        if name in CRITERIA:
            raise RuntimeError(f"criterion {name!r} is already registered")
        CRITERIA[name] = fn
        return fn
    return deco


def _axis_magnitudes(view: GraphView, name: str, p: float, axis: int) -> np.ndarray:
    """Σ|W|^p over every axis of a constant but `axis`, one value per position along it; cached on the view, so
    a weight read by two groups (as output and input channels) is reduced once per axis, and only these sums
    (never a copy of the weight) stay in memory."""
    cache = view.__dict__.setdefault("_magnitude_cache", {})
    key = (name, p, axis)
    if key not in cache:
        arr = view.array(name)
        if not np.issubdtype(arr.dtype, np.floating) or arr.dtype.itemsize < 4:
            arr = arr.astype(np.float32)
        magnitude = np.abs(arr) if p == 1 else np.abs(arr) ** p
        other = tuple(i for i in range(magnitude.ndim) if i != axis)
        # float32 sums are pairwise in numpy: accurate enough for ranking, and twice as float64
        cache[key] = (magnitude.sum(axis=other) if other else magnitude).astype(np.float64)
    return cache[key]


def member_channel_norms(member: Member, view: GraphView, root: int, find, size: int, p: float = 1) -> np.ndarray:
    """Per-channel p-norm (to the p-th power summed) of the member's slices that belong to space `root`."""
    per_position = _axis_magnitudes(view, member.tensor, p, member.axis)
    total = np.zeros(size)
    for seg in member.layout.segments:
        if find(seg.space) == root:
            total += per_position[seg.positions()].sum(axis=1)
    return total


def _magnitude(group: ChannelGroup, view: GraphView, find, p: float, members=None) -> np.ndarray:
    root = find(group.spaces[0])
    members = [m for m in group.members if m.scored and m.role in ("in", "out")] if members is None else members
    if not members:
        members = [m for m in group.members if m.scored]
    if not members:
        return np.ones(group.size)
    scores = np.zeros(group.size)
    for m in members:
        norms = member_channel_norms(m, view, root, find, group.size, p) ** (1.0 / p)
        mean = norms.mean()
        scores += norms / mean if mean > 0 else norms
    return scores / len(members)


@criterion("l1")
def l1(group, view, find, rng):
    return _magnitude(group, view, find, 1)


@criterion("l2")
def l2(group, view, find, rng):
    return _magnitude(group, view, find, 2)


@criterion("bn-scale")
def bn_scale(group, view, find, rng):
    """|gamma| of the BatchNormalization layers in the group (Network Slimming); l1 where there are none."""
    bns = [m for m in group.members if m.op_type == "BatchNormalization" and m.input_index == 1]
    if not bns:
        return l1(group, view, find, rng)
    return _magnitude(group, view, find, 1, members=bns)


@criterion("random")
def random_scores(group, view, find, rng):
    return rng.random(group.size)


DataCriterion = Callable[[ChannelGroup, "DataInputs"], np.ndarray]
DATA_CRITERIA: dict[str, DataCriterion] = {}


def data_criterion(name: str):
    def deco(fn: DataCriterion) -> DataCriterion:
        if name in CRITERIA or name in DATA_CRITERIA:
            raise RuntimeError(f"criterion {name!r} is already registered")
        DATA_CRITERIA[name] = fn
        return fn
    return deco


@dataclass
class DataInputs:
    view: GraphView
    find: Callable[[int], int]
    axes: dict
    nodes: dict
    stats: ActivationStats


# data criteria whose statistics are not activation statistics: name -> collector(prep, feeds, **options)
STATISTICS: dict[str, Callable] = {}


def all_criteria() -> list[str]:
    return sorted(CRITERIA) + sorted(DATA_CRITERIA)


def _readers(group: ChannelGroup, data: DataInputs):
    """(member, activation tensor name) for each consumer of the group whose input was measured."""
    for m in group.members:
        if m.role != "in" or not m.scored:
            continue
        name = data.nodes[m.node].input[0]
        if name in data.stats.tensors and name in data.axes:
            yield m, name


def _combine(per_member: list[np.ndarray], size: int) -> np.ndarray:
    if not per_member:
        return np.ones(size)
    scores = np.zeros(size)
    for v in per_member:
        mean = v.mean()
        scores += v / mean if mean > 0 else v
    return scores / len(per_member)


@data_criterion("activation")
def activation_score(group, data):
    root = data.find(group.spaces[0])
    return _combine([per_channel(data.axes[t], data.stats.tensors[t].abs_mean, root, data.find, group.size)
                     for _, t in _readers(group, data)], group.size)


@data_criterion("apoz")
def apoz_score(group, data):
    root = data.find(group.spaces[0])
    parts = []
    for _, t in _readers(group, data):
        st = data.stats.tensors[t]
        nonzero = per_channel(data.axes[t], 1.0 - st.zero_fraction, root, data.find, group.size)
        # without a ReLU nothing is exactly zero; mean |x| breaks the ties
        mag = per_channel(data.axes[t], st.abs_mean, root, data.find, group.size)
        parts.append(nonzero + 1e-3 * mag / max(mag.max(), 1e-12))
    return _combine(parts, group.size)


def _refit_losses(group, m, axis, cov: np.ndarray, data, root: int, ridge: float = 1e-3,
                  steps: int = 64) -> np.ndarray:
    """Channels (or whole heads) scored by what is lost when they go and their reader is refit on the rest,
    as `--recover lstsq` does.

    Removing the inputs at positions R of a linear layer W and refitting the kept ones by least squares (the
    bias absorbing means) leaves the error tr(W_Rᵀ (Q_RR)⁻¹ W_R), Q the inverse of the inputs' covariance over
    the calibration tokens (Optimal Brain Surgeon, per input row). Units (heads, or channels) are removed
    greedily, the cheapest first, about 1/`steps` of them at a time, each time compensating the kept rows and
    updating Q as if refit; a unit's score is the total error once it is gone (the last: the error of removing
    all), so keeping fewer always means keeping the ones scored highest. A head's score is spread evenly over
    its channels."""
    w = np.moveaxis(data.view.array(m.tensor).astype(np.float64), m.axis, 0)
    w = w.reshape(w.shape[0], -1)
    n_units = group.size // group.unit
    units = [np.concatenate([s.positions(np.arange(u * group.unit, (u + 1) * group.unit)).ravel()
                             for s in axis.segments if data.find(s.space) == root]) for u in range(n_units)]
    damped = cov.copy()  # the ridge added in place: no identity matrix beside it (5,504 wide: 242 MB each)
    damped[np.diag_indices_from(damped)] += ridge * max(np.trace(cov) / len(cov), 1e-12)
    q = linalg.inv(damped)
    del damped
    # q and w shrink to the inputs still in: `local` maps an axis position to its row in them
    local = np.arange(len(cov))
    single = all(len(p) == 1 for p in units)
    chunk = 1 if group.unit > 1 else max(1, n_units // steps)
    scores = np.zeros(group.size)
    alive = list(range(n_units))
    total = 0.0
    while alive:
        if single:
            rows = local[np.array([units[u][0] for u in alive])]
            costs = (w[rows] ** 2).sum(axis=1) / np.maximum(np.diag(q)[rows], 1e-300)
        else:
            costs = []
            for u in alive:
                r = local[units[u]]
                costs.append(np.sum(np.linalg.inv(q[np.ix_(r, r)]) * (w[r] @ w[r].T)))
        gone = [alive[i] for i in np.argsort(costs, kind="stable")[:chunk]]
        r = local[np.concatenate([units[u] for u in gone])]
        q_rr_inv = np.linalg.inv(q[np.ix_(r, r)])
        total += max(float(np.sum(q_rr_inv * (w[r] @ w[r].T))), 0.0)
        # the kept inputs absorb what the removed ones did (their rows of w change), and the precision of the
        # kept inputs is the inverse of their own covariance: a Schur complement of q
        kept = np.ones(len(q), dtype=bool)
        kept[r] = False
        q_kr = q[np.ix_(kept, r)]
        w = w[kept] - q_kr @ (q_rr_inv @ w[r])
        q = q[np.ix_(kept, kept)] - q_kr @ q_rr_inv @ q_kr.T
        local = np.where(local >= 0, np.cumsum(np.concatenate([[0], kept[:-1]]))[np.maximum(local, 0)], -1)
        local[np.concatenate([units[u] for u in gone])] = -1
        for u in gone:
            scores[u * group.unit:(u + 1) * group.unit] = total / group.unit
        gone_set = set(gone)
        alive = [u for u in alive if u not in gone_set]
    return scores


@data_criterion("hybrid")
def hybrid_score(group, data):
    """|W|·‖X‖ per channel; where a fully connected reader's input covariance was recorded, the error a
    channel's (or head's) removal leaves after a least-squares refit of that reader (see _refit_losses)."""
    root = data.find(group.spaces[0])
    parts = []
    for m, t in _readers(group, data):
        axis = data.axes[t]
        entry = data.stats.tensors[t]
        norm = entry.norm
        if (m.node, m.input_index) in entry.refit:  # reduced while the statistics were gathered
            parts.append(entry.refit[(m.node, m.input_index)])
            continue
        cov = entry.covariance() if _refits(m, axis) else None
        if cov is not None:
            parts.append(_refit_losses(group, m, axis, cov, data, root))
            continue
        w = np.abs(data.view.array(m.tensor).astype(np.float64))
        w_pos = np.moveaxis(w, m.axis, 0).reshape(w.shape[m.axis], -1).sum(axis=1)
        aligned = m.layout.length == axis.length and all(
            a.same_structure(b) for a, b in zip(m.layout.segments, axis.segments)) and len(
            m.layout.segments) == len(axis.segments)
        if aligned:  # weight positions and activation positions coincide (also through a Flatten)
            parts.append(per_channel(axis, w_pos * norm, root, data.find, group.size, "sum"))
        else:  # grouped conv weights index channels modulo the group width: combine per channel
            w_c = per_channel(m.layout, w_pos, root, data.find, group.size, "sum")
            x_c = np.sqrt(per_channel(axis, norm ** 2, root, data.find, group.size, "sum"))
            parts.append(w_c * x_c)
    return _combine(parts, group.size)


def _refits(m: Member, axis) -> bool:
    """Whether the reader's weight rows line up with the activation's positions (a refit score applies)."""
    return m.layout.length == axis.length and all(
        a.same_structure(b) for a, b in zip(m.layout.segments, axis.segments))


def reduce_grams(prep, stats: ActivationStats, names) -> None:
    """Replace the Gram matrices of `names` by the refit scores of every prunable group that reads them
    (what `hybrid` would compute from them later), so that they need not be kept."""
    names = set(names)
    if not names:
        return
    analysis = prep.analysis
    data = DataInputs(prep.view, analysis.find, analysis.context.axes, {n.name: n for n in prep.view.nodes}, stats)
    covariances = {}
    for group in analysis.prunable:
        root = analysis.find(group.spaces[0])
        for m, t in _readers(group, data):
            if t not in names or not _refits(m, data.axes[t]):
                continue
            if t not in covariances:
                covariances[t] = stats.tensors[t].covariance()
            if covariances[t] is not None:
                stats.tensors[t].refit[(m.node, m.input_index)] = _refit_losses(group, m, data.axes[t],
                                                                                covariances[t], data, root)
    for t in names:
        if t in stats.tensors:
            stats.tensors[t].gram = stats.tensors[t].total = None


@data_criterion("fluctuation")
def fluctuation_score(group, data):
    """Var(x_c) · ||W_c||² per channel, W_c the reader's weights on input c (the mean |x| where the reader's
    input variance was not recorded)."""
    root = data.find(group.spaces[0])
    parts = []
    for m, t in _readers(group, data):
        axis, stats = data.axes[t], data.stats.tensors[t]
        spread = stats.variance
        if spread is None:  # statistics gathered without value sums
            cov = stats.covariance()
            spread = np.diag(cov) / max(stats.count, 1) if cov is not None else stats.abs_mean ** 2
        w = data.view.array(m.tensor).astype(np.float64)
        w_sq = np.moveaxis(w * w, m.axis, 0).reshape(w.shape[m.axis], -1).sum(axis=1)
        if m.layout.length == axis.length and all(a.same_structure(b) for a, b in zip(m.layout.segments,
                                                                                   axis.segments)):
            parts.append(per_channel(axis, spread * w_sq, root, data.find, group.size, "sum"))
        else:
            parts.append(per_channel(m.layout, w_sq, root, data.find, group.size, "sum")
                         * per_channel(axis, spread, root, data.find, group.size, "sum"))
    return _combine(parts, group.size)


STATISTICS["taylor"] = gradient_stats  # torch, the optional train extra, is imported when it runs


@data_criterion("taylor")
def taylor_score(group, data):
    """Σ |g·w| over the group's weights of each channel (the gradients' products from train/taylor.py)."""
    root = data.find(group.spaces[0])
    total = np.zeros(group.size)
    for m in group.members:
        product = data.stats.products.get(m.tensor) if m.scored else None
        if product is None:
            continue
        other = tuple(i for i in range(product.ndim) if i != m.axis)
        per_position = product.sum(axis=other) if other else product
        for seg in m.layout.segments:
            if data.find(seg.space) == root:
                total += per_position[seg.positions()].sum(axis=1)
    return total


def score_groups(analysis: Analysis, view: GraphView, name: str = "l1", seed: int = 0,
                 stats: ActivationStats | None = None) -> dict[int, np.ndarray]:
    """Scores of every prunable group; data criteria need `stats` from `activations.channel_stats`."""
    if name in DATA_CRITERIA:
        if stats is None:
            raise InputError(f"criterion {name!r} scores channels from activations: pass calibration data (--data)")
        data = DataInputs(view, analysis.find, analysis.context.axes, {n.name: n for n in view.nodes}, stats)
        fn = DATA_CRITERIA[name]
        try:
            return {g.spaces[0]: fn(g, data) for g in analysis.groups if g.prunable}
        finally:
            view.__dict__.pop("_magnitude_cache", None)
    if name not in CRITERIA:
        raise InputError(f"unknown criterion {name!r} (choose from {', '.join(all_criteria())})")
    rng = np.random.default_rng(seed)
    fn = CRITERIA[name]
    try:
        return {g.spaces[0]: fn(g, view, analysis.find, rng) for g in analysis.groups if g.prunable}
    finally:
        view.__dict__.pop("_magnitude_cache", None)  # |W| copies live only while scoring
