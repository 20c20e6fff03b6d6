"""Decoders with a key/value cache (optimum's layout: past_key_values.N.key/value in, present.N.key/value out).

When key/value heads prune, the cache inputs and outputs follow (the only interface change), the report lists every
changed shape, and a greedy generation loop that feeds present back as past gives the same tokens and logits before
and after pruning zeroed heads. keep_kv_cache keeps the cache and freezes those heads.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import onnx
import pytest

from onnxprune.pipeline.plan import plan_uniform
from onnxprune.pipeline.prepare import prepare
from onnxprune.pipeline.prune import RunSettings, prune_model
from onnxprune.recipe import Recipe
from onnxprune.runtime.session import internal_session
from onnxprune.testing import zero_channels

pytestmark = pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")
LAYERS, KV_HEADS, HEAD = 2, 2, 8


@pytest.fixture(scope="module")
def cache_model(tiny_decoder):
    def get(dynamo: bool) -> onnx.ModelProto:
        return onnx.load(str(tiny_decoder(dynamo, hidden=32, heads=4, kv_heads=KV_HEADS, layers=LAYERS)))

    return get


def generate(model: onnx.ModelProto, prompt: np.ndarray, steps: int) -> tuple[list[int], list[np.ndarray]]:
    """Greedy decoding: the prompt, then one token per step with the previous present fed back as past."""
    sess = internal_session(model)
    inputs = {i.name: i for i in model.graph.input}
    heads = {n: i.type.tensor_type.shape.dim[1].dim_value for n, i in inputs.items() if n.startswith("past")}
    past = {n: np.zeros((1, h, 0, HEAD), np.float32) for n, h in heads.items()}
    names = [o.name for o in sess.get_outputs()]
    ids, tokens, logits = prompt[None, :], [], []
    total = 0
    for _ in range(steps):
        total += ids.shape[1]
        out = dict(zip(names, sess.run(None, {"input_ids": ids, "attention_mask": np.ones((1, total), np.int64),
                                              **past})))
        last = out["logits"][0, -1]
        logits.append(last)
        tokens.append(int(last.argmax()))
        past = {n: out[n.replace("past_key_values", "present")] for n in past}
        ids = np.array([[tokens[-1]]], np.int64)
    return tokens, logits


@pytest.mark.parametrize("mode", ["kv-groups", "query-heads"])
@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_generation_with_pruned_cache_matches(cache_model, dynamo, mode):
    model = cache_model(dynamo)
    prep = prepare(model, gqa_mode=mode)
    heads = [g for g in prep.analysis.prunable if g.kv_groups]
    assert len(heads) == LAYERS and all(g.kv_groups == KV_HEADS for g in heads)
    rng = np.random.default_rng(0)
    plan = plan_uniform(prep.analysis, {g.spaces[0]: rng.random(g.size) for g in prep.analysis.prunable}, 0.5)
    removed = {r: np.setdiff1d(np.arange(plan.sizes[r]), k) for r, k in plan.kept.items()}
    zeroed = zero_channels(prep, removed)
    result = prune_model(zeroed, Recipe(gqa_mode=mode), RunSettings(removed=removed))

    changed = {c["name"]: (c["before"], c["after"]) for c in result.interface}
    if mode == "query-heads":  # the k/v heads and so the cache stay
        assert changed == {}
    else:
        cache_names = {f"{p}.{i}.{kv}" for i in range(LAYERS) for kv in ("key", "value")
                       for p in ("past_key_values", "present")}
        assert set(changed) == cache_names
        assert changed["past_key_values.0.key"] == (["batch", 2, "past", HEAD], ["batch", 1, "past", HEAD])
        before, after = changed["present.1.value"]  # [batch, kv heads, total, head_size]
        assert (before[1], after[1]) == (2, 1) and before[::2] == after[::2]

    prompt = np.array([5, 17, 42, 3], np.int64)
    want_tokens, want_logits = generate(zeroed, prompt, 10)
    got_tokens, got_logits = generate(result.model, prompt, 10)
    assert got_tokens == want_tokens
    scale = max(float(np.abs(w).max()) for w in want_logits)
    assert max(float(np.abs(w - g).max()) for w, g in zip(want_logits, got_logits)) < 1e-4 * scale
    # the zeroed heads mattered: the unpruned model generates other logits
    _, plain_logits = generate(model, prompt, 10)
    assert max(float(np.abs(w - p).max()) for w, p in zip(want_logits, plain_logits)) > 1e-2 * scale


def test_keep_kv_cache_freezes_the_heads(cache_model, tmp_path, capsys):
    from onnxprune.cli import main

    model = cache_model(False)
    groups = prepare(model, keep_kv_cache=True).analysis.groups
    heads = [g for g in groups if g.kv_groups]
    assert heads and not any(g.prunable for g in heads)
    assert all("key/value cache" in g.reason and "keep_kv_cache" in g.reason for g in heads)
    result = prune_model(model, Recipe(ratio=0.5, keep_kv_cache=True))
    assert result.interface == [] and result.stats["params_after"] < result.stats["params_before"]

    path = tmp_path / "lm.onnx"
    onnx.save(model, str(path))
    capsys.readouterr()
    assert main(["prune", str(path), "--ratio", "0.5", "-o", str(tmp_path / "p.onnx"),
                 "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "interface changes" in out and "past_key_values.0.key" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert len(report["interface"]) == 4 * LAYERS and report["gqa_mode"] == "auto"
    assert report["gqa_modes_used"] == ["kv-groups"]  # 2 KV groups can lose half of them whole
    pruned = onnx.load(str(tmp_path / "p.onnx"))
    assert [d.dim_value for d in pruned.graph.input[2].type.tensor_type.shape.dim][1] == 1

    assert main(["prune", str(path), "--ratio", "0.5", "--keep-kv-cache", "-o", str(tmp_path / "k.onnx"),
                 "--json", str(tmp_path / "k.json")]) == 0
    assert json.loads((tmp_path / "k.json").read_text())["interface"] == []
    assert main(["analyze", str(path), "--gqa-mode", "query-heads", "--json", str(tmp_path / "a.json")]) == 0
    rows = [r for r in json.loads((tmp_path / "a.json").read_text())["groups"] if r.get("kv_groups")]
    assert len(rows) == LAYERS and all((r["heads"], r["kv_groups"], r["head_dim"], r["gqa_mode"], r["prunable"])
                                       == (4, 2, HEAD, "query-heads", True) for r in rows)


def test_hugging_face_folder_gets_an_updated_config(tmp_path):
    """A model beside config.json (and a tokenizer): the output folder gets config.json with the pruned head, KV-head
    and MLP sizes, and the other files; layers pruned unevenly are reported, not written as one wrong value."""
    from tools import export_transformers as et
    from tools import stdlib_text as st

    from onnxprune.cli import main
    from onnxprune.io.model_folder import pruned_sizes

    lm = et.llama_lm(hidden=32, heads=4, kv_heads=KV_HEADS, layers=LAYERS, intermediate=64, vocab=st.VOCAB)
    src = st.save_hf_folder(lm, tmp_path / "src")
    (src / "model.safetensors").unlink()
    et.export_cache(lm, src / "model.onnx", dynamo=False)
    out = tmp_path / "out"
    out.mkdir()
    assert main(["prune", str(src / "model.onnx"), "--ratio", "0.5", "-o", str(out / "model.onnx"),
                 "--json", str(tmp_path / "r.json")]) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["intermediate_size"],
            config["hidden_size"]) == (2, 1, 32, 32)
    assert config["head_dim"] == HEAD and (out / "tokenizer.json").is_file()
    assert json.loads((src / "config.json").read_text())["num_attention_heads"] == 4  # the source is untouched
    report = json.loads((tmp_path / "r.json").read_text())
    assert "config.json: num_key_value_heads 2 -> 1" in report["model_folder"]
    # uneven layers: one value cannot describe them
    model = onnx.load(str(src / "model.onnx"))
    prep = prepare(model)
    neurons = [g for g in prep.analysis.prunable if not g.kv_groups]
    result = prune_model(model, Recipe(), RunSettings(removed={neurons[0].spaces[0]: np.arange(8)}))
    assert pruned_sizes(result)["intermediate"] == {56, 64}
