"""Accuracy, fidelity to a reference model, and latency on onnxruntime execution providers.

Everything here returns plain dicts (JSON-ready once passed through `report.to_jsonable`); `eval` prints them.
A model argument may be a path, an `onnx.ModelProto`, serialized bytes or an existing
`onnxruntime.InferenceSession` (so one session serves both the outputs and the timing).
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import onnx

from onnxprune.evaluate.data import Dataset
from onnxprune.errors import InputError, require_onnxruntime
from onnxprune.report import environment, no_progress, progress
from onnxprune.io.weights import session_source

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "dml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
}
_INSTALL_HINTS = {
    "CUDAExecutionProvider": "pip uninstall onnxruntime && pip install 'onnxprune[gpu]' (and a matching CUDA/cuDNN)",
    "TensorrtExecutionProvider": "pip uninstall onnxruntime && pip install 'onnxprune[gpu]' (and TensorRT)",
}
# Providers whose memory is not the host's: timed a second way, with inputs and outputs bound on the device.
_DEVICE_OF = {"CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "cuda"}
OPT_LEVELS = ("disable", "basic", "extended", "all")
METRICS = ("auto", "accuracy", "perplexity")
ModelLike = Any  # str | os.PathLike | onnx.ModelProto | bytes | onnxruntime.InferenceSession


def provider_name(provider: str) -> str:
    """'cpu' / 'cuda' / ... or a full onnxruntime name -> the full name; unknown names are an InputError."""
    if provider in PROVIDERS.values():
        return provider
    name = PROVIDERS.get(provider.strip().lower())
    if name is None:
        raise InputError(f"unknown execution provider {provider!r} (known: {', '.join(PROVIDERS)})")
    return name


def check_providers(providers: Iterable[str]) -> list[str]:
    """Full names of `providers`, each available in this onnxruntime build, else an InputError with a hint."""
    ort = require_onnxruntime()
    available = ort.get_available_providers()
    names = [provider_name(p) for p in providers]
    for name in names:
        if name not in available:
            hint = _INSTALL_HINTS.get(name, "install an onnxruntime build that includes it")
            raise InputError(f"{name} is not available in this onnxruntime (available: {', '.join(available)}); "
                             f"hint: {hint}")
    if not names:
        raise InputError("no execution provider given")
    return names


def make_session(model: ModelLike, provider: str = "cpu", threads: int | None = None, opt_level: str = "all"):
    """An InferenceSession on exactly `provider` (CPU as fallback for ops the provider lacks, as onnxruntime does).

    A session that starts on anything else than the requested provider (onnxruntime silently falls back when
    e.g. the CUDA libraries are missing) is an InputError, so a GPU run can never quietly be a CPU run.
    """
    ort = require_onnxruntime()
    if isinstance(model, ort.InferenceSession):
        return model
    name = check_providers([provider])[0]
    if opt_level not in OPT_LEVELS:
        raise InputError(f"unknown graph optimization level {opt_level!r} (choose from {', '.join(OPT_LEVELS)})")
    options = ort.SessionOptions()
    options.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[opt_level]
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3  # onnxruntime's warnings (unused initializers ...) would break the table
    source = session_source(model, options) if isinstance(model, onnx.ModelProto) else model
    source = os.fspath(source) if isinstance(source, os.PathLike) else source
    chain = [name] if name == "CPUExecutionProvider" else [name, "CPUExecutionProvider"]
    try:
        session = ort.InferenceSession(source, options, providers=chain)
    except Exception as exc:  # onnxruntime raises its own exception types for invalid models
        raise InputError(f"onnxruntime cannot load {_label(model)}: {_first_line(exc)}") from None
    if session.get_providers()[0] != name:
        raise InputError(f"{name} was requested but onnxruntime started {session.get_providers()}; "
                         f"hint: {_INSTALL_HINTS.get(name, 'check the provider installation')}")
    return session


def run_model(model_or_path: ModelLike, dataset: Dataset | Sequence[dict[str, np.ndarray]],
              providers: Sequence[str] = ("cpu",), *, threads: int | None = None, opt_level: str = "all",
              show_progress: bool = False) -> list[dict[str, np.ndarray]]:
    """Run every batch on the first provider; returns {output name: array} per batch."""
    from onnxprune.graph.kvcache import feed_adapter

    session = make_session(model_or_path, providers[0], threads, opt_level)
    names = [o.name for o in session.get_outputs()]
    feeds = list(dataset.batches() if isinstance(dataset, Dataset) else dataset)
    adapt = feed_adapter(session)  # an empty key/value cache in this model's shape
    outputs = []
    with progress("running", len(feeds), enabled=show_progress) as advance:
        for i, feed in enumerate(feeds):
            try:
                values = session.run(names, adapt(feed))
            except Exception as exc:  # shape or type mismatches surface here as onnxruntime errors
                raise InputError(f"onnxruntime failed on batch {i}: {_first_line(exc)}") from None
            outputs.append(dict(zip(names, values)))
            advance()
    return outputs


def accuracy(outputs: Sequence[dict[str, np.ndarray]], labels: np.ndarray, k: Sequence[int] = (1, 5)) -> dict:
    """Top-k accuracy (fractions) of the first output shaped [N, classes]; k larger than classes is skipped."""
    name, scores = _score_output(_concat(outputs))
    if name is None:
        raise InputError("accuracy needs an output of class scores shaped [N, classes]; this model has none")
    labels = np.asarray(labels)
    if len(labels) != len(scores):
        raise InputError(f"{len(labels)} labels for {len(scores)} outputs")
    if len(labels) and (labels.min() < 0 or labels.max() >= scores.shape[1]):
        raise InputError(f"labels range {labels.min()}..{labels.max()} but output {name!r} has "
                         f"{scores.shape[1]} classes")
    ks = sorted({int(x) for x in k if 0 < int(x) <= scores.shape[1]})
    # stable sort of the negated scores: ties go to the lower class index, as argmax does
    ranked = np.argsort(-scores, axis=1, kind="stable")[:, : max(ks)]
    hits = ranked == labels[:, None]
    result: dict[str, Any] = {"output": name, "samples": int(len(labels))}
    for kk in ks:
        result[f"top{kk}"] = float(hits[:, :kk].any(axis=1).mean()) if len(labels) else float("nan")
    return result


def logits_name(outputs: dict[str, np.ndarray], feed: dict[str, np.ndarray]) -> str | None:
    """The output of a causal LM's next-token logits: named like *logits*, [batch, seq, vocab] float, with the
    feed's input_ids [batch, seq] all below vocab; None when there is none."""
    ids = feed.get("input_ids")
    if ids is None or np.ndim(ids) != 2:
        return None
    for name, value in outputs.items():
        if "logit" in name.lower() and value.ndim == 3 and value.dtype.kind == "f" and \
                value.shape[:2] == ids.shape and (ids.size == 0 or int(ids.max()) < value.shape[2]):
            return name
    return None


