"""`lstsq` recovery: every affected layer refit, stage by stage in graph order, on the pruned model's own
activations against the original's outputs (one staged pass of each model, runtime/stages.py)."""

from __future__ import annotations

import collections

import numpy as np

from onnxprune.pipeline.activations import Probe, token_rows
from onnxprune.pipeline.recover.im2col import layer_rows, token_pick
from onnxprune.pipeline.recover.layers import Layer, current_params, write_layer
from onnxprune.pipeline.recover.ridge import Gram, RidgePath, select_alpha, solve
from onnxprune.runtime.stages import FrontierStore, StagedRun
from onnxprune.report import progress


def _stages(layers: list[Layer]) -> list[list[Layer]]:
    """Layers grouped by the tensor they read, in graph order: one capture of that tensor serves them all."""
    stages: dict[str, list[Layer]] = {}
    for layer in layers:
        stages.setdefault(layer.node.input[0], []).append(layer)
    return list(stages.values())


def fit_lstsq(prep, layers, params, feeds, seed, holdout, max_rows, result, staged=True, budget=None) -> None:
    """Refit `layers` in graph order, one stage (the layers reading one tensor) at a time.

    Each stage's input X comes from the model as recovered so far (so earlier refits are seen) and its
    targets Y from the original. With `staged` both models run stage by stage (runtime/stages.py): every
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
    """Accumulate the Gram matrices of one stage's layers over every batch, then solve and write them.

    Linear layers of the stage read the same token rows (one random pick per batch), so those with the same
    bias setting share one Gram matrix A of their input and its eigendecompositions (ridge.RidgePath): q, k
    and v of an attention block cost one A and one eigendecomposition, not three of each."""
    fits, shared = [], {}
    for layer in stage:
        intercept = not (layer.kind == "matmul" and layer.bias_add is None)
        wt, bias = current_params(layer, params)
        theta0 = np.vstack([wt, (np.zeros((1, wt.shape[1])) if bias is None else bias[None, :])]) \
            if intercept else wt
        d, o = theta0.shape
        key = ("rows", intercept) if layer.kind != "conv" else ("conv", len(fits))
        a_fit, a_held = shared.setdefault(key, (np.zeros((d, d)), np.zeros((d, d))))
        fits.append((layer, intercept, theta0, Gram(a_fit, np.zeros((d, o))), Gram(a_held, np.zeros((d, o))), key))
    rng = np.random.default_rng(seed)
    split = np.random.default_rng(seed + 1)
    for feed, now, targets in source.batches(stage):
        x_now = now[stage[0].node.input[0]]
        n = x_now.shape[0] if x_now.ndim else 1
        is_held = split.random(n) < holdout
        keep = token_rows(feed, x_now.shape)
        rows = {}  # key -> (design rows, sample of each row, token pick), shared by the linear layers of a key
        for layer, intercept, _, fit, held, key in fits:
            y_full = targets[_target(layer)]
            if layer.residual:  # the sum the original model fed its LayerNorm, less the current residual
                add, other = layer.residual
                y_full = y_full.astype(np.float64) - now[add.input[other]]
            y_kept = np.take(y_full, layer.out_kept, axis=1 if layer.kind != "matmul" else -1)
            first = key not in rows  # a convolution's key is its own: always first
            if key[0] == "rows":
                if first:
                    picked, sample = token_pick(x_now.shape, rng, max_rows, keep)
                    x = np.asarray(x_now, dtype=np.float64).reshape(-1, x_now.shape[-1])[picked]
                    rows[key] = (np.hstack([x, np.ones((len(x), 1))]) if intercept else x, sample, picked)
                x, sample, picked = rows[key]
                y = np.asarray(y_kept, dtype=np.float64).reshape(-1, y_kept.shape[-1])[picked]
            else:
                x, y, sample = layer_rows(layer, x_now, y_kept, rng, max_rows, keep)
                if intercept:
                    x = np.hstack([x, np.ones((len(x), 1))])
            mask = is_held[sample] if n_samples >= 4 else np.zeros(len(x), bool)
            fit.add(x[~mask], y[~mask], with_a=first)
            if mask.any():
                held.add(x[mask], y[mask], with_a=first)
    paths: dict = {}
    for layer, intercept, theta0, fit, held, key in fits:
        _solve_and_write(layer, params, intercept, theta0, fit, held, result, paths.setdefault(key, {}))


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


def _solve_and_write(layer, params, intercept, theta0, fit, held, result, paths: dict) -> None:
    """Choose the strength on the held-out rows, refit on all rows, write the layer. `paths` caches the
    RidgePath (eigendecomposition) of the fit Gram matrix this layer shares with others of its stage."""
    name = layer.node.name
    dtype = params.get(name, 1).dtype
    if held.rows == 0:
        alpha, errors = float("inf"), []
    else:
        if "fit" not in paths:
            paths["fit"] = RidgePath(fit.a, intercept)
        alpha, errors = select_alpha(fit, held, theta0, intercept, path=paths["fit"])
    total = Gram(fit.a + held.a, fit.b + held.b, fit.yy + held.yy, fit.rows + held.rows)
    theta = solve(total.a, total.b, theta0, alpha, intercept)  # one LU: a fraction of an eigendecomposition
    if intercept:
        write_layer(layer, params, theta[:-1], theta[-1], dtype)
    else:
        write_layer(layer, params, theta, None, dtype)
    before = held.error(theta0) if held.rows else total.error(theta0)
    after = min(errors) if errors else total.error(theta)
    scale = max(held.yy if held.rows else total.yy, 1e-30)
    result.layers.append({"node": name, "method": "lstsq", "alpha": alpha, "rows": total.rows,
                          "rel_err_before": before / scale, "rel_err_after": after / scale})
