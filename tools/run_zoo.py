"""Run every zoo case (issue 2) through onnxprune and print one table.

For each model and exporter: prune at --ratio (0.5) with the L1 criterion, run the original and the pruned
model in onnxruntime on the same input, and run the zero-channel oracle. Columns:

  groups      prunable / total channel groups
  MACs, params  pruned / original
  shapes      whether every output of the pruned model has the original's shape
  oracle      the zero-channel oracle's max |zeroed - pruned| / max |zeroed| over all outputs, with the
              number of channels it removed (30% of every prunable group)
  time        seconds for prune_model (normalise, analyse, score, plan, rewrite, validate)

    python tools/run_zoo.py [--names resnet18 nhwc_gap_gemm ...] [--exporter both] [--markdown] [--no-oracle]

Exit status 1 when any case fails a check.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import onnx

if __package__ in (None, ""):  # run as `python tools/run_zoo.py`: the checkout's root, for `tools.*` and onnxprune
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools import zoo  # noqa: E402
from onnxprune.recipe import Recipe

ORACLE_TOL = 1e-5


def external_cases() -> dict[str, callable]:
    """The non-PyTorch models: name -> () -> (model, feed)."""
    from tests import zoo_models

    cases = {}
    for name, build in zoo_models.NHWC_MODELS.items():
        cases[name] = lambda build=build: (build(), {"input": zoo_models.nhwc_input()})
    def mlp():
        model, x_test, _, _ = zoo_models.sklearn_mlp()
        return model, {model.graph.input[0].name: x_test[:16]}
    cases["sklearn_mlp"] = mlp
    return cases


def load_case(name: str, exporter: str) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """(model, feed) for a zoo case; exporter "-" for the non-PyTorch models."""
    if exporter == "-":
        return external_cases()[name]()
    path = zoo.export(name, exporter)
    return onnx.load(str(path)), {"input": zoo.example_input(name, batch=2)}


def run_case(name: str, exporter: str, ratio: float = 0.5, oracle: bool = True) -> dict:
    from onnxprune.pipeline.prune import prune_model
    from onnxprune.testing import zero_channel_oracle
    from onnxprune.runtime.session import run

    row = {"model": name, "exporter": exporter}
    model, feed = load_case(name, exporter)
    t0 = time.perf_counter()
    res = prune_model(model, Recipe(ratio=ratio))
    row["time_s"] = time.perf_counter() - t0
    s = res.stats
    row["groups"] = f"{s['groups_prunable']}/{s['groups']}"
    row["macs_ratio"] = s["macs_after"] / s["macs_before"]
    row["params_ratio"] = s["params_after"] / s["params_before"]
    before, after = run(model, feed), run(res.model, feed)
    row["shapes_ok"] = [a.shape for a in after] == [b.shape for b in before]
    if oracle:
        t0 = time.perf_counter()
        r = zero_channel_oracle(model, seed=0, fraction=0.3, feed=feed)
        row["oracle_s"] = time.perf_counter() - t0
        row["oracle_err"] = r.max_rel_err
        row["oracle_channels"] = r.pruned_channels
    return row


def all_cases(names: list[str] | None, exporter: str) -> list[tuple[str, str]]:
    exporters = zoo.EXPORTERS if exporter == "both" else (exporter,)
    out = [(n, e) for n, e in zoo.cases() if e in exporters and (not names or n in names)]
    out += [(n, "-") for n in external_cases() if not names or n in names]
    return out


def fmt_row(row: dict) -> list[str]:
    if "error" in row:
        return [row["model"], row["exporter"], "ERROR", "", "", "", "", "", row["error"][:90]]
    if "oracle_err" not in row:
        oracle = "-"
    else:
        oracle = f"{row['oracle_err']:.1e}" + ("" if row["oracle_err"] <= ORACLE_TOL else " FAIL")
    return [row["model"], row["exporter"], row["groups"], f"{row['macs_ratio']:.3f}", f"{row['params_ratio']:.3f}",
            "ok" if row["shapes_ok"] else "FAIL", oracle, str(row.get("oracle_channels", "-")), f"{row['time_s']:.2f}"]


HEADER = ["model", "exporter", "groups", "MACs", "params", "shapes", "oracle", "oracle ch", "prune s"]


def failed(row: dict) -> bool:
    if "error" in row or not row["shapes_ok"] or row["macs_ratio"] >= 1.0:
        return True
    return "oracle_err" in row and row["oracle_err"] > ORACLE_TOL


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Prune every zoo model and print a table.")
    parser.add_argument("--names", nargs="*", help="zoo model names (default: all)")
    parser.add_argument("--exporter", choices=[*zoo.EXPORTERS, "both"], default="both")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--no-oracle", action="store_true")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument("-v", "--verbose", action="store_true", help="print tracebacks of failing cases")
    args = parser.parse_args(argv)

    rows = []
    t_all = time.perf_counter()
    for name, exporter in all_cases(args.names, args.exporter):
        try:
            row = run_case(name, exporter, args.ratio, oracle=not args.no_oracle)
        except Exception as exc:  # noqa: BLE001 - one row per case
            row = {"model": name, "exporter": exporter,
                   "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
            if args.verbose:
                traceback.print_exc()
        rows.append(row)
        print("  ".join(fmt_row(row)), file=sys.stderr, flush=True)
    total = time.perf_counter() - t_all
    _print_table(rows, args.markdown)
    for name in dict.fromkeys(r["model"] for r in rows):
        if name in zoo.ZOO and zoo.ZOO[name].frozen_note:
            print(f"\nfrozen groups in {name}: {zoo.ZOO[name].frozen_note}")
    bad = [f"{r['model']}[{r['exporter']}]" for r in rows if failed(r)]
    failing = f"; failing: {', '.join(bad)}" if bad else ""
    print(f"\n{len(rows)} cases, {len(rows) - len(bad)} pass, total {total:.0f} s{failing}")
    return 1 if bad else 0


def _print_table(rows: list[dict], markdown: bool) -> None:
    table = [HEADER] + [fmt_row(r) for r in rows]
    if markdown:
        print("| " + " | ".join(HEADER) + " |")
        print("|" + "|".join("---" for _ in HEADER) + "|")
        for r in table[1:]:
            print("| " + " | ".join(r) + " |")
        return
    widths = [max(len(r[i]) for r in table) for i in range(len(HEADER))]
    for r in table:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))


if __name__ == "__main__":
    sys.exit(main())
