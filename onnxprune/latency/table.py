"""The latency table: per channel group, the measured latency of the whole model with that group alone
pruned to a few channel counts, on one provider, batch and thread count; cached on disk.

Why whole-model probes rather than isolated subgraphs: the time a channel costs depends on what onnxruntime
makes of the graph around it (Conv+BN+ReLU fusion, NCHWc layout reorders on x86, MatMul prepacking, attention
fusions), and a one-layer model timed alone sees none of that. Pruning one group with the same rewrite the
final prune uses (pipeline/apply.py) and timing the model end to end measures exactly what the user will run.
The cost is affordable because it is small: 3 counts per group (at multiples of 8/16 on wide groups, whole
heads on attention groups), each timed as a ratio to the unpruned model in interleaved rounds (latency/
measure.py), so a busy machine's drift cancels; a table is built once per model, provider, batch and threads
and read from the cache afterwards (a sweep's candidates share it).

The table predicts a plan's latency multiplicatively, t(plan) = t0 * prod_g r_g(k_g): a layer whose input and
output channels belong to two groups costs in proportion to both counts, which a sum of savings would count
twice (halving both would save all its time). Between measured counts, r is interpolated linearly.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx

from onnxprune.latency import measure
from onnxprune.latency.measure import LatencySettings
from onnxprune.pipeline.apply import apply_validated
from onnxprune.pipeline.budget import CostModel
from onnxprune.pipeline.plan import Plan, select
from onnxprune.report import progress

VERSION = 2  # 2: a Slice whose computed bounds keep their values is no longer pinned to constants
FRACTIONS = (0.75, 0.5, 0.25)  # kept fractions probed per group


@dataclass
class GroupCurve:
    """Whole-model latency (as a ratio to the unpruned model) with one group kept at each of `counts`."""

    root: int
    group: int                 # the group's id, for tables
    size: int
    counts: list[int] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)   # measured latency ratio at each count
    macs: list[float] = field(default_factory=list)     # kept fraction of MACs at each count
    reason: str = ""           # why the group has no curve (its rewrite failed)

    def ratio_at(self, count: int) -> float:
        """Latency ratio with `count` channels kept, interpolated between measured counts (1.0 at full size)."""
        if count >= self.size or not self.counts:
            return 1.0
        xs = [*self.counts, self.size]
        ys = [*self.ratios, 1.0]
        order = np.argsort(xs)
        return float(np.interp(count, np.asarray(xs)[order], np.asarray(ys)[order]))


@dataclass
class LatencyTable:
    base_ms: float             # the unpruned model, min of round medians
    noise: float               # typical relative spread of a measured ratio
    provider: str
    batch: int
    threads: int
    curves: dict[int, GroupCurve]
    key: str = ""
    cached: bool = False       # read from the cache (nothing was timed)
    seconds: float = 0.0       # time spent building it

    def predict(self, kept: dict[int, int]) -> float:
        """Predicted latency ratio of a plan keeping kept[root] channels per group (others whole)."""
        return float(math.prod(self.curves[r].ratio_at(k) for r, k in kept.items() if r in self.curves))

    def resolved(self) -> LatencyTable:
        """The table as plans use it: a probe whose measured ratio is within twice the table's spread of 1 is
        taken at its MAC fraction instead. One group pruned alone moves a model of many small groups (YOLOv8n's
        59, EfficientNet's squeeze-excitation widths) by less than the measurement can resolve; added up over
        dozens of groups, such noise would predict a speed-up that is not there, or hide one that is. MACs are
        the prior where the clock cannot tell; the closed loop measures what they add up to."""
        floor = 2 * self.noise
        curves = {}
        for root, c in self.curves.items():
            macs = c.macs if len(c.macs) == len(c.ratios) else [1.0] * len(c.ratios)
            ratios = [min(m, 1.0) if abs(1.0 - r) <= floor else r for r, m in zip(c.ratios, macs)]
            curves[root] = GroupCurve(c.root, c.group, c.size, list(c.counts), ratios, list(c.macs), c.reason)
        return LatencyTable(self.base_ms, self.noise, self.provider, self.batch, self.threads, curves, self.key,
                            self.cached, self.seconds)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["curves"] = {str(r): asdict(c) for r, c in self.curves.items()}
        return out

    @classmethod
    def from_dict(cls, data: dict) -> LatencyTable:
        curves = {int(r): GroupCurve(**c) for r, c in data["curves"].items()}
        return cls(**{**data, "curves": curves})


def probe_counts(group, fractions=FRACTIONS, max_group_ratio: float = 0.9) -> list[int]:
    """Kept channel counts to measure: `fractions` of the group, at multiples the hardware likes (16 from 128
    channels, 8 from 32), whole heads for attention groups, whole blocks for grouped convolutions, never below
    what `max_group_ratio` leaves. Counts as `select` would keep them."""
    size = group.size
    step, align = _granularity(group)
    floor_keep = max(1, size - math.floor(size * max_group_ratio))
    counts = set()
    for f in fractions:
        k = round(size * f / align) * align
        k = max(k, math.ceil(floor_keep / align) * align, step)
        if k < size:
            counts.add(k)
    dummy = np.arange(size, 0, -1, dtype=np.float64)
    return sorted({len(select(group, dummy, k)) for k in counts} - {size})


def between_counts(group, counts: list[int], per_gap: int = 8) -> list[int]:
    """Kept counts strictly between the measured ones (and between the largest and the whole group), at the
    multiples `probe_counts` aligns to, at most `per_gap` per gap (evenly spread): counts the allocation may
    refine a plan to, their latency interpolated (allocate.refine_options). Counts as `select` keeps them."""
    if not counts:
        return []
    size = group.size
    _, align = _granularity(group)
    edges = sorted({*counts, size})
    dummy = np.arange(size, 0, -1, dtype=np.float64)
    out: set[int] = set()
    for lo, hi in zip(edges, edges[1:]):
        inside = list(range((lo // align + 1) * align, hi, align))
        if len(inside) > per_gap:
            inside = [inside[i] for i in np.linspace(0, len(inside) - 1, per_gap).round().astype(int)]
        out.update(len(select(group, dummy, k)) for k in inside)
    return sorted(k for k in out if edges[0] < k < size and k not in counts)


def _granularity(group) -> tuple[int, int]:
    """(step, align): the channels a count moves by (a head, a block of a grouped convolution), and the
    multiple counts are probed at (16 from 128 channels, 8 from 32, for groups of single channels)."""
    size = group.size
    step = group.unit * max(group.blocks, 1) if group.unit > 1 else max(group.blocks, 1)
    align = step * (16 if size >= 128 else 8 if size >= 32 else 1) if step == 1 else step
    return step, align


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """--latency-cache, else $ONNXPRUNE_LATENCY_CACHE, else ~/.cache/onnxprune/latency (XDG_CACHE_HOME)."""
    if path:
        return Path(path)
    if os.environ.get("ONNXPRUNE_LATENCY_CACHE"):
        return Path(os.environ["ONNXPRUNE_LATENCY_CACHE"])
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "onnxprune" / "latency"


def table_key(prep, feed: dict[str, np.ndarray], settings: LatencySettings) -> str:
    """The model (its bytes), the groups, the feed's shapes, provider, batch, threads and onnxruntime version."""
    import onnxruntime

    h = hashlib.sha256(prep.model.SerializeToString())
    groups = [(g.spaces[0], g.size, g.unit, g.blocks) for g in prep.analysis.prunable]
    shapes = {k: list(np.shape(v)) for k, v in sorted(feed.items())}
    h.update(json.dumps([VERSION, groups, shapes, settings.provider, settings.batch, settings.threads,
                         onnxruntime.__version__], sort_keys=True).encode())
    return h.hexdigest()


def build_table(prep, model: onnx.ModelProto, feed: dict[str, np.ndarray], settings: LatencySettings,
                cache: str | os.PathLike | None = None, show_progress: bool = False) -> LatencyTable:
    """The latency table of `prep`'s prunable groups: read from the cache when this model, feed shape,
    provider, batch and threads were measured before, else measured (and written to the cache)."""
    import time

    settings.check()
    key = table_key(prep, feed, settings)
    folder = cache_dir(cache)
    path = folder / f"{key[:32]}.json"
    if path.is_file():
        try:
            table = LatencyTable.from_dict(json.loads(path.read_text()))
            if table.key == key:
                table.cached = True
                return table
        except (ValueError, TypeError, KeyError):
            pass  # a damaged or older cache file is measured again and replaced
    start = time.perf_counter()
    cost = CostModel(prep)
    curves: dict[int, GroupCurve] = {}
    base: list[float] = []
    noise: list[float] = []
    groups = prep.analysis.prunable
    with progress("latency table", len(groups), enabled=show_progress) as advance:
        for group in groups:
            root = group.spaces[0]
            curve = GroupCurve(root, group.id, group.size)
            curves[root] = curve
            models = {"original": prep.model}
            plans = {}
            dummy = np.arange(group.size, 0, -1, dtype=np.float64)  # which channels does not matter for time
            for k in probe_counts(group):
                plan = Plan({root: select(group, dummy, k)}, {root: group.size})
                try:
                    done = apply_validated(prep, plan, model, None, check=False)
                    pruned, applied = done.model, done.plan
                except Exception as exc:  # noqa: BLE001 - a group whose rewrite fails has no curve
                    curve.reason = f"rewrite failed: {str(exc).splitlines()[0][:200]}"
                    break
                if root not in applied.kept:
                    curve.reason = group.reason or "rewrite fault"
                    break
                models[str(k)] = pruned
                plans[k] = plan
            if curve.reason or not plans:
                advance(1)
                continue
            timed = measure.time_models(models, feed, settings, reference="original")
            base.append(timed["ms"]["original"])
            for k, plan in plans.items():
                curve.counts.append(k)
                curve.ratios.append(timed["ratio"][str(k)])
                curve.macs.append(cost.cost(plan, "macs"))
                noise.append(timed["noise"][str(k)])
            advance(1)
    if not base:  # nothing prunable: the model alone
        base.append(measure.time_models({"original": prep.model}, feed, settings)["ms"]["original"])
    table = LatencyTable(float(min(base)), float(np.median(noise)) if noise else 0.0, settings.provider,
                         settings.batch, settings.threads, curves, key, False, time.perf_counter() - start)
    _write(path, table)
    return table


def _write(path: Path, table: LatencyTable) -> None:
    """Atomically: a half-written cache file would be read as damaged and measured again, never trusted."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".table.", suffix=".json", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(table.to_dict(), f)
        os.replace(tmp, path)
    except OSError:
        pass  # an unwritable cache folder costs a re-measurement next time, not the prune
