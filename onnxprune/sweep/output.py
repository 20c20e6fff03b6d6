"""What a sweep shows and writes: the table, the JSON and CSV files, and the Pareto plot."""

from __future__ import annotations

import csv
import io
import os
import tempfile
from pathlib import Path

from onnxprune.io.paths import make_parent
from onnxprune.recipe import field_names
from onnxprune.report import format_value, make_console
from onnxprune.sweep.pareto import drop, higher_is_better

METRIC_KEYS = ("metric", "value", "macs", "params", "bytes", "latency_ms")


def print_table(baseline: dict, candidates: list[dict], labels: dict[str, str], console=None) -> None:
    """Baseline first, then every candidate (#, as numbered in pareto.png); * marks the Pareto front, > the
    --max-drop choice. Candidates' MACs, parameters and bytes are fractions of the baseline's."""
    from rich.table import Table

    console = console or make_console()
    base = baseline["metrics"]
    table = Table(title=f"sweep: {len(candidates)} candidates, {sum(c['pareto'] for c in candidates)} on the "
                        f"Pareto front (*); MACs, params, bytes as a fraction of the original's",
                  title_justify="left")
    for col in ("#", "", "candidate", base["metric"], "drop", "MACs", "params", "bytes", "latency ms", "status"):
        table.add_column(col, justify="left" if col in ("", "candidate", "status") else "right")
    table.add_row("", "", "original", f"{base['value']:.2f}", "", f"{base['macs']:,}", f"{base['params']:,}",
                  f"{base['bytes']:,}", format_value(base["latency_ms"]), "")
    for k, c in enumerate(candidates, 1):
        mark = ("*" if c["pareto"] else "") + (">" if c.get("selected") else "")
        if c["status"] == "ok":
            status = "ok (resumed)" if c.get("resumed") else "ok"
            table.add_row(str(k), mark, labels[c["id"]], *_cells(c["metrics"], base), status)
        else:
            table.add_row(str(k), mark, labels[c["id"]], *[""] * 6, f"failed: {c['error']}")
    console.print(table)


def _cells(m: dict, base: dict) -> list[str]:
    def rel(key: str) -> str:
        return f"{m[key] / base[key]:.3f}" if base[key] else f"{m[key]:,}"

    return [f"{m['value']:.2f}", f"{drop(base, m):+.2f}", rel("macs"), rel("params"), rel("bytes"),
            format_value(m["latency_ms"])]


def write_csv(path: str | os.PathLike, baseline: dict, candidates: list[dict], labels: dict[str, str]) -> Path:
    """One row per model, baseline first: id, label, status, error, pareto, the metrics, the recipe fields."""
    path = Path(path)
    recipe_fields = field_names()
    columns = ["id", "label", "status", "error", "pareto", *METRIC_KEYS, *recipe_fields]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, lineterminator="\n")
    writer.writeheader()
    rows = [{"id": "baseline", "label": "baseline", "status": "ok", "pareto": "", **baseline["metrics"]}]
    for c in candidates:
        recipe = {k: (";".join(v) if isinstance(v, list) else v) for k, v in c["recipe"].items()}
        rows.append({"id": c["id"], "label": labels[c["id"]], "status": c["status"], "error": c["error"] or "",
                     "pareto": c["pareto"], **(c["metrics"] or {}), **recipe})
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    _atomic_write(path, buffer.getvalue())
    return path


def readable(tmp: str) -> None:
    """Give a temporary file (mkstemp makes it 0600) the permissions a new file gets under the umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)


def _atomic_write(path: Path, text: str) -> None:
    make_parent(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        readable(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def plot_pareto(path: str | os.PathLike, baseline: dict, candidates: list[dict], labels: dict[str, str]) -> Path | None:
    """A PNG: the metric against MACs and (when measured) against latency, as fractions of the original's;
    Pareto members in red, numbered as in the table (#) and listed under the plots by recipe; the dashed
    line is each panel's own two-objective front. None when matplotlib is missing (onnxprune[plot])."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    number = {c["id"]: k for k, c in enumerate(candidates, 1)}
    ok = [c for c in candidates if c["status"] == "ok"]
    base = baseline["metrics"]
    higher = higher_is_better(base["metric"])
    panels = [("macs", "MACs (fraction of the original)")]
    if base.get("latency_ms") and ok and all(c["metrics"]["latency_ms"] for c in ok):
        panels.append(("latency_ms", "latency p50 (fraction of the original)"))
    front = [c for c in ok if c["pareto"]]
    lines = [f"#{number[c['id']]}  {labels[c['id']]}" for c in front]
    text_height = 0.15 * len(lines) + 0.2
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.2 + text_height), squeeze=False)
    for ax, (key, xlabel) in zip(axes[0], panels):
        def x(m, key=key):
            return m[key] / base[key] if base[key] else m[key]

        points = sorted(((x(c["metrics"]), c["metrics"]["value"]) for c in ok),
                        key=lambda p: (p[0], -p[1] if higher else p[1]))
        stair, best = [], None
        for px, py in points:  # this panel's own front: better metric at every step to the right
            if best is None or (py > best if higher else py < best):
                stair.append((px, py))
                best = py
        if stair:
            ax.step([p[0] for p in stair], [p[1] for p in stair], where="post", color="tab:red", alpha=0.4,
                    linestyle="--", linewidth=1)
        others = [c for c in ok if not c["pareto"]]
        ax.scatter([x(c["metrics"]) for c in others], [c["metrics"]["value"] for c in others], s=22,
                   color="0.6", label="candidate", zorder=2)
        ax.scatter([x(c["metrics"]) for c in front], [c["metrics"]["value"] for c in front], s=36,
                   color="tab:red", label="Pareto front", zorder=3)
        # members drawn at (almost) one spot share a label; labels alternate above and below the points
        spots: dict[tuple, tuple[tuple[float, float], list[str]]] = {}
        for c in sorted(front, key=lambda c: x(c["metrics"])):
            point = (x(c["metrics"]), c["metrics"]["value"])
            spots.setdefault((round(point[0], 2), round(point[1] / 2)), (point, []))[1].append(f"#{number[c['id']]}")
        for k, (point, names) in enumerate(spots.values()):
            ax.annotate(",".join(names), point, textcoords="offset points", xytext=(4, 4 if k % 2 == 0 else -11),
                        fontsize=7, color="tab:red")
        ax.scatter([x(base)], [base["value"]], marker="*", s=140, color="black", label="original", zorder=4)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("perplexity" if base["metric"] == "perplexity" else f"{base['metric']} (%)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="lower right" if higher else "upper right")
    fig.suptitle(f"{len(candidates)} candidates; front over {base['metric']}, MACs, bytes"
                 + (" and latency" if len(panels) > 1 else ""), fontsize=9)
    fig.text(0.01, 0.01, "\n".join(lines), fontsize=7, family="monospace", va="bottom", color="tab:red")
    fig.tight_layout(rect=(0, text_height / (4.2 + text_height), 1, 1))
    path = make_parent(path, "plot")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=100)
        readable(tmp)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)
    return path