def perplexity(outputs: Sequence[dict[str, np.ndarray]], feeds: Sequence[dict[str, np.ndarray]],
               name: str | None = None) -> dict:
    """Token-level perplexity of a causal LM: exp of the mean negative log-likelihood of each next token.

    The logits at position t predict input_ids[t + 1]; a prediction counts when both positions are real tokens
    (attention_mask 1 at t and t + 1, or every position without a mask). Log-softmax in float64, one sample at a
    time (a [seq, vocab] slice), so a 32k vocabulary costs no more than one row of logits.
    """
    if len(outputs) != len(feeds) or not feeds:
        raise InputError("perplexity needs the feeds the outputs came from")
    name = name or logits_name(outputs[0], feeds[0])
    if name is None:
        raise InputError("perplexity needs an output of logits [batch, seq, vocab] (named like 'logits') and "
                         "input_ids [batch, seq] in the data")
    total, tokens = 0.0, 0
    for out, feed in zip(outputs, feeds):
        ids, logits = np.asarray(feed["input_ids"]), out[name]
        mask = _token_mask([feed])
        real = np.ones(ids.shape, bool) if mask is None or mask.shape != ids.shape else mask
        for b in range(ids.shape[0]):
            use = real[b, :-1] & real[b, 1:]
            if not use.any():
                continue
            x = logits[b, :-1][use].astype(np.float64)
            top = x.max(axis=1, keepdims=True)
            log_z = np.log(np.exp(x - top).sum(axis=1)) + top[:, 0]
            total += float(np.sum(log_z - x[np.arange(len(x)), ids[b, 1:][use]]))
            tokens += int(use.sum())
    if tokens == 0:
        raise InputError("perplexity: the data holds no pair of consecutive real tokens")
    nll = total / tokens
    return {"output": name, "tokens": tokens, "nll": nll, "perplexity": float(np.exp(nll))}


