"""`onnxprune eval`: accuracy, agreement with a reference model and latency, with gates for CI.

Exit codes: 0 when every gate is met, 1 when one is missed (GateFailed), 2 for bad input (InputError).
"""

from __future__ import annotations

from pathlib import Path

import click

from onnxprune.commands._output import creates_output_folders
from onnxprune.commands.options import (
    data_options,
    dataset_from_options,
    parse_providers,
    provider_options,
    tracking_option,
)
from onnxprune.errors import GateFailed, InputError
from onnxprune.evaluate.compare import METRICS, evaluate
from onnxprune.evaluate.gates import check_gates, validate_gates
from onnxprune.io.model_io import load_model
from onnxprune.report import format_value, make_console, print_table, write_json


@click.command("eval")
@click.argument("model", type=click.Path())
@click.option("--reference", type=click.Path(), default=None, help="Compare with this model (e.g. the unpruned one).")
@data_options
@provider_options
@click.option("--metric", type=click.Choice(METRICS), default="auto", show_default=True,
              help="perplexity: a causal LM's token perplexity on input_ids (auto: when the model outputs logits "
                   "[batch, seq, vocab] and the data has input_ids and no labels; --max-drop is then a perplexity "
                   "ratio, e.g. 1.15).")
@click.option("--top-k", default="1,5", show_default=True, metavar="K[,K...]", help="Top-k accuracies to report.")
@click.option("--warmup", type=click.IntRange(min=0), default=10, show_default=True, help="Untimed runs first.")
@click.option("--runs", type=click.IntRange(min=1), default=100, show_default=True, help="Timed runs.")
@click.option("--duration", type=click.FloatRange(min=0, min_open=True), default=None, metavar="SECONDS",
              help="Time for this long instead of --runs.")
@click.option("--latency-batch-sizes", default=None, metavar="B[,B...]",
              help="Batch sizes to time (default: the data's batch size).")
@click.option("--no-latency", is_flag=True, help="Skip the timing.")
@click.option("--max-drop", type=float, default=None, metavar="POINTS",
              help="Gate: top-1 accuracy may drop at most this many points below the reference.")
@click.option("--min-agreement", type=float, default=None, metavar="FRACTION",
              help="Gate: top-1 agreement with the reference at least this (e.g. 0.99).")
