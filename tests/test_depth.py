"""Issue 19 item 4: depth pruning (--drop-blocks) by block influence.

The oracle: a decoder layer made exactly the identity (its attention and MLP output projections zeroed, so it adds
0 to the residual stream) has influence 0, is the one dropped, and the model without it gives the outputs of the
model with it. Forms: a plain LLaMA-like decoder, one with an explicit key/value cache (whose entries of the
dropped layer go and whose later layers are renumbered), and onnxruntime-genai's model builder output (fused skip
norms, genai_config.json's num_hidden_layers follows, onnxruntime-genai generates the same tokens).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxprune.cli import main
from onnxprune.errors import InputError
from onnxprune.graph.blocks import find_blocks
from onnxprune.pipeline.prune import prune_model
from onnxprune.runtime.session import run
from onnxprune.recipe import Recipe
from onnxprune.sweep.grid import parse_list
from onnxprune.pipeline.prune import RunSettings

needs_transformers = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                        reason="needs transformers")
LAYERS = 3


def identity_layer(model: onnx.ModelProto, layer: int) -> onnx.ModelProto:
    """A copy whose decoder layer `layer` adds nothing to the residual stream: its o_proj and down_proj MatMul
    weights are zero."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name: t for t in out.graph.initializer}
    hit = 0
    for node in out.graph.node:
        if node.op_type == "MatMul" and f"layers.{layer}/" in node.name and ("o_proj" in node.name
                                                                             or "down_proj" in node.name):
            w = inits[node.input[1]]
            w.CopyFrom(numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(w)), w.name))
            hit += 1
    assert hit == 2
    return out


def token_feeds(n=3, batch=2, seq=8, vocab=100):
    rng = np.random.default_rng(0)
    return [{"input_ids": rng.integers(0, vocab, (batch, seq)).astype(np.int64),
             "attention_mask": np.ones((batch, seq), np.int64)} for _ in range(n)]


@pytest.fixture(scope="module")
def decoders(tmp_path_factory):
    from tools import export_transformers as et

    folder = tmp_path_factory.mktemp("depth")
    plain = et.export(et.llama(hidden=32, heads=4, kv_heads=2, layers=LAYERS), "llama", folder / "plain.onnx",
                      dynamo=False)
    cache = et.export_cache(et.llama_lm(hidden=32, heads=4, kv_heads=2, layers=LAYERS), folder / "cache.onnx",
                            dynamo=False)
    return onnx.load(str(plain)), onnx.load(str(cache))


@needs_transformers
def test_blocks_are_decoder_layers_and_resnet_blocks(decoders):
    _, cache = decoders
    blocks = find_blocks(cache)
    assert len(blocks) == LAYERS and all(b.attention and len(b.adds) == 2 for b in blocks)
    assert blocks[1].cache_inputs == ("past_key_values.1.key", "past_key_values.1.value")
    assert blocks[1].cache_outputs == ("present.1.key", "present.1.value")
    assert blocks[0].output == blocks[1].input
    resnet = find_blocks(onnx.load("models/digits_resnet.onnx"))
    assert len(resnet) == 3 and not any(b.attention for b in resnet)  # identity-skip blocks; downsampling stays


@needs_transformers
def test_identity_layer_is_dropped_and_the_cache_follows(decoders):
    _, cache = decoders
    zeroed = identity_layer(cache, 1)
    feeds = token_feeds()
    result = prune_model(zeroed, Recipe(drop_blocks=1, criterion="l1"), RunSettings(calibration=feeds))
    assert result.depth["dropped"] == [1] and result.depth["influence"][1] < 1e-6
    assert min(result.depth["influence"][0], result.depth["influence"][2]) > 1e-2
    model = result.model
    onnx.checker.check_model(model, full_check=True)
    inputs, outputs = [i.name for i in model.graph.input], [o.name for o in model.graph.output]
    assert inputs == ["input_ids", "attention_mask", "past_key_values.0.key", "past_key_values.0.value",
                      "past_key_values.1.key", "past_key_values.1.value"]
    assert outputs == ["logits", "present.0.key", "present.0.value", "present.1.key", "present.1.value"]
    rows = {r["name"]: r for r in result.interface}
    assert rows["present.1.key"]["after"] is None and rows["past_key_values.2.value"]["renamed"] == \
        "past_key_values.1.value"
    assert result.stats["params_after"] < result.stats["params_before"]
    # the oracle: greedy generation with the cache fed back matches the model that kept the identity layer
    from tests.test_kvcache import generate

    prompt = np.array([5, 17, 42, 3], np.int64)
    want_tokens, want_logits = generate(zeroed, prompt, 6)
    got_tokens, got_logits = generate(model, prompt, 6)
    scale = max(float(np.abs(w).max()) for w in want_logits)
    assert got_tokens == want_tokens
    assert max(float(np.abs(w - g).max()) for w, g in zip(want_logits, got_logits)) < 1e-4 * scale