def compare_outputs(candidate_outputs: Sequence[dict[str, np.ndarray]],
                    reference_outputs: Sequence[dict[str, np.ndarray]], *,
                    atol: float | None = None, rtol: float | None = None,
                    feeds: Sequence[dict[str, np.ndarray]] | None = None) -> dict:
    """Per output: max/mean absolute error, mean and worst per-sample cosine similarity, top-1 agreement for
    outputs shaped [N, classes], and (with atol/rtol) how many elements miss |c - r| <= atol + rtol * |r|.

    With the `feeds` the outputs came from, a [batch, seq, ...] output whose feed has an attention mask of
    [batch, seq] is compared on real tokens only (padded positions hold whatever the model leaves there).
    The top-level `top1_agreement` is that of the first class-score output (None if there is none).
    """
    cand, ref = _concat(candidate_outputs), _concat(reference_outputs)
    mask = _token_mask(feeds)
    if list(cand) != list(ref):
        raise InputError(f"the models' outputs differ: candidate {', '.join(cand)}; reference {', '.join(ref)}")
    per_output = {}
    for name, r in ref.items():
        c = cand[name]
        if c.shape != r.shape:
            raise InputError(f"output {name!r} has shape {list(c.shape)} in the candidate, "
                             f"{list(r.shape)} in the reference")
        c64, r64 = c.astype(np.float64), r.astype(np.float64)
        if mask is not None and r.ndim >= 3 and mask.shape == r.shape[:2]:
            real = mask.reshape(mask.shape + (1,) * (r.ndim - 2))
            c64, r64 = c64 * real, r64 * real
            entry_mask = True
        else:
            entry_mask = False
        diff = np.abs(c64 - r64)
        entry: dict[str, Any] = {
            "shape": list(r.shape),
            "max_abs_err": float(diff.max()) if diff.size else 0.0,
            "mean_abs_err": float(diff.mean()) if diff.size else 0.0,
        }
        if entry_mask:
            entry["real_tokens_only"] = True
        cosine = _cosine_per_sample(c64, r64)
        entry["cosine"], entry["cosine_min"] = float(cosine.mean()), float(cosine.min())
        if _is_scores(r):
            entry["top1_agreement"] = float((c.argmax(axis=1) == r.argmax(axis=1)).mean())
        if atol is not None or rtol is not None:
            close = np.isclose(c64, r64, rtol=rtol or 0.0, atol=atol or 0.0, equal_nan=True)
            entry["tolerance_violations"] = int(close.size - close.sum())
            entry["within_tolerance"] = bool(close.all())
        per_output[name] = entry
    first_scores = next((e["top1_agreement"] for e in per_output.values() if "top1_agreement" in e), None)
    return {"top1_agreement": first_scores, "outputs": per_output}


def measure_latency(model_or_path: ModelLike, dataset_or_feed: Dataset | dict[str, np.ndarray],
                    providers: Sequence[str] = ("cpu",), warmup: int = 10, runs: int = 100,
                    duration: float | None = None, threads: int | None = None, opt_level: str = "all", *,
                    batch_sizes: Sequence[int] | None = None, show_progress: bool = False) -> dict:
    """Time `session.run` on the first batch: `warmup` untimed runs, then `runs` timed ones (or as fit
    in `duration` seconds), per provider and per batch size (the batch is cut or its samples repeated).

    On CUDA/TensorRT a second row times I/O binding with inputs and outputs resident on the device and a
    synchronisation after each run, so host copies are not counted; the plain row includes them.
    """
    rows = []
    for provider in providers:
        session = make_session(model_or_path, provider, threads, opt_level)
        rows += _time_models({"model": session}, dataset_or_feed, batch_sizes, warmup, runs, duration,
                             show_progress)["model"]
    return {"warmup": warmup, "runs": None if duration else runs, "duration_s": duration, "threads": threads,
            "opt_level": opt_level, "results": rows}


