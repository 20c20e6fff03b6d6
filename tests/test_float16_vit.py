"""A float16 ViT (torchvision, TorchScript, onnxconverter-common) with its heads pruned (issue 17, item 7).

The rewrite loads and runs in onnxruntime; a rewrite onnxruntime refuses to load is a failed validation like any
other, narrowed to its group by the bisection; and a converted model that onnxruntime refuses before any rewrite
is named as the input's fault, not the rewrite's.
"""

from __future__ import annotations

import onnx
import pytest

from onnxprune.errors import InputError
from onnxprune.pipeline import validate as validate_module
from onnxprune.pipeline.prepare import prepare
from onnxprune.pipeline.prune import prune_model
from onnxprune.recipe import Recipe
from onnxprune.runtime.feeds import sample_feed
from onnxprune.runtime.session import SessionError, run
from tests.test_robust import _vit_fp16


@pytest.fixture(scope="module")
def vit16():
    return _vit_fp16(keep_io_types=False)


def _head_groups(model) -> list:
    return [g for g in prepare(model).analysis.prunable if g.unit > 1]


def test_heads_of_a_float16_vit_prune_and_run(vit16):
    heads = _head_groups(vit16)
    assert heads, "the ViT's attention heads are prunable groups"
    res = prune_model(vit16, Recipe(ratio=0.5))
    assert not res.faults
    pruned_roots = set(res.plan.kept)
    assert {g.spaces[0] for g in heads} <= pruned_roots
    floats = {t.data_type for t in res.model.graph.initializer if t.data_type in (1, 10, 11, 16)}
    assert floats == {onnx.TensorProto.FLOAT16}
    feed = sample_feed(vit16)
    assert run(res.model, feed)[0].shape == run(vit16, feed)[0].shape


def test_a_rewrite_onnxruntime_cannot_load_is_contained_to_its_group(vit16, monkeypatch):
    """onnxruntime refuses (as a session load error) every candidate whose first head group lost heads: the
    bisection freezes that group alone and the rest is pruned."""
    target = _head_groups(vit16)[0]
    real_run = validate_module.run
    refused = []

    def run_or_refuse(model, feed):
        kept = {t.name: list(t.dims) for t in model.graph.initializer}
        original = {t.name: list(t.dims) for t in vit16.graph.initializer}
        if any(kept.get(m.tensor) != original.get(m.tensor) for m in target.members if m.tensor in original):
            refused.append(1)
            raise SessionError("onnxruntime cannot load <in-memory model>: Type Error: injected", "injected")
        return real_run(model, feed)

    monkeypatch.setattr(validate_module, "run", run_or_refuse)
    res = prune_model(vit16, Recipe(ratio=0.5))
    assert refused
    [fault] = res.faults
    assert fault["stage"] == "validate" and "injected" in fault["error"]
    assert fault["groups"] == [target.id]
    assert target.spaces[0] not in res.plan.kept
    assert len(res.plan.kept) == len(prepare(vit16).analysis.prunable) - 1
    feed = sample_feed(vit16)
    assert run(res.model, feed)[0].shape == run(vit16, feed)[0].shape


def test_a_converted_model_onnxruntime_refuses_is_named_as_the_input(vit16):
    """onnxconverter-common leaves TorchScript's shape Casts at to=FLOAT with float16 outputs; onnxruntime refuses
    that model before any rewrite: the error says so instead of blaming the rewrite."""
    broken = onnx.ModelProto()
    broken.CopyFrom(vit16)
    for node in broken.graph.node:
        if node.op_type == "Cast" and any(a.name == "to" and a.i == onnx.TensorProto.FLOAT16 for a in node.attribute):
            next(a for a in node.attribute if a.name == "to").i = onnx.TensorProto.FLOAT
            break
    else:
        pytest.fail("the converted ViT has no float16 Cast to break")
    with pytest.raises(InputError, match="cannot load the input model either"):
        prune_model(broken, Recipe(ratio=0.5))
