"""Which channels each group keeps.

Uniform: every prunable group loses `ratio` of its channels. Global: channels of all groups are ranked
together by their (per-group normalised) scores and the lowest `ratio` of all channels go, so unimportant
groups lose more. Both keep at least one channel and, with `round_to`, a multiple of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from onnxprune.errors import InputError
from onnxprune.graph.analysis import Analysis


@dataclass
class Plan:
    kept: dict[int, np.ndarray] = field(default_factory=dict)  # group root space -> sorted kept channels
    sizes: dict[int, int] = field(default_factory=dict)        # group root space -> channels before

    def pruned(self, root: int) -> int:
        return self.sizes[root] - len(self.kept[root]) if root in self.kept else 0

    @property
    def total_pruned(self) -> int:
        return sum(self.pruned(r) for r in self.kept)


def _rounded_keep(size: int, keep: int, round_to: int) -> int:
    keep = max(1, min(size, keep))
    if round_to > 1 and size > round_to:
        keep = max(round_to, int(round(keep / round_to)) * round_to)
        keep = min(keep, size)
    return keep


def _top(scores: np.ndarray, keep: int) -> np.ndarray:
    order = np.argsort(-scores, kind="stable")
    return np.sort(order[:keep])


def select(group, scores: np.ndarray, keep: int) -> np.ndarray:
    """The `keep` best channels of a group, honouring grouped-convolution blocks and attention heads.

    With blocks, each block keeps round(keep / blocks) channels (at least one); tied blocks keep the same local
    indices, chosen by the block-summed scores. With a `unit` (heads of `unit` features), round(keep / unit)
    whole heads are kept (at least one), ranked by the sum of their features' scores; with blocks too (query heads
    of grouped-query attention, pruned inside their KV groups) every block keeps as many heads.
    """
    unit = getattr(group, "unit", 1)
    if unit > 1:
        heads = scores.reshape(group.size // unit, unit).sum(axis=1)
        blocks = max(group.blocks, 1)
        per_block = len(heads) // blocks
        n_heads = max(1, min(per_block, int(round(keep / unit / blocks))))
        kept_heads = np.concatenate([b * per_block + _top(heads[b * per_block:(b + 1) * per_block], n_heads)
                                     for b in range(blocks)])
        return (kept_heads[:, None] * unit + np.arange(unit)[None, :]).ravel()
    if group.blocks <= 1:
        return _top(scores, keep)
    per_block_size = group.size // group.blocks
    per_block = max(1, min(per_block_size, int(round(keep / group.blocks))))
    blocks = scores.reshape(group.blocks, per_block_size)
    if group.tied:
        local = _top(blocks.sum(axis=0), per_block)
        return (np.arange(group.blocks)[:, None] * per_block_size + local[None, :]).ravel()
    return np.concatenate([b * per_block_size + _top(blocks[b], per_block) for b in range(group.blocks)])


def check_ratio(ratio: float, option: str = "--ratio") -> None:
    if not 0.0 <= ratio < 1.0:
        raise InputError(f"{option} must be in [0, 1), got {ratio}")


def _uniform_keep(group, ratio: float, round_to: int) -> int:
    """Channels a group keeps when it loses `ratio` of them (rounded down); attention heads count whole heads."""
    if group.unit > 1:
        heads = group.size // group.unit // group.blocks  # per block: query heads inside each KV group
        removed = int(math.floor(heads * ratio))
        return max(1, heads - removed) * group.unit * group.blocks
    return _rounded_keep(group.size, group.size - int(math.floor(group.size * ratio)), round_to)


def _coarse_head_keeps(groups, scores: dict[int, np.ndarray], ratio: float) -> dict[int, int]:
    """Channels kept by the query-head groups that gqa_mode auto chose, where one step is one head in every
    KV group (a third of the heads when 3 query heads share each KV head, as in SmolLM2).

    Rounding each layer's share down would remove no head below that step, and rounding it up would remove
    the step from every layer. Instead the steps are shared out over the layers so that together they lose
    `ratio` of their heads (to the nearest step), each step going to the layer where it removes the smallest
    part of the layer's head scores."""
    keeps, costs = {}, []
    total_heads, removed_heads = 0, 0
    for group in groups:
        blocks, unit = max(group.blocks, 1), group.unit
        per_block = group.size // unit // blocks
        removed = int(math.floor(per_block * ratio))
        keeps[group.spaces[0]] = removed
        total_heads += per_block * blocks
        removed_heads += removed * blocks
        heads = np.asarray(scores[group.spaces[0]], dtype=np.float64).reshape(blocks, per_block, unit).sum(axis=2)
        for step in range(removed, per_block - 1):  # the cost of each further step, cumulative per layer
            weakest = np.sort(heads, axis=1)[:, : step + 1].sum()
            costs.append((weakest / max(heads.sum(), 1e-30), step, group.spaces[0], blocks))
    target = ratio * total_heads
    for cost, step, root, blocks in sorted(costs):
        if removed_heads + blocks / 2 > target:
            break
        if keeps[root] == step:  # steps of one layer go in order
            keeps[root] = step + 1
            removed_heads += blocks
    out = {}
    for group in groups:
        blocks = max(group.blocks, 1)
        per_block = group.size // group.unit // blocks
        out[group.spaces[0]] = max(1, per_block - keeps[group.spaces[0]]) * group.unit * blocks
    return out


