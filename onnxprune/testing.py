"""The zero-channel oracle: the correctness check every handler and zoo model is held to.

Pick channels in every prunable group and zero the weights that *read* them (each consumer's input-channel
slices). Those channels then contribute nothing, so removing exactly them must leave every output unchanged
up to float rounding. A wrong index map, a missed consumer or a bad shape fix shows up as a mismatch.

The check is only as the zeroing is visible: a randomly initialised detector head can hardly depend on
its weights, and then any rewrite passes. `moved` (how far zeroing moved the outputs of the unzeroed model,
relative to their scale) says so; `informative(tol)` asks that it be far above the tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from onnxprune.graph.kvcache import cache_inputs, follow, sample_cache
from onnxprune.io.weights import tensor_array
from onnxprune.pipeline.plan import plan_uniform
from onnxprune.pipeline.prepare import prepare
from onnxprune.pipeline.prune import RunSettings, prune_model
from onnxprune.recipe import Recipe
from onnxprune.runtime.feeds import sample_feed
from onnxprune.runtime.session import run


@dataclass
class OracleResult:
    max_abs_err: float
    max_rel_err: float
    pruned_channels: int
    groups: int
    zeroed: onnx.ModelProto
    pruned: onnx.ModelProto
    moved: float = float("nan")  # max |original - zeroed| / max |original|: what the zeroing changed
    faults: list = field(default_factory=list)  # faults contained while pruning (onnxprune.pipeline.apply)

    def informative(self, tol: float, factor: float = 100.0) -> bool:
        """Whether zeroing moved the outputs `factor` times more than `tol` (else the oracle proves little)."""
        return self.moved > factor * tol


def zero_channels(prep, removed: dict[int, np.ndarray]) -> onnx.ModelProto:
    """A copy of the prepared model with the input-channel weights of `removed` channels set to zero."""
    model = onnx.ModelProto()
    model.CopyFrom(prep.model)
    inits = {t.name: t for t in model.graph.initializer}
    arrays: dict[str, np.ndarray] = {}
    find = prep.analysis.find
    for m in prep.analysis.context.members:
        if m.role != "in":
            continue
        for seg in m.layout.segments:
            chans = removed.get(find(seg.space))
            if chans is None or len(chans) == 0:
                continue
            arr = arrays.setdefault(m.tensor, np.array(tensor_array(inits[m.tensor])))
            index = [slice(None)] * arr.ndim
            index[m.axis] = seg.positions(np.asarray(chans)).ravel()
            arr[tuple(index)] = 0
    for name, arr in arrays.items():
        inits[name].CopyFrom(numpy_helper.from_array(arr, name))
    return model


def zero_channel_oracle(model: onnx.ModelProto, seed: int = 0, fraction: float = 0.3,
                        feed: dict[str, np.ndarray] | None = None, **options) -> OracleResult:
    """`options` go to `prepare` and `prune_model` (gqa_mode, keep_kv_cache, prune_hidden)."""
    prep = prepare(model, **options)
    rng = np.random.default_rng(seed)
    # random scores through the planner, so grouped-convolution constraints hold for the chosen channels
    scores = {g.spaces[0]: rng.random(g.size) for g in prep.analysis.prunable}
    plan = plan_uniform(prep.analysis, scores, fraction)
    removed = {root: np.setdiff1d(np.arange(plan.sizes[root]), kept) for root, kept in plan.kept.items()}
    zeroed = zero_channels(prep, removed)
    # validated on the shapes it is run on (a decoder's cache: validated as it starts, empty)
    shapes = {k: tuple(np.shape(v)) for k, v in feed.items()} if feed is not None and not cache_inputs(model) \
        else None
    result = prune_model(zeroed, Recipe(**options), RunSettings(removed=removed, input_shapes=shapes))
    feed = feed if feed is not None else sample_cache(model, sample_feed(model, seed))
    # a key/value cache follows its pruned heads: the pruned model reads and writes it without them
    names = [o.name for o in model.graph.output]
    want = list(follow(result, dict(zip(names, run(zeroed, feed)))).values())
    got = run(result.model, follow(result, feed))
    before = list(follow(result, dict(zip(names, run(prep.model, feed)))).values())
    max_abs, max_rel = _errors(want, got)
    moved = _errors(before, want)[1] if removed else 0.0
    return OracleResult(max_abs, max_rel, sum(len(v) for v in removed.values()), len(removed), zeroed, result.model,
                        moved, result.faults)


def _errors(reference: list, other: list) -> tuple[float, float]:
    """Largest absolute difference over all outputs, and the largest relative to each output's scale (so that
    outputs near zero do not inflate it). Integer outputs (labels, indices) count as floats."""
    max_abs = max_rel = 0.0
    for w, g in zip(reference, other):
        w = np.asarray(w, dtype=np.float64)
        g = np.asarray(g, dtype=np.float64)
        err = float(np.max(np.abs(w - g))) if w.size else 0.0
        scale = float(np.max(np.abs(w))) if w.size else 0.0
        max_abs = max(max_abs, err)
        max_rel = max(max_rel, err / scale if scale > 0 else err)
    return max_abs, max_rel
