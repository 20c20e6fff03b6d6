"""The pruning pipeline: normalize → analyze → score → plan → rewrite → recover → validate.

With calibration data, scores can come from activations (`criterion="activation" | "apoz" | "hybrid"`), the
plan can meet a MAC or parameter budget (`target_macs`, `target_params`, per-group ratios from global scores
or sensitivity), and the pruned model can be recovered without retraining (`recover="bias" | "lstsq"`).
`prune_within_drop` searches the largest compression whose accuracy on held-out data stays within a budget.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxprune.graph.analysis import GQA_MODES, Analysis, analyze_graph
from onnxprune.graph.ir import GraphView
from onnxprune.graph.normalize import normalize
from onnxprune.kvcache import interface_changes
from onnxprune.model_io import check_supported
from onnxprune.planning import Plan, check_ratio, plan_global, plan_removal, plan_uniform
from onnxprune.rewrite import apply_plan
from onnxprune.errors import InputError
from onnxprune.scoring import DATA_CRITERIA, score_groups
from onnxprune.model_io import model_bytes
from onnxprune.stats import count_macs, count_params
from onnxprune.validate import validate


@dataclass
class Prepared:
    """A normalised model with its graph view and channel groups."""

    model: onnx.ModelProto
    view: GraphView
    analysis: Analysis


@dataclass
class PruneResult:
    model: onnx.ModelProto
    analysis: Analysis
    plan: Plan
    stats: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    recovery: list[dict] = field(default_factory=list)  # per refit layer (see onnxprune.recovery)
    search: list[dict] = field(default_factory=list)    # prune_within_drop: every candidate tried
    interface: list[dict] = field(default_factory=list)  # inputs/outputs whose shape changed (key/value cache)

    def group_rows(self) -> list[dict]:
        rows = []
        for g in self.analysis.groups:
            root = g.spaces[0]
            kept = len(self.plan.kept[root]) if root in self.plan.kept else g.size
            rows.append({"group": g.id, "channels": g.size, "kept": kept, "prunable": g.prunable,
                         "reason": g.reason, "sources": g.sources, "members": len(g.members),
                         "unit": g.unit, "blocks": g.blocks, **gqa_fields(g)})
        return rows


def gqa_fields(group) -> dict:
    """Report fields of a grouped-query attention group: heads, head size, KV groups and the mode."""
    if not group.kv_groups:
        return {}
    return {"heads": group.size // group.head_dim, "head_dim": group.head_dim, "kv_groups": group.kv_groups,
            "gqa_mode": group.gqa_mode}


HIDDEN_WARNING = ("hidden features were removed: LayerNorm now normalises over fewer features, so outputs change "
                  "even where the removed features were zero; compare with `onnxprune eval --reference`")


def prepare(model: onnx.ModelProto, exclude: tuple[str, ...] = (), prune_hidden: bool = False,
            gqa_mode: str = "kv-groups", keep_kv_cache: bool = False) -> Prepared:
    """Normalise and analyse `model`; `prune_hidden` lets LayerNorm pass channels (the hidden size becomes
    prunable, approximately: normalisation statistics change). Grouped-query attention prunes whole KV groups
    (`gqa_mode="kv-groups"`) or query heads evenly inside every KV group (`"query-heads"`); `keep_kv_cache`
    keeps a decoder's key/value cache inputs and outputs as they are (their heads then stay)."""
    if gqa_mode not in GQA_MODES:
        raise InputError(f"unknown gqa_mode {gqa_mode!r} (choose from {', '.join(GQA_MODES)})")
    check_supported(model)
    normalized = normalize(model)
    view = GraphView(normalized)
    return Prepared(normalized, view, analyze_graph(view, tuple(exclude), prune_hidden, gqa_mode, keep_kv_cache))


def _feeds(calibration) -> list[dict[str, np.ndarray]]:
    if calibration is None:
        return []
    return list(calibration.feeds if hasattr(calibration, "feeds") else calibration)


