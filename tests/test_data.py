"""The shared data loader: every format loads, checks against the model, and fails with a clear message."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxprune.commands.options import dataset_from_options, parse_input_shapes
from onnxprune.evaluate.data import ImageOptions, from_arrays, load_data, split_dataset
from onnxprune.errors import InputError
from tests.shipped_models import DIGITS

CNN = DIGITS.cnn()  # read-only here: module-level, for the parametrize lists

TWO_INPUTS = onnx.parser.parse_model("""
<ir_version: 8, opset_import: ["" : 17]>
two (float[N, 4] x, int64[N, 3] ids) => (float[N, 4] y, int64[N, 3] z) {
  y = Relu(x)
  z = Identity(ids)
}
""")
FIXED_BATCH = onnx.parser.parse_model("""
<ir_version: 8, opset_import: ["" : 17]>
fixed (float[4, 2] x) => (float[4, 2] y) { y = Relu(x) }
""")
DYNAMIC_SEQ = onnx.parser.parse_model("""
<ir_version: 8, opset_import: ["" : 17]>
seq (float[N, S] x) => (float[N, S] y) { y = Relu(x) }
""")
IMAGE_RGB = onnx.parser.parse_model("""
<ir_version: 8, opset_import: ["" : 17]>
rgb (float[N, 6, 6, 3] x) => (float[N, 6, 6, 3] y) { y = Relu(x) }
""")


def polygraphy_array(array: np.ndarray) -> dict:
    """Polygraphy's JSON encoding of an ndarray (polygraphy/json/serde.py): base64 of np.save bytes."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return {"array": base64.b64encode(buffer.getvalue()).decode(), "polygraphy_class": "ndarray"}


def test_npz_with_labels_batches_in_order(digits):
    ds = load_data(digits.heldout_path, CNN, batch_size=64)
    raw = np.load(digits.heldout_path)
    assert len(ds) == 450 and ds.labels.dtype == np.int64
    assert [f["input"].shape[0] for f in ds.feeds] == [64] * 7 + [2]
    np.testing.assert_array_equal(np.concatenate([f["input"] for f in ds.feeds]), raw["input"])
    np.testing.assert_array_equal(ds.labels, raw["labels"])


def test_single_input_model_takes_any_array_name(tmp_path):
    x = np.random.default_rng(0).random((5, 1, 8, 8))  # float64: cast to the model's float32
    np.savez(tmp_path / "d.npz", pixels=x)
    ds = load_data(tmp_path / "d.npz", CNN, batch_size=2)
    assert ds.feeds[0]["input"].dtype == np.float32 and len(ds) == 5 and ds.labels is None


def test_npy_file_and_limit(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((10, 1, 8, 8), np.float32))
    ds = load_data(tmp_path / "x.npy", CNN, batch_size=4, limit=7)
    assert [f["input"].shape[0] for f in ds.feeds] == [4, 3]


def test_folder_of_npy_samples_with_labels(tmp_path):
    for i in range(3):  # one sample per file, without a batch axis
        np.save(tmp_path / f"sample_{i}.npy", np.full((1, 8, 8), i, np.float32))
    np.save(tmp_path / "labels.npy", np.array([2, 1, 0]))
    ds = load_data(tmp_path, CNN, batch_size=2)
    assert len(ds) == 3 and ds.labels.tolist() == [2, 1, 0]
    assert ds.feeds[1]["input"][0, 0, 0, 0] == 2


def test_folder_of_npz_files_is_concatenated(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(2):
        np.savez(tmp_path / f"part{i}.npz", x=rng.random((3, 4), np.float32), ids=np.ones((3, 3), np.int64),
                 labels=np.arange(3) + i)
    ds = load_data(tmp_path, TWO_INPUTS, batch_size=4)
    assert len(ds) == 6 and ds.labels.tolist() == [0, 1, 2, 1, 2, 3]
    assert set(ds.feeds[0]) == {"x", "ids"} and ds.feeds[0]["ids"].dtype == np.int64


def test_polygraphy_json_feeds(tmp_path):
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.random((2, 4)).astype(np.float32), "ids": np.arange(6).reshape(2, 3)} for _ in range(3)]
    path = tmp_path / "inputs.json"
    path.write_text(json.dumps([{k: polygraphy_array(v) for k, v in f.items()} for f in feeds]))
    ds = load_data(path, TWO_INPUTS, batch_size=3)
    assert len(ds) == 6
    np.testing.assert_array_equal(np.concatenate([f["x"] for f in ds.feeds]), np.concatenate([f["x"] for f in feeds]))


