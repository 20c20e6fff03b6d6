"""Transformers as exporters emit them: BERT-like (also DistilBERT, RoBERTa, ALBERT), GPT-2-like, LLaMA-like
(transformers, random weights; grouped-query attention too) and a small torchvision ViT (also with timm-style
attention), exported with the TorchScript (opset 17) and dynamo (opset 18) exporters.

Each case: pruning runs and keeps output shapes, the zero-channel oracle holds (removing zeroed heads or neurons
leaves outputs unchanged), and the expected head and neuron groups are prunable.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import onnx
import pytest

from onnxprune.pipeline.prepare import prepare
from onnxprune.pipeline.prune import RunSettings, prune_model
from onnxprune.recipe import Recipe
from onnxprune.runtime.session import run
from onnxprune.testing import zero_channel_oracle

pytestmark = pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")

# (kind, exporter) -> (head groups, neuron groups) expected prunable (ViT: torch's packed in_proj, heads folded
# into the batch axis; vit_split: timm-style qkv viewed as [B, N, 3, H, D], unbound by Split or Slice; ALBERT: its
# layers share weights, so they are one group — except the MLP weights the dynamo exporter copies per layer)
CASES = {("bert", False): (2, 2), ("bert", True): (2, 2), ("gpt2", False): (2, 2), ("gpt2", True): (2, 2),
         ("vit", False): (2, 2), ("vit", True): (2, 2), ("vit_split", False): (2, 2), ("vit_split", True): (2, 2),
         ("llama", False): (2, 2), ("llama", True): (2, 2), ("llama_gqa", False): (2, 2), ("llama_gqa", True): (2, 2),
         ("distilbert", False): (2, 2), ("roberta", False): (2, 2), ("albert", False): (1, 1), ("albert", True): (1, 2)}
SLOW = {("vit", True), ("gpt2", True), ("vit_split", True), ("llama", True), ("albert", True)}
EXPORT_KIND = {"bert": "bert", "gpt2": "gpt2", "llama": "gpt2", "llama_gqa": "gpt2", "vit": "vit", "vit_split": "vit",
               "distilbert": "bert", "roberta": "bert", "albert": "bert"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from tools import export_transformers as et

    cache: dict = {}

    def get(kind: str, dynamo: bool) -> onnx.ModelProto:
        if (kind, dynamo) not in cache:
            path = tmp_path_factory.mktemp("tf") / f"{kind}_{'dyn' if dynamo else 'ts'}.onnx"
            model = {"bert": et.bert, "gpt2": et.gpt2, "vit": et.vit, "vit_split": et.vit_split, "llama": et.llama,
                     "llama_gqa": lambda: et.llama(kv_heads=2)}.get(kind, lambda: et.encoder(kind))()
            et.export(model, EXPORT_KIND[kind], path, dynamo)
            cache[(kind, dynamo)] = onnx.load(str(path))
        return cache[(kind, dynamo)]

    return get


def feed_for(kind: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    if kind.startswith("vit"):
        return {"pixel_values": rng.standard_normal((2, 3, 32, 32)).astype(np.float32)}
    feed = {"input_ids": rng.integers(0, 100, (2, 7)).astype(np.int64)}
    if EXPORT_KIND[kind] == "bert":
        mask = np.ones((2, 7), np.int64)
        mask[1, 5:] = 0
        feed["attention_mask"] = mask
    return feed


@pytest.mark.parametrize("kind,dynamo", [pytest.param(k, d, marks=pytest.mark.slow) if (k, d) in SLOW else (k, d)
                                         for k, d in CASES], ids=lambda v: str(v))
def test_prune_transformer(exported, kind, dynamo):
    model = exported(kind, dynamo)
    heads, neurons = CASES[(kind, dynamo)]
    groups = prepare(model).analysis.prunable
    assert sum(g.unit > 1 for g in groups) == heads
    assert sum(g.unit == 1 for g in groups) == neurons

    feed = feed_for(kind)
    oracle = zero_channel_oracle(model, feed=feed)
    assert oracle.max_rel_err < 1e-4, f"zero-channel oracle: rel err {oracle.max_rel_err}"
    onnx.checker.check_model(oracle.pruned, full_check=True)

    result = prune_model(model, Recipe(ratio=0.3))
    assert result.stats["params_after"] < result.stats["params_before"]
    for want, got in zip(run(model, feed), run(result.model, feed)):
        assert want.shape == got.shape
    if heads:
        assert any(len(result.plan.kept.get(g.spaces[0], [])) < g.size for g in groups if g.unit > 1)
    if kind == "llama_gqa":  # k/v heads shared by 2 query heads each (repeat_kv): whole KV groups, or query heads
        assert all(g.kv_groups == 2 for g in groups if g.unit > 1)
        oracle = zero_channel_oracle(model, feed=feed, gqa_mode="query-heads")
        assert oracle.pruned_channels > 0 and oracle.max_rel_err < 1e-4, oracle.max_rel_err
        moved = np.abs(run(oracle.zeroed, feed)[0] - run(model, feed)[0]).max() / np.abs(run(model, feed)[0]).max()
        assert moved > 1e-2


def test_token_rows_follow_the_attention_mask():
    from onnxprune.pipeline.activations import token_rows

    mask = np.array([[1, 1, 0], [1, 0, 0]], np.int64)
    rows = token_rows({"input_ids": np.zeros((2, 3), np.int64), "attention_mask": mask}, (2, 3, 8))
    assert rows.tolist() == [True, True, False, True, False, False]
    assert token_rows({"input_ids": np.zeros((2, 3), np.int64)}, (2, 3, 8)) is None
    assert token_rows({"attention_mask": mask}, (6, 8)) is None  # not a [batch, seq, features] tensor


def test_solve_path_matches_one_solve_per_alpha():
    from onnxprune.pipeline.recover.ridge import ALPHAS, solve, solve_path

    rng = np.random.default_rng(0)
    x = np.hstack([rng.normal(size=(300, 12)) + 1.0, np.ones((300, 1))])
    y = x[:, :12] @ rng.normal(size=(12, 4)) + rng.normal(size=(300, 4))
    a, b, theta0 = x.T @ x, x.T @ y, rng.normal(size=(13, 4))
    for intercept, (aa, bb, t0) in ((True, (a, b, theta0)), (False, (a[:12, :12], b[:12], theta0[:12]))):
        for alpha, theta in zip(ALPHAS, solve_path(aa, bb, t0, ALPHAS, intercept)):
            np.testing.assert_allclose(theta, solve(aa, bb, t0, alpha, intercept), rtol=1e-8, atol=1e-10)


def test_probe_with_only_outputs_runs_the_needed_nodes(exported):
    from onnxprune.pipeline.activations import only_outputs

    model = exported("bert", False)
    name = next(n.output[0] for n in model.graph.node if n.op_type == "MatMul")
    small = only_outputs(model, [name])
    assert [o.name for o in small.graph.output] == [name]
    assert len(small.graph.node) < len(model.graph.node) // 3
    feed = feed_for("bert")
    from onnxprune.pipeline.activations import Probe

    np.testing.assert_array_equal(Probe(model, [name]).run(feed)[name], Probe(model, [name], only=True).run(feed)[name])


def test_lstsq_refits_against_the_residual_stream_and_skips_padding(exported):
    """Heads and neurons of a small BERT pruned with lstsq: the output projection and fc2 are refit to the
    original residual sums (their Add), the fit ignores padded tokens, and the output moves towards the
    original's on real tokens."""
    model = exported("bert", False)
    rng = np.random.default_rng(1)
    calib = []
    for _ in range(6):
        mask = np.ones((4, 9), np.int64)
        mask[:, 5:] = rng.integers(0, 2, (4, 4)).cumprod(axis=1)  # right padding of varied length
        calib.append({"input_ids": rng.integers(0, 100, (4, 9)).astype(np.int64), "attention_mask": mask})
    feed = feed_for("bert")
    want = run(model, [feed][0])[0]
    real = feed["attention_mask"].astype(bool)

    def error(m):
        return float(np.abs(run(m, feed)[0] - want)[real].mean())

    plain = prune_model(model, Recipe(ratio=0.5, criterion="activation"), RunSettings(calibration=calib))
    fixed = prune_model(model, Recipe(ratio=0.5, criterion="activation", recover="lstsq"), RunSettings(calibration=calib))
    refit = {entry["node"]: entry for entry in fixed.recovery}
    assert any("attention/output/dense" in n for n in refit) and any("/output/dense" in n for n in refit)
    real_tokens = sum(int(f["attention_mask"].sum()) for f in calib)
    assert all(entry["rows"] == real_tokens for entry in refit.values())
    assert error(fixed.model) < error(plain.model)
    onnx.checker.check_model(fixed.model, full_check=True)


