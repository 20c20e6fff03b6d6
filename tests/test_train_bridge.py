"""Issue 18, the training bridge: the ONNX graph run in torch (onnxprune/train/graph_module.py) equals
onnxruntime, trains, and writes its weights back into the same graph.

Exactness: max |torch - onnxruntime| <= 1e-5 * max |onnxruntime| over each output (float32: both sides differ
only in float32 rounding, about 1e-7 relative here; a wrong op semantics gives errors of order 1e-1).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

from onnxprune.errors import OnnxPruneError, UnsupportedOpError
from onnxprune.runtime.session import run
from onnxprune.runtime.feeds import sample_feed
from onnxprune.train import to_torch, write_back
from tests.onnx_builders import build

MODELS = Path(__file__).resolve().parent.parent / "models"
REL = 1e-5


def assert_exact(model: onnx.ModelProto, feed: dict, rel: float = REL) -> dict:
    ref = run(model, feed)
    module = to_torch(model)
    got = module.run(feed)
    names = [o.name for o in model.graph.output]
    assert list(got) == names
    for name, r in zip(names, ref):
        g = got[name]
        assert g.shape == r.shape, (name, g.shape, r.shape)
        assert g.dtype == r.dtype, (name, g.dtype, r.dtype)
        if r.dtype.kind in "biu":
            np.testing.assert_array_equal(g, r)
            continue
        r64, g64 = r.astype(np.float64), g.astype(np.float64)
        scale = max(float(np.abs(r64).max()), 1e-6)
        err = float(np.abs(g64 - r64).max())
        assert err <= rel * scale, f"{name}: max abs err {err:.3g} vs scale {scale:.3g}"
    return got


def llama_feed(model: onnx.ModelProto, batch: int = 2, seq: int = 5, past: int = 3) -> dict:
    rng = np.random.default_rng(0)
    feed = {"input_ids": rng.integers(0, 200, (batch, seq)).astype(np.int64),
            "attention_mask": np.ones((batch, seq + past), np.int64)}
    for i in model.graph.input[2:]:
        dims = [d.dim_value for d in i.type.tensor_type.shape.dim]
        feed[i.name] = rng.standard_normal((batch, dims[1], past, dims[3])).astype(np.float32)
    return feed


@pytest.mark.parametrize("name", ["digits_cnn", "digits_resnet"])
def test_shipped_cnns_are_exact(name):
    model = onnx.load(MODELS / f"{name}.onnx")
    x = np.load(MODELS / "digits_heldout.npz")
    feed = {model.graph.input[0].name: x[x.files[0]][:16].astype(np.float32)}
    assert_exact(model, feed)


def test_kv_cache_decoder_is_exact():
    model = onnx.load(MODELS / "stdlib_llama.onnx")
    assert_exact(model, llama_feed(model))
    mask = llama_feed(model)
    mask["attention_mask"][0, :2] = 0  # left padding goes through the causal-mask arithmetic
    assert_exact(model, mask)


def test_parameters_and_constants():
    model = onnx.load(MODELS / "stdlib_llama.onnx")
    module = to_torch(model)
    floats = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    assert set(module.param_names.values()) <= floats
    assert len(module.params) >= 30
    assert all(p.requires_grad and p.dtype == torch.float32 for p in module.params.values())
    assert all(module.dtypes[k] == onnx.TensorProto.FLOAT for k in module.params)
    # integer initializers and Constant nodes are buffers, never parameters
    assert all(not b.dtype.is_floating_point or b.numel() <= 1 or True for b in module.buffers())
    fixed = to_torch(model, trainable="weights")
    assert any(not p.requires_grad for p in fixed.params.values()) or all(p.numel() > 1 for p in fixed.params.values())
    assert all(p.requires_grad == (p.numel() > 1) for p in fixed.params.values())
    assert not any(p.requires_grad for p in to_torch(model, trainable="none").params.values())


def test_static_float_initializers_stay_constants():
    # a float initializer read only as Resize scales is a constant; the conv weight is a parameter
    m = build([("Conv", ["x", "w"], ["c"], {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}),
               ("Resize", ["c", "", "scales"], ["y"], {"mode": "nearest"})],
              {"x": [1, 3, 8, 8]}, ["y"], {"w": (4, 3, 3, 3), "scales": np.array([1, 1, 2, 2], np.float32)})
    module = to_torch(m)
    assert set(module.param_names.values()) == {"w"}
    assert_exact(m, sample_feed(m))


def test_write_back_without_training_is_identical():
    for name in ("digits_cnn.onnx", "stdlib_llama.onnx"):
        model = onnx.load(MODELS / name)
        back = write_back(model, to_torch(model))
        assert back.SerializeToString() == model.SerializeToString()


def test_write_back_writes_trained_values_into_the_same_graph():
    model = onnx.load(MODELS / "digits_cnn.onnx")
    module = to_torch(model)
    key = next(k for k, p in module.params.items() if p.dim() == 4)
    with torch.no_grad():
        module.params[key].mul_(0.5)
    back = write_back(model, module)
    assert [n.SerializeToString() for n in back.graph.node] == [n.SerializeToString() for n in model.graph.node]
    assert back.graph.input == model.graph.input and back.graph.output == model.graph.output
    inits = {t.name: t for t in back.graph.initializer}
    assert list(inits) == [t.name for t in model.graph.initializer]
    before = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    changed = module.param_names[key]
    for name, t in inits.items():
        value = onnx.numpy_helper.to_array(t)
        if name == changed:
            np.testing.assert_array_equal(value, before[name] * np.float32(0.5))
        else:
            np.testing.assert_array_equal(value, before[name])
    # the written model computes what the module computes
    feed = sample_feed(model)
    got = module.run(feed)
    np.testing.assert_allclose(run(back, feed)[0], got["logits"], rtol=1e-5, atol=1e-5)


def test_float16_model_trains_in_float32_and_writes_float16():
    from onnxconverter_common import float16

    model = float16.convert_float_to_float16(onnx.load(MODELS / "digits_cnn.onnx"))
    halves = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16]
    assert halves
    module = to_torch(model)
    assert all(p.dtype == torch.float32 for p in module.params.values())
    assert {module.dtypes[k] for k in module.params} == {onnx.TensorProto.FLOAT16}
    x = np.load(MODELS / "digits_heldout.npz")
    feed = {model.graph.input[0].name: x[x.files[0]][:16].astype(np.float16)}
    ref, got = run(model, feed)[0], module.run(feed)["logits"]
    assert got.dtype == np.float16
    # onnxruntime rounds every activation to float16; torch keeps float32 inside: agreement to float16 rounding
    np.testing.assert_allclose(got.astype(np.float32), ref.astype(np.float32), rtol=0, atol=3e-2 * np.abs(ref).max())
    back = write_back(model, module)
    assert back.SerializeToString() == model.SerializeToString()
    key = next(iter(module.params))
    with torch.no_grad():
        module.params[key].add_(1.0)
    changed = {t.name: t for t in write_back(model, module).graph.initializer}[module.param_names[key]]
    assert changed.data_type == onnx.TensorProto.FLOAT16


def test_unsupported_op_is_one_line_error():
    m = build([("Relu", ["x"], ["r"]), ("Celu", ["r"], ["c"]), ("MaxRoiPool", ["c", "rois"], ["y"], {"pooled_shape": [2, 2]})],
              {"x": [1, 3, 8, 8]}, ["y"], {"rois": np.array([[0, 0, 0, 4, 4]], np.float32)})
    with pytest.raises(UnsupportedOpError) as err:
        to_torch(m)
    message = str(err.value)
    assert isinstance(err.value, OnnxPruneError) and "\n" not in message
    assert "MaxRoiPool" in message and "maxroipool_2" in message


def test_subgraph_module_shares_parameters_and_matches():
    model = onnx.load(MODELS / "digits_resnet.onnx")
    full = to_torch(model)
    adds = [n for n in model.graph.node if n.op_type == "Add"]
    cut_in, cut_out = adds[0].output[0], adds[2].output[0]
    block = full.outputs_of([cut_out], inputs=[cut_in])
    assert block.input_names == [cut_in] and block.output_names == [cut_out]
    assert 0 < len(block.params) < len(full.params)
    assert all(block.params[k] is full.params[k] for k in block.params)  # training the block trains the model
    x = np.load(MODELS / "digits_heldout.npz")
    feed = {"input": x[x.files[0]][:8].astype(np.float32)}
    head = full.outputs_of([cut_in, cut_out])
    with torch.no_grad():
        mid = head({"input": torch.from_numpy(feed["input"])})
        out = block({cut_in: mid[cut_in]})[cut_out]
    torch.testing.assert_close(out, mid[cut_out], rtol=0, atol=0)
    # built straight from the model: same nodes and parameters
    alone = to_torch(model, inputs=[cut_in], outputs=[cut_out])
    assert alone.nodes == block.nodes and set(alone.param_names.values()) == set(block.param_names.values())
    with pytest.raises(OnnxPruneError, match="neither an input"):
        to_torch(model, inputs=[], outputs=[cut_out])  # nothing fed: the graph input is missing


def test_gradients_reach_every_trainable_parameter():
    model = onnx.load(MODELS / "digits_cnn.onnx")
    module = to_torch(model)
    x = torch.randn(4, *[d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]])
    module({"input": x})["logits"].square().mean().backward()
    # BatchNorm running statistics are parameters too (initializers); every one gets a gradient
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in module.params.values())


# -- every handler test model: the models the handler tests build, captured where they hand them to onnxprune
class _Captured(Exception):
    pass


HANDLER_TEST_FILES = ("test_handlers.py", "test_attention_handlers.py", "test_contrib.py", "test_gqa.py")
_ENTRY_POINTS = ("check", "reasons", "prepare", "prune_model", "zero_channel_oracle", "check_oracle", "run",
                 "check_as_original", "select")


def _call_variants(fn):
    """Arguments for each parametrized variant of a test function (none: one call without arguments)."""
    import inspect
    import itertools

    params = list(inspect.signature(fn).parameters)
    if not params:
        return [{}]
    marks = [m for m in getattr(fn, "pytestmark", []) if m.name == "parametrize"]
    axes = []
    for mark in marks:
        names = [n.strip() for n in (mark.args[0].split(",") if isinstance(mark.args[0], str) else mark.args[0])]
        rows = []
        for value in mark.args[1]:
            value = value.values if hasattr(value, "values") else value
            value = value if len(names) > 1 else (value,)
            rows.append(dict(zip(names, value)))
        axes.append(rows)
    if sorted(n for rows in axes for n in rows[0]) != sorted(params):
        return []  # needs a fixture (tmp_path, an exported model): not a handler-built graph
    return [dict(kv for part in combo for kv in part.items()) for combo in itertools.product(*axes)]


def handler_models():
    """(label, model, feed or None) for every graph the handler test modules build."""
    import importlib.util
    from unittest import mock

    found = []
    tests = Path(__file__).resolve().parent
    names = [f"tests.{p.stem}" for p in (tests / name for name in HANDLER_TEST_FILES) if p.exists()]
    names += [f"tests.handlers.{p.stem}" for p in sorted((tests / "handlers").glob("test_*.py"))]
    for module_name in names:  # the handler tests may move under tests/handlers/: both layouts are read
        module = importlib.import_module(module_name)

        def record(*args, **kwargs):
            model = next((a for a in list(args) + list(kwargs.values()) if isinstance(a, onnx.ModelProto)), None)
            if model is None:
                raise _Captured(None)
            feed = kwargs.get("feed") or next((a for a in args if isinstance(a, dict)), None)
            raise _Captured((model, feed))

        patches = [mock.patch.object(module, name, record) for name in _ENTRY_POINTS if hasattr(module, name)]
        for p in patches:
            p.start()
        try:
            for name in sorted(dir(module)):
                fn = getattr(module, name)
                if not name.startswith("test_") or not callable(fn):
                    continue
                for i, kwargs in enumerate(_call_variants(fn)):
                    try:
                        fn(**kwargs)
                    except _Captured as got:
                        if got.args[0] is not None:
                            found.append((f"{module_name.split('.')[-1]}::{name}[{i}]", *got.args[0]))
                    except Exception:  # noqa: BLE001 - a test that builds nothing before failing here
                        continue
        finally:
            for p in patches:
                p.stop()
    return found


def test_every_handler_test_model_is_exact():
    models = handler_models()
    assert len(models) >= 40, len(models)
    failures = []
    import importlib.util

    gqa_feed = next(importlib.import_module(m).gqa_feed for m in ("tests.test_gqa", "tests.handlers.test_gqa")
                    if importlib.util.find_spec(m) is not None)

    for label, model, feed in models:
        if feed is None and any(n.op_type == "GroupQueryAttention" for n in model.graph.node):
            feed = gqa_feed()  # past, new tokens, attention mask and total length that agree with each other
        try:
            assert_exact(model, feed if feed is not None else sample_feed(model))
        except Exception as exc:  # noqa: BLE001 - collected, so one run names every failing model
            failures.append(f"{label}: {type(exc).__name__}: {str(exc)[:200]}")
    assert not failures, "\n".join(failures)


def test_lazy_external_data_model_streams_its_changed_weights(tmp_path):
    """A model with external data (loaded lazily) writes back only the tensors that changed, to a data file of
    their own; the unchanged ones keep pointing at the original bytes; the saved result runs as the module."""
    from onnxprune.io.model_io import load_model, save_model
    from onnxprune.io.weights import TensorWriter, external_info, is_external

    src = tmp_path / "cnn.onnx"
    onnx.save_model(onnx.load(MODELS / "digits_cnn.onnx"), src, save_as_external_data=True,
                    all_tensors_to_one_file=True, location="cnn.onnx.data", size_threshold=0)
    lazy = load_model(src)
    module = to_torch(lazy)
    key = max(module.params, key=lambda k: module.params[k].numel())
    with torch.no_grad():
        module.params[key].mul_(-1.0)
    writer = TensorWriter(tmp_path / "trained.data")
    back = write_back(lazy, module, writer)
    writer.close()
    changed = module.param_names[key]
    for t in back.graph.initializer:
        assert is_external(t)
        location = external_info(t)[0]
        assert location.endswith("trained.data" if t.name == changed else "cnn.onnx.data"), (t.name, location)
    out = save_model(back, tmp_path / "out.onnx")
    feed = sample_feed(lazy)
    np.testing.assert_allclose(run(onnx.load(out), feed)[0], module.run(feed)["logits"], rtol=1e-5, atol=1e-5)


# -- one-node models for the forms where ONNX and torch differ (padding, coordinate modes, opset changes)
def _w(*shape, seed=1):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


_NO_ROI = ("roi", np.array([], np.float32))
ONE_NODE = [
    ("LpPool", {"kernel_shape": [2, 2], "p": 1, "pads": [0, 0, 1, 1], "strides": [2, 2]}, [], 17),
    ("GlobalLpPool", {"p": 3}, [], 17),
    ("LRN", {"size": 3, "alpha": 0.01}, [], 17),
    ("MeanVarianceNormalization", {}, [], 17),
    ("Shrink", {"lambd": 0.3, "bias": 0.1}, [], 17),
    ("Resize", {"mode": "linear"}, [_NO_ROI, ("scales", np.array([1, 1, 2, 1.5], np.float32))], 17),
    ("Resize", {"mode": "cubic", "coordinate_transformation_mode": "align_corners"},
     [_NO_ROI, ("scales", np.array([1, 1, 1.7, 0.6], np.float32))], 17),
    ("Resize", {"mode": "cubic", "exclude_outside": 1}, [_NO_ROI, ("scales", np.array([1, 1, 2, 2], np.float32))], 17),
    ("Resize", {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"},
     [_NO_ROI, ("scales", np.array([1, 1, 0.5, 3], np.float32))], 17),
    ("Resize", {"mode": "linear", "coordinate_transformation_mode": "pytorch_half_pixel"},
     [_NO_ROI, ("scales", np.array([], np.float32)), ("sizes", np.array([2, 6, 5, 11], np.int64))], 17),
    ("Resize", {"mode": "nearest", "coordinate_transformation_mode": "half_pixel_symmetric"},
     [_NO_ROI, ("scales", np.array([1, 1, 1.5, 2.5], np.float32))], 19),
    ("AveragePool", {"kernel_shape": [3, 3], "pads": [0, 1, 2, 1], "count_include_pad": 0}, [], 17),
    ("AveragePool", {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "count_include_pad": 1, "ceil_mode": 1,
                     "strides": [2, 2]}, [], 17),
    ("MaxPool", {"kernel_shape": [3, 3], "auto_pad": "SAME_UPPER", "strides": [2, 2]}, [], 17),
    ("MaxPool", {"kernel_shape": [2, 2], "ceil_mode": 1, "strides": [2, 2]}, [], 17),
    ("Pad", {"mode": "reflect"}, [("pads", np.array([0, 0, 2, 1, 0, 0, 1, 3], np.int64))], 17),
    ("Pad", {"mode": "edge"}, [("pads", np.array([0, 1, 2, 1, 0, 0, 1, 3], np.int64))], 17),
    ("Pad", {"mode": "wrap"}, [("pads", np.array([0, 0, 2, 1, 0, 0, 1, 3], np.int64))], 19),
    ("Slice", {}, [("s", np.array([5, -1], np.int64)), ("e", np.array([0, -100], np.int64)),
                   ("a", np.array([2, 3], np.int64)), ("st", np.array([-2, -3], np.int64))], 17),
    ("ConvTranspose", {"strides": [2, 2], "output_padding": [1, 0], "pads": [1, 0, 0, 1], "group": 2},
     [("w", _w(6, 2, 3, 3))], 17),
    ("ConvTranspose", {"strides": [3, 2], "auto_pad": "SAME_LOWER"}, [("w", _w(6, 2, 3, 3))], 17),
    ("ConvTranspose", {"strides": [2, 2], "output_shape": [16, 13]}, [("w", _w(6, 2, 3, 3)),
                                                                      ("b", np.ones(2, np.float32))], 17),
    ("Conv", {"auto_pad": "SAME_LOWER", "strides": [2, 2]}, [("w", _w(4, 6, 3, 2))], 17),
    ("Softmax", {"axis": 1}, [], 11),
    ("LogSoftmax", {"axis": 2}, [], 12),
    ("Hardmax", {"axis": -1}, [], 13),
    ("Einsum", {"equation": "bchw,bchw->bc"}, [("w", _w(2, 6, 7, 7))], 17),
    ("GroupNormalization", {"num_groups": 3}, [("s", _w(3)), ("bb", _w(3, seed=2))], 18),
    ("GroupNormalization", {"num_groups": 3}, [("s", _w(6)), ("bb", _w(6, seed=2))], 21),
    ("LayerNormalization", {"axis": 1}, [("s", _w(6, 7, 7))], 17),
    ("ReduceMax", {"keepdims": 0}, [("ax", np.array([1, -1], np.int64))], 18),
    ("ReduceSum", {"noop_with_empty_axes": 1}, [], 13),
    ("ReduceLogSumExp", {"axes": [2]}, [], 13),
    ("CumSum", {"exclusive": 1, "reverse": 1}, [("ax", np.array(2, np.int64))], 17),
    ("Gelu", {"approximate": "tanh"}, [], 20),
    ("Trilu", {"upper": 0}, [("k", np.array(1, np.int64))], 17),
]


@pytest.mark.parametrize("op, attrs, extra, opset", ONE_NODE,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(ONE_NODE)])
def test_one_node_forms_are_exact(op, attrs, extra, opset):
    from onnx import TensorProto, helper

    shape = (2, 6, 7, 7)
    graph = helper.make_graph(
        [helper.make_node(op, ["x"] + [n for n, _ in extra], ["y"], name="node", **attrs)], "one",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(a, n) for n, a in extra])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              ir_version=8 if opset < 21 else 10)
    assert_exact(model, {"x": _w(*shape, seed=0)})


def test_blocks_chain_to_the_whole_model():
    """Cut the KV-cache decoder after each layer's residual stream (found by `cut_points`): the blocks, run one
    after another on what earlier blocks left, give the whole module's outputs, and share its parameters."""
    model = onnx.load(MODELS / "stdlib_llama.onnx")
    module = to_torch(model)
    layer_outputs = [n.output[0] for n in model.graph.node if n.op_type == "Add" and "/layers." in n.name
                     and n.name.endswith("Add_1") and "self_attn" not in n.name]
    cuts = module.cut_points()
    assert len(layer_outputs) == 4 and set(layer_outputs) <= set(cuts)
    blocks = module.blocks(layer_outputs)
    assert len(blocks) == 5
    assert [b.output_names[-1] for b in blocks[:4]] == layer_outputs
    # later blocks read the previous layer's output and the mask / rotary tensors block 0 computed once
    assert layer_outputs[0] in blocks[1].input_names and "input_ids" not in blocks[1].input_names
    owned = [set(b.param_names.values()) for b in blocks]
    assert all(owned) and set().union(*owned) == set(module.param_names.values())
    feed = {k: torch.from_numpy(v) for k, v in llama_feed(model).items()}
    env = dict(feed)
    with torch.no_grad():
        for b in blocks:
            env |= b({n: env[n] for n in b.input_names})
        whole = module(feed)
    for name, value in whole.items():
        torch.testing.assert_close(env[name], value, rtol=0, atol=0)
    key = next(iter(blocks[1].params))
    assert blocks[1].params[key] is module.params[key]


