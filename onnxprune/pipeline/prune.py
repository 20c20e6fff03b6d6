"""The pruning pipeline: normalize → analyze → score → plan → rewrite → recover → validate.

With calibration data, scores can come from activations (`criterion="activation" | "apoz" | "hybrid"`), the
plan can meet a MAC or parameter budget (`target_macs`, `target_params`, per-group ratios from global scores
or sensitivity), and the pruned model can be recovered without retraining (`recover="bias" | "lstsq"`).
`prune_within_drop` searches the largest compression whose accuracy on held-out data stays within a budget.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxprune.graph.analysis import GQA_MODES, Analysis, analyze_graph
from onnxprune.graph.ir import GraphView
from onnxprune.graph.normalize import normalize
from onnxprune.graph.kvcache import interface_changes
from onnxprune.io.model_io import check_supported
from onnxprune.pipeline.depth import depth_interface, keep_inputs, prune_depth
from onnxprune.pipeline.apply import ContainedFaultError, is_fault, prune_validated, strict_message
from onnxprune.runtime.feeds import resolve_shapes, validation_feed
from onnxprune.pipeline.plan import Plan, plan_global, plan_removal, plan_uniform
from onnxprune.recipe import Recipe, as_recipe
from onnxprune.errors import InputError
from onnxprune.pipeline.score import DATA_CRITERIA, score_groups
from onnxprune.io.model_io import model_bytes
from onnxprune.graph.stats import count_macs, count_params
from onnxprune.pipeline.validate import validate
from onnxprune.io.weights import TensorWriter, Workspace, external_folder, is_lazy


@dataclass
class Prepared:
    """A normalised model with its graph view and channel groups.

    A lazily loaded model (weights in external files) gets a `workspace` for the data files of its rewrites,
    made on first use beside its data (or set by the caller, e.g. beside the output)."""

    model: onnx.ModelProto
    view: GraphView
    analysis: Analysis
    workspace: Workspace | None = None

    def writer(self) -> TensorWriter | None:
        """Where sliced and refit weights are streamed (None: the model is in memory, so are they)."""
        if not is_lazy(self.model):
            return None
        if self.workspace is None:
            self.workspace = Workspace(near=external_folder(self.model))
        return self.workspace.writer()


@dataclass
class PruneResult:
    model: onnx.ModelProto
    analysis: Analysis | None
    plan: Plan
    stats: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    recovery: list[dict] = field(default_factory=list)  # per refit layer (see onnxprune.pipeline.recover)
    search: list[dict] = field(default_factory=list)    # prune_within_drop: every candidate tried
    recipe: Recipe | None = None                         # the resolved recipe that made `model`
    layers: list[dict] = field(default_factory=list)    # unstructured: weights zeroed per layer
    interface: list[dict] = field(default_factory=list)  # inputs/outputs whose shape changed (key/value cache)
    depth: dict | None = None  # depth pruning: blocks found, their influence, those dropped (pipeline/depth.py)

    @property
    def faults(self) -> list[dict]:
        """Contained faults (onnxprune.pipeline.apply): listed apart from ordinary frozen groups."""
        return [f.as_dict() for f in self.analysis.faults] if self.analysis is not None else []

    def group_rows(self) -> list[dict]:
        rows = []
        if self.analysis is None:  # unstructured: no channel groups
            return rows
        for g in self.analysis.groups:
            root = g.spaces[0]
            kept = len(self.plan.kept[root]) if root in self.plan.kept else g.size
            rows.append({"group": g.id, "channels": g.size, "kept": kept, "prunable": g.prunable,
                         "reason": g.reason, "sources": g.sources, "members": len(g.members),
                         "unit": g.unit, "blocks": g.blocks, "fault": is_fault(g, self.analysis.faults),
                         **gqa_fields(g)})
        return rows


def gqa_fields(group) -> dict:
    """Report fields of a grouped-query attention group: heads, head size, KV groups and the mode."""
    if not group.kv_groups:
        return {}
    return {"heads": group.size // group.head_dim, "head_dim": group.head_dim, "kv_groups": group.kv_groups,
            "gqa_mode": group.gqa_mode}


def gqa_notes(analysis: Analysis, recipe: Recipe, plan: Plan) -> list[str]:
    """What gqa_mode "auto" chose where whole key/value groups could not meet the recipe's share of heads (and
    query heads did go)."""
    if recipe.gqa_mode != "auto":
        return []
    chosen = sorted({g.kv_groups for g in analysis.prunable if g.kv_groups and g.gqa_mode == "query-heads"
                     and g.spaces[0] in plan.kept})
    if not chosen:
        return []
    share = head_share(recipe)
    why = "a single KV head" if chosen == [1] else (
        f"{'/'.join(map(str, chosen))} KV groups" + (f" cannot lose {share:.0%} of them whole" if share else ""))
    note = (f"gqa-mode auto pruned query heads evenly inside the KV groups ({why}); the key/value heads and "
            "cache stay (--gqa-mode kv-groups removes whole groups)")
    return [note]


HIDDEN_WARNING = ("hidden features were removed: LayerNorm now normalises over fewer features, so outputs change "
                  "even where the removed features were zero; compare with `onnxprune eval --reference`")


def prepare(model: onnx.ModelProto, exclude: tuple[str, ...] = (), prune_hidden: bool = False,
            gqa_mode: str = "kv-groups", keep_kv_cache: bool = False, head_share: float | None = None) -> Prepared:
    """Normalise and analyse `model`; `prune_hidden` lets LayerNorm pass channels (the hidden size becomes
    prunable, approximately: normalisation statistics change). Grouped-query attention prunes whole KV groups
    (`gqa_mode="kv-groups"`), query heads evenly inside every KV group (`"query-heads"`), or whichever can meet
    `head_share`, the share of heads the run removes (`"auto"`, see graph.analysis.gqa_mode_for);
    `keep_kv_cache` keeps a decoder's key/value cache inputs and outputs as they are (their heads then stay)."""
    if gqa_mode not in GQA_MODES:
        raise InputError(f"unknown gqa_mode {gqa_mode!r} (choose from {', '.join(GQA_MODES)})")
    check_supported(model)
    normalized = normalize(model)
    view = GraphView(normalized)
    return Prepared(normalized, view, analyze_graph(view, tuple(exclude), prune_hidden, gqa_mode, keep_kv_cache,
                                                    head_share))