def test_activation_statistics_skip_padded_tokens(exported):
    """What the padded positions hold changes no statistic: scores see real tokens only."""
    from onnxprune.pipeline.statistics import channel_stats

    model = exported("bert", False)
    prep = prepare(model)
    feed = feed_for("bert")
    other = dict(feed, input_ids=np.where(feed["attention_mask"] == 0, 42, feed["input_ids"]))
    a, b = channel_stats(prep, [feed]), channel_stats(prep, [other])
    assert a.tensors and a.tensors.keys() == b.tensors.keys()
    for name in a.tensors:
        np.testing.assert_allclose(a.tensors[name].sq_sum, b.tensors[name].sq_sum, rtol=1e-5)
        assert a.tensors[name].count == b.tensors[name].count


@pytest.mark.slow
@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_vit_b_16_heads_and_neurons(tmp_path, dynamo):
    """torchvision's ViT-B/16 itself: 12 head groups (packed in_proj) and 12 MLP neuron groups are prunable, and
    removing zeroed heads and neurons leaves the logits unchanged."""
    from tools import export_transformers as et

    path = et.export(et.vit(small=False), "vit", tmp_path / "vit_b_16.onnx", dynamo, image_size=224)
    model = onnx.load(str(path))
    groups = prepare(model).analysis.prunable
    assert sorted(g.size // g.unit for g in groups if g.unit > 1) == [12] * 12
    assert sorted(g.size for g in groups if g.unit == 1) == [3072] * 12
    feed = {"pixel_values": np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)}
    oracle = zero_channel_oracle(model, feed=feed)
    assert oracle.pruned_channels > 0 and oracle.max_rel_err < 1e-4, oracle.max_rel_err


