"""Issue 12, a broader zoo: timm, Hugging Face transformers and Ultralytics YOLOv8 models (tools/zoo_libs.py),
each pruned at 0.5 and held to the zero-channel oracle, which must also be informative: zeroing must move the
outputs far more than the tolerance, or the weights are drawn again (a random detector head hardly depends on
its weights). CI runs a subset; `--runslow` the rest.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
import pytest

from tools import zoo_libs
from onnxprune.recipe import Recipe

ORACLE_TOL = 1e-5


def _params():
    out = []
    for name, spec in zoo_libs.LIBS.items():
        marks = [pytest.mark.slow] if not spec.ci else []
        out.append(pytest.param(name, id=name, marks=marks))
    return out


@functools.lru_cache(maxsize=2)
def _bytes(name: str, seed: int) -> bytes:
    pytest.importorskip(zoo_libs.LIBS[name].library)
    return zoo_libs.export(name, seed).read_bytes()


def load(name: str, seed: int = 0) -> onnx.ModelProto:
    return onnx.load_from_string(_bytes(name, seed))


@pytest.mark.parametrize("name", _params())
def test_prune_half_and_oracle(name):
    from onnxprune.pipeline.prune import prune_model
    from onnxprune.testing import zero_channel_oracle
    from onnxprune.runtime.session import run

    spec = zoo_libs.LIBS[name]
    feed = {"input": zoo_libs.example_input(name, batch=2)}
    for seed in range(3):  # weights drawn again while the oracle would prove nothing
        model = load(name, seed)
        r = zero_channel_oracle(model, seed=0, fraction=0.3, feed=feed)
        if r.informative(ORACLE_TOL):
            break
    assert r.informative(ORACLE_TOL), f"zeroing moved the outputs by only {r.moved:.2g} for every seed"
    assert not r.faults, r.faults
    assert r.max_rel_err <= ORACLE_TOL, (r.max_rel_err, r.max_abs_err)
    assert r.groups >= 1 and r.pruned_channels > 0

    res = prune_model(model, Recipe(ratio=0.5))
    assert not res.faults, res.faults
    before, after = run(model, feed), run(res.model, feed)
    assert [a.shape for a in after] == [b.shape for b in before]
    assert res.stats["macs_after"] < 0.9 * res.stats["macs_before"], res.stats
    allowed = ("reaches graph output", "only one channel", "no layer reads", *spec.frozen)
    unexpected = [g.reason for g in res.analysis.groups if not g.prunable and not any(a in g.reason for a in allowed)]
    assert not unexpected, unexpected
    same = prune_model(model, Recipe(ratio=0.0))
    for a, b in zip(run(same.model, feed), before):
        np.testing.assert_array_equal(a, b)


def test_yolov8_c2f_halves_prune():
    """YOLOv8's C2f cuts each cv1 output in halves (`chunk(2, 1)`, Slices with bounds computed from the shape):
    the halves prune apart, so almost every group of the backbone and neck is prunable."""
    pytest.importorskip("ultralytics")
    from onnxprune.pipeline.prepare import prepare

    prep = prepare(load("ultralytics/yolov8n"))
    assert len(prep.analysis.prunable) >= 55 and len(prep.analysis.groups) <= 64
    assert not prep.analysis.faults
