"""Issue 12: valid models that used to end in an internal error prune without containment, oracle holding.

Each known form is reproduced by a small exported or handcrafted model: Swin's window partition (Reshape to
6-D, Transpose, Reshape back), a Resize whose sizes are computed at run time, inputs whose dims are stored as
-1 (paddle2onnx), and float16 ViTs (onnxconverter-common). "Without containment" means no handler fault and no
group frozen by the validation bisection (`faults` is empty): containment is the safety net, not the fix.
"""

from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
import onnx
import pytest

from onnxprune.pipeline.prepare import prepare
from onnxprune.pipeline.prune import prune_model
from onnxprune.recipe import Recipe
from onnxprune.runtime.feeds import sample_feed
from onnxprune.runtime.session import run
from onnxprune.testing import zero_channel_oracle
from tests.onnx_builders import build

ORACLE_TOL = 1e-5


def oracle(model, tol=ORACLE_TOL, min_groups=1, feed=None):
    """The oracle holds, is informative (zeroing moved the outputs), and nothing was contained."""
    r = zero_channel_oracle(model, feed=feed)
    assert not r.faults, r.faults
    assert r.groups >= min_groups, r.groups
    assert r.max_rel_err <= tol, (r.max_rel_err, r.max_abs_err)
    assert r.informative(tol), f"zeroing moved the outputs by only {r.moved}"
    onnx.checker.check_model(r.pruned, full_check=True)
    return r


def torch_export(module, x, dynamo=False, dynamic=None):
    import torch

    torch.manual_seed(0)
    buf = io.BytesIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if dynamo:
            program = torch.onnx.export(module.eval(), (x,), dynamo=True, opset_version=18, input_names=["input"],
                                        dynamic_shapes=({0: torch.export.Dim("batch")},))
            return program.model_proto
        torch.onnx.export(module.eval(), x, buf, dynamo=False, opset_version=17, input_names=["input"],
                          output_names=["output"], dynamic_axes=dynamic or {"input": {0: "batch"}})
    return onnx.load_from_string(buf.getvalue())


def test_swin_window_partition_prunes_heads_and_mlps():
    """torchvision's Swin (TorchScript): Reshape [B, H/w, w, W/w, w, C] and back; `Reshape._map` raised
    `min() arg is an empty sequence` because the window dims are symbols that do not line up."""
    import torch
    from torchvision.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    swin = SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4],
                           num_classes=10)
    model = torch_export(swin, torch.randn(1, 3, 32, 32))
    assert sum(n.op_type == "Reshape" for n in model.graph.node) > 8
    prep = prepare(model)
    assert not prep.analysis.faults
    heads = [g for g in prep.analysis.prunable if g.unit > 1]
    assert len(heads) == 4 and len(prep.analysis.prunable) == 8, [str(g) for g in prep.analysis.groups]
    r = oracle(model, min_groups=6)
    res = prune_model(model, Recipe(ratio=0.5))
    assert not res.faults and res.stats["params_after"] < 0.8 * res.stats["params_before"]
    assert r.pruned_channels > 0


def test_window_partition_reshape_handcrafted():
    """The bare form: NHWC channels through a 6-D window partition and merge, symbolic batch."""
    c = 8
    nodes = [("Conv", ["x", "w1"], ["c1"], {"kernel_shape": [1, 1]}),
             ("Transpose", ["c1"], ["t1"], {"perm": [0, 2, 3, 1]}),           # [B, 8, 8, C]
             ("Reshape", ["t1", "s6"], ["r6"]),                                # [B, 2, 4, 2, 4, C]
             ("Transpose", ["r6"], ["p6"], {"perm": [0, 1, 3, 2, 4, 5]}),     # [B, 2, 2, 4, 4, C]
             ("Reshape", ["p6", "sw"], ["win"]),                               # [B*4, 16, C]
             ("Relu", ["win"], ["a"]),
             ("Reshape", ["a", "s6b"], ["m6"]),                                # [B, 2, 2, 4, 4, C]
             ("Transpose", ["m6"], ["q6"], {"perm": [0, 1, 3, 2, 4, 5]}),
             ("Reshape", ["q6", "s4"], ["t2"]),                                # [B, 8, 8, C]
             ("Transpose", ["t2"], ["c2"], {"perm": [0, 3, 1, 2]}),
             ("Conv", ["c2", "w2"], ["y"], {"kernel_shape": [1, 1]})]
    shapes = {"s6": [-1, 2, 4, 2, 4, c], "sw": [-1, 16, c], "s6b": [-1, 2, 2, 4, 4, c], "s4": [-1, 8, 8, c]}
    weights = {"w1": (c, 3, 1, 1), "w2": (4, c, 1, 1)} | {k: np.array(v, np.int64) for k, v in shapes.items()}
    model = build(nodes, {"x": ["batch", 3, 8, 8]}, ["y"], weights)
    assert [g.prunable for g in prepare(model).analysis.groups] == [True, False]
    oracle(model)
    res = prune_model(model, Recipe(ratio=0.5))
    assert [int(v) for t in res.model.graph.initializer if t.name.startswith("sw") for v in
            onnx.numpy_helper.to_array(t)] == [-1, 16, 4]


