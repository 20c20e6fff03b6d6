"""Latency on onnxruntime execution providers: warmed-up, timed runs per provider and batch size.

Several models are timed in ABBA segments so that drift in the machine's speed weighs on each alike; on CUDA and
TensorRT a second row times I/O binding with inputs and outputs resident on the device.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from onnxprune.errors import InputError, first_line, require_onnxruntime
from onnxprune.evaluate.data import Dataset
from onnxprune.report import no_progress, progress
from onnxprune.runtime.session import ModelLike, open_session

# Providers whose memory is not the host's: timed a second way, with inputs and outputs bound on the device.
# Providers whose memory is not the host's: timed a second way, with inputs and outputs bound on the device.
_DEVICE_OF = {"CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "cuda"}


def measure_latency(model_or_path: ModelLike, dataset_or_feed: Dataset | dict[str, np.ndarray],
                    providers: Sequence[str] = ("cpu",), warmup: int = 10, runs: int = 100,
                    duration: float | None = None, threads: int | None = None, opt_level: str = "all", *,
                    batch_sizes: Sequence[int] | None = None, show_progress: bool = False,
                    check: bool = True) -> dict:
    """Time `session.run` on the first batch: `warmup` untimed runs, then `runs` timed ones (or as fit
    in `duration` seconds), per provider and per batch size (the batch is cut or its samples repeated).
    `check=False` skips the one untimed run that turns a batch the model refuses into an InputError (for a
    session and feed already checked: repeated calls on a slow model would pay a run each).

    On CUDA/TensorRT a second row times I/O binding with inputs and outputs resident on the device and a
    synchronisation after each run, so host copies are not counted; the plain row includes them.
    """
    rows = []
    for provider in providers:
        session = open_session(model_or_path, provider, threads, opt_level)
        rows += time_models({"model": session}, dataset_or_feed, batch_sizes, warmup, runs, duration,
                             show_progress, check)["model"]
    return {"warmup": warmup, "runs": None if duration else runs, "duration_s": duration, "threads": threads,
            "opt_level": opt_level, "results": rows}


def time_models(sessions: dict[str, Any], dataset_or_feed: Dataset | dict[str, np.ndarray],
                 batch_sizes: Sequence[int] | None, warmup: int, runs: int, duration: float | None,
                 show_progress: bool, check: bool = True) -> dict[str, list[dict]]:
    """Latency rows per model. Several models are timed in ABBA segments (A B B A), so that drift in the
    machine's speed during the measurement (other load, clock frequency) weighs on each model alike."""
    feed = next(dataset_or_feed.batches()) if isinstance(dataset_or_feed, Dataset) else dataset_or_feed
    roles = list(sessions)
    segments = roles + roles[::-1] if len(roles) > 1 else roles
    per_role = len(segments) // len(roles)
    rows: dict[str, list[dict]] = {role: [] for role in roles}
    for size in batch_sizes or [_batch_len(feed)]:
        calls = {role: _timed_calls(session, _resize_batch(feed, size)) for role, session in sessions.items()}
        for i, (mode, _) in enumerate(calls[roles[0]]):
            used = sessions[roles[0]].get_providers()
            label = f"latency {used[0].replace('ExecutionProvider', '')} batch {size} {mode}"
            times: dict[str, list[np.ndarray]] = {role: [] for role in roles}
            with progress(label, None if duration else runs * len(roles), enabled=show_progress) as advance:
                for role in roles:
                    try:  # one checked run first: a batch size the model does not accept is an input error
                        if check:
                            calls[role][i][1]()
                    except Exception as exc:
                        raise InputError(f"onnxruntime failed to run {role} at batch size {size} ({mode}): "
                                         f"{first_line(exc)}") from None
                    _timed(calls[role][i][1], warmup, 0, None, advance)
                for k, role in enumerate(segments):
                    first = k < len(roles)  # the first of a role's segments takes the remainder
                    n = runs // per_role + (runs % per_role if first else 0)
                    times[role].append(_timed(calls[role][i][1], 0, n, duration and duration / per_role, advance))
            for role in roles:
                rows[role].append({"provider": used[0], "providers_used": sessions[role].get_providers(),
                                   "batch_size": size, "mode": mode, **_stats(np.concatenate(times[role]), size)})
    return rows