def _time_models(sessions: dict[str, Any], dataset_or_feed: Dataset | dict[str, np.ndarray],
                 batch_sizes: Sequence[int] | None, warmup: int, runs: int, duration: float | None,
                 show_progress: bool) -> dict[str, list[dict]]:
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
                        calls[role][i][1]()
                    except Exception as exc:
                        raise InputError(f"onnxruntime failed to run {role} at batch size {size} ({mode}): "
                                         f"{_first_line(exc)}") from None
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


def evaluate(candidate: ModelLike, dataset: Dataset, reference: ModelLike | None = None,
             providers: Sequence[str] = ("cpu",), *, top_k: Sequence[int] = (1, 5), latency: bool = True,
             warmup: int = 10, runs: int = 100, duration: float | None = None, threads: int | None = None,
             opt_level: str = "all", batch_sizes: Sequence[int] | None = None, atol: float | None = None,
             rtol: float | None = None, show_progress: bool = False, metric: str = "auto") -> dict:
    """Outputs, accuracy (when the data has labels), agreement with `reference`, and latency on each provider.

    `metric`: "auto" also reports perplexity when the model outputs next-token logits and the data has input_ids
    (and no labels); "perplexity" requires it; "accuracy" never computes it."""
    if metric not in METRICS:
        raise InputError(f"unknown --metric {metric!r} (choose from {', '.join(METRICS)})")
    providers = check_providers(providers)
    models = {"candidate": candidate} | ({"reference": reference} if reference is not None else {})
    result: dict[str, Any] = {}
    outputs, all_sessions = {}, {}
    for role, model in models.items():
        sessions = {p: make_session(model, p, threads, opt_level) for p in providers}
        outputs[role] = run_model(sessions[providers[0]], dataset, show_progress=show_progress)
        entry: dict[str, Any] = {"model": _label(model)}
        if dataset.labels is not None:
            entry["accuracy"] = accuracy(outputs[role], dataset.labels, top_k)
        if metric == "perplexity" or (metric == "auto" and dataset.labels is None and outputs[role]
                                      and logits_name(outputs[role][0], dataset.feeds[0]) is not None):
            entry["perplexity"] = perplexity(outputs[role], dataset.feeds)
        result[role] = entry
        all_sessions[role] = sessions
    if latency:
        for p in providers:  # candidate and reference timed alternately, per provider
            rows = _time_models({role: s[p] for role, s in all_sessions.items()}, dataset, batch_sizes, warmup,
                                runs, duration, show_progress)
            for role, role_rows in rows.items():
                result[role].setdefault("latency", []).extend(role_rows)
    if reference is not None:
        result["agreement"] = compare_outputs(outputs["candidate"], outputs["reference"], atol=atol, rtol=rtol,
                                              feeds=dataset.feeds)
        result["deltas"] = _deltas(result["candidate"], result["reference"])
    result["data"] = {"source": dataset.source, "samples": len(dataset), "batches": len(dataset.feeds),
                      "batch_size": dataset.batch_size, "labels": dataset.labels is not None}
    result["providers"] = providers
    result["options"] = {"metric": metric, "top_k": list(top_k), "warmup": warmup, "runs": None if duration else runs,
                         "duration_s": duration, "threads": threads, "opt_level": opt_level,
                         "batch_sizes": list(batch_sizes) if batch_sizes else None, "atol": atol, "rtol": rtol}
    result.update(environment())
    return result


# Metrics where a smaller value is better (the sweep's drop and Pareto front read this).
LOWER_IS_BETTER = frozenset({"perplexity"})


def quality_metric(outputs: Sequence[dict[str, np.ndarray]], reference_outputs: Sequence[dict[str, np.ndarray]] | None,
                   labels: np.ndarray | None, feeds: Sequence[dict[str, np.ndarray]] | None = None) -> tuple[str, float]:
    """The one figure a model is judged by on a data set, as (metric, value): top-1 accuracy (%) with
    labels, else top-1 agreement (%) with the reference outputs, else (outputs that are not class scores)
    100 x the mean cosine similarity of the first output, on real tokens when the `feeds` carry an attention
    mask; for a causal LM (next-token logits with input_ids in the feeds) its token-level perplexity. Used by
    sweep (and, through sensitivity.model_metric, prune's report and sensitivity); metrics in LOWER_IS_BETTER
    rank the other way."""
    if labels is not None:
        return "accuracy", 100.0 * accuracy(outputs, labels, (1,))["top1"]
    if feeds and outputs and logits_name(outputs[0], feeds[0]) is not None:  # a causal LM: lower is better
        return "perplexity", perplexity(outputs, feeds)["perplexity"]
    cmp = compare_outputs(outputs, reference_outputs, feeds=feeds)
    if cmp["top1_agreement"] is not None:
        return "agreement", 100.0 * cmp["top1_agreement"]
    first = next(iter(cmp["outputs"].values()))
    return "cosine", 100.0 * first["cosine"]


