"""The pipeline in one function: prepare → score → plan → apply → recover → validate (→ quantize).

`prune_model(model, recipe, run)` takes what the prune does (the Recipe: criterion, budget, recovery, ...) and
how this run goes (`RunSettings`: calibration data, input shapes, strictness, memory budget, work already done
for this model), and returns a `PruneResult` holding the model, the plan applied, the faults met and the figures
a report shows. Nothing it is given is modified: a prepared model shared by sweep candidates stays as it was.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxprune.errors import ContainedFaultError, InputError
from onnxprune.evaluate.data import Dataset
from onnxprune.graph.analysis import Analysis
from onnxprune.graph.faults import Fault, strict_message
from onnxprune.graph.kvcache import interface_changes
from onnxprune.pipeline.depth import depth_interface, keep_inputs, prune_depth
from onnxprune.graph.stats import count_macs, count_params
from onnxprune.io.model_io import check_supported, model_bytes
from onnxprune.latency.allocate import plan_for_latency
from onnxprune.latency.measure import LatencySettings, latency_feed
from onnxprune.pipeline.activations import ActivationStats
from onnxprune.pipeline.apply import apply_validated
from onnxprune.pipeline.budget import plan_for_target
from onnxprune.pipeline.plan import Plan, plan_global, plan_removal, plan_uniform
from onnxprune.pipeline.prepare import Prepared, head_share, prepare_recipe
from onnxprune.pipeline.recover import recover as run_recovery
from onnxprune.pipeline.risks import data_free_warnings
from onnxprune.pipeline.score import DATA_CRITERIA, score_groups
from onnxprune.pipeline.sensitivity import SensitivityResult, sensitivity
from onnxprune.runtime import linalg
from onnxprune.runtime.stages import format_bytes
from onnxprune.pipeline.finetune import finetune
from onnxprune.pipeline.statistics import criterion_stats
from onnxprune.pipeline.unstructured import prune_unstructured
from onnxprune.pipeline.validate import validate
from onnxprune.quantize.quantize import quantize_model
from onnxprune.recipe import Recipe
from onnxprune.runtime.feeds import resolve_shapes, validation_feed

Feeds = Sequence[dict[str, np.ndarray]]


@dataclass(frozen=True)
class Reuse:
    """Work already done for this model and recipe family, shared by sweep candidates and search steps."""

    prepared: Prepared | None = None
    stats: ActivationStats | None = None                 # activation statistics of the run's calibration data
    scores: dict[int, np.ndarray] | None = None          # group root space -> channel scores
    sensitivity: SensitivityResult | None = None         # per-group curves (allocate = "sensitivity")


@dataclass(frozen=True)
class RunSettings:
    """How one run goes, apart from what it does (the recipe).

    `calibration` (a Dataset or a list of feed dicts) feeds data-aware criteria, recovery and int8
    calibration; `input_shapes` (input name -> shape) fixes dynamic input dims for validation and MAC counts
    (else the calibration data's, else 1); `strict` makes any contained fault an error; `memory_budget`
    (bytes) caps what calibration keeps in memory (runtime/stages.py); `validate=False` skips the
    post-conditions (benchmarks); `removed` (group root space -> channels) replaces scoring and planning (the
    zero-channel oracle prunes exactly the channels it zeroed); `reuse` holds work already done;
    `latency_cache` is where `target_latency` keeps its measured tables.
    """

    calibration: object = None
    input_shapes: dict[str, tuple[int, ...]] | None = None
    strict: bool = False
    memory_budget: int | None = None
    validate: bool = True
    removed: dict[int, np.ndarray] | None = None
    reuse: Reuse = Reuse()
    latency_cache: str | None = None  # folder of measured latency tables (latency/table.py; default ~/.cache)
    eval_data: object = None          # held-out Dataset re-training (recipe.finetune) is judged on
    train_device: str = "auto"        # torch device re-training runs on (auto: CUDA when torch sees a GPU)
    linalg_device: str = "auto"       # where refits factorise (runtime/linalg.py; auto: a CUDA GPU when there)

    def feeds(self) -> list[dict[str, np.ndarray]]:
        data = self.calibration
        if data is None:
            return []
        return list(data.feeds if hasattr(data, "feeds") else data)

    def replace(self, **changes) -> RunSettings:
        return dataclasses.replace(self, **changes)


@dataclass
class PruneResult:
    model: onnx.ModelProto
    analysis: Analysis | None
    plan: Plan
    stats: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    recovery: list[dict] = field(default_factory=list)  # per refit layer (see pipeline/recover.py)
    search: list[dict] = field(default_factory=list)    # prune_within_drop: every candidate tried
    recipe: Recipe | None = None                         # the resolved recipe that made `model`
    layers: list[dict] = field(default_factory=list)    # unstructured: weights zeroed per layer
    interface: list[dict] = field(default_factory=list)  # inputs/outputs whose shape changed (key/value cache)
    contained: list[Fault] = field(default_factory=list)  # faults met while applying and measuring this plan

    @property
    def all_faults(self) -> list[Fault]:
        """Faults of the analysis (handler exceptions) and of this run (rewrites, validation, sensitivity)."""
        return (list(self.analysis.faults) if self.analysis is not None else []) + self.contained
    warnings: list[str] = field(default_factory=list)   # known risks of this prune (onnxprune.pipeline.risks)
    finetune: dict | None = None                          # re-training's report (pipeline/finetune.py)
    depth: dict | None = None  # depth pruning: blocks found, their influence, those dropped (pipeline/depth.py)

    @property
    def faults(self) -> list[dict]:
        """Contained faults, listed apart from ordinary frozen groups."""
        return [f.as_dict() for f in self.all_faults]

    def group_rows(self) -> list[dict]:
        if self.analysis is None:  # unstructured: no channel groups
            return []
        faults = self.all_faults
        rows = []
        for g in self.analysis.groups:
            root = g.spaces[0]
            kept = len(self.plan.kept[root]) if root in self.plan.kept else g.size
            reasons = list(g.reasons) + [f.reason for f in self.contained if g.id in f.groups]
            reason = "; ".join(dict.fromkeys(reasons)) if reasons else g.reason
            rows.append({"group": g.id, "channels": g.size, "kept": kept, "prunable": g.prunable and not reasons,
                         "reason": reason, "sources": g.sources, "members": len(g.members),
                         "unit": g.unit, "blocks": g.blocks, "fault": any(g.id in f.groups for f in faults),
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


def prune_model(model: onnx.ModelProto, recipe: Recipe | None = None, run: RunSettings | None = None) -> PruneResult:
    """Prune `model` as `recipe` says (default: Recipe()), in the run `run` describes (default: no data).

    `result.recipe` is the resolved recipe (its defaults made explicit): replayed with the same calibration
    data, it gives the same model.
    """
    run = run or RunSettings()
    if not isinstance(recipe, (Recipe, type(None))):
        raise TypeError(f"expected a Recipe, got {type(recipe).__name__}")
    with linalg.using(run.linalg_device):  # where refits and refit scores factorise their Gram matrices
        return _prune_model(model, recipe, run)


def _prune_model(model: onnx.ModelProto, recipe: Recipe | None, run: RunSettings) -> PruneResult:
    feeds = run.feeds()
    recipe = (recipe or Recipe()).resolved(has_data=bool(feeds))
    if recipe.mode == "unstructured":
        return _prune_unstructured(model, recipe, run.validate)
    check_runnable(recipe, feeds, explicit=run.removed is not None)
    if recipe.drop_blocks and run.removed is None:
        return _prune_depth_first(model, recipe, run)
    prep = run.reuse.prepared or prepare_recipe(model, recipe)
    stats = run.reuse.stats
    if recipe.criterion in DATA_CRITERIA and stats is None and run.removed is None:
        stats = criterion_stats(recipe.criterion, prep, feeds, labels=getattr(run.calibration, "labels", None),
                                memory_budget=run.memory_budget, seed=recipe.seed)
    warnings = data_free_warnings(model, recipe, bool(feeds), prep.analysis) if run.removed is None else []
    plan, notes, contained, latency = make_plan(model, prep, recipe, run, stats)
    feed = validation_feed(model, run.input_shapes, feeds, recipe.seed) if run.validate else None
    applied = apply_validated(prep, plan, model, feed, check=run.validate)
    pruned, plan = applied.model, applied.plan
    contained += applied.faults
    # model passes over the calibration data (statistics, then recovery's staged runs)
    passes = {"statistics": stats.passes} if stats is not None and feeds and run.removed is None else {}
    recovery: list[dict] = []
    if recipe.recover != "none" and plan.kept:
        rec = run_recovery(prep, plan, pruned, feeds, recipe.recover, seed=recipe.seed,
                           memory_budget=run.memory_budget)
        pruned, recovery = rec.model, rec.layers
        notes.extend(rec.notes)
        passes.update({f"recovery_{k}": v for k, v in rec.passes.items() if k in ("pruned", "original")})
        if rec.passes.get("spilled_bytes"):
            notes.append(f"calibration kept at most {format_bytes(rec.passes['frontier_peak_bytes'])} of activations "
                         f"in memory and spilled {format_bytes(rec.passes['spilled_bytes'])} to disk (--memory-budget)")
        if run.validate:
            validate(pruned, model, feed)
    tuned = None
    if recipe.finetune != "none" and plan.kept:
        tuned = finetune(pruned, prep.model, run.calibration, recipe, eval_data=run.eval_data,
                         memory_budget=run.memory_budget, show_progress=True, device=run.train_device)
        pruned = tuned.model
        notes.extend(tuned.notes)
    faults = list(prep.analysis.faults) + contained
    if run.strict and faults:
        raise ContainedFaultError(strict_message(faults))
    shapes = resolve_shapes(model, run.input_shapes, feeds[0] if feeds else None)[0]
    figures = {
        "params_before": count_params(model), "params_after": count_params(pruned),
        "macs_before": count_macs(prep.model, prep.view, shapes), "macs_after": count_macs(pruned, None, shapes),
        "bytes_before": model_bytes(model), "bytes_after": model_bytes(pruned),
        "groups": len(prep.analysis.groups), "groups_prunable": len(prep.analysis.prunable),
        "groups_pruned": len(plan.kept), "channels_removed": plan.total_pruned,
        "faults": len(faults),
    }
    if latency is not None:
        figures["latency"] = latency
    if passes:
        figures["passes"] = {**passes, "total": sum(passes.values())}
    interface = interface_changes(model, pruned)
    if interface:
        notes.append(f"the key/value cache follows the pruned heads: {len(interface)} inputs and outputs changed "
                     "shape (the only interface change; see the interface table)")
    result = PruneResult(pruned, prep.analysis, plan, figures, notes, recovery, recipe=recipe, interface=interface,
                         contained=contained, warnings=warnings,
                         finetune=tuned.report if tuned is not None else None)
    return quantize_result(result, feeds) if recipe.quantize else result


def make_plan(model: onnx.ModelProto, prep: Prepared, recipe: Recipe, run: RunSettings,
              stats: ActivationStats | None) -> tuple[Plan, list[str], list[Fault], dict | None]:
    """Score and plan: the channels to keep per group, notes for the report, faults met by sensitivity, and the
    latency report of a latency target."""
    if run.removed is not None:
        plan = plan_removal(prep.analysis, run.removed)
        return plan, gqa_notes(prep.analysis, recipe, plan), [], None
    notes: list[str] = []
    faults: list[Fault] = []
    latency = None
    scores = run.reuse.scores
    if scores is None:
        scores = score_groups(prep.analysis, prep.view, recipe.criterion, recipe.seed, stats=stats)
    target = recipe.target_macs if recipe.target_macs is not None else recipe.target_params
    curves = None
    if recipe.allocate == "sensitivity" and (target is not None or recipe.target_latency is not None):
        measured = run.reuse.sensitivity or sensitivity_curves(prep, run.calibration, scores)
        curves, faults = measured.curves(), list(measured.faults)
    if recipe.target_latency is not None:
        plan, latency = _plan_for_latency(prep, model, scores, recipe, run, notes, curves)
    elif target is not None:
        metric = "macs" if recipe.target_macs is not None else "params"
        budget = plan_for_target(prep, scores, target, metric, recipe.allocate, curves, recipe.round_to)
        plan = budget.plan
        if budget.estimate > target + 1e-9:
            notes.append(f"the {metric} target {target:g} cannot be met: every prunable group is at its limit "
                         f"(kept {budget.estimate:.3f})")
    else:
        planner = plan_global if recipe.global_ranking else plan_uniform
        plan = planner(prep.analysis, scores, recipe.ratio, recipe.round_to, head_ratio=recipe.head_ratio)
    notes.extend(gqa_notes(prep.analysis, recipe, plan))
    if {prep.analysis.find(s) for s in prep.analysis.context.approximate} & set(plan.kept):
        notes.append(HIDDEN_WARNING)
    return plan, notes, faults, latency


def _plan_for_latency(prep: Prepared, model: onnx.ModelProto, scores: dict[int, np.ndarray], recipe: Recipe,
                      run: RunSettings, notes: list[str], curves=None) -> tuple[Plan, dict]:
    """The plan meeting the recipe's latency target, measured (onnxprune/latency), and its report; `curves`
    (sensitivity) price the channels instead of the scores."""
    settings = latency_settings(recipe)
    feed = latency_feed(prep.model, settings.batch, run.input_shapes, run.feeds(), recipe.seed)
    result = plan_for_latency(prep, model, scores, recipe.target_latency, settings, feed, run.latency_cache,
                              sensitivity=curves)
    if not result.met:
        notes.append(f"the latency target {recipe.target_latency} was not met: the fastest plan tried measured "
                     f"{result.measured:.3f} of the original's latency (target {result.target_ratio:.3f})")
    return result.plan, result.as_dict()


def latency_settings(recipe: Recipe) -> LatencySettings:
    """Where the recipe's latency target is measured: its provider, batch and threads."""
    return LatencySettings(recipe.latency_provider, recipe.latency_batch, recipe.latency_threads, seed=recipe.seed)


def check_runnable(recipe: Recipe, feeds: Feeds, explicit: bool = False) -> None:
    """Rules that need to know the data, checked before any work (`explicit`: the plan is given)."""
    needs_data = recipe.criterion in DATA_CRITERIA and not explicit
    if (needs_data or recipe.recover != "none" or recipe.finetune != "none") and not feeds:
        what = (f"--criterion {recipe.criterion}" if needs_data else
                f"--recover {recipe.recover}" if recipe.recover != "none" else f"--finetune {recipe.finetune}")
        raise InputError(f"{what} needs calibration data: pass --data FILE")


def _prune_depth_first(model: onnx.ModelProto, recipe: Recipe, run: RunSettings) -> PruneResult:
    """Drop the least influential residual blocks (pipeline/depth.py), then width-prune what stays as the rest
    of the recipe says; the stats and the interface compare with `model`."""
    feeds = run.feeds()
    depth = prune_depth(model, recipe.drop_blocks, feeds)
    kept = keep_inputs(feeds, depth.model)
    calib = dataclasses.replace(run.calibration, feeds=kept) if isinstance(run.calibration, Dataset) else kept
    names = {i.name for i in depth.model.graph.input}
    shapes = None if run.input_shapes is None else {k: v for k, v in run.input_shapes.items() if k in names}
    result = prune_model(depth.model, dataclasses.replace(recipe, drop_blocks=None),
                         run.replace(calibration=calib, input_shapes=shapes, reuse=Reuse()))
    result.recipe = recipe
    shapes = resolve_shapes(model, run.input_shapes, feeds[0] if feeds else None)[0]
    result.stats.update({"params_before": count_params(model), "macs_before": count_macs(model, None, shapes),
                         "bytes_before": model_bytes(model), "blocks_dropped": len(depth.dropped)})
    renamed = set(depth.renamed.values())  # a renumbered cache entry is compared under its old name, above
    result.interface = depth_interface(model, depth) + [c for c in interface_changes(model, result.model)
                                                        if c["name"] not in renamed]
    result.notes[:0] = depth.notes
    result.depth = depth.as_dict()
    return result


    if recipe.quantize in ("int8", "static") and not feeds:
        raise InputError(f"--quantize {recipe.quantize} calibrates on data: pass --data FILE")
    if recipe.target_latency is not None:
        latency_settings(recipe).check()  # a provider this onnxruntime lacks: one line, before any work
    if recipe.allocate == "sensitivity" and recipe.target is None and recipe.target_latency is None:
        raise InputError("--allocate sensitivity spreads a budget: add --target-macs, --target-params, "
                         "--target-latency or --max-drop")


def sensitivity_curves(prep: Prepared, calibration, scores: dict[int, np.ndarray]) -> SensitivityResult:
    """Per-group sensitivity on the calibration data (labels used when it has them)."""
    dataset = calibration if hasattr(calibration, "labels") else _unlabelled(calibration)
    if not dataset.feeds:
        raise InputError("--allocate sensitivity measures each group on calibration data: pass --data FILE")
    return sensitivity(prep, dataset, scores)


def _unlabelled(feeds) -> Dataset:
    return Dataset(list(feeds or []), None, "calibration")


def quantize_result(result: PruneResult, feeds: Feeds) -> PruneResult:
    """Quantize the pruned model as the recipe says; MACs and parameters stay those of the float model
    (the same layers, in int8), bytes become the quantized model's."""
    q = quantize_model(result.model, result.recipe.quantize, calibration=list(feeds) or None)
    result.stats["bytes_float"] = model_bytes(result.model)  # the pruned model before quantization
    result.model = q.model
    result.notes.extend(q.notes)
    result.stats["bytes_after"] = model_bytes(q.model)
    result.stats["quantize"] = q.mode
    return result


def _prune_unstructured(model: onnx.ModelProto, recipe: Recipe, check: bool) -> PruneResult:
    check_supported(model)
    out = prune_unstructured(model, ratio=recipe.ratio, threshold=recipe.threshold, exclude=recipe.exclude)
    if check:
        validate(out.model, model, stage="unstructured")
    # shapes do not change: MACs and stored parameters stay; the file compresses better (gzip figures)
    params, macs = count_params(model), count_macs(model)
    stats = {**out.stats, "params_before": params, "params_after": params, "macs_before": macs, "macs_after": macs}
    result = PruneResult(out.model, None, Plan(), stats, out.notes, recipe=recipe, layers=out.layers)
    return quantize_result(result, []) if recipe.quantize else result