def _feeds(calibration) -> list[dict[str, np.ndarray]]:
    if calibration is None:
        return []
    return list(calibration.feeds if hasattr(calibration, "feeds") else calibration)


def prune_model(model: onnx.ModelProto, recipe: Recipe | float | None = None, *, calibration=None,
                validate_result: bool = True, removed: dict[int, np.ndarray] | None = None,
                prepared: Prepared | None = None, scores: dict[int, np.ndarray] | None = None,
                sensitivity: dict | None = None, stats=None, strict: bool = False, input_shapes: dict | None = None,
                memory_budget: int | None = None, **options) -> PruneResult:
    """Prune `model` as `recipe` says; `removed` (group root space -> channels) overrides scoring and planning.

    Keyword `options` are recipe fields (`prune_model(model, ratio=0.5, criterion="l1")`): they override
    the recipe's, or build one when none is given (then the criterion defaults to l1, as before recipes;
    a Recipe's own default is hybrid when calibration data is given). `calibration` (a Dataset or a list of
    feed dicts) feeds data-aware criteria, recovery and int8 calibration. `prepared`, `scores`, `stats`
    (activation statistics of `calibration`) and `sensitivity` (curves from onnxprune.pipeline.sensitivity) reuse
    work already done for this model. `result.recipe` is the resolved recipe: replayed, it gives the same
    model.

    Run settings, not part of the recipe: `input_shapes` (input name -> shape) fixes dynamic input dims for
    validation and MAC counts (else the calibration data's, else 1); `strict` makes any contained fault an
    error (onnxprune.pipeline.apply); `memory_budget` (bytes) caps what calibration keeps in memory
    (pipeline/stages.py).
    """
    from onnxprune.pipeline.recover import recover as run_recovery

    feeds = _feeds(calibration)
    recipe = as_recipe(recipe, options).resolved(has_data=bool(feeds))
    if recipe.mode == "unstructured":
        return _prune_unstructured(model, recipe, validate_result)
    # the recipe's fields as locals, so the pipeline below reads as the stages it runs
    ratio, criterion, global_ranking, round_to = recipe.ratio, recipe.criterion, recipe.global_ranking, recipe.round_to
    seed, recover, allocate, head_ratio = recipe.seed, recipe.recover, recipe.allocate, recipe.head_ratio
    target_macs, target_params = recipe.target_macs, recipe.target_params
    if (criterion in DATA_CRITERIA or recover != "none") and not feeds and removed is None:
        what = f"--criterion {criterion}" if criterion in DATA_CRITERIA else f"--recover {recover}"
        raise InputError(f"{what} needs calibration data: pass --data FILE")
    _check_runnable(recipe, feeds)
    if recipe.drop_blocks and removed is None:
        return _prune_depth_first(model, recipe, calibration, feeds, validate_result=validate_result, strict=strict,
                                  input_shapes=input_shapes, memory_budget=memory_budget)
    prep = prepared or prepare_recipe(model, recipe)
    notes: list[str] = []
    if removed is not None:
        plan = plan_removal(prep.analysis, removed)
    else:
        if scores is None:
            if criterion in DATA_CRITERIA and stats is None:
                from onnxprune.pipeline.activations import channel_stats

                stats = channel_stats(prep, feeds, memory_budget=memory_budget, seed=seed)
            scores = score_groups(prep.analysis, prep.view, criterion, seed, stats=stats)
        target = target_macs if target_macs is not None else target_params
        if target is not None:
            from onnxprune.pipeline.budget import plan_for_target

            metric = "macs" if target_macs is not None else "params"
            if allocate == "sensitivity" and sensitivity is None:
                sensitivity = sensitivity_curves(prep, calibration, scores)
            budget = plan_for_target(prep, scores, target, metric, allocate, sensitivity, round_to)
            plan = budget.plan
            if budget.estimate > target + 1e-9:
                notes.append(f"the {metric} target {target:g} cannot be met: every prunable group is at its limit "
                             f"(kept {budget.estimate:.3f})")
        else:
            planner = plan_global if global_ranking else plan_uniform
            plan = planner(prep.analysis, scores, ratio, round_to, head_ratio=head_ratio)
    notes.extend(gqa_notes(prep.analysis, recipe, plan))
    if {prep.analysis.find(s) for s in prep.analysis.context.approximate} & set(plan.kept):
        notes.append(HIDDEN_WARNING)
    feed = validation_feed(model, input_shapes, feeds, seed) if validate_result else None
    pruned, plan = prune_validated(prep, plan, model, feed, check=validate_result)
    recovery: list[dict] = []
    # model passes over the calibration data (statistics, then recovery's staged runs)
    passes = {"statistics": stats.passes} if stats is not None and feeds and removed is None else {}
    if recover != "none" and plan.kept:
        rec = run_recovery(prep, plan, pruned, feeds, recover, seed=seed, memory_budget=memory_budget)
        pruned, recovery = rec.model, rec.layers
        notes.extend(rec.notes)
        passes.update({f"recovery_{k}": v for k, v in rec.passes.items() if k in ("pruned", "original")})
        if rec.passes.get("spilled_bytes"):
            from onnxprune.pipeline.stages import format_bytes

            notes.append(f"calibration kept at most {format_bytes(rec.passes['frontier_peak_bytes'])} of activations "
                         f"in memory and spilled {format_bytes(rec.passes['spilled_bytes'])} to disk (--memory-budget)")
    if validate_result and recover != "none" and plan.kept:
        validate(pruned, model, feed)
    if strict and prep.analysis.faults:
        raise ContainedFaultError(strict_message(prep.analysis.faults))
    shapes = resolve_shapes(model, input_shapes, feeds[0] if feeds else None)[0]
    stats_out = {
        "params_before": count_params(model), "params_after": count_params(pruned),
        "macs_before": count_macs(prep.model, prep.view, shapes), "macs_after": count_macs(pruned, None, shapes),
        "bytes_before": model_bytes(model), "bytes_after": model_bytes(pruned),
        "groups": len(prep.analysis.groups), "groups_prunable": len(prep.analysis.prunable),
        "groups_pruned": len(plan.kept), "channels_removed": plan.total_pruned,
        "faults": len(prep.analysis.faults),
    }
    if passes:
        stats_out["passes"] = {**passes, "total": sum(passes.values())}
    interface = interface_changes(model, pruned)
    if interface:
        notes.append(f"the key/value cache follows the pruned heads: {len(interface)} inputs and outputs changed "
                     "shape (the only interface change; see the interface table)")
    result = PruneResult(pruned, prep.analysis, plan, stats_out, notes, recovery, recipe=recipe,
                         interface=interface)
    return quantize_result(result, feeds) if recipe.quantize else result


