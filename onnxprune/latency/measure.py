"""How latency is measured: the settings, the feed, and the one timing function the latency package uses.

Timing reuses `evaluate.latency.measure_latency` (sessions from `runtime.session.open_session`, so an execution provider that
is not installed is a one-line InputError before any work). Robustness on a busy machine comes from the
design, not from long runs:
  * models compared with each other are timed in interleaved rounds (A B C, then C B A, ...), so drift in the
    machine's speed weighs on each alike;
  * each round gives a median per model, and a model's time is the minimum of its round medians (the least
    disturbed round);
  * comparisons are made as ratios to a reference timed in the same rounds, and the ratio's spread over the
    rounds gives the measurement noise the closed loop allows for;
  * a round spends about `seconds` on each model, but at least one run, and only models under a third of that
    get a warm-up run first (a longer run warms its own caches); when the ratios are still noisier than
    `noise_goal` after `rounds` rounds, rounds are added up to `max_rounds`. Before, every round ran each model
    at least 5 times (a checked run, a warm-up and 3 timed runs), so a latency table of a model that runs
    0.5-2 s at a serving batch (YOLOv8n, ViT-B/16 at batch 8) took 1.5 hours on one thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from onnxprune.errors import InputError
from onnxprune.runtime.session import check_providers, open_session
from onnxprune.evaluate.latency import measure_latency
from onnxprune.recipe import latency_ms
from onnxprune.runtime.feeds import graph_inputs, validation_feed


@dataclass(frozen=True)
class LatencySettings:
    """Where and how latency is measured: the provider, batch and threads are recipe fields (the plan depends
    on them); the rounds and the time spent per measurement are fixed here."""

    provider: str = "cpu"
    batch: int = 1
    threads: int = 1
    rounds: int = 5           # interleaved rounds per comparison (at least)
    seconds: float = 0.03     # time per model per round (runs = seconds / latency, 1..50 runs)
    seed: int = 0
    max_rounds: int = 9       # rounds are added while a ratio's noise exceeds noise_goal, up to this many
    noise_goal: float = 0.01

    def check(self) -> None:
        """A provider this onnxruntime lacks is an InputError (one line, with an install hint)."""
        check_providers([self.provider])


def parse_target(value: float | str, base_ms: float) -> float:
    """A latency target as a fraction of `base_ms`: 0.5 keeps half the time, '12ms' is absolute."""
    if isinstance(value, str):
        ms = latency_ms(value)
        if ms is None:
            raise InputError(f"--target-latency takes a fraction (0.5) or milliseconds (12ms), got {value!r}")
        return ms / base_ms
    return float(value)


def latency_feed(model: onnx.ModelProto, batch: int, input_shapes: dict | None = None,
                 feeds: list[dict] | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """The validation feed (calibration data's shapes, else --input-shapes, else guessed) at batch `batch`:
    inputs with a dynamic first dim are cut or their samples repeated."""
    feed = validation_feed(model, input_shapes, feeds, seed)
    dynamic = {i.name for i in graph_inputs(model) if i.dims and i.dims[0] is None}
    out = {}
    for name, array in feed.items():
        array = np.asarray(array)
        if name in dynamic and array.ndim and array.shape[0] not in (0, batch):
            reps = -(-batch // array.shape[0])
            array = np.concatenate([array] * reps, axis=0)[:batch]
        out[name] = array
    return out


def fit_feed(session, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`feed` with each input's static dims made the session's: a decoder whose key/value heads were pruned
    reads a smaller cache. Unlike kvcache.feed_adapter (which keeps the values, so only reshapes an empty
    past), a non-empty past becomes zeros of the new shape too: timing does not depend on the values."""
    out = dict(feed)
    for inp in session.get_inputs():
        if inp.name not in feed:
            continue
        array = np.asarray(feed[inp.name])
        shape = tuple(d if isinstance(d, int) and d > 0 else s for d, s in zip(inp.shape, array.shape))
        if len(inp.shape) == array.ndim and shape != array.shape:
            out[inp.name] = np.zeros(shape, dtype=array.dtype)
    return out


def time_models(models: dict[str, Any], feed: dict[str, np.ndarray], settings: LatencySettings,
                reference: str | None = None) -> dict[str, Any]:
    """Milliseconds per run of each model (min of the round medians), timed in interleaved rounds.

    With `reference` (a key of `models`), also each model's time as a ratio to the reference's (the median of
    the per-round ratios) and its `noise` (the relative standard error of that median). Models may be
    ModelProtos or paths; sessions use `settings.threads` intra-op threads.
    """
    sessions = {k: open_session(m, settings.provider, settings.threads) for k, m in models.items()}
    feeds = {k: fit_feed(session, feed) for k, session in sessions.items()}
    keys = list(sessions)
    medians: dict[str, list[float]] = {k: [] for k in keys}
    runs: dict[str, int] = {}
    for k in keys:  # a first call checks the feed, warms the session up and sizes the runs
        first = measure_latency(sessions[k], feeds[k], warmup=0, runs=1)["results"][0]["p50_ms"]
        runs[k] = round_runs(first, settings.seconds)
    rounds = 0
    while True:
        for k in keys if rounds % 2 == 0 else keys[::-1]:
            warmup = 1 if runs[k] >= 3 else 0  # a model too slow for 3 runs in a round warms its own caches
            row = measure_latency(sessions[k], feeds[k], warmup=warmup, runs=runs[k], check=False)["results"][0]
            medians[k].append(row["p50_ms"])
        rounds += 1
        if rounds < settings.rounds:
            continue
        ratios, noise = _ratios(medians, reference) if reference is not None else ({}, {})
        if rounds >= settings.max_rounds or max(noise.values(), default=0.0) <= settings.noise_goal:
            break
    out: dict[str, Any] = {"ms": {k: float(min(v)) for k, v in medians.items()}, "rounds": medians}
    if reference is not None:
        out["ratio"], out["noise"] = ratios, noise
    return out


def round_runs(first_ms: float, seconds: float) -> int:
    """Timed runs per model per round: about `seconds` of them, 1 to 50."""
    return int(min(50, max(1, seconds * 1e3 / max(first_ms, 1e-3))))


def _ratios(medians: dict[str, list[float]], reference: str) -> tuple[dict[str, float], dict[str, float]]:
    """Each model's time as a ratio to the reference's (the median of the per-round ratios) and its noise: the
    standard error of that median, from the rounds' median absolute deviation (one disturbed round does not
    inflate it), relative to the ratio."""
    ref = np.asarray(medians[reference])
    ratios, noise = {}, {}
    for k, values in medians.items():
        per_round = np.asarray(values) / ref
        ratios[k] = float(np.median(per_round))
        mad = float(np.median(np.abs(per_round - ratios[k])))
        noise[k] = float(1.4826 * mad / np.sqrt(len(per_round)) / max(ratios[k], 1e-12))
    return ratios, noise
