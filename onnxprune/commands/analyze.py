"""`onnxprune analyze`: list the channel groups and why each is prunable or frozen."""

from __future__ import annotations

import click

from onnxprune.commands._output import console, groups_table, write_json
from onnxprune.graph.analysis import GQA_MODES
from onnxprune.model_io import load_model


@click.command("analyze")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--exclude", multiple=True, help="Node-name glob whose output channels stay (repeatable).")
@click.option("--prune-hidden", is_flag=True, help="Show the hidden size as prunable (approximate, see prune).")
@click.option("--gqa-mode", type=click.Choice(GQA_MODES), default="kv-groups", show_default=True,
              help="Grouped-query attention: whole KV groups, or query heads evenly inside every KV group.")
@click.option("--keep-kv-cache", is_flag=True, help="Show a decoder's key/value cache kept (its heads frozen).")
@click.option("--all", "show_all", is_flag=True, help="Show every group (frozen ones too) without a limit.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the groups as JSON here.")
def analyze(model: str, exclude: tuple[str, ...], prune_hidden: bool, show_all: bool, json_path: str | None,
            gqa_mode: str = "kv-groups", keep_kv_cache: bool = False) -> None:
    """List the channel groups of MODEL: coupled layers, channel counts, prunable or frozen and why."""
    from onnxprune.prune import gqa_fields, prepare

    prep = prepare(load_model(model), exclude, prune_hidden, gqa_mode, keep_kv_cache)
    rows = [{"group": g.id, "channels": g.size, "kept": g.size, "prunable": g.prunable, "reason": g.reason,
             "sources": g.sources, "members": len({m.node for m in g.members}),
             "unit": g.unit, "blocks": g.blocks, "tensors": g.tensors[:20], **gqa_fields(g)}
            for g in prep.analysis.groups]
    prunable = [r for r in rows if r["prunable"]]
    shown = rows if show_all else prunable + [r for r in rows if not r["prunable"]]
    console.print(groups_table(shown, f"{model}: {len(prunable)} of {len(rows)} channel groups prunable",
                               show_kept=False, limit=None if show_all else 40))
    if json_path:
        write_json(json_path, {"model": model, "groups": rows})
