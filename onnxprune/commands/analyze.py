"""`onnxprune analyze`: list the channel groups and why each is prunable or frozen; with --latency, each
group's saving of the measured latency beside its saving of MACs (and --plot, a bar chart)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import click

from onnxprune.choices import GQA_MODES
from onnxprune.commands._output import console, creates_output_folders, groups_table, show_faults, write_json
from onnxprune.commands.options import parse_input_shapes
from onnxprune.errors import InputError
from onnxprune.io.model_io import load_model


@click.command("analyze")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--exclude", multiple=True, help="Node-name glob whose output channels stay (repeatable).")
@click.option("--prune-hidden", is_flag=True, help="Show the hidden size as prunable (approximate, see prune).")
@click.option("--gqa-mode", type=click.Choice(GQA_MODES), default="auto", show_default=True,
              help="Grouped-query attention: whole KV groups, or query heads evenly inside every KV group; auto: "
                   "query heads for a single KV head (multi-query attention), else whole groups.")
@click.option("--keep-kv-cache", is_flag=True, help="Show a decoder's key/value cache kept (its heads frozen).")
@click.option("--all", "show_all", is_flag=True, help="Show every group (frozen ones too) without a limit.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the groups as JSON here.")
@click.option("--input-shapes", default=None, metavar="NAME:1x3x224x224[,...]",
              help="Fix dynamic input dims for the MAC count; a single-input model may omit NAME:.")
@click.option("--strict", is_flag=True, help="Fail (exit 2) when a handler fault had to be contained.")
@creates_output_folders(json_path="--json")
@click.option("--latency", "show_latency", is_flag=True,
              help="Measure each group's share of the latency (onnxruntime, cached) beside its share of MACs.")
@click.option("--provider", default="cpu", show_default=True, help="--latency: execution provider.")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True, help="--latency: batch size.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="--latency: onnxruntime intra-op threads.")
@click.option("--latency-cache", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="Folder of measured latency tables. [default: ~/.cache/onnxprune/latency]")
@click.option("--plot", type=click.Path(dir_okay=False), default=None,
              help="--latency: write a bar chart (time vs MAC share per group) as PNG here.")
def analyze(model: str, exclude: tuple[str, ...], prune_hidden: bool, show_all: bool, json_path: str | None,
            input_shapes: str | None, strict: bool, gqa_mode: str = "auto", keep_kv_cache: bool = False,
            show_latency: bool = False, provider: str = "cpu", batch: int = 1, threads: int = 1,
            latency_cache: str | None = None, plot: str | None = None) -> None:
    """List the channel groups of MODEL: coupled layers, channel counts, prunable or frozen and why."""
    from onnxprune.errors import ContainedFaultError
    from onnxprune.graph.faults import is_fault, strict_message
    from onnxprune.graph.stats import count_macs
    from onnxprune.pipeline.prepare import prepare
    from onnxprune.pipeline.prune import gqa_fields
    from onnxprune.runtime.feeds import resolve_shapes

    if plot is not None and not show_latency:
        raise InputError("--plot draws the latency shares: add --latency")
    if plot is not None and not Path(plot).parent.exists():
        raise InputError(f"folder for --plot does not exist: {Path(plot).parent}")
    proto = load_model(model)
    given_shapes = parse_input_shapes(input_shapes, proto)
    shapes = resolve_shapes(proto, given_shapes)[0]
    settings = None
    if show_latency:
        from onnxprune.latency.measure import LatencySettings

        settings = LatencySettings(provider, batch, threads)
        settings.check()  # a provider this onnxruntime lacks: one line, before any work
    prep = prepare(proto, exclude, prune_hidden, gqa_mode, keep_kv_cache)
    faults = prep.analysis.faults
    rows = [{"group": g.id, "channels": g.size, "kept": g.size, "prunable": g.prunable, "reason": g.reason,
             "sources": g.sources, "members": len({m.node for m in g.members}),
             "unit": g.unit, "blocks": g.blocks, "tensors": g.tensors[:20], "fault": is_fault(g, faults),
             **gqa_fields(g)}
            for g in prep.analysis.groups]
    prunable = [r for r in rows if r["prunable"]]
    shown = rows if show_all else prunable + [r for r in rows if not r["prunable"]]
    macs = count_macs(prep.model, prep.view, shapes)
    shape_text = ", ".join(f"{k}:{'x'.join(map(str, v))}" for k, v in shapes.items())
    console.print(groups_table(shown, f"{model}: {len(prunable)} of {len(rows)} channel groups prunable; "
                                      f"{macs:,} MACs at {shape_text}",
                               show_kept=False, limit=None if show_all else 40))
    if not strict:
        show_faults([f.as_dict() for f in faults])
    latency = _latency(prep, proto, settings, given_shapes, latency_cache, plot, model) if settings else None
    if json_path:
        write_json(json_path, {"model": model, "input_shapes": {k: list(v) for k, v in shapes.items()},
                               "macs": macs, "groups": rows, "faults": [f.as_dict() for f in faults],
                               "latency": latency})
    if strict and faults:
        raise ContainedFaultError(strict_message(faults))


def _latency(prep, proto, settings, input_shapes, cache, plot: str | None, model: str) -> dict:
    """Measure (or read) the latency table, print the shares, draw the plot; the JSON section."""
    from rich.table import Table

    from onnxprune.latency.measure import latency_feed
    from onnxprune.latency.shares import group_shares, plot_shares
    from onnxprune.latency.table import build_table

    feed = latency_feed(prep.model, settings.batch, input_shapes, None, settings.seed)
    table = build_table(prep, proto, feed, settings, cache, show_progress=True)
    rows = group_shares(table, prep.analysis)
    where = f"{settings.provider} batch {settings.batch}, {settings.threads} threads"
    title = (f"{model}: {table.base_ms:.3f} ms on {where}; latency and MACs saved by each group alone at "
             f"its fewest measured channels "
             f"({'cached table' if table.cached else f'measured in {table.seconds:.1f} s'})")
    out = Table(title=title, title_justify="left")
    for col in ("group", "channels", "kept", "opened by", "time saved", "MACs saved", "time/MACs"):
        out.add_column(col, justify="left" if col == "opened by" else "right")
    for r in rows:
        if r["time_share"] is None:
            out.add_row(str(r["group"]), str(r["channels"]), "-", ", ".join(r["sources"][:2]), "-", "-", r["reason"])
            continue
        rel = r["time_share"] / r["mac_share"] if r["mac_share"] > 1e-9 else float("inf")
        out.add_row(str(r["group"]), str(r["channels"]), str(r["kept"]), ", ".join(r["sources"][:2]),
                    f"{100 * r['time_share']:.1f}%", f"{100 * r['mac_share']:.1f}%", f"{rel:.2f}")
    console.print(out)
    if plot is not None:
        fd, tmp = tempfile.mkstemp(prefix=".latency.", suffix=".png", dir=Path(plot).parent)
        os.close(fd)
        try:
            plot_shares(rows, tmp, f"{Path(model).name}: {table.base_ms:.3f} ms on {where}")
            os.replace(tmp, plot)
        finally:
            Path(tmp).unlink(missing_ok=True)
        console.print(f"wrote {plot}")
    return {"base_ms": table.base_ms, "noise": table.noise, "provider": settings.provider, "batch": settings.batch,
            "threads": settings.threads, "cached": table.cached, "groups": rows}
