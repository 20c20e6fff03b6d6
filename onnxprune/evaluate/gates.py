"""Evaluation gates: --max-drop, --min-agreement and tolerances, checked on an `evaluate` result."""

from __future__ import annotations

from onnxprune.errors import InputError


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


def _gate(name: str, limit, value, passed: bool, reason: str) -> dict:
    return {"gate": name, "limit": limit, "value": value, "passed": bool(passed), "reason": reason}

