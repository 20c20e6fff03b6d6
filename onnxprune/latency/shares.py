"""Where the time goes: what each group saves of the measured latency beside what it saves of the MACs.

Both are read at the fewest channels the group's latency curve measured (a quarter of them, at a multiple the
hardware likes): 1 - r(k) for the whole model's latency ratio r, 1 - m(k) for its kept MAC fraction m. A layer
between two groups counts in both, so the shares add up to more than 100 %. Time well below MACs marks a group
whose arithmetic is cheap on this provider (or whose time is overhead that pruning does not remove); time
above MACs, one that costs more than its arithmetic (memory-bound layers, layout reorders).
"""

from __future__ import annotations

from onnxprune.latency.table import LatencyTable


def group_shares(table: LatencyTable, analysis) -> list[dict]:
    """One row per prunable group: id, channels, sources, the count measured (`kept`), the time and MACs saved
    there (fractions), most time first; groups without a curve (their rewrite failed) have None and a reason."""
    by_root = {g.spaces[0]: g for g in analysis.prunable}
    rows = []
    for root, curve in table.curves.items():
        group = by_root.get(root)
        row = {"group": curve.group, "channels": curve.size, "sources": group.sources if group else [],
               "kept": None, "time_share": None, "mac_share": None, "counts": curve.counts, "ratios": curve.ratios,
               "reason": curve.reason}
        if curve.counts:
            i = curve.counts.index(min(curve.counts))
            row.update(kept=curve.counts[i], time_share=1.0 - curve.ratios[i], mac_share=1.0 - curve.macs[i])
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
    ax.set_yticks(y, [f"group {r['group']} ({r['kept']}/{r['channels']} ch) {(r['sources'] or [''])[0]}"[:52]
                      for r in shown], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("saved with the group alone at its fewest measured channels (% of the model)")
    ax.set_title(title[:100], fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