def test_cut_points_of_a_residual_cnn():
    module = to_torch(onnx.load(MODELS / "digits_resnet.onnx"))
    cuts = module.cut_points()
    adds = [c for c in cuts if c.endswith("/Add_output_0")]
    assert len(adds) == 4  # every residual block's join; nothing inside a block (its shortcut is live there)
    assert not any("conv1" in c or "conv2" in c for c in cuts)


def test_bfloat16_initializers_round_trip():
    import ml_dtypes

    model = onnx.load(MODELS / "digits_cnn.onnx")
    for i, t in enumerate(model.graph.initializer):
        if t.data_type == onnx.TensorProto.FLOAT:
            value = onnx.numpy_helper.to_array(t).astype(ml_dtypes.bfloat16)
            model.graph.initializer[i].CopyFrom(onnx.numpy_helper.from_array(value, t.name))
    module = to_torch(model)
    assert {module.dtypes[k] for k in module.params} == {onnx.TensorProto.BFLOAT16}
    assert write_back(model, module).SerializeToString() == model.SerializeToString()
    key = next(iter(module.params))
    with torch.no_grad():
        module.params[key].mul_(2.0)  # exact in bfloat16
    tensor = {t.name: t for t in write_back(model, module).graph.initializer}[module.param_names[key]]
    before = {t.name: t for t in model.graph.initializer}[tensor.name]
    assert tensor.data_type == onnx.TensorProto.BFLOAT16
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(tensor).astype(np.float32),
                                  2 * onnx.numpy_helper.to_array(before).astype(np.float32))


