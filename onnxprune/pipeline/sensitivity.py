"""Per-group sensitivity: how much accuracy (or fidelity) a model loses when one group alone is pruned.

For every prunable group and every ratio, only that group loses its lowest-scored channels; the pruned model
runs on the data and is compared with the unpruned one: top-1 accuracy drop in points when the data has labels,
otherwise the drop in top-1 agreement with the unpruned model's outputs (100 - agreement %, or for outputs that
are not class scores, 100 * (1 - mean cosine similarity)).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from onnxprune.errors import InputError, OnnxPruneError
from onnxprune.evaluate.metrics import is_lm_digest, lm_digest, logits_name, metric_digest, perplexity, quality_metric
from onnxprune.graph.faults import Fault
from onnxprune.pipeline.apply import fault_for
from onnxprune.pipeline.budget import CostModel
from onnxprune.pipeline.plan import Plan, select
from onnxprune.pipeline.rewrite import apply_plan
from onnxprune.runtime.session import run_batches

DEFAULT_RATIOS = (0.25, 0.5, 0.75)


@dataclass
class SensitivityResult:
    ratios: list[float]
    metric: str                       # "accuracy" or "agreement" or "cosine"
    baseline: float                   # the unpruned model's metric (percent)
    rows: list[dict] = field(default_factory=list)  # one per prunable group
    data_source: str = ""
    faults: list[Fault] = field(default_factory=list)  # groups whose pruned model could not be measured


    def curves(self) -> dict[int, tuple[list[float], list[float]]]:
        """group root space -> (ratios, drops), as budget.removal_order takes them."""
        return {r["root"]: (self.ratios, r["drops"]) for r in self.rows}


def model_metric(outputs: list[dict], reference: list[dict] | None, labels: np.ndarray | None,
                 feeds: list[dict] | None = None) -> tuple[str, float]:
    """Top-1 accuracy (%) with labels; for a causal LM (next-token logits, input_ids in the feeds) its perplexity
    relative to the reference's, as 100 · ppl_reference / ppl (%, 100 = as good), so that drops in points work
    as for accuracy; else what evaluate.quality_metric says (agreement, or cosine on real tokens).

    Named "perplexity_kept": it is the perplexity *kept*, in percent (higher is better, as for every metric
    here); "perplexity" always means the absolute value (lower is better, evaluate.metrics.perplexity)."""
    if labels is None and feeds and outputs and reference and \
            (is_lm_digest(outputs) or logits_name(outputs[0], feeds[0]) is not None):
        ratio = perplexity(reference, feeds)["perplexity"] / perplexity(outputs, feeds)["perplexity"]
        return "perplexity_kept", 100.0 * ratio
    return quality_metric(outputs, reference, labels, feeds)


def single_group_plan(group, scores: np.ndarray, ratio: float) -> Plan:
    keep = max(1, group.size - int(np.floor(group.size * ratio)))
    root = group.spaces[0]
    plan = Plan(sizes={root: group.size})
    kept = select(group, scores, keep)
    if len(kept) < group.size:
        plan.kept[root] = kept
    return plan


def sensitivity(prep, dataset, scores: dict[int, np.ndarray], ratios: Sequence[float] = DEFAULT_RATIOS,
                use_labels: bool = True, progress=None) -> SensitivityResult:
    """Prune each prunable group alone at each ratio and measure the drop on `dataset`. A group whose pruned
    model cannot be built or run is left out of the rows, with a fault (the analysis is left as it was)."""
    ratios = sorted(float(r) for r in ratios)
    if not ratios or not all(0.0 < r < 1.0 for r in ratios):
        raise InputError(f"sensitivity ratios must be in (0, 1), got {', '.join(map(str, ratios))}")
    labels = dataset.labels if use_labels else None
    reduce = metric_digest(dataset) if use_labels else lm_digest
    reference = run_batches(prep.model, dataset.batches(), reduce=reduce)
    metric, baseline = model_metric(reference, reference, labels, dataset.feeds)
    result = SensitivityResult(list(ratios), metric, baseline, data_source=dataset.source)
    cost = CostModel(prep)
    for group in prep.analysis.prunable:
        root = group.spaces[0]
        drops, values, macs = [], [], []
        for ratio in ratios:
            plan = single_group_plan(group, scores[root], ratio)
            try:
                outputs = run_batches(apply_plan(prep.model, prep.view, prep.analysis, plan), dataset.batches(),
                                      reduce=reduce)
            except (MemoryError, KeyboardInterrupt, OnnxPruneError):
                raise
            except Exception as exc:  # noqa: BLE001 - contained: this group is left out (onnxprune.pipeline.apply)
                result.faults.append(fault_for(group, exc))
                break
            _, value = model_metric(outputs, reference, labels, dataset.feeds)
            values.append(value)
            drops.append(baseline - value)
            macs.append(cost.cost(plan, "macs"))
            if progress:
                progress()
        if len(values) < len(ratios):
            continue
        result.rows.append({"group": group.id, "root": root, "channels": group.size, "sources": group.sources,
                            "values": values, "drops": drops, "macs_kept": macs})
    return result


def plot_sensitivity(result: SensitivityResult, path) -> None:
    """A PNG: drop against ratio, one line per group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in result.rows:
        label = f"group {row['group']} ({row['channels']} ch, {row['sources'][0]})"
        ax.plot([0.0, *result.ratios], [0.0, *row["drops"]], marker="o", label=label[:60])
    ax.set_xlabel("fraction of the group's channels removed")
    unit = {"accuracy": "top-1 accuracy drop (points)", "agreement": "top-1 agreement drop (points)",
            "cosine": "cosine similarity drop (x100)",
            "perplexity_kept": "perplexity kept drop (points of 100 x ppl before / ppl after)"}[result.metric]
    ax.set_ylabel(unit)
    ax.set_title(f"sensitivity per group ({result.data_source})"[:90], fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