def prune_model(model: onnx.ModelProto, ratio: float = 0.5, criterion: str = "l1", global_ranking: bool = False,
                round_to: int = 1, exclude: tuple[str, ...] = (), seed: int = 0, validate_result: bool = True,
                removed: dict[int, np.ndarray] | None = None, prepared: Prepared | None = None,
                scores: dict[int, np.ndarray] | None = None, *, calibration=None, recover: str = "none",
                target_macs: float | None = None, target_params: float | None = None,
                allocate: str = "global", sensitivity: dict | None = None, stats=None,
                head_ratio: float | None = None, prune_hidden: bool = False, gqa_mode: str = "kv-groups",
                keep_kv_cache: bool = False) -> PruneResult:
    """Prune `model`; `removed` (group root space -> channels) overrides scoring and planning.

    `calibration` (a Dataset or a list of feed dicts) feeds data-aware criteria and recovery; `target_macs` /
    `target_params` (fraction kept) replace `ratio` with a budget met by per-group ratios (`allocate`: global,
    uniform, or sensitivity with `sensitivity` curves from onnxprune.sensitivity); `stats` reuses activation
    statistics already computed on `calibration`; `head_ratio` is the share of heads attention-head groups lose
    (default: `ratio`); `gqa_mode` and `keep_kv_cache` as for `prepare`.
    """
    from onnxprune.recovery import MODES, recover as run_recovery

    check_ratio(ratio)
    if head_ratio is not None:
        check_ratio(head_ratio, "--head-ratio")
        if target_macs is not None or target_params is not None:
            raise InputError("--head-ratio goes with --ratio, not with --target-macs/--target-params")
    if recover not in MODES:
        raise InputError(f"unknown --recover {recover!r} (choose from {', '.join(MODES)})")
    if target_macs is not None and target_params is not None:
        raise InputError("give one of --target-macs and --target-params, not both")
    feeds = _feeds(calibration)
    if (criterion in DATA_CRITERIA or recover != "none") and not feeds and removed is None:
        what = f"--criterion {criterion}" if criterion in DATA_CRITERIA else f"--recover {recover}"
        raise InputError(f"{what} needs calibration data: pass --data FILE")
    prep = prepared or prepare(model, exclude, prune_hidden, gqa_mode, keep_kv_cache)
    notes: list[str] = []
    if removed is not None:
        plan = plan_removal(prep.analysis, removed)
    else:
        if scores is None:
            if criterion in DATA_CRITERIA and stats is None:
                from onnxprune.activations import channel_stats

                stats = channel_stats(prep, feeds)
            scores = score_groups(prep.analysis, prep.view, criterion, seed, stats=stats)
        target = target_macs if target_macs is not None else target_params
        if target is not None:
            from onnxprune.budget import plan_for_target

            metric = "macs" if target_macs is not None else "params"
            budget = plan_for_target(prep, scores, target, metric, allocate, sensitivity, round_to)
            plan = budget.plan
            if budget.estimate > target + 1e-9:
                notes.append(f"the {metric} target {target:g} cannot be met: every prunable group is at its limit "
                             f"(kept {budget.estimate:.3f})")
        else:
            planner = plan_global if global_ranking else plan_uniform
            plan = planner(prep.analysis, scores, ratio, round_to, head_ratio=head_ratio)
    if {prep.analysis.find(s) for s in prep.analysis.context.approximate} & set(plan.kept):
        notes.append(HIDDEN_WARNING)
    pruned = apply_plan(prep.model, prep.view, prep.analysis, plan)
    recovery: list[dict] = []
    if recover != "none" and plan.kept:
        rec = run_recovery(prep, plan, pruned, feeds, recover, seed=seed)
        pruned, recovery = rec.model, rec.layers
        notes.extend(rec.notes)
    if validate_result:
        validate(pruned, model)
    stats_out = {
        "params_before": count_params(model), "params_after": count_params(pruned),
        "macs_before": count_macs(prep.model, prep.view), "macs_after": count_macs(pruned),
        "bytes_before": model_bytes(model), "bytes_after": model_bytes(pruned),
        "groups": len(prep.analysis.groups), "groups_prunable": len(prep.analysis.prunable),
        "groups_pruned": len(plan.kept), "channels_removed": plan.total_pruned,
    }
    interface = interface_changes(model, pruned)
    if interface:
        notes.append(f"the key/value cache follows the pruned heads: {len(interface)} inputs and outputs changed "
                     "shape (the only interface change; see the interface table)")
    return PruneResult(pruned, prep.analysis, plan, stats_out, notes, recovery, interface=interface)