def test_json_plain_lists_and_nested_values_form(tmp_path):
    encoded = polygraphy_array(np.ones((2, 3), np.int64))
    nested = {"polygraphy_class": "ndarray", "values": {"array": encoded["array"]}}
    path = tmp_path / "feeds.json"
    path.write_text(json.dumps([{"x": [[0.5] * 4] * 2, "ids": nested}]))
    ds = load_data(path, TWO_INPUTS)
    assert ds.feeds[0]["x"].dtype == np.float32 and ds.feeds[0]["ids"].tolist() == [[1, 1, 1]] * 2


def test_json_batches_of_different_length_stay_batches(tmp_path):
    path = tmp_path / "seq.json"
    path.write_text(json.dumps([{"x": [[1.0, 2.0]]}, {"x": [[1.0, 2.0, 3.0]]}]))
    ds = load_data(path, DYNAMIC_SEQ)
    assert [f["x"].shape for f in ds.feeds] == [(1, 2), (1, 3)]


def _write_images(root: Path, mode: str = "L") -> None:
    from PIL import Image

    for c, cls in enumerate(["cat", "dog"]):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            value = 255 if c else 0
            Image.new(mode, (10, 12), value if mode == "L" else (value,) * 3).save(root / cls / f"{i}.png")


def test_image_folder_resizes_to_the_model_and_labels_by_class(tmp_path):
    _write_images(tmp_path)
    ds = load_data(tmp_path, CNN, batch_size=4, image=ImageOptions(mean=(0.5,), std=(0.25,)))
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1] and ds.feeds[0]["input"].shape == (4, 1, 8, 8)
    x = np.concatenate([f["input"] for f in ds.feeds])
    np.testing.assert_allclose(x[0], -2.0)  # (0 - 0.5) / 0.25
    np.testing.assert_allclose(x[-1], 2.0)  # (1 - 0.5) / 0.25


def test_image_folder_nhwc_with_resize_and_crop(tmp_path):
    _write_images(tmp_path, "RGB")
    ds = load_data(tmp_path, IMAGE_RGB, image=ImageOptions(resize=(8,), crop=(6,), layout="NHWC"))
    assert ds.feeds[0]["x"].shape == (6, 6, 6, 3)


def test_random_data_and_dynamic_dimensions():
    ds = load_data(None, TWO_INPUTS, random=5, batch_size=2, seed=1)
    assert len(ds) == 5 and ds.feeds[0]["ids"].dtype == np.int64 and ds.feeds[0]["x"].shape == (2, 4)
    with pytest.raises(InputError, match="dynamic dimension 1.*--input-shapes"):
        load_data(None, DYNAMIC_SEQ, random=2)
    ds = load_data(None, DYNAMIC_SEQ, random=4, input_shapes={"x": (2, 7)})
    assert [f["x"].shape for f in ds.feeds] == [(2, 7), (2, 7)]


def test_fixed_batch_wins_and_remainder_is_dropped(tmp_path):
    np.save(tmp_path / "x.npy", np.ones((10, 2), np.float32))
    ds = load_data(tmp_path / "x.npy", FIXED_BATCH, batch_size=3)
    assert [f["x"].shape[0] for f in ds.feeds] == [4, 4] and "2 samples dropped" in ds.source


def test_labels_file(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((3, 1, 8, 8), np.float32))
    np.save(tmp_path / "y.npy", np.array([[1.0], [2.0], [3.0]]))  # integral floats, [N,1]: accepted
    ds = load_data(tmp_path / "x.npy", CNN, labels=str(tmp_path / "y.npy"))
    assert ds.labels.tolist() == [1, 2, 3] and ds.labels.dtype == np.int64


