"""Transformers as exporters emit them: BERT-like, GPT-2-like (transformers, random weights) and a small
torchvision ViT, each exported with the TorchScript (opset 17) and dynamo (opset 18) exporters.

Each case: pruning runs and keeps output shapes, the zero-channel oracle holds (removing zeroed heads or neurons
leaves outputs unchanged), and the expected head and neuron groups are prunable.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxprune.prune import prepare, prune_model
from onnxprune.testing import zero_channel_oracle
from onnxprune.validate import run

pytestmark = pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

# (kind, exporter) -> (head groups, neuron groups) expected prunable; ViT's packed in_proj heads stay frozen
CASES = {("bert", False): (2, 2), ("bert", True): (2, 2), ("gpt2", False): (2, 2), ("gpt2", True): (2, 2),
         ("vit", False): (0, 2), ("vit", True): (0, 2)}
SLOW = {("vit", True), ("gpt2", True)}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    import export_transformers as et

    cache: dict = {}

    def get(kind: str, dynamo: bool) -> onnx.ModelProto:
        if (kind, dynamo) not in cache:
            path = tmp_path_factory.mktemp("tf") / f"{kind}_{'dyn' if dynamo else 'ts'}.onnx"
            et.export({"bert": et.bert, "gpt2": et.gpt2, "vit": et.vit}[kind](), kind, path, dynamo)
            cache[(kind, dynamo)] = onnx.load(str(path))
        return cache[(kind, dynamo)]

    return get


def feed_for(kind: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    if kind == "vit":
        return {"pixel_values": rng.standard_normal((2, 3, 32, 32)).astype(np.float32)}
    feed = {"input_ids": rng.integers(0, 100, (2, 7)).astype(np.int64)}
    if kind == "bert":
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

    result = prune_model(model, ratio=0.3)
    assert result.stats["params_after"] < result.stats["params_before"]
    for want, got in zip(run(model, feed), run(result.model, feed)):
        assert want.shape == got.shape
    if heads:
        assert any(len(result.plan.kept.get(g.spaces[0], [])) < g.size for g in groups if g.unit > 1)
