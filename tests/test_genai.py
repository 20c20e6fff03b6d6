"""onnxruntime-genai's model builder output: a tiny random LLaMA-style GQA decoder (com.microsoft GroupQueryAttention
with packed q|k|v and rotary embeddings, SimplifiedLayerNormalization, SkipSimplifiedLayerNormalization) beside its
genai_config.json. It prunes; the output folder gets an updated genai_config.json and the tokenizer; and
onnxruntime_genai generates from it: the same tokens as the unpruned model whose pruned heads and neurons were
zeroed."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

from onnxprune.pipeline.prune import RunSettings
from onnxprune.recipe import Recipe

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("onnxruntime_genai") is None,
                       reason="needs onnxruntime-genai (pip install 'onnxprune[genai]')"),
    pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers"),
]


@pytest.fixture(scope="module")
def genai_folder(tmp_path_factory):
    """Hugging Face folder of a random LlamaForCausalLM (8 query heads of 16 sharing 2 k/v heads) with a byte-level
    WordLevel tokenizer, built by `python -m onnxruntime_genai.models.builder -p fp32 -e cpu`."""
    from tools import export_transformers as et
    from tools import stdlib_text as st

    root = tmp_path_factory.mktemp("genai")
    model = et.llama_lm(hidden=128, heads=8, kv_heads=2, layers=2, intermediate=96, vocab=st.VOCAB,
                        config={"bos_token_id": st.BOS, "eos_token_id": st.EOS, "pad_token_id": st.PAD})
    st.save_hf_folder(model, root / "hf")
    out = root / "built"
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(root / "hf"), "-o", str(out),
                    "-p", "fp32", "-e", "cpu", "-c", str(root / "cache")], check=True, capture_output=True)
    return out


def generate(folder, prompt, length=24):
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=length, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([prompt], dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    return generator.get_sequence(0).tolist()


def test_builder_model_prunes_and_generates(genai_folder, tmp_path):
    from onnxprune.io.model_folder import write_folder
    from onnxprune.pipeline.plan import plan_uniform
    from onnxprune.pipeline.prepare import prepare
    from onnxprune.pipeline.prune import prune_model
    from onnxprune.testing import zero_channels

    original = onnx.load(str(genai_folder / "model.onnx"))
    assert {"GroupQueryAttention", "SkipSimplifiedLayerNormalization"} <= {n.op_type for n in original.graph.node}
    prep = prepare(original)
    assert sorted((g.kv_groups, g.size // g.head_dim) for g in prep.analysis.prunable if g.kv_groups) == [(2, 8)] * 2
    rng = np.random.default_rng(0)
    plan = plan_uniform(prep.analysis, {g.spaces[0]: rng.random(g.size) for g in prep.analysis.prunable}, 0.5)
    removed = {r: np.setdiff1d(np.arange(plan.sizes[r]), k) for r, k in plan.kept.items()}
    zeroed = zero_channels(prep, removed)
    result = prune_model(zeroed, Recipe(), RunSettings(removed=removed))

    folders = {}
    for name, proto, res in (("zeroed", zeroed, prune_model(zeroed, Recipe(), RunSettings(removed={}))), ("pruned", result.model, result)):
        folder = tmp_path / name
        folder.mkdir()
        onnx.save(proto, str(folder / "model.onnx"))
        notes = write_folder(genai_folder / "model.onnx", folder / "model.onnx", res)
        assert any("model folder" in n for n in notes)
        folders[name] = folder
    config = json.loads((folders["pruned"] / "genai_config.json").read_text())["model"]["decoder"]
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_size"]) == (4, 1, 16)
    assert (folders["pruned"] / "tokenizer.json").is_file()
    prompt = [256, 100, 101, 102, 32]
    want = generate(folders["zeroed"], prompt)
    assert len(want) == 24
    assert generate(folders["pruned"], prompt) == want
    assert generate(genai_folder, prompt) != want  # the zeroed heads and neurons mattered


def test_cli_prunes_a_genai_folder(genai_folder, tmp_path):
    from onnxprune.cli import main

    out = tmp_path / "out"
    out.mkdir()
    assert main(["prune", str(genai_folder / "model.onnx"), "--ratio", "0.5", "-o", str(out / "model.onnx"),
                 "--json", str(tmp_path / "report.json")]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert any("num_key_value_heads 2 -> 1" in n for n in report["model_folder"])
    assert len(report["interface"]) == 8
    tokens = generate(out, [256, 35, 32])
    assert len(tokens) == 24
    # the pruned model does not overwrite the original folder's config
    assert main(["prune", str(genai_folder / "model.onnx"), "--ratio", "0.5", "-o", str(out / "model.onnx")]) == 2
