"""`onnxprune analyze`: list the channel groups and why each is prunable or frozen."""

from __future__ import annotations

import click

from onnxprune.commands.options import parse_input_shapes
from onnxprune.commands._output import console, groups_table, show_faults, write_json
from onnxprune.graph.analysis import GQA_MODES
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
def analyze(model: str, exclude: tuple[str, ...], prune_hidden: bool, show_all: bool, json_path: str | None,
            input_shapes: str | None, strict: bool, gqa_mode: str = "auto", keep_kv_cache: bool = False) -> None:
    """List the channel groups of MODEL: coupled layers, channel counts, prunable or frozen and why."""
    from onnxprune.pipeline.apply import ContainedFaultError, is_fault, strict_message
    from onnxprune.runtime.feeds import resolve_shapes
    from onnxprune.pipeline.prune import gqa_fields, prepare
    from onnxprune.graph.stats import count_macs

    proto = load_model(model)
    shapes = resolve_shapes(proto, parse_input_shapes(input_shapes, proto))[0]
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
    if json_path:
        write_json(json_path, {"model": model, "input_shapes": {k: list(v) for k, v in shapes.items()},
                               "macs": macs, "groups": rows, "faults": [f.as_dict() for f in faults]})
    if strict and faults:
        raise ContainedFaultError(strict_message(faults))