def _prune_depth_first(model: onnx.ModelProto, recipe: Recipe, calibration, feeds, *, validate_result: bool,
                       strict: bool, input_shapes: dict | None, memory_budget: int | None) -> PruneResult:
    """Drop the least influential residual blocks (pipeline/depth.py), then width-prune what stays as the rest
    of the recipe says; the stats and the interface compare with `model`."""
    from onnxprune.evaluate.data import Dataset

    depth = prune_depth(model, recipe.drop_blocks, feeds)
    kept = keep_inputs(feeds, depth.model)
    calib = dataclasses.replace(calibration, feeds=kept) if isinstance(calibration, Dataset) else kept
    names = {i.name for i in depth.model.graph.input}
    shapes = None if input_shapes is None else {k: v for k, v in input_shapes.items() if k in names}
    result = prune_model(depth.model, dataclasses.replace(recipe, drop_blocks=None), calibration=calib,
                         validate_result=validate_result, strict=strict, input_shapes=shapes,
                         memory_budget=memory_budget)
    result.recipe = recipe
    shapes = resolve_shapes(model, input_shapes, feeds[0] if feeds else None)[0]
    result.stats.update({"params_before": count_params(model), "macs_before": count_macs(model, None, shapes),
                         "bytes_before": model_bytes(model), "blocks_dropped": len(depth.dropped)})
    renamed = set(depth.renamed.values())  # a renumbered cache entry is compared under its old name, above
    result.interface = depth_interface(model, depth) + [c for c in interface_changes(model, result.model)
                                                        if c["name"] not in renamed]
    result.notes[:0] = depth.notes
    result.depth = depth.as_dict()
    return result


