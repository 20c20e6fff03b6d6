"""The pruning pipeline: normalize → analyze → score → plan → rewrite → validate."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxprune.graph.analysis import Analysis, analyze_graph
from onnxprune.graph.ir import GraphView
from onnxprune.graph.normalize import normalize
from onnxprune.model_io import check_supported
from onnxprune.planning import Plan, check_ratio, plan_global, plan_removal, plan_uniform
from onnxprune.rewrite import apply_plan
from onnxprune.scoring import score_groups
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

    def group_rows(self) -> list[dict]:
        rows = []
        for g in self.analysis.groups:
            root = g.spaces[0]
            kept = len(self.plan.kept[root]) if root in self.plan.kept else g.size
            rows.append({"group": g.id, "channels": g.size, "kept": kept, "prunable": g.prunable,
                         "reason": g.reason, "sources": g.sources, "members": len(g.members)})
        return rows


def prepare(model: onnx.ModelProto, exclude: tuple[str, ...] = ()) -> Prepared:
    check_supported(model)
    normalized = normalize(model)
    view = GraphView(normalized)
    return Prepared(normalized, view, analyze_graph(view, tuple(exclude)))


def prune_model(model: onnx.ModelProto, ratio: float = 0.5, criterion: str = "l1", global_ranking: bool = False,
                round_to: int = 1, exclude: tuple[str, ...] = (), seed: int = 0, validate_result: bool = True,
                removed: dict[int, np.ndarray] | None = None, prepared: Prepared | None = None,
                scores: dict[int, np.ndarray] | None = None) -> PruneResult:
    """Prune `model`; `removed` (group root space -> channels) overrides scoring and planning."""
    check_ratio(ratio)
    prep = prepared or prepare(model, exclude)
    if removed is not None:
        plan = plan_removal(prep.analysis, removed)
    else:
        scores = scores if scores is not None else score_groups(prep.analysis, prep.view, criterion, seed)
        planner = plan_global if global_ranking else plan_uniform
        plan = planner(prep.analysis, scores, ratio, round_to)
    pruned = apply_plan(prep.model, prep.view, prep.analysis, plan)
    if validate_result:
        validate(pruned, model)
    stats = {
        "params_before": count_params(model), "params_after": count_params(pruned),
        "macs_before": count_macs(prep.model, prep.view), "macs_after": count_macs(pruned),
        "bytes_before": model.ByteSize(), "bytes_after": pruned.ByteSize(),
        "groups": len(prep.analysis.groups), "groups_prunable": len(prep.analysis.prunable),
        "groups_pruned": len(plan.kept), "channels_removed": plan.total_pruned,
    }
    return PruneResult(pruned, prep.analysis, plan, stats)