@pytest.mark.parametrize("attrs, mask, past, bias", [({}, False, False, True), ({"unidirectional": 1}, False, False, False),
                                                     ({}, True, False, False), ({"scale": 0.3}, False, True, False),
                                                     ({"unidirectional": 1}, True, True, False)])
def test_multi_head_attention_contrib_op(attrs, mask, past, bias):
    from onnx import TensorProto, helper

    names = ["q", "k", "v", "bias" if bias else "", "mask" if mask else "", "", "past_k" if past else "",
             "past_v" if past else ""]
    while names[-1] == "":
        names.pop()
    outs = ["y", "present_k", "present_v"] if past else ["y"]
    total = 8 if past else 5
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 5, 16]) for n in ("q", "k", "v")]
    inputs += [helper.make_tensor_value_info("mask", TensorProto.INT32, [2, total])] if mask else []
    inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 2, 3, 8]) for n in ("past_k", "past_v")
               if past]
    graph = helper.make_graph(
        [helper.make_node("MultiHeadAttention", names, outs, name="mha", domain="com.microsoft", num_heads=2, **attrs)],
        "mha", inputs, [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs],
        [onnx.numpy_helper.from_array(_w(48, seed=3), "bias")] if bias else [])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
                              ir_version=8)
    feed = {n: _w(2, 5, 16, seed=i) for i, n in enumerate(("q", "k", "v"))}
    if mask:
        feed["mask"] = np.ones((2, total), np.int32)
        feed["mask"][1, -2:] = 0
    if past:
        feed |= {n: _w(2, 2, 3, 8, seed=5 + i) for i, n in enumerate(("past_k", "past_v"))}
    assert_exact(model, feed)