def _timed_calls(session, feed: dict[str, np.ndarray]) -> list[tuple[str, Callable[[], Any]]]:
    """(mode, zero-argument call) pairs to time: session.run, and on a device provider I/O binding too."""
    provider = session.get_providers()[0]
    # functools.partial is a C-level call: less overhead per run than a lambda
    calls = [("run" + (" (host copies)" if provider in _DEVICE_OF else ""), functools.partial(session.run, None, feed))]
    if provider in _DEVICE_OF:
        calls.append(("I/O binding (on device)", _device_resident_call(session, feed, _DEVICE_OF[provider])))
    return calls


def _timed(call: Callable[[], Any], warmup: int, runs: int, duration: float | None,
           advance: Callable[[int], None]) -> np.ndarray:
    """Seconds per call, for `runs` calls or for as fit in `duration` seconds.

    Runs go back to back in chunks; the clock is read once between two runs (one read per run instead of
    two halves the timing overhead, which shows next to a 50 us model) and a run's latency is the difference
    of successive reads. The progress bar advances between chunks, outside every timed interval.
    """
    for _ in range(warmup):
        call()
    clock = time.perf_counter
    chunks: list[list[float]] = []
    # by count: one chunk, or ~50 for a progress bar; by duration: chunks of ~0.1 s, so a slow model
    # does not overrun much
    chunk = (runs if advance is no_progress else max(1, runs // 50)) if duration is None else 1
    done, end = 0, (clock() + duration) if duration is not None else None
    while (done < runs) if duration is None else (not chunks or clock() < end):
        n = min(chunk, runs - done) if duration is None else chunk
        stamps = [clock()]
        append = stamps.append
        for _ in range(n):
            call()
            append(clock())
        chunks.append(stamps)
        done += n
        advance(n)
        if duration is not None:
            chunk = max(1, min(1024, int(0.1 * n / max(stamps[-1] - stamps[0], 1e-9))))
    if len(chunks) == 1:
        return np.diff(chunks[0])
    # plain Python: np.diff per chunk costs ~6 us a call, which adds up next to a 50 us model
    return np.array([b - a for stamps in chunks for a, b in zip(stamps, stamps[1:])])


def _device_resident_call(session, feed: dict[str, np.ndarray], device: str) -> Callable[[], None]:
    """One run with inputs already on the device and outputs left there, waiting for the device to finish."""
    ort = require_onnxruntime()
    binding = session.io_binding()
    # the host->device copies happen here, once, outside the timed region; keep the OrtValues alive
    resident = {name: ort.OrtValue.ortvalue_from_numpy(array, device, 0) for name, array in feed.items()}
    for name, value in resident.items():
        binding.bind_ortvalue_input(name, value)
    for output in session.get_outputs():
        binding.bind_output(output.name, device, 0)
    binding.synchronize_inputs()

    def call() -> None:
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()  # kernels run asynchronously: without this the clock stops too early

    # the call keeps the device buffers alive; the binding is exposed so its outputs can be read back
    call.resident, call.binding = resident, binding  # type: ignore[attr-defined]
    return call


def _stats(times: np.ndarray, batch_size: int) -> dict:
    ms = np.sort(times * 1e3)
    # percentiles by linear interpolation between order statistics (np.percentile's default), computed
    # directly: np.percentile costs ~0.4 ms a call, which shows next to a 50 us model timed 100 times
    position = np.array([50, 90, 95, 99]) / 100 * (len(ms) - 1)
    low = np.floor(position).astype(int)
    high = np.minimum(low + 1, len(ms) - 1)
    p50, p90, p95, p99 = ms[low] + (ms[high] - ms[low]) * (position - low)
    mean = float(ms.mean())
    return {"runs": int(len(ms)), "p50_ms": float(p50), "p90_ms": float(p90), "p95_ms": float(p95),
            "p99_ms": float(p99), "mean_ms": mean, "throughput_per_s": batch_size * 1e3 / mean if mean else None}


def _batch_len(feed: dict[str, np.ndarray]) -> int:
    return next((a.shape[0] for a in feed.values() if a.ndim), 1)


def _resize_batch(feed: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """The feed with `size` samples: the first ones, or all of them repeated in order."""
    if size < 1:
        raise InputError(f"batch size must be at least 1, got {size}")
    if size == _batch_len(feed):
        return feed
    return {k: (np.ascontiguousarray(np.resize(v, (size, *v.shape[1:]))) if v.ndim else v) for k, v in feed.items()}