@pytest.mark.parametrize("arrays, model, message", [
    ({"x": np.zeros((2, 4), np.float32)}, TWO_INPUTS, "no array for model input 'ids'"),
    ({"x": np.zeros((2, 4), np.float32), "ids": np.zeros((2, 3), np.int64), "extra": np.zeros(2)}, TWO_INPUTS,
     "array 'extra' matches no model input"),
    ({"x": np.zeros((2, 4), np.float32), "ids": np.zeros((2, 3), np.float32)}, TWO_INPUTS,
     "input 'ids' expects int64 but the data has float32"),
    ({"x": np.zeros((2, 5), np.float32), "ids": np.zeros((2, 3), np.int64)}, TWO_INPUTS,
     r"input 'x' expects shape \[N,4\] but the data has \[2,5\]"),
    ({"x": np.zeros((2, 4), np.float32), "ids": np.zeros((3, 3), np.int64)}, TWO_INPUTS,
     "different sample counts"),
    ({"input": np.zeros((2, 64), np.float32)}, CNN, r"expects shape \[batch,1,8,8\] but the data has \[2,64\]"),
    ({"input": np.zeros((2, 1, 8, 8)), "labels": np.array([0.5, 1])}, CNN, "labels must be integer"),
    ({"input": np.zeros((2, 1, 8, 8)), "labels": np.array([0, 1, 2])}, CNN, "3 labels for 2 samples"),
    ({"input": np.full((2, 1, 8, 8), "a")}, CNN, "expects float32 but the data has <U1"),
])
def test_mismatches_are_one_line_input_errors(tmp_path, arrays, model, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(InputError, match=message) as info:
        load_data(tmp_path / "bad.npz", model)
    assert "\n" not in str(info.value)


def test_pickled_data_is_never_loaded(tmp_path):
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match="pickled Python objects.*allow_pickle=False"):
        load_data(tmp_path / "obj.npy", CNN)


@pytest.mark.parametrize("name, content, message", [
    ("bad.npz", b"not a zip", "cannot read"),
    ("bad.json", b"[{", "not valid JSON"),
    ("bad.json", b'{"a": 1}', r"expects shape \[batch,1,8,8\] but the data has \[\]"),
    ("bad.json", b'[{"input": [[1, 2], [3]]}]', "not a numeric array"),
    ("bad.json", b'[{"input": {"polygraphy_class": "ndarray"}}]', "expected an encoded ndarray"),
    ("bad.txt", b"1 2 3", "unsupported data file"),
])
def test_unreadable_files(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(InputError, match=message):
        load_data(tmp_path / name, CNN)


def test_no_data_and_both_sources_are_errors(tmp_path, digits):
    with pytest.raises(InputError, match="no data given"):
        load_data(None, CNN)
    with pytest.raises(InputError, match="either --data or --random"):
        load_data(digits.calib_path, CNN, random=3)
    with pytest.raises(InputError, match="data not found"):
        load_data(tmp_path / "missing.npz", CNN)


def test_split_dataset_parts_do_not_overlap():
    x = np.arange(20, dtype=np.float32).reshape(20, 1)
    ds = from_arrays({"x": x}, labels=np.arange(20), batch_size=6)
    calib, held = split_dataset(ds, 0.25, seed=3)
    a = np.concatenate([f["x"] for f in calib.feeds]).ravel()
    b = np.concatenate([f["x"] for f in held.feeds]).ravel()
    assert len(calib) == 5 and len(held) == 15 and not set(a) & set(b) and set(a) | set(b) == set(range(20))
    np.testing.assert_array_equal(calib.labels, a.astype(np.int64))  # labels follow their samples
    assert calib.feeds[0]["x"].shape[0] == 5 and held.feeds[0]["x"].shape[0] == 6
    with pytest.raises(InputError):
        split_dataset(ds, 1.0)


def test_dataset_from_options_pops_its_keys(digits):
    kwargs = {"data": str(digits.calib_path), "labels": None, "batch_size": 100, "input_shapes": None,
              "random": None, "resize": None, "crop": None, "mean": None, "std": None, "layout": "NCHW",
              "limit": 250, "json_path": "x.json"}
    ds = dataset_from_options(CNN, kwargs)
    assert len(ds) == 250 and len(ds.feeds) == 3 and kwargs == {"json_path": "x.json"}
    assert dataset_from_options(CNN, data=None, random=None, other=1) is None


def test_parse_input_shapes():
    assert parse_input_shapes("x:1x4,ids:1x3") == {"x": (1, 4), "ids": (1, 3)}
    assert parse_input_shapes("2x1x8x8", CNN) == {"input": (2, 1, 8, 8)}
    with pytest.raises(InputError, match="NAME:DxDxD"):
        parse_input_shapes("x:1xq")
    with pytest.raises(InputError, match="not a model input"):
        load_data(None, CNN, random=2, input_shapes={"nope": (1,)})
    with pytest.raises(InputError, match="contradicts"):
        load_data(None, CNN, random=2, input_shapes={"input": (1, 3, 8, 8)})