def _is_coarse_auto(group) -> bool:
    return group.unit > 1 and getattr(group, "gqa_auto", False) and group.gqa_mode == "query-heads"


def _keep(plan: Plan, group, scores: np.ndarray, keep: int) -> None:
    root = group.spaces[0]
    plan.sizes[root] = group.size
    kept = select(group, scores, keep)
    if len(kept) < group.size:
        plan.kept[root] = kept


def plan_uniform(analysis: Analysis, scores: dict[int, np.ndarray], ratio: float, round_to: int = 1,
                 head_ratio: float | None = None) -> Plan:
    """Every group loses `ratio` of its channels; attention-head groups lose `head_ratio` of their heads
    (default: `ratio`)."""
    check_ratio(ratio)
    plan = Plan()
    coarse = [g for g in analysis.prunable if _is_coarse_auto(g)]
    shared = _coarse_head_keeps(coarse, scores, head_ratio if head_ratio is not None else ratio) if coarse else {}
    for group in analysis.prunable:
        r = head_ratio if head_ratio is not None and group.unit > 1 else ratio
        keep = shared.get(group.spaces[0])
        _keep(plan, group, scores[group.spaces[0]], keep if keep is not None else _uniform_keep(group, r, round_to))
    return plan


def plan_global(analysis: Analysis, scores: dict[int, np.ndarray], ratio: float, round_to: int = 1,
                max_group_ratio: float = 0.9, head_ratio: float | None = None) -> Plan:
    """Rank all channels together; no group loses more than `max_group_ratio` of its channels. With
    `head_ratio`, attention-head groups are left out of the ranking and lose that share of their heads."""
    check_ratio(ratio)
    groups = analysis.prunable
    plan = Plan()
    if head_ratio is not None:
        for group in (g for g in groups if g.unit > 1):
            _keep(plan, group, scores[group.spaces[0]], _uniform_keep(group, head_ratio, round_to))
        groups = [g for g in groups if g.unit == 1]
    if not groups or ratio == 0:
        return plan
    all_scores = np.concatenate([scores[g.spaces[0]] / max(scores[g.spaces[0]].max(), 1e-12) for g in groups])
    n_prune = int(math.floor(len(all_scores) * ratio))
    threshold = np.sort(all_scores)[n_prune - 1] if n_prune else -np.inf
    for group in groups:
        root = group.spaces[0]
        normed = scores[root] / max(scores[root].max(), 1e-12)
        floor_keep = group.size - int(math.floor(group.size * max_group_ratio))
        _keep(plan, group, scores[root],
              _rounded_keep(group.size, max(floor_keep, int((normed > threshold).sum())), round_to))
    return plan


def plan_removal(analysis: Analysis, removed: dict[int, np.ndarray]) -> Plan:
    """A plan that removes exactly the given channels (used by the zero-channel oracle and by tests)."""
    plan = Plan()
    by_root = {g.spaces[0]: g for g in analysis.groups}
    for root, channels in removed.items():
        group = by_root[root]
        if not group.prunable:
            raise InputError(f"group {group.id} is frozen: {group.reason}")
        keep = np.setdiff1d(np.arange(group.size), np.asarray(channels, dtype=np.int64))
        if len(keep) == 0:
            raise InputError(f"group {group.id} would lose all its channels")
        plan.sizes[root] = group.size
        plan.kept[root] = keep
    return plan