class _Upsample:
    """A segmentation-style skip: upsample to the skip's size, `F.interpolate(b, size=a.shape[2:])`."""

    @staticmethod
    def module():
        import torch
        import torch.nn.functional as F

        class M(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
                self.c2 = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1)
                self.c3 = torch.nn.Conv2d(8, 4, 1)

            def forward(self, x):
                a = torch.relu(self.c1(x))
                b = torch.relu(self.c2(a))
                return self.c3(F.interpolate(b, size=a.shape[2:], mode="bilinear", align_corners=False) + a)

        return M()


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_resize_with_sizes_computed_at_run_time(dynamo):
    """sizes = Concat(Shape(b)[:2], Shape(a)[2:]): the rewrite called .copy() on None. The channel entry reads
    the Resize input's own channel dim, so the channels pass and the Shape follows the new count."""
    import torch

    model = torch_export(_Upsample.module(), torch.randn(2, 3, 16, 16), dynamo=dynamo,
                         dynamic={"input": {0: "b", 2: "h", 3: "w"}})
    resize = next(n for n in model.graph.node if n.op_type == "Resize")
    assert resize.input[3] not in {t.name for t in model.graph.initializer}
    prep = prepare(model)
    assert not prep.analysis.faults
    assert len(prep.analysis.prunable) == 1 and len(prep.analysis.prunable[0].sources) == 2
    feed = {"input": np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)}
    oracle(model, feed=feed)
    res = prune_model(model, Recipe(ratio=0.5))
    assert not res.faults and run(res.model, feed)[0].shape == (2, 4, 16, 16)


def test_resize_sizes_from_an_unrelated_tensor_freeze():
    """A channel entry read from a tensor that does not lose the same channels cannot follow: frozen, with a
    reason, not a fault."""
    nodes = [("Conv", ["x", "w1"], ["c1"], {"kernel_shape": [1, 1]}),
             ("Shape", ["x"], ["sx"]),
             ("Resize", ["c1", "", "", "sx"], ["r"], {"mode": "nearest"}),
             ("Conv", ["r", "w2"], ["y"], {"kernel_shape": [1, 1]})]
    model = build(nodes, {"x": [1, 8, 4, 4]}, ["y"], {"w1": (8, 8, 1, 1), "w2": (4, 8, 1, 1)})
    prep = prepare(model)
    assert not prep.analysis.faults
    assert "the channel entry of its sizes is computed at run time" in prep.analysis.groups[0].reason
    assert not prune_model(model, Recipe(ratio=0.5)).faults


def _minus_one_model():
    nodes = [("Conv", ["x", "w1"], ["c1"], {"kernel_shape": [3, 3], "pads": [1] * 4}), ("Relu", ["c1"], ["r"]),
             ("Flatten", ["r"], ["f"]), ("Gemm", ["f", "w2"], ["y"], {"transB": 1})]
    model = build(nodes, {"x": [-1, 3, 4, 4]}, ["y"], {"w1": (8, 3, 3, 3), "w2": (5, 8 * 16)})
    dims = model.graph.output[0].type.tensor_type.shape.dim
    del dims[:]
    dims.add().dim_value = -1
    dims.add().dim_value = 5
    return model


def test_inputs_with_minus_one_dims():
    """paddle2onnx writes dynamic dims as dim_value -1: the validation feed asked numpy for a negative dim, and
    MAC counts multiplied by -1."""
    model = _minus_one_model()
    onnx.checker.check_model(model, full_check=True)
    assert sample_feed(model)["x"].shape == (1, 3, 4, 4)
    res = prune_model(model, Recipe(ratio=0.5))
    assert not res.faults
    assert res.stats["macs_before"] == 8 * 27 * 16 + 5 * 128 and res.stats["macs_after"] > 0
    assert res.model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == -1  # interface kept as it was
    oracle(model)