@needs_transformers
def test_plain_decoder_keeps_its_interface_and_its_config_follows(decoders, tmp_path):
    plain, _ = decoders
    src = tmp_path / "src"
    src.mkdir()
    onnx.save(plain, str(src / "model.onnx"))
    (src / "config.json").write_text(json.dumps({"num_hidden_layers": LAYERS, "hidden_size": 32}))
    data = tmp_path / "calib.npz"
    np.savez(data, input_ids=np.random.default_rng(1).integers(0, 100, (6, 8)).astype(np.int64))
    out, report = tmp_path / "out" / "model.onnx", tmp_path / "r.json"
    out.parent.mkdir()
    # a share of the blocks (1 of 3), with width pruning and least-squares recovery in the same recipe
    assert main(["prune", str(src / "model.onnx"), "-o", str(out), "--drop-blocks", "0.34", "--ratio", "0.3",
                 "--data", str(data), "--recover", "lstsq", "--json", str(report)]) == 0
    pruned = onnx.load(str(out))
    for a, b in ((plain.graph.input, pruned.graph.input), (plain.graph.output, pruned.graph.output)):
        assert [(v.name, v.type) for v in a] == [(v.name, v.type) for v in b]
    data = json.loads(report.read_text())
    assert len(data["depth"]["dropped"]) == 1 and data["interface"] == [] and data["recipe"]["drop_blocks"] == 0.34
    assert data["stats"]["groups_pruned"] > 0 and data["stats"]["blocks_dropped"] == 1
    assert json.loads((out.parent / "config.json").read_text())["num_hidden_layers"] == LAYERS - 1
    ids = np.array([[1, 2, 3, 4, 5]], np.int64)
    assert run(pruned, {"input_ids": ids})[0].shape == (1, 5, 32)
    # replay: the report's recipe gives the same model
    again = tmp_path / "again.onnx"
    assert main(["prune", str(src / "model.onnx"), "-o", str(again), "--recipe", str(report),
                 "--data", str(tmp_path / "calib.npz")]) == 0
    assert {t.name: t.raw_data for t in onnx.load(str(again)).graph.initializer} == \
        {t.name: t.raw_data for t in pruned.graph.initializer}


def test_depth_needs_data_and_a_valid_count(tmp_path, cli_error):
    out = tmp_path / "o.onnx"
    cli_error(["prune", "models/digits_resnet.onnx", "-o", str(out), "--drop-blocks", "1"],
              "--drop-blocks scores blocks on calibration data")
    cli_error(["prune", "models/digits_resnet.onnx", "-o", str(out), "--drop-blocks", "1.5"],
              "a number of blocks")
    cli_error(["prune", "models/digits_resnet.onnx", "-o", str(out), "--drop-blocks", "3",
               "--data", "models/digits_calib.npz"], "at least one must stay")
    assert not out.exists()
    with pytest.raises(InputError, match="structured"):
        Recipe(mode="unstructured", drop_blocks=1)
    assert parse_list("drop_blocks", "1,0.25") == [1.0, 0.25]