def prepare_recipe(model: onnx.ModelProto, recipe: Recipe) -> Prepared:
    """prepare() with the recipe's graph settings (exclude patterns, hidden size, decoder options)."""
    return prepare(model, recipe.exclude, recipe.prune_hidden, **_decoder_options(recipe))


def _decoder_options(recipe: Recipe) -> dict:
    """The recipe's decoder settings (gqa_mode, with the share of heads "auto" decides by; keep_kv_cache) as
    prepare() keywords."""
    options = {"gqa_mode": recipe.gqa_mode}
    if recipe.keep_kv_cache:
        options["keep_kv_cache"] = True
    if recipe.gqa_mode == "auto":
        options["head_share"] = head_share(recipe)
    return options


def head_share(recipe: Recipe) -> float | None:
    """The share of attention heads a recipe removes, as far as it says: its head ratio, else its ratio, else
    what a MAC or parameter target leaves out; None when unknown (a --max-drop search)."""
    if recipe.head_ratio is not None:
        return recipe.head_ratio
    if recipe.ratio is not None:
        return recipe.ratio
    target = recipe.target
    return None if target is None else 1.0 - target[1]


def _check_runnable(recipe: Recipe, feeds) -> None:
    """Rules that need to know the data, checked before any work."""
    if recipe.quantize in ("int8", "static") and not feeds:
        raise InputError(f"--quantize {recipe.quantize} calibrates on data: pass --data FILE")
    if recipe.allocate == "sensitivity":
        if recipe.target is None:
            raise InputError("--allocate sensitivity spreads a budget: add --target-macs, --target-params or "
                             "--max-drop")


def sensitivity_curves(prep: Prepared, calibration, scores: dict[int, np.ndarray]) -> dict:
    """Per-group sensitivity curves on the calibration data (labels used when it has them)."""
    from onnxprune.evaluate.data import Dataset
    from onnxprune.pipeline.sensitivity import sensitivity

    dataset = calibration if isinstance(calibration, Dataset) else Dataset(_feeds(calibration), None, "calibration")
    if not dataset.feeds:
        raise InputError("--allocate sensitivity measures each group on calibration data: pass --data FILE")
    return sensitivity(prep, dataset, scores).curves()


def quantize_result(result: PruneResult, feeds) -> PruneResult:
    """Quantize the pruned model as the recipe says; MACs and parameters stay those of the float model
    (the same layers, in int8), bytes become the quantized model's."""
    from onnxprune.quantize.quantize import quantize_model

    q = quantize_model(result.model, result.recipe.quantize, calibration=feeds or None)
    result.stats["bytes_float"] = model_bytes(result.model)  # the pruned model before quantization
    result.model = q.model
    result.notes.extend(q.notes)
    result.stats["bytes_after"] = model_bytes(q.model)
    result.stats["quantize"] = q.mode
    return result


def _prune_unstructured(model: onnx.ModelProto, recipe: Recipe, validate_result: bool) -> PruneResult:
    from onnxprune.pipeline.plan import Plan
    from onnxprune.pipeline.unstructured import prune_unstructured

    check_supported(model)
    out = prune_unstructured(model, ratio=recipe.ratio, threshold=recipe.threshold, exclude=recipe.exclude)
    if validate_result:
        validate(out.model, model, stage="unstructured")
    # shapes do not change: MACs and stored parameters stay; the file compresses better (gzip figures)
    params, macs = count_params(model), count_macs(model)
    stats = {**out.stats, "params_before": params, "params_after": params, "macs_before": macs, "macs_after": macs}
    result = PruneResult(out.model, None, Plan(), stats, out.notes, recipe=recipe, layers=out.layers)
    return quantize_result(result, []) if recipe.quantize else result


