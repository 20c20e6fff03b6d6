"""Readable layer names in tables (issue 21): the shared prefix goes, the distinctive tail stays, and at 80 columns
every group of the shipped decoder names its layer. --json keeps the full names.

The table snapshot is tests/snapshots/analyze_stdlib_llama_80.txt; after a deliberate change of the table,
rewrite it with ONNXPRUNE_UPDATE_SNAPSHOTS=1 and review the diff."""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path

from rich.console import Console

from onnxprune.cli import main
from onnxprune.names import ShortNames

ROOT = Path(__file__).resolve().parents[1]
SNAPSHOT = Path(__file__).resolve().parent / "snapshots" / "analyze_stdlib_llama_80.txt"

DECODER = ["/model/model/layers.0/self_attn/q_proj/MatMul", "/model/model/layers.0/self_attn/k_proj/MatMul",
           "/model/model/layers.0/self_attn/Reshape_4", "/model/model/layers.3/mlp/gate_proj/MatMul",
           "/model/model/layers.3/mlp/up_proj/MatMul", "/model/lm_head/MatMul"]


def test_shared_prefix_wrappers_and_op_types_go():
    short = ShortNames(DECODER)
    assert [short(n) for n in DECODER] == ["layers.0/self_attn/q_proj", "layers.0/self_attn/k_proj",
                                           "layers.0/self_attn/Reshape_4", "layers.3/mlp/gate_proj",
                                           "layers.3/mlp/up_proj", "lm_head"]
    assert short.listing(DECODER[:3]) == "layers.0/self_attn/q_proj, k_proj +1"
    assert short.listing(DECODER[3:5]) == "layers.3/mlp/gate_proj, up_proj"
    reason = ("Add /model/model/layers.0/Add: input /model/model/layers.0/input_layernorm/Cast_output_0 has 128 "
              "entries on the channel axis")
    assert short.text(reason) == ("Add layers.0/Add: input layers.0/input_layernorm/Cast_output_0 has 128 entries "
                                  "on the channel axis")


def test_a_layer_index_stays_even_where_every_name_has_it():
    names = ["/model/layers.7/mlp/gate_proj/MatMul", "/model/layers.7/mlp/up_proj/MatMul"]
    short = ShortNames(names)
    assert [short(n) for n in names] == ["layers.7/mlp/gate_proj", "layers.7/mlp/up_proj"]


def test_names_that_would_collide_keep_their_op_type_and_plain_names_stay():
    names = ["/stem/conv/Conv", "/stem/conv/Relu", "/head/fc/Gemm", "Conv_0", "node_12"]
    short = ShortNames(names)
    assert [short(n) for n in names] == ["stem/conv/Conv", "stem/conv/Relu", "head/fc", "Conv_0", "node_12"]
    assert ShortNames(["/conv1/Conv"])("/conv1/Conv") == "conv1"  # one name: only its op type goes


def _analyze_at_80(monkeypatch, *args) -> str:
    from onnxprune.commands import analyze

    buffer = io.StringIO()
    monkeypatch.setattr(analyze, "console", Console(file=buffer, width=80, highlight=False, color_system=None))
    monkeypatch.chdir(ROOT)  # the title shows the model path as given
    assert main(["analyze", "models/stdlib_llama.onnx", *args]) == 0
    return buffer.getvalue()


def _opened_by(table: str) -> dict[int, str]:
    """Each group's "opened by" cell (its lines joined), from the rendered table."""
    cells: dict[int, str] = {}
    group = None
    for line in table.splitlines():
        cols = [c.strip() for c in line.split("│")]
        if len(cols) < 6:
            continue
        if cols[1].isdigit():
            group = int(cols[1])
            cells[group] = cols[4]
        elif group is not None:
            cells[group] += cols[4]
    return cells


def test_decoder_table_at_80_columns_names_every_layer(monkeypatch, tmp_path):
    report = tmp_path / "groups.json"
    text = _analyze_at_80(monkeypatch, "--all", "--json", str(report))
    assert max(len(line) for line in text.splitlines()) <= 80
    groups = json.loads(report.read_text())["groups"]
    opened = _opened_by(text)
    assert sorted(opened) == sorted(g["group"] for g in groups) and len(groups) == 17
    for g in groups:
        # --json keeps the full names; the table shows the distinctive tail, layer index included
        assert all(s.startswith("/model/") for s in g["sources"])
        layer = re.search(r"layers\.(\d+)/", g["sources"][0])
        want = f"layers.{layer.group(1)}/" if layer else "lm_head"
        assert opened[g["group"]].startswith(want), (g["group"], opened[g["group"]])
        assert "/model/model" not in opened[g["group"]]
    if os.environ.get("ONNXPRUNE_UPDATE_SNAPSHOTS"):
        SNAPSHOT.parent.mkdir(exist_ok=True)
        SNAPSHOT.write_text(text)
    assert text == SNAPSHOT.read_text()