def check_gates(result: dict, *, max_drop: float | None = None, min_agreement: float | None = None,
                atol: float | None = None, rtol: float | None = None) -> list[dict]:
    """Each requested gate as {gate, limit, value, passed, reason}; a gate that cannot apply is an InputError.

    max_drop is in accuracy points (reference top-1 minus candidate top-1, x100), or for a perplexity report the
    largest ratio of candidate to reference perplexity (e.g. 1.15); min_agreement a fraction.
    """
    ppl = "perplexity" in result["candidate"] and "accuracy" not in result["candidate"]
    validate_gates(has_reference="agreement" in result, has_labels="accuracy" in result["candidate"] or ppl,
                   max_drop=max_drop, min_agreement=min_agreement)
    gates = []
    if max_drop is not None and ppl:
        ratio = result["deltas"]["perplexity_ratio"]
        gates.append(_gate("max-drop", max_drop, ratio, ratio <= max_drop,
                           f"perplexity {result['candidate']['perplexity']['perplexity']:.4g} is {ratio:.4f}x the "
                           f"reference's (allowed {max_drop:g}x)"))
    elif max_drop is not None:
        drop = -result["deltas"]["top1_points"]
        change = f"dropped {drop:.2f} points" if drop > 0 else f"did not drop ({-drop:+.2f} points)"
        gates.append(_gate("max-drop", max_drop, drop, drop <= max_drop,
                           f"top-1 accuracy {change} (allowed drop {max_drop:g})"))
    if min_agreement is not None:
        agreement = result["agreement"]["top1_agreement"]
        if agreement is None:
            raise InputError("--min-agreement needs an output of class scores [N, classes]; use --atol/--rtol")
        gates.append(_gate("min-agreement", min_agreement, agreement, agreement >= min_agreement,
                           f"top-1 agreement {agreement:.4f} (required {min_agreement:g})"))
    if atol is not None or rtol is not None:
        outputs = result["agreement"]["outputs"]
        if any("within_tolerance" not in e for e in outputs.values()):
            raise InputError("tolerance gates need evaluate(..., atol=, rtol=) with the same values")
        missed = {n: e["tolerance_violations"] for n, e in outputs.items() if not e["within_tolerance"]}
        detail = ", ".join(f"{n}: {v} elements, max abs err {outputs[n]['max_abs_err']:.3g}" for n, v in missed.items())
        gates.append(_gate("tolerance", {"atol": atol, "rtol": rtol}, sum(missed.values()), not missed,
                           f"outside atol={atol or 0:g} rtol={rtol or 0:g}: {detail or 'none'}"))
    return gates


def validate_gates(*, has_reference: bool, has_labels: bool, max_drop: float | None = None,
                   min_agreement: float | None = None, atol: float | None = None, rtol: float | None = None) -> None:
    """Refuse gates that cannot apply, before any model runs (InputError, exit code 2)."""
    if any(v is not None for v in (max_drop, min_agreement, atol, rtol)) and not has_reference:
        raise InputError("gates (--max-drop, --min-agreement, --atol, --rtol) compare with a model: pass --reference")
    if max_drop is not None and not has_labels:
        raise InputError("--max-drop needs labels: a 'labels' array in the data or --labels FILE.npy")
    if min_agreement is not None and not 0.0 <= min_agreement <= 1.0:
        raise InputError(f"--min-agreement is a fraction between 0 and 1 (e.g. 0.99), got {min_agreement}")
    for name, value in (("--max-drop", max_drop), ("--atol", atol), ("--rtol", rtol)):
        if value is not None and value < 0:
            raise InputError(f"{name} must not be negative, got {value}")


