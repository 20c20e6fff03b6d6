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
from onnxprune.testing import zero_channel_oracle
from onnxprune.runtime.session import run
from onnxprune.runtime.feeds import sample_feed
from onnxprune.recipe import Recipe
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
    from onnxconverter_common import float16

    from tools import export_transformers as et

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


