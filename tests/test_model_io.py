"""Loading and saving: external data, paths outside the model folder, atomic writes."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxprune.io import model_io
from onnxprune.io.weights import is_lazy, tensor_array
from onnxprune.errors import InputError
from onnxprune.pipeline.prepare import prepare
from onnxprune.pipeline.prune import prune_model
from onnxprune.pipeline.score import score_groups
from onnxprune.runtime.session import run
from onnxprune.runtime.feeds import sample_feed
from onnxprune.recipe import Recipe



def test_external_data_roundtrip_and_prune(tmp_path, digits):
    model = digits.cnn()
    src = tmp_path / "ext" / "m.onnx"
    src.parent.mkdir()
    model_io.save_model(model, src, external_data=True)
    assert (src.parent / "m.onnx.data").exists()
    assert src.stat().st_size < 20_000  # weights are beside it, not inside
    loaded = model_io.load_model(src)
    feed = sample_feed(model)
    np.testing.assert_array_equal(run(loaded, feed)[0], run(model, feed)[0])
    pruned = prune_model(loaded, Recipe(ratio=0.5)).model
    out = tmp_path / "out" / "p.onnx"
    out.parent.mkdir()
    model_io.save_model(pruned, out, external_data=True)
    assert run(model_io.load_model(out), feed)[0].shape == (1, 10)
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]


def test_external_data_outside_the_folder_is_refused(tmp_path, digits):
    model = digits.cnn()
    inner = tmp_path / "inner"
    inner.mkdir()
    onnx.save_model(model, tmp_path / "m.onnx", save_as_external_data=True, location="w.bin", size_threshold=0)
    shutil.move(tmp_path / "m.onnx", inner / "m.onnx")
    m = onnx.load(inner / "m.onnx", load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../w.bin"
    onnx.save_model(m, inner / "m.onnx")
    with pytest.raises(InputError, match="outside the model's folder"):
        model_io.load_model(inner / "m.onnx")


def test_missing_external_data(tmp_path, digits):
    onnx.save_model(digits.cnn(), tmp_path / "m.onnx", save_as_external_data=True, location="w.bin",
                    size_threshold=0)
    os.remove(tmp_path / "w.bin")
    with pytest.raises(InputError, match="external data file missing"):
        model_io.load_model(tmp_path / "m.onnx")


def test_interrupted_save_leaves_nothing(tmp_path, monkeypatch, digits):
    target = tmp_path / "out.onnx"
    target.write_bytes(b"previous")

    def boom(*args, **kwargs):
        Path(args[1]).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx, "save_model", boom)
    with pytest.raises(KeyboardInterrupt):
        model_io.save_model(digits.cnn(), target, overwrite=True)
    assert target.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]


def test_save_refuses_existing_and_makes_missing_folders(tmp_path, digits):
    model = digits.cnn()
    model_io.save_model(model, tmp_path / "a.onnx")
    with pytest.raises(InputError, match="output exists"):
        model_io.save_model(model, tmp_path / "a.onnx")
    model_io.save_model(model, tmp_path / "no" / "a.onnx")
    assert onnx.load(tmp_path / "no" / "a.onnx") == model
    with pytest.raises(InputError, match="a file is in the way"):
        model_io.save_model(model, tmp_path / "a.onnx" / "b.onnx")


def test_metadata_and_opset_survive(tmp_path, digits):
    model = digits.cnn()
    onnx.helper.set_model_props(model, {"author": "test"})
    pruned = prune_model(model, Recipe(ratio=0.5)).model
    assert {p.key: p.value for p in pruned.metadata_props} == {"author": "test"}
    assert pruned.opset_import == model.opset_import
    assert pruned.producer_name == model.producer_name


def test_bn_scale_scores_follow_gamma(digits):
    prep = prepare(digits.cnn())
    l1 = score_groups(prep.analysis, prep.view, "l1")
    bn = score_groups(prep.analysis, prep.view, "bn-scale")
    assert l1.keys() == bn.keys()
    assert any(not np.allclose(l1[k], bn[k]) for k in l1)


def test_session_through_external_data_keeps_the_model(monkeypatch, digits):
    from onnxprune.runtime import session

    model = digits.cnn()
    feed = sample_feed(model)
    want = session.internal_session(model).run(None, feed)[0]
    monkeypatch.setattr(session, "_INLINE_LIMIT", 1)  # force the >2 GB path on a small model
    got = session.internal_session(model).run(None, feed)[0]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert all(not t.external_data for t in model.graph.initializer)


def test_initializers_listed_as_inputs_are_pruned_and_the_input_list_follows(digits):
    """Older exporters (IR < 4) list every initializer among the graph inputs."""
    model = digits.cnn()
    names = {i.name for i in model.graph.input}
    for t in model.graph.initializer:
        if t.name not in names:
            model.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    model.ir_version = 3
    pruned = prune_model(model, Recipe(ratio=0.5)).model
    data_inputs = [i.name for i in pruned.graph.input if i.name not in {t.name for t in pruned.graph.initializer}]
    assert data_inputs == ["input"]
    listed = {i.name for i in pruned.graph.input}
    assert all(t.name in listed for t in pruned.graph.initializer)
    assert pruned.ir_version == 3
    feed = sample_feed(model, batch=2)
    assert run(pruned, feed)[0].shape == (2, 10)
    from onnxprune.testing import zero_channel_oracle

    assert zero_channel_oracle(model).max_rel_err < 1e-5


def test_one_file_model_is_mapped_in_place_and_saved_in_one_file(tmp_path, monkeypatch, digits):
    """A large one-file model keeps its weights in the file (io/inline_map.py): the loaded protobuf holds none,
    it runs, prunes and saves as one file again, identical to a model parsed whole."""
    monkeypatch.setattr(model_io, "MAP_INLINE_BYTES", 0)  # the shipped CNN stands in for a large model
    src = digits.cnn_file(tmp_path)
    whole = onnx.load(src)
    mapped = model_io.load_model(src)
    assert is_lazy(mapped) and mapped.ByteSize() < whole.ByteSize() / 4
    mapped_names = [t.name for t in mapped.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert mapped_names  # its convolution weights, at least
    for a, b in zip(mapped.graph.initializer, whole.graph.initializer):
        assert a.name == b.name
        np.testing.assert_array_equal(tensor_array(a), onnx.numpy_helper.to_array(b))
    feed = sample_feed(whole)
    np.testing.assert_array_equal(run(mapped, feed)[0], run(whole, feed)[0])
    # saved as loaded: one file, which onnx parses whole and checks
    copy = model_io.save_model(mapped, tmp_path / "copy.onnx")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("copy")) == ["copy.onnx"]
    reread = onnx.load(copy)
    onnx.checker.check_model(reread, full_check=True)
    assert {t.name for t in reread.graph.initializer} == {t.name for t in whole.graph.initializer}
    np.testing.assert_array_equal(run(reread, feed)[0], run(whole, feed)[0])
    # pruned: sliced weights go to a workspace, and the output is still one file
    a = prune_model(mapped, Recipe(ratio=0.5)).model
    b = prune_model(whole, Recipe(ratio=0.5)).model
    out = model_io.save_model(a, tmp_path / "out" / "p.onnx")
    assert sorted(p.name for p in out.parent.iterdir()) == ["p.onnx"]
    np.testing.assert_array_equal(run(onnx.load(out), feed)[0], run(b, feed)[0])


def test_wire_walk_refuses_garbage_and_loading_names_it(tmp_path, monkeypatch):
    from onnxprune.io.inline_map import WireError, load_mapped

    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\xff" * 64)
    with pytest.raises(WireError):
        load_mapped(bad)
    monkeypatch.setattr(model_io, "MAP_INLINE_BYTES", 0)
    with pytest.raises(InputError, match="not a readable ONNX model"):
        model_io.load_model(bad)


def test_truncated_one_file_model_is_a_clear_error(tmp_path, monkeypatch, digits):
    monkeypatch.setattr(model_io, "MAP_INLINE_BYTES", 0)
    src = digits.cnn_file(tmp_path)
    data = src.read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="not a readable ONNX model"):
        model_io.load_model(cut)