def measure(model: onnx.ModelProto, dataset, reference: onnx.ModelProto | None = None,
            reference_outputs: list | None = None) -> dict:
    """Top-1 accuracy (%) on `dataset` when it has labels, else top-1 agreement (%) with `reference`."""
    from onnxprune.evaluate.metrics import run_model
    from onnxprune.pipeline.sensitivity import model_metric

    outputs = run_model(model, dataset)
    if dataset.labels is None and reference_outputs is None:
        reference_outputs = run_model(reference if reference is not None else model, dataset)
    metric, value = model_metric(outputs, reference_outputs, dataset.labels, dataset.feeds)
    result = {"metric": metric, "value": value, "source": dataset.source, "samples": len(dataset)}
    if metric == "perplexity":  # value: 100 · reference perplexity / perplexity
        from onnxprune.evaluate.metrics import perplexity

        result["perplexity"] = perplexity(outputs, dataset.feeds)["perplexity"]
    return result


def prune_within_drop(model: onnx.ModelProto, max_drop: float, eval_data, recipe: Recipe | None = None, *,
                      metric: str = "macs", steps: int = 7, lowest: float = 0.05, calibration=None,
                      prepared: Prepared | None = None, stats=None, sensitivity: dict | None = None,
                      validate_result: bool = True, strict: bool = False, input_shapes: dict | None = None,
                      memory_budget: int | None = None, **options) -> PruneResult:
    """The smallest kept fraction of MACs (or params) whose drop on `eval_data` is at most `max_drop` points.

    Bisects the kept fraction over [lowest, 1]; each candidate runs the whole pipeline with the recipe's
    budget replaced by that target (`options` are recipe fields, as for prune_model). The drop is in top-1
    accuracy points with labels, else in agreement with the unpruned model. Quantization, when the recipe
    asks for it, is applied to the model found. Every candidate is listed in `result.search`, and
    `result.recipe` holds the target found.
    """
    from onnxprune.evaluate.metrics import run_model

    if max_drop < 0:
        raise InputError(f"--max-drop is in points and must be >= 0, got {max_drop}")
    feeds = _feeds(calibration)
    recipe = as_recipe(recipe, options).without_budget().resolved(has_data=bool(feeds)).replace(ratio=None)
    quantize, recipe = recipe.quantize, dataclasses.replace(recipe, quantize=None)
    _check_runnable(dataclasses.replace(recipe, target_macs=1.0), feeds)
    prep = prepared or prepare_recipe(model, recipe)
    ref_out = run_model(prep.model, eval_data)
    base = measure(prep.model, eval_data, reference_outputs=ref_out)
    ratio = None
    if base["metric"] == "perplexity":  # a causal LM: --max-drop is the largest perplexity ratio
        if max_drop < 1:
            raise InputError(f"--max-drop for a language model is a perplexity ratio (e.g. 1.15), got {max_drop}")
        ratio, max_drop = max_drop, 100.0 * (1.0 - 1.0 / max_drop)
    if recipe.criterion in DATA_CRITERIA and stats is None:
        from onnxprune.pipeline.activations import channel_stats

        stats = channel_stats(prep, feeds, memory_budget=memory_budget, seed=recipe.seed)
    scores = score_groups(prep.analysis, prep.view, recipe.criterion, recipe.seed, stats=stats)
    if recipe.allocate == "sensitivity" and sensitivity is None:
        sensitivity = sensitivity_curves(prep, calibration, scores)
    key = "target_macs" if metric == "macs" else "target_params"
    log: list[dict] = []
    best: PruneResult | None = None
    lo, hi = lowest, 1.0
    for _ in range(steps):
        mid = (lo + hi) / 2
        result = prune_model(model, recipe.replace(**{key: mid}), calibration=calibration, prepared=prep,
                             scores=scores, stats=stats, sensitivity=sensitivity, validate_result=validate_result,
                             strict=strict, input_shapes=input_shapes, memory_budget=memory_budget)
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
        unchanged = dataclasses.replace(recipe, ratio=0.0, allocate="global", recover="none")
        best = prune_model(model, unchanged, prepared=prep, removed={}, validate_result=validate_result,
                           strict=strict, input_shapes=input_shapes)
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
    if quantize:
        best.recipe = dataclasses.replace(best.recipe, quantize=quantize)
        best = quantize_result(best, feeds)
    return best