def _vit_fp16(keep_io_types: bool):
    """torchvision's ViT (TorchScript) converted by onnxconverter-common. Its converter leaves TorchScript's
    shape-arithmetic Casts at to=FLOAT while marking their outputs float16, which neither the checker nor
    onnxruntime accept; those Casts are set to float16, as a user fixing the converted model would."""
    pytest.importorskip("onnxconverter_common")
    import sys
    from pathlib import Path

    from onnxconverter_common import float16

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    import export_transformers as et

    model = torch_export(et.vit(), __import__("torch").randn(2, 3, 32, 32))
    half = float16.convert_float_to_float16(model, keep_io_types=keep_io_types)
    declared = {v.name: v.type.tensor_type.elem_type for v in half.graph.value_info}
    for node in half.graph.node:
        if node.op_type == "Cast" and declared.get(node.output[0]) == onnx.TensorProto.FLOAT16:
            for a in node.attribute:
                if a.name == "to" and a.i == onnx.TensorProto.FLOAT:
                    a.i = onnx.TensorProto.FLOAT16
    onnx.checker.check_model(half, full_check=True)
    return half


@pytest.mark.parametrize("keep_io_types", [False, True], ids=["fp16-io", "fp32-io"])
def test_float16_vit(keep_io_types):
    model = _vit_fp16(keep_io_types)
    io_type = model.graph.input[0].type.tensor_type.elem_type
    assert io_type == (onnx.TensorProto.FLOAT if keep_io_types else onnx.TensorProto.FLOAT16)
    res = prune_model(model, Recipe(ratio=0.5))
    assert not res.faults
    assert res.stats["groups_pruned"] >= 4
    floats = {t.data_type for t in res.model.graph.initializer if t.data_type in (1, 10, 11, 16)}
    assert floats == {onnx.TensorProto.FLOAT16}  # nothing written in float32
    feed = sample_feed(model)
    assert run(res.model, feed)[0].shape == run(model, feed)[0].shape
    # float16 rounding: removed channels still sum fewer terms in another order
    oracle(model, tol=2e-3, min_groups=4)


def test_expand_to_a_constant_shape_follows_the_channels():
    """Found by tools/fuzz.py (seed 120): Expand passed channels but kept its constant target [1, C, H, W], so the
    pruned model failed the checker (contained by the bisection). The target's channel entry now follows."""
    nodes = [("Conv", ["x", "w1"], ["c1"], {"kernel_shape": [1, 1]}),
             ("ReduceMean", ["c1"], ["m"], {"axes": [3], "keepdims": 1}),
             ("Expand", ["m", "shape"], ["e"]),
             ("Add", ["c1", "e"], ["a"]),
             ("Conv", ["a", "w2"], ["y"], {"kernel_shape": [1, 1]})]
    model = build(nodes, {"x": [1, 3, 4, 4]}, ["y"], {"w1": (8, 3, 1, 1), "w2": (4, 8, 1, 1),
                                                       "shape": np.array([1, 8, 4, 4], np.int64)})
    oracle(model)
    res = prune_model(model, Recipe(ratio=0.5))
    assert not res.faults and res.stats["groups_pruned"] == 1
    shape = next(t for t in res.model.graph.initializer if t.name.startswith("shape"))
    assert onnx.numpy_helper.to_array(shape).tolist() == [1, 4, 4, 4]


def test_expand_with_an_untraceable_shape_freezes():
    nodes = [("Conv", ["x", "w1"], ["c1"], {"kernel_shape": [1, 1]}),
             ("ReduceMean", ["c1"], ["m"], {"axes": [3], "keepdims": 1}),
             ("Shape", ["z"], ["s"]),
             ("Expand", ["m", "s"], ["e"]),
             ("Add", ["c1", "e"], ["a"]),
             ("Conv", ["a", "w2"], ["y"], {"kernel_shape": [1, 1]})]
    model = build(nodes, {"x": [1, 3, 4, 4], "z": ["n", 8, 4, 4]}, ["y"], {"w1": (8, 3, 1, 1), "w2": (4, 8, 1, 1)})
    prep = prepare(model)
    assert not prep.analysis.faults and not prep.analysis.prunable
    assert "Expand" in prep.analysis.groups[0].reason