# ---- helpers ------------------------------------------------------------------------------------------

def _gate(name: str, limit, value, passed: bool, reason: str) -> dict:
    return {"gate": name, "limit": limit, "value": value, "passed": bool(passed), "reason": reason}


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


def _deltas(candidate: dict, reference: dict) -> dict:
    deltas: dict[str, Any] = {}
    if "perplexity" in candidate and "perplexity" in reference:
        deltas["perplexity_ratio"] = candidate["perplexity"]["perplexity"] / reference["perplexity"]["perplexity"]
    for key, value in candidate.get("accuracy", {}).items():
        if key.startswith("top") and key in reference.get("accuracy", {}):
            deltas[f"{key}_points"] = 100.0 * (value - reference["accuracy"][key])
    ref_rows = {(r["provider"], r["batch_size"], r["mode"]): r for r in reference.get("latency", [])}
    speedups = []
    for row in candidate.get("latency", []):
        ref = ref_rows.get((row["provider"], row["batch_size"], row["mode"]))
        if ref:
            speedups.append({"provider": row["provider"], "batch_size": row["batch_size"], "mode": row["mode"],
                             "p50_speedup": ref["p50_ms"] / row["p50_ms"] if row["p50_ms"] else None})
    if speedups:
        deltas["latency"] = speedups
    return deltas


def _concat(outputs: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if not outputs:
        raise InputError("no outputs to compare: the data holds no batches")
    return {name: (np.concatenate([o[name] for o in outputs]) if outputs[0][name].ndim else outputs[0][name])
            for name in outputs[0]}


def _token_mask(feeds) -> np.ndarray | None:
    """The feeds' attention masks ([batch, seq], integer or bool, an input named like *mask*), concatenated."""
    if not feeds:
        return None
    parts = []
    for feed in feeds:
        found = [v for k, v in feed.items() if "mask" in k.lower() and v.ndim == 2 and v.dtype.kind in "iub"]
        if len(found) != 1:
            return None
        parts.append(found[0] != 0)
    try:
        return np.concatenate(parts)
    except ValueError:  # batches padded to different lengths: outputs would not concatenate either
        return None


def _is_scores(array: np.ndarray) -> bool:
    return array.ndim == 2 and array.shape[1] > 1 and array.dtype.kind == "f"


def _score_output(outputs: dict[str, np.ndarray]) -> tuple[str | None, np.ndarray | None]:
    return next(((n, a) for n, a in outputs.items() if _is_scores(a)), (None, None))


def _cosine_per_sample(c: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Cosine similarity of each sample's flattened output; two zero vectors count as identical."""
    c2 = c.reshape(len(c), -1) if c.ndim else c.reshape(1, -1)
    r2 = r.reshape(len(r), -1) if r.ndim else r.reshape(1, -1)
    if c2.size == 0:
        return np.ones(1)
    dot = (c2 * r2).sum(axis=1)
    norms = np.linalg.norm(c2, axis=1) * np.linalg.norm(r2, axis=1)
    both_zero = (np.linalg.norm(c2, axis=1) == 0) & (np.linalg.norm(r2, axis=1) == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        cosine = np.where(norms > 0, dot / np.where(norms > 0, norms, 1.0), 0.0)
    return np.where(both_zero, 1.0, cosine)


def _batch_len(feed: dict[str, np.ndarray]) -> int:
    return next((a.shape[0] for a in feed.values() if a.ndim), 1)


def _resize_batch(feed: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """The feed with `size` samples: the first ones, or all of them repeated in order."""
    if size < 1:
        raise InputError(f"batch size must be at least 1, got {size}")
    if size == _batch_len(feed):
        return feed
    return {k: (np.ascontiguousarray(np.resize(v, (size, *v.shape[1:]))) if v.ndim else v) for k, v in feed.items()}


def _label(model: ModelLike) -> str:
    if isinstance(model, (str, os.PathLike)):
        return os.fspath(model)
    if isinstance(model, onnx.ModelProto):
        return model.graph.name or "<in-memory model>"
    return "<in-memory model>"


def _first_line(exc: Exception, limit: int = 300) -> str:
    """The exception's text on one line (onnxruntime spreads the useful part over several), at most `limit`."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
