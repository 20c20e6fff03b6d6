"""Where the time goes: each group's share of the measured latency beside its share of the MACs.

A group's share is read from its latency curve at the fewest channels measured, extrapolated linearly to
no channels: (1 - r(k)) / (1 - k / size), where r is the whole-model latency ratio; its MAC share is the same
expression on the kept MAC fraction. A layer between two groups counts in both, so shares can add up to more
than 100 %. A time share well above the MAC share marks a group whose channels cost more time than their
arithmetic (memory-bound layers, layout reorders); well below, one whose MACs are cheap on this provider.
"""

from __future__ import annotations

from onnxprune.latency.table import LatencyTable


def group_shares(table: LatencyTable, analysis) -> list[dict]:
    """One row per prunable group: id, channels, sources, time share and MAC share (fractions), largest time
    share first; groups without a curve (their rewrite failed) have None shares and a reason."""
    by_root = {g.spaces[0]: g for g in analysis.prunable}
    rows = []
    for root, curve in table.curves.items():
        group = by_root.get(root)
        row = {"group": curve.group, "channels": curve.size, "sources": group.sources if group else [],
               "time_share": None, "mac_share": None, "counts": curve.counts, "ratios": curve.ratios,
               "reason": curve.reason}
        if curve.counts:
            i = curve.counts.index(min(curve.counts))
            removed = 1.0 - curve.counts[i] / curve.size
            row["time_share"] = (1.0 - curve.ratios[i]) / removed
            row["mac_share"] = (1.0 - curve.macs[i]) / removed
        rows.append(row)
    rows.sort(key=lambda r: -(r["time_share"] if r["time_share"] is not None else -1.0))
    return rows


def plot_shares(rows: list[dict], path, title: str) -> None:
    """A PNG: horizontal bars per group, share of measured time beside share of MACs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    shown = [r for r in rows if r["time_share"] is not None][:40]
    y = np.arange(len(shown))
    fig, ax = plt.subplots(figsize=(7.5, 1.2 + 0.28 * max(len(shown), 1)))
    ax.barh(y - 0.2, [100 * r["time_share"] for r in shown], height=0.4, label="measured time")
    ax.barh(y + 0.2, [100 * r["mac_share"] for r in shown], height=0.4, label="MACs")
    ax.set_yticks(y, [f"group {r['group']} ({r['channels']} ch) {(r['sources'] or [''])[0]}"[:48] for r in shown],
                  fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("share of the model (%), extrapolated from the fewest channels measured")
    ax.set_title(title[:100], fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