@pytest.mark.parametrize("attrs, mask, past", [({"is_causal": 1}, None, False), ({}, "bool", False),
                                               ({"softcap": 2.0}, "float", False), ({"is_causal": 1}, None, True),
                                               ({"is_causal": 1, "scale": 0.2}, "bool", True)])
def test_onnx_attention_op(attrs, mask, past):
    """ONNX Attention (opset 23), grouped-query (4 query heads, 2 key/value heads) on 3-D inputs; is_causal with a
    past is aligned at the bottom right, as onnxruntime computes it."""
    from onnx import TensorProto, helper

    total = 8 if past else 5
    feed = {"q": _w(2, 5, 32, seed=0), "k": _w(2, 5, 16, seed=1), "v": _w(2, 5, 16, seed=2)}
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, v.shape) for n, v in feed.items()]
    if mask == "bool":
        feed["mask"] = np.random.default_rng(3).random((5, total)) > 0.3
        feed["mask"][:, 0] = True
        inputs.append(helper.make_tensor_value_info("mask", TensorProto.BOOL, [5, total]))
    elif mask == "float":
        feed["mask"] = _w(2, 1, 5, total, seed=3)
        inputs.append(helper.make_tensor_value_info("mask", TensorProto.FLOAT, [2, 1, 5, total]))
    if past:
        for i, n in enumerate(("past_k", "past_v")):
            feed[n] = _w(2, 2, 3, 8, seed=4 + i)
            inputs.append(helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 2, 3, 8]))
    names = ["q", "k", "v", "mask" if mask else "", "past_k" if past else "", "past_v" if past else ""]
    while names[-1] == "":
        names.pop()
    outs = ["y", "present_k", "present_v"] if past else ["y"]
    graph = helper.make_graph([helper.make_node("Attention", names, outs, name="attention", q_num_heads=4,
                                                kv_num_heads=2, **attrs)], "attention", inputs,
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs])
    assert_exact(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=10), feed)


