"""Printing shared by the pruning commands: rich tables on stdout, JSON files written atomically."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from onnxprune.report import write_json  # noqa: F401 - re-exported for the commands

console = Console(highlight=False)


def groups_table(rows: list[dict], title: str, show_kept: bool = True, limit: int | None = None) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("group", justify="right")
    table.add_column("channels", justify="right")
    if show_kept:
        table.add_column("kept", justify="right")
    table.add_column("layers", justify="right")
    table.add_column("opened by")
    table.add_column("status")
    shown = rows if limit is None else rows[:limit]
    for r in shown:
        cells = [str(r["group"]), _count(r, r["channels"])]
        if show_kept:
            cells.append(_count(r, r["kept"]))
        sources = ", ".join(r["sources"][:2]) + (f" +{len(r['sources']) - 2}" if len(r["sources"]) > 2 else "")
        status = "prunable" if r["prunable"] else f"frozen: {r['reason']}"
        if r.get("gqa_mode"):
            status += (" (gqa-mode kv-groups: whole KV groups)" if r["gqa_mode"] == "kv-groups"
                       else " (gqa-mode query-heads: query heads evenly inside KV groups)")
        cells += [str(r["members"]), sources, status]
        table.add_row(*cells)
    if limit is not None and len(rows) > limit:
        table.caption = f"{len(rows) - limit} more groups not shown (use --all)"
    return table


def show_faults(faults: list[dict]) -> None:
    """Contained faults, apart from ordinary frozen groups: each is a bug in onnxprune worth reporting."""
    if not faults:
        return
    err = Console(stderr=True, highlight=False)
    err.print(f"warning: {len(faults)} fault(s) contained (their groups stay unpruned; please report them; "
              "--strict makes this an error):", soft_wrap=True)
    for fault in faults:
        groups = ", ".join(map(str, fault["groups"])) or "none"
        err.print(f"  {fault['reason']} [groups {groups}]", soft_wrap=True)


def interface_table(changes: list[dict]) -> Table:
    """Inputs and outputs whose shape changed (a decoder's key/value cache following its pruned heads)."""
    table = Table(title="interface changes (key/value cache follows the pruned heads and dropped layers)",
                  title_justify="left")
    for col in ("name", "kind", "before", "after"):
        table.add_column(col)
    for c in changes:
        after = _shape(c["after"]) + (f" as {c['renamed']}" if c.get("renamed") else "")
        table.add_row(c["name"], c["kind"], _shape(c["before"]), after)
    return table


def _shape(dims: list | None) -> str:
    if dims is None:
        return "(removed)"
    return escape("[" + ", ".join(str(d) for d in dims) + "]")


def summary_table(stats: dict) -> Table:
    table = Table(title="model", title_justify="left")
    for col in ("", "before", "after", "after/before"):
        table.add_column(col, justify="right" if col else "left")
    for label, key in (("parameters", "params"), ("MACs", "macs"), ("file size (bytes)", "bytes")):
        before, after = stats[f"{key}_before"], stats[f"{key}_after"]
        table.add_row(label, f"{before:,}", f"{after:,}", f"{after / before:.3f}" if before else "-")
    return table


def _count(row: dict, n: int) -> str:
    """Channel counts, shown as heads for attention groups and per block for grouped convolutions."""
    unit = row.get("unit", 1)
    if row.get("kv_groups"):
        head = row["head_dim"]
        return f"{n // head} heads x {head}, {row['kv_groups']} KV groups"
    if unit > 1:
        return f"{n // unit} heads x {unit}"
    blocks = row.get("blocks", 1)
    if blocks > 1:
        return f"{n} ({blocks} groups)"
    return str(n)