def measure(model: onnx.ModelProto, dataset, reference: onnx.ModelProto | None = None,
            reference_outputs: list | None = None) -> dict:
    """Top-1 accuracy (%) on `dataset` when it has labels, else top-1 agreement (%) with `reference`."""
    from onnxprune.evaluate import run_model
    from onnxprune.sensitivity import model_metric

    outputs = run_model(model, dataset)
    if dataset.labels is None and reference_outputs is None:
        reference_outputs = run_model(reference if reference is not None else model, dataset)
    metric, value = model_metric(outputs, reference_outputs, dataset.labels, dataset.feeds)
    result = {"metric": metric, "value": value, "source": dataset.source, "samples": len(dataset)}
    if metric == "perplexity":  # value: 100 · reference perplexity / perplexity
        from onnxprune.evaluate import perplexity

        result["perplexity"] = perplexity(outputs, dataset.feeds)["perplexity"]
    return result


def prune_within_drop(model: onnx.ModelProto, max_drop: float, eval_data, *, metric: str = "macs",
                      steps: int = 7, lowest: float = 0.05, **kwargs) -> PruneResult:
    """The smallest kept fraction of MACs (or params) whose drop on `eval_data` is at most `max_drop` points.

    Bisects the kept fraction over [lowest, 1]; each candidate runs the whole pipeline (`kwargs` go to
    prune_model). The drop is in top-1 accuracy points with labels, else in agreement with the unpruned
    model. Every candidate is listed in `result.search`.
    """
    from onnxprune.evaluate import run_model

    if max_drop < 0:
        raise InputError(f"--max-drop is in points and must be >= 0, got {max_drop}")
    prep = kwargs.pop("prepared", None) or prepare(model, kwargs.pop("exclude", ()), kwargs.get("prune_hidden", False),
                                                   kwargs.get("gqa_mode", "kv-groups"),
                                                   kwargs.get("keep_kv_cache", False))
    kwargs.pop("ratio", None)
    ref_out = run_model(prep.model, eval_data)
    base = measure(prep.model, eval_data, reference_outputs=ref_out)
    ratio = None
    if base["metric"] == "perplexity":  # a causal LM: --max-drop is the largest perplexity ratio
        if max_drop < 1:
            raise InputError(f"--max-drop for a language model is a perplexity ratio (e.g. 1.15), got {max_drop}")
        ratio, max_drop = max_drop, 100.0 * (1.0 - 1.0 / max_drop)
    if kwargs.get("criterion", "l1") in DATA_CRITERIA and kwargs.get("stats") is None:
        from onnxprune.activations import channel_stats

        kwargs["stats"] = channel_stats(prep, _feeds(kwargs.get("calibration")))
    key = "target_macs" if metric == "macs" else "target_params"
    log: list[dict] = []
    best: PruneResult | None = None
    lo, hi = lowest, 1.0
    for _ in range(steps):
        mid = (lo + hi) / 2
        result = prune_model(model, prepared=prep, **{key: mid}, **kwargs)
        value = measure(result.model, eval_data, reference_outputs=ref_out)["value"]
        drop = base["value"] - value
        ok = drop <= max_drop
        log.append({"target": mid, "kept": result.stats[f"{metric}_after"] / max(result.stats[f"{metric}_before"], 1),
                    "value": value, "drop": drop, "ok": ok})
        if ok:
            best, hi = result, mid
        else:
            lo = mid
    if best is None:
        best = prune_model(model, prepared=prep, removed={}, **{k: v for k, v in kwargs.items()
                                                              if k in ("seed", "validate_result")})
        best.notes.append(f"no compression kept the drop within {ratio or max_drop:g}"
                          f"{'x perplexity' if ratio else ' points'}; the model is unchanged")
    best.search = log
    kept = best.stats[f'{metric}_after'] / max(best.stats[f'{metric}_before'], 1)
    if ratio is not None:
        for entry in log:
            entry["perplexity_ratio"] = 100.0 / max(entry["value"], 1e-12)
        best.notes.append(f"--max-drop {ratio:g}: perplexity on {eval_data.source} was {base['perplexity']:.4g}, "
                          f"allowed up to {ratio:g}x; kept {kept:.3f} of {metric}")
    else:
        best.notes.append(f"--max-drop {max_drop:g}: {base['metric']} on {eval_data.source} was "
                          f"{base['value']:.2f}%; kept {kept:.3f} of {metric}")
    return best