def test_resnet_block_drops_and_runs(tmp_path):
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    assert main(["prune", "models/digits_resnet.onnx", "-o", str(out), "--drop-blocks", "1",
                 "--data", "models/digits_calib.npz", "--json", str(report)]) == 0
    data = json.loads(report.read_text())
    assert len(data["depth"]["dropped"]) == 1 and data["stats"]["params_after"] < data["stats"]["params_before"]
    x = np.load("models/digits_heldout.npz")
    name = next(k for k in x.files if k != "labels")
    assert run(onnx.load(str(out)), {onnx.load(str(out)).graph.input[0].name: x[name][:4]})[0].shape[0] == 4


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("onnxruntime_genai") is None, reason="needs onnxruntime-genai")
@needs_transformers
def test_genai_builder_model_drops_a_layer_and_generates(tmp_path):
    from tools import export_transformers as et
    from tools import stdlib_text as st

    from tests.test_genai import generate

    model = et.llama_lm(hidden=128, heads=8, kv_heads=2, layers=LAYERS, intermediate=96, vocab=st.VOCAB,
                        config={"bos_token_id": st.BOS, "eos_token_id": st.EOS, "pad_token_id": st.PAD})
    st.save_hf_folder(model, tmp_path / "hf")
    built = tmp_path / "built"
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(tmp_path / "hf"), "-o",
                    str(built), "-p", "fp32", "-e", "cpu", "-c", str(tmp_path / "cache")], check=True,
                   capture_output=True)
    zeroed_dir = tmp_path / "zeroed"
    shutil.copytree(built, zeroed_dir)
    zeroed = identity_layer(onnx.load(str(built / "model.onnx")), 1)
    for f in zeroed_dir.glob("model.onnx*"):
        f.unlink()
    onnx.save(zeroed, str(zeroed_dir / "model.onnx"))
    data = tmp_path / "calib.npz"
    np.savez(data, input_ids=np.random.default_rng(2).integers(0, st.VOCAB, (4, 12)).astype(np.int64),
             attention_mask=np.ones((4, 12), np.int64))
    out = tmp_path / "pruned" / "model.onnx"
    out.parent.mkdir()
    assert main(["prune", str(zeroed_dir / "model.onnx"), "-o", str(out), "--drop-blocks", "1", "--data",
                 str(data), "--json", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["depth"]["dropped"] == [1]
    decoder = json.loads((out.parent / "genai_config.json").read_text())["model"]["decoder"]
    assert decoder["num_hidden_layers"] == LAYERS - 1
    names = [i.name for i in onnx.load(str(out)).graph.input]
    assert [n for n in names if n.startswith("past")] == ["past_key_values.0.key", "past_key_values.1.key",
                                                         "past_key_values.0.value", "past_key_values.1.value"]
    prompt = [st.BOS, 40, 50, 60]
    assert generate(out.parent, prompt) == generate(zeroed_dir, prompt)


def test_sweep_varies_depth_and_width(tmp_path):
    out = tmp_path / "sweep"
    assert main(["sweep", "models/digits_resnet.onnx", "-o", str(out), "--eval-data", "models/digits_heldout.npz",
                 "--data", "models/digits_calib.npz", "--drop-blocks", "1", "--ratio", "0,0.2",
                 "--no-latency"]) == 0
    candidates = json.loads((out / "sweep.json").read_text())["candidates"]
    assert sorted((c["recipe"]["drop_blocks"], c["recipe"]["ratio"]) for c in candidates) == [(1.0, 0.0), (1.0, 0.2)]
    assert all(c["status"] == "ok" for c in candidates)
    params = {c["recipe"]["ratio"]: c["metrics"]["params"] for c in candidates}
    assert params[0.2] < params[0.0] < 170_730  # depth alone, then depth and width, below the original's


def test_mask_added_to_every_layers_scores_is_no_block():
    """Two attention layers that add one mask to their scores (as transformers' exports do): the mask reaches
    the second layer's scores through the first layer, yet only the two residual layers are blocks."""
    from tests.onnx_builders import build

    nodes = []
    stream = "x"
    for i in range(2):
        nodes += [("MatMul", [stream, f"wq{i}"], [f"q{i}"]), ("MatMul", [stream, f"wk{i}"], [f"k{i}"]),
                  ("MatMul", [stream, f"wv{i}"], [f"v{i}"]),
                  ("Transpose", [f"k{i}"], [f"kt{i}"], {"perm": [0, 2, 1]}),
                  ("MatMul", [f"q{i}", f"kt{i}"], [f"s{i}"]), ("Add", [f"s{i}", "mask"], [f"sm{i}"]),
                  ("Softmax", [f"sm{i}"], [f"p{i}"], {"axis": -1}), ("MatMul", [f"p{i}", f"v{i}"], [f"a{i}"]),
                  ("MatMul", [f"a{i}", f"wo{i}"], [f"o{i}"]), ("Add", [stream, f"o{i}"], [f"h{i}"])]
        stream = f"h{i}"
    weights = {f"w{n}{i}": (8, 8) for i in range(2) for n in "qkvo"}
    model = build(nodes, {"x": [1, 4, 8], "mask": [1, 4, 4]}, ["h1"], weights)
    blocks = find_blocks(model)
    assert [(b.input, b.output) for b in blocks] == [("x", "h0"), ("h0", "h1")]