@pytest.mark.parametrize("attrs, three_d, positions", [({}, False, True), ({"interleaved": 1}, False, True),
                                                       ({"num_heads": 2}, True, True), ({}, False, False),
                                                       ({"num_heads": 2, "rotary_embedding_dim": 4,
                                                         "interleaved": 1}, True, False)])
def test_onnx_rotary_embedding_op(attrs, three_d, positions):
    from onnx import TensorProto, helper

    shape = [2, 5, 16] if three_d else [2, 2, 5, 8]
    half = attrs.get("rotary_embedding_dim", 8) // 2
    cos = _w(10, half, seed=1) if positions else _w(2, 5, half, seed=1)
    inits = {"cos": cos, "sin": np.flip(cos, -1).copy()}
    if positions:
        inits["pos"] = np.array([[0, 1, 2, 3, 4], [3, 4, 5, 6, 7]], np.int64)
    graph = helper.make_graph([helper.make_node("RotaryEmbedding", ["x", *inits], ["y"], name="rotary", **attrs)],
                              "rotary", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [onnx.numpy_helper.from_array(v, n) for n, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=10)
    assert_exact(model, {"x": _w(*shape, seed=0)})


def test_checkpointed_segments_give_the_same_outputs_and_gradients():
    """module.checkpoint(cut_points) recomputes activations in the backward pass: the loss and every gradient
    are those of the plain forward (end-to-end distillation trains deep models this way)."""
    model = onnx.load(MODELS / "stdlib_llama.onnx")
    feed = {k: torch.from_numpy(v) for k, v in llama_feed(model, batch=2, seq=16, past=3).items()}

    def loss_and_grads(checkpointed: bool):
        module = to_torch(model, trainable="weights")
        if checkpointed:
            module.checkpoint(module.cut_points())
            assert len(module._segments) > 4
        out = module(feed)
        loss = sum((v.float() ** 2).mean() for v in out.values())
        loss.backward()
        return loss.detach(), {k: p.grad for k, p in module.params.items() if p.grad is not None}

    plain, plain_grads = loss_and_grads(False)
    again, grads = loss_and_grads(True)
    torch.testing.assert_close(again, plain)
    assert grads.keys() == plain_grads.keys() and len(grads) > 10
    for k, g in plain_grads.items():
        torch.testing.assert_close(grads[k], g, rtol=1e-5, atol=1e-7)
