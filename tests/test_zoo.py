"""The torchvision zoo (issue 2): every model, both exporters, pruned at 0.5 and held to the zero-channel oracle.

Models come from tools/zoo.py (random seeded weights, exported once and cached under .cache/zoo/). CI runs
a representative subset; the rest are marked slow (`pytest --runslow`, or `python tools/run_zoo.py` for the
table in docs/BENCHMARKS.md).

Oracle tolerance. The oracle zeroes the weights that read 30% of the channels of every prunable group,
prunes exactly those channels and compares the two models on the same input. Removed channels contribute
exact zeros, so the only difference is float32 rounding from kernels summing fewer terms in another order:
about sqrt(depth * fan_in) * 2^-24 relative to the activations, 1e-7 to 7e-7 over this zoo. We compare
max |zeroed - pruned| / max |zeroed| over all outputs (the scale is the largest output, so logits near zero
do not inflate the ratio) against 1e-5. A wrong index map or a missed consumer gives errors of order 1e-1.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
import pytest

from tools import zoo
from onnxprune.recipe import Recipe

ORACLE_TOL = 1e-5
# Uniform 0.5 removes half the channels of each prunable group; a layer with both sides pruned keeps about
# a quarter of its MACs. Frozen groups (stem input, classifier output, channel shuffle, LayerNorm) keep some.
MAX_MACS_RATIO = 0.75

# Both exporters of a few architectures that cover residual adds, depthwise convs, dense concatenation,
# channel shuffle and inception branches, plus the PRESERVE and deduplicated-initializer exports.
CI_CASES = {
    ("resnet18", "torchscript"), ("resnet18", "dynamo"),
    ("mobilenet_v2", "torchscript"), ("mobilenet_v2", "dynamo"),
    ("densenet121", "torchscript"), ("densenet121", "dynamo"),
    ("shufflenet_v2", "torchscript"), ("shufflenet_v2", "dynamo"),
    ("googlenet", "torchscript"), ("googlenet", "dynamo"),
    ("squeezenet", "torchscript"),
    ("resnet18_bn", "torchscript"),
    ("resnet18_plain", "torchscript"),
}


def _params():
    out = []
    for name, exporter in zoo.cases():
        marks = () if (name, exporter) in CI_CASES else (pytest.mark.slow,)
        out.append(pytest.param(name, exporter, id=f"{name}-{exporter}", marks=marks))
    return out


CASES = _params()


@functools.lru_cache(maxsize=1)
def _load_bytes(name: str, exporter: str) -> bytes:
    return zoo.export(name, exporter).read_bytes()


def load(name: str, exporter: str) -> onnx.ModelProto:
    """A fresh copy of the exported model (tests may not share a mutable proto)."""
    return onnx.load_from_string(_load_bytes(name, exporter))


def ort_run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    from onnxprune.runtime.session import run

    return run(model, {"input": x})


def test_zoo_lists_the_issue_architectures():
    wanted = {"resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "densenet121",
              "shufflenet_v2", "squeezenet", "googlenet", "resnext50", "regnet_y_400mf", "vgg11", "convnext_tiny"}
    assert wanted <= set(zoo.ZOO)
    for name in wanted:
        assert zoo.ZOO[name].exporters == zoo.EXPORTERS, name
    assert zoo.ZOO["resnet18_bn"].preserve_bn


@pytest.mark.parametrize("name, exporter", CASES)
def test_prune_half(name: str, exporter: str):
    from onnxprune.pipeline.prune import prune_model

    spec = zoo.ZOO[name]
    model = load(name, exporter)
    x = zoo.example_input(name, batch=2)  # batch 2: the dynamic batch axis must survive pruning
    before = ort_run(model, x)

    res = prune_model(model, Recipe(ratio=0.5))
    after = ort_run(res.model, x)

    # the interface is unchanged and onnxruntime gives the original output shapes
    assert [i.name for i in res.model.graph.input] == [i.name for i in model.graph.input]
    assert [o.name for o in res.model.graph.output] == [o.name for o in model.graph.output]
    assert [a.shape for a in after] == [b.shape for b in before] == [(2, 1000)]
    assert all(np.isfinite(a).all() for a in after)

    s = res.stats
    assert s["macs_after"] < MAX_MACS_RATIO * s["macs_before"], s
    assert s["params_after"] < s["params_before"], s
    assert s["channels_removed"] > 0

    # every frozen group is frozen for a reason this architecture explains (catches new, unexpected freezes)
    allowed = ("reaches graph output", *spec.frozen)
    unexpected = [(g.size, g.reason) for g in res.analysis.groups
                  if not g.prunable and not any(a in str(g.reason) for a in allowed)]
    assert not unexpected, unexpected
    frozen = [g for g in res.analysis.groups if not g.prunable]
    if not spec.frozen:
        assert len(frozen) == 1, [g.reason for g in frozen]  # only the classifier's output channels


@pytest.mark.parametrize("name, exporter", CASES)
def test_zero_channel_oracle(name: str, exporter: str):
    from onnxprune.pipeline.prepare import prepare
    from onnxprune.testing import zero_channel_oracle

    model = load(name, exporter)
    prunable = prepare(model).analysis.prunable
    total = sum(g.size for g in prunable)
    r = zero_channel_oracle(model, seed=0, fraction=0.3, feed={"input": zoo.example_input(name, batch=2)})
    assert r.max_rel_err <= ORACLE_TOL, (r.max_rel_err, r.max_abs_err)
    # the oracle really removed channels from (nearly) every prunable group: about 30% of their channels
    assert r.groups >= 0.8 * len(prunable), (r.groups, len(prunable))
    assert r.pruned_channels >= 0.2 * total, (r.pruned_channels, total)


def test_preserve_export_keeps_batchnorm_and_prunes_it():
    from onnx import numpy_helper

    from onnxprune.pipeline.prune import prune_model

    model = load("resnet18_bn", "torchscript")
    bns = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    assert len(bns) == 20
    res = prune_model(model, Recipe(ratio=0.5))
    inits = {t.name: t for t in res.model.graph.initializer}
    pruned_bns = [n for n in res.model.graph.node if n.op_type == "BatchNormalization"]
    assert len(pruned_bns) == 20
    # each BN's four parameter vectors match the channel count of the Conv that feeds it
    convs = {n.output[0]: n for n in res.model.graph.node if n.op_type == "Conv"}
    for bn in pruned_bns:
        out_channels = inits[convs[bn.input[0]].input[1]].dims[0]
        sizes = {numpy_helper.to_array(inits[name]).shape for name in bn.input[1:5]}
        assert sizes == {(out_channels,)}, bn.name
    # every BN width was halved: ResNet-18's 64/128/256/512 became 32/64/128/256
    widths = sorted({inits[convs[bn.input[0]].input[1]].dims[0] for bn in pruned_bns})
    assert widths == [32, 64, 128, 256], widths


def test_deduplicated_initializers_do_not_freeze_groups():
    """TorchScript shares identical (zero) conv biases behind Identity nodes; pruning must unshare them."""
    from onnxprune.pipeline.prepare import prepare

    plain = load("resnet18_plain", "torchscript")
    inits = {t.name for t in plain.graph.initializer}
    assert sum(n.op_type == "Identity" and n.input[0] in inits for n in plain.graph.node) >= 8
    randomised = load("resnet18", "torchscript")
    assert len(prepare(plain).analysis.prunable) == len(prepare(randomised).analysis.prunable) == 12


def _both_exporters():
    out = []
    for name, spec in zoo.ZOO.items():
        if spec.exporters != zoo.EXPORTERS:
            continue
        ci = all((name, e) in CI_CASES for e in zoo.EXPORTERS)
        out.append(pytest.param(name, id=name, marks=() if ci else (pytest.mark.slow,)))
    return out


@pytest.mark.parametrize("name", _both_exporters())
def test_macs_agree_across_exporters(name: str):
    """The two exports of one network are the same computation: MAC and parameter counts must agree.

    A MAC counter that loses shapes (e.g. behind Reshapes whose shape is computed at run time) shows here.
    """
    from onnxprune.graph.stats import count_macs, count_params

    ts, dyn = load(name, "torchscript"), load(name, "dynamo")
    assert count_macs(ts) == pytest.approx(count_macs(dyn), rel=1e-6)
    # dynamo folds a few scalar constants differently (Clip bounds, LayerNorm), hence the small tolerance
    assert count_params(ts) == pytest.approx(count_params(dyn), rel=1e-4)
