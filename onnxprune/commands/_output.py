"""Printing shared by the pruning commands: rich tables on stdout, JSON files written atomically."""

from __future__ import annotations

import functools

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from onnxprune.io.paths import check_folder, check_output, make_folder, make_parent, output_folders
from onnxprune.names import ShortNames
from onnxprune.report import write_json  # noqa: F401 - re-exported for the commands

console = Console(highlight=False)


def creates_output_folders(folders: dict[str, str] | None = None, **files: str):
    """Decorator for a command's callback (put it right above the function): the outputs it writes, named by
    its parameters (`files`: parameter -> option, e.g. json_path="--json"; `folders` likewise for an output
    folder), are checked before any work (onnxprune.io.paths), their missing folders made, and when the
    command fails the folders it made are removed again (when empty). With `dry_run` set, `output` (the
    model) is not written, so its folder is not made."""
    folders = folders or {}

    def decorate(command):
        @functools.wraps(command)
        def wrapper(**kwargs):
            paths = {option: kwargs.get(name) for name, option in files.items()
                     if kwargs.get(name) and not (name == "output" and kwargs.get("dry_run"))}
            dirs = {option: kwargs.get(name) for name, option in folders.items() if kwargs.get(name)}
            for option, path in paths.items():
                check_output(path, what=option)
            for option, folder in dirs.items():
                check_folder(folder, what=option)
            with output_folders(*paths.values(), folders=tuple(dirs.values())):
                for option, path in paths.items():
                    make_parent(path, option)
                for option, folder in dirs.items():
                    make_folder(folder, option)
                return command(**kwargs)

        return wrapper

    return decorate


def groups_table(rows: list[dict], title: str, show_kept: bool = True, limit: int | None = None,
                 names: ShortNames | None = None) -> Table:
    """One row per group. Node names are shortened to what tells them apart (onnxprune/names.py), over `names`
    (default: the names of `rows`; give all the model's groups' when `rows` is a selection)."""
    names = names or ShortNames(s for r in rows for s in r["sources"])
    table = Table(title=title, title_justify="left")
    table.add_column("group", justify="right")
    # counts of heads wrap ("8 heads x 16," / "2 KV groups") to leave the names room
    table.add_column("channels", justify="right", max_width=14)
    if show_kept:
        table.add_column("kept", justify="right", max_width=14)
    table.add_column("layers", justify="right")
    shown = rows if limit is None else rows[:limit]
    opened = {r["group"]: names.listing(r["sources"]) for r in shown}
    table.add_column("opened by", overflow="fold")  # folded where narrow, never cut: the layer index must stay
    table.add_column("status", overflow="fold")
    for r in shown:
        cells = [str(r["group"]), _count(r, r["channels"])]
        if show_kept:
            cells.append(_count(r, r["kept"]))
        sources = opened[r["group"]]
        status = "prunable" if r["prunable"] else f"frozen: {names.text(r['reason'])}"
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


def show_finetune(report: dict, limit: int = 12) -> None:
    """Re-training's blocks (the first `limit` and a count of the rest) and its quality figures, calibration
    and held-out side by side."""
    blocks = report.get("blockwise", {}).get("blocks", [])
    if blocks:
        table = Table(title=f"block-wise distillation ({report['blockwise']['status']}; loss relative to the "
                            "original's block output)", title_justify="left")
        for col in ("block", "output", "params", "calibration", "held-out", "status"):
            table.add_column(col, justify="right" if col in ("block", "params") else "left")
        for r in blocks[:limit]:
            def pair(role):
                b, a = r.get(f"{role}_before"), r.get(f"{role}_after")
                return "" if b is None or a is None else f"{b:.4g} -> {a:.4g}"
            table.add_row(str(r["block"]), _tail(r["output"], 32), f"{r.get('params', 0):,}", pair("calibration"),
                          pair("held_out"), r["status"])
        if len(blocks) > limit:
            table.add_row("...", f"{len(blocks) - limit} more", "", "", "", "")
        console.print(table)
    e2e = report.get("end_to_end")
    if e2e:
        console.print(f"end-to-end distillation ({e2e['status']}): loss on calibration "
                      f"{e2e['calibration_before']:.4g} -> {e2e['calibration_after']:.4g}, held-out "
                      + (f"{e2e['held_out_before']:.4g} -> {e2e['held_out_after']:.4g}"
                         if e2e.get("held_out_before") is not None else "n/a"))
    quality = report.get("quality")
    if quality:
        table = Table(title="re-training (held-out data decides what is kept)", title_justify="left")
        for col in ("role", "metric", "before", "after"):
            table.add_column(col, justify="left" if col in ("role", "metric") else "right")
        for role, q in quality.items():
            table.add_row(role.replace("_", "-"), q["metric"], f"{q['before']:.4g}", f"{q['after']:.4g}")
        console.print(table)


def _tail(text: str, width: int) -> str:
    """The end of a long tensor name (where exporters put the layer and op)."""
    return text if len(text) <= width else "…" + text[-(width - 1):]