def test_hidden_size_prunes_only_when_asked(exported, tmp_path, capsys):
    """--prune-hidden: the residual stream (conv stem, class token, position embedding, every LayerNorm, the
    writers and readers of all blocks) becomes one prunable group; the result runs, keeps its output shape and
    is reported as approximate. Without the option that group stays frozen with the LayerNorm reason."""
    from onnxprune.cli import main
    from onnxprune.pipeline.prune import HIDDEN_WARNING

    model = exported("vit", False)
    frozen = [g for g in prepare(model).analysis.groups if g.size == 32 and not g.prunable]
    assert frozen and any("hidden size" in g.reason or "LayerNorm" in g.reason for g in frozen)
    hidden = [g for g in prepare(model, prune_hidden=True).analysis.prunable if g.size == 32 and g.unit == 1]
    assert len(hidden) == 1 and len({m.node for m in hidden[0].members}) > 15

    result = prune_model(model, Recipe(ratio=0.25, prune_hidden=True))
    assert HIDDEN_WARNING in result.notes
    shapes = {t.name: tuple(t.dims) for t in result.model.graph.initializer}
    assert {v for k, v in shapes.items() if "ln_1.weight" in k} == {(24,)}
    assert {v for k, v in shapes.items() if "class_token" in k} == {(1, 1, 24)}
    feed = feed_for("vit")
    assert run(result.model, feed)[0].shape == run(model, feed)[0].shape
    # ratio 0 with the option changes nothing
    same = prune_model(model, Recipe(ratio=0.0, prune_hidden=True))
    np.testing.assert_allclose(run(same.model, feed)[0], run(model, feed)[0], rtol=1e-5, atol=1e-6)

    path = tmp_path / "vit.onnx"
    onnx.save(model, str(path))
    capsys.readouterr()
    assert main(["prune", str(path), "--ratio", "0.25", "--prune-hidden", "-o", str(tmp_path / "p.onnx")]) == 0
    out, err = capsys.readouterr()
    assert "warning: --prune-hidden changes LayerNorm statistics" in err and "note: hidden features" in out


@pytest.mark.parametrize("dynamo", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["torchscript", "dynamo"])
def test_prune_hidden_from_the_embeddings(tmp_path, dynamo):
    """BERT that outputs its pooled [CLS] vector: with --prune-hidden the hidden size is one group from the word,
    position and token-type embedding tables through every LayerNorm and residual Add to the pooler's input."""
    from tools import export_transformers as et

    path = et.export(et.bert(pooled=True), "bert", tmp_path / "bert_pooled.onnx", dynamo)
    model = onnx.load(str(path))
    assert not any(g.size == 32 and g.unit == 1 for g in prepare(model).analysis.prunable)
    hidden = [g for g in prepare(model, prune_hidden=True).analysis.prunable if g.size == 32 and g.unit == 1]
    assert len(hidden) == 1 and sum(m.op_type == "Gather" for m in hidden[0].members) == 3
    result = prune_model(model, Recipe(ratio=0.25, prune_hidden=True))
    feed = feed_for("bert")
    assert run(result.model, feed)[0].shape == run(model, feed)[0].shape == (2, 32)
    tables = [t for t in result.model.graph.initializer if "_embeddings.weight" in t.name]
    assert len(tables) == 3 and all(t.dims[1] == 24 for t in tables)
