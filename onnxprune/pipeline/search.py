"""Search over budgets: the largest compression whose quality on held-out data stays within a drop.

`prune_within_drop` bisects the kept fraction of MACs (or parameters); every candidate runs the whole pipeline
(pipeline/prune.py) on one prepared model, with the statistics, scores and sensitivity curves computed once.
"""

from __future__ import annotations

import dataclasses

import onnx

from onnxprune.errors import InputError
from onnxprune.evaluate.metrics import metric_digest, perplexity
from onnxprune.pipeline.prepare import prepare_recipe
from onnxprune.pipeline.prune import (
    PruneResult,
    Reuse,
    RunSettings,
    check_runnable,
    prune_model,
    quantize_result,
    sensitivity_curves,
)
from onnxprune.pipeline.score import DATA_CRITERIA, score_groups
from onnxprune.pipeline.sensitivity import model_metric
from onnxprune.pipeline.statistics import channel_stats
from onnxprune.recipe import Recipe
from onnxprune.runtime.session import run_batches


def measure(model: onnx.ModelProto, dataset, reference: onnx.ModelProto | None = None,
            reference_outputs: list | None = None, outputs: list | None = None) -> dict:
    """Top-1 accuracy (%) on `dataset` when it has labels, else top-1 agreement (%) with `reference`; for a causal
    LM the perplexity kept (100 · reference perplexity / perplexity) and the perplexity itself."""
    reduce = metric_digest(dataset)
    if outputs is None:  # `outputs`: the model's own, when the caller has them (run_batches with metric_digest)
        outputs = run_batches(model, dataset.batches(), reduce=reduce)
    if dataset.labels is None and reference_outputs is None:
        reference_outputs = outputs if reference is None else run_batches(reference, dataset.batches(),
                                                                          reduce=reduce)
    metric, value = model_metric(outputs, reference_outputs, dataset.labels, dataset.feeds)
    result = {"metric": metric, "value": value, "source": dataset.source, "samples": len(dataset)}
    if metric == "perplexity_kept":  # value: 100 · reference perplexity / perplexity
        result["perplexity"] = perplexity(outputs, dataset.feeds)["perplexity"]
    return result


def prune_within_drop(model: onnx.ModelProto, max_drop: float, eval_data, recipe: Recipe | None = None,
                      run: RunSettings | None = None, *, metric: str = "macs", steps: int = 7,
                      lowest: float = 0.05) -> PruneResult:
    """The smallest kept fraction of MACs (or params) whose drop on `eval_data` is at most `max_drop` points.

    Bisects the kept fraction over [lowest, 1]; each candidate runs the whole pipeline with the recipe's
    budget replaced by that target. The drop is in top-1 accuracy points with labels, else in agreement with
    the unpruned model; for a causal LM `max_drop` is the largest perplexity ratio (e.g. 1.15). Quantization,
    when the recipe asks for it, is applied to the model found. Every candidate is listed in `result.search`,
    and `result.recipe` holds the target found.
    """
    if max_drop < 0:
        raise InputError(f"--max-drop is in points and must be >= 0, got {max_drop}")
    run = run or RunSettings()
    feeds = run.feeds()
    recipe = (recipe or Recipe()).without_budget().resolved(has_data=bool(feeds)).replace(ratio=None)
    quantize, recipe = recipe.quantize, dataclasses.replace(recipe, quantize=None)
    check_runnable(dataclasses.replace(recipe, target_macs=1.0), feeds)
    reuse = run.reuse
    prep = reuse.prepared or prepare_recipe(model, recipe)
    ref_out = run_batches(prep.model, eval_data.batches(), reduce=metric_digest(eval_data))
    base = measure(prep.model, eval_data, reference_outputs=ref_out, outputs=ref_out)
    ratio = None
    if base["metric"] == "perplexity_kept":  # a causal LM: --max-drop is the largest perplexity ratio
        if max_drop < 1:
            raise InputError(f"--max-drop for a language model is a perplexity ratio (e.g. 1.15), got {max_drop}")
        ratio, max_drop = max_drop, 100.0 * (1.0 - 1.0 / max_drop)
    stats = reuse.stats
    if recipe.criterion in DATA_CRITERIA and stats is None:
        stats = channel_stats(prep, feeds, memory_budget=run.memory_budget, seed=recipe.seed)
    scores = reuse.scores or score_groups(prep.analysis, prep.view, recipe.criterion, recipe.seed, stats=stats)
    sensitivity = reuse.sensitivity
    if recipe.allocate == "sensitivity" and sensitivity is None:
        sensitivity = sensitivity_curves(prep, run.calibration, scores)
    step_run = run.replace(reuse=Reuse(prep, stats, scores, sensitivity))
    key = "target_macs" if metric == "macs" else "target_params"
    log: list[dict] = []
    best: PruneResult | None = None
    lo, hi = lowest, 1.0
    for _ in range(steps):
        mid = (lo + hi) / 2
        result = prune_model(model, recipe.replace(**{key: mid}), step_run)
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
        best = prune_model(model, unchanged, run.replace(calibration=None, removed={}, reuse=Reuse(prep)))
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