@click.option("--atol", type=float, default=None, help="Gate: |candidate - reference| <= atol + rtol*|reference|.")
@click.option("--rtol", type=float, default=None, help="Gate: see --atol.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the report as JSON.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@tracking_option
@creates_output_folders(json_path="--json")
def eval_command(model: str, reference: str | None, mlflow_uri: str | None, **kwargs) -> None:
    """Evaluate MODEL on data: accuracy, agreement with --reference, latency per execution provider."""
    if mlflow_uri:
        from onnxprune.sweep.tracking import require_mlflow

        require_mlflow()
    candidate = load_model(model)
    if reference is not None:
        load_model(reference)  # a missing or corrupt reference fails here, before any data is read
    dataset = dataset_from_options(candidate, kwargs)
    if dataset is None:
        raise InputError("eval needs data: pass --data FILE or --random N")
    gates = {k: kwargs.pop(k) for k in ("max_drop", "min_agreement", "atol", "rtol")}
    language_model = kwargs["metric"] == "perplexity" or (
        kwargs["metric"] == "auto" and dataset.labels is None and "input_ids" in dataset.feeds[0]
        and any("logit" in o.name.lower() for o in candidate.graph.output))
    validate_gates(has_reference=reference is not None, has_labels=dataset.labels is not None or language_model,
                   **gates)
    result = evaluate(
        model, dataset, reference, parse_providers(kwargs["providers"]), top_k=_ints(kwargs["top_k"], "--top-k"),
        latency=not kwargs["no_latency"], warmup=kwargs["warmup"], runs=kwargs["runs"], duration=kwargs["duration"],
        threads=kwargs["threads"], opt_level=kwargs["opt_level"],
        batch_sizes=_ints(kwargs["latency_batch_sizes"], "--latency-batch-sizes"),
        atol=gates["atol"], rtol=gates["rtol"], show_progress=not kwargs["quiet"], metric=kwargs["metric"])
    result["gates"] = check_gates(result, **gates)
    show(result)
    if kwargs["json_path"]:
        write_json(Path(kwargs["json_path"]), result)
    if mlflow_uri:
        from onnxprune.sweep.tracking import log_eval

        log_eval(mlflow_uri, result, kwargs["json_path"])
    missed = [g["reason"] for g in result["gates"] if not g["passed"]]
    if missed:
        raise GateFailed("gate missed: " + "; ".join(missed))


def show(result: dict, console=None) -> None:
    """Print the eval report: a quality table, a latency table and the gates."""
    console = console or make_console()
    data = result["data"]
    console.print(f"data: {data['source']}, {data['samples']} samples in {data['batches']} batches"
                  + ("" if data["labels"] else ", no labels"))
    cand, ref = result["candidate"], result.get("reference") or {}
    rows = []
    for key, value in cand.get("accuracy", {}).items():
        if key.startswith("top"):
            ref_value = ref.get("accuracy", {}).get(key)
            delta = result.get("deltas", {}).get(f"{key}_points")
            rows.append({"metric": f"{key} accuracy (%)", "candidate": 100 * value,
                         "reference": None if ref_value is None else 100 * ref_value,
                         "delta": None if delta is None else f"{delta:+.2f}"})
    if "perplexity" in cand:
        ref_ppl = ref.get("perplexity", {}).get("perplexity")
        ratio = result.get("deltas", {}).get("perplexity_ratio")
        rows.append({"metric": f"perplexity [{cand['perplexity']['output']}, {cand['perplexity']['tokens']} tokens]",
                     "candidate": cand["perplexity"]["perplexity"], "reference": ref_ppl,
                     "delta": None if ratio is None else f"x{ratio:.4f}"})
    for name, entry in result.get("agreement", {}).get("outputs", {}).items():
        for key, label in (("top1_agreement", "top-1 agreement"), ("max_abs_err", "max abs error"),
                           ("mean_abs_err", "mean abs error"), ("cosine", "cosine (mean)"),
                           ("cosine_min", "cosine (worst sample)"), ("tolerance_violations", "outside atol/rtol")):
            if key in entry:
                rows.append({"metric": f"{label} [{name}]", "candidate": entry[key]})
    if rows:
        print_table(rows, ["metric", "candidate", "reference", "delta"],
                    title=f"{cand['model']}" + (f" vs {ref['model']}" if ref else ""), console=console)
    latency = [{"model": role, **row} for role in ("candidate", "reference")
               for row in (result.get(role) or {}).get("latency", [])]
    speedups = {(s["provider"], s["batch_size"], s["mode"]): s["p50_speedup"]
                for s in result.get("deltas", {}).get("latency", [])}
    for row in latency:
        row["provider"] = row["provider"].replace("ExecutionProvider", "")
        if row["model"] == "candidate" and speedups:
            row["p50 speed-up"] = speedups.get((row["providers_used"][0], row["batch_size"], row["mode"]))
    if latency:
        columns = [("model", "model"), ("provider", "provider"), ("mode", "mode"), ("batch_size", "batch"),
                   ("runs", "runs"), ("p50_ms", "p50 ms"), ("p90_ms", "p90 ms"), ("p95_ms", "p95 ms"),
                   ("p99_ms", "p99 ms"), ("mean_ms", "mean ms"), ("throughput_per_s", "samples/s")]
        columns += [("p50 speed-up", "p50 speed-up")] if speedups else []
        print_table(latency, columns, title="latency", console=console)
    if result.get("gates"):
        print_table([{"gate": g["gate"], "limit": format_value(g["limit"]) if not isinstance(g["limit"], dict)
                      else " ".join(f"{k}={v}" for k, v in g["limit"].items() if v is not None),
                      "result": "met" if g["passed"] else "MISSED", "detail": g["reason"]} for g in result["gates"]],
                    title="gates", console=console)


def _ints(text: str | None, option: str) -> list[int] | None:
    if not text:
        return None
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise InputError(f"{option} takes comma-separated integers, got {text!r}") from None
    if min(values) < 1:
        raise InputError(f"{option} values must be at least 1, got {text!r}")
    return values
