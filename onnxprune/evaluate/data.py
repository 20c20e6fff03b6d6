"""Calibration and evaluation data: one loader for every command that takes data.

Accepted sources (`load_data(spec, model, ...)`):
  * an `.npz` file: arrays named after the model inputs (a single-input model may use any one name), plus
    optional integer labels in an array named `labels`;
  * an `.npy` file: the one input of a single-input model;
  * a folder of `.npz`/`.npy` files, read in name order: `.npz` files as above, `<input name>.npy` /
    `labels.npy` as whole arrays, any other `.npy` as a sample (or a batch) of a single-input model;
  * a JSON file in Polygraphy's data-loader format (`polygraphy run --save-inputs`, `save_json`): a list of
    feed dicts {input name: array}, arrays encoded as {"polygraphy_class": "ndarray", "array": <base64 of
    np.save bytes>}; plain nested lists are accepted too;
  * a folder of images with one sub-folder per class (labels are the sorted class folder indices, as in
    torchvision's ImageFolder), preprocessed by `ImageOptions`;
  * `random=N`: N synthetic samples, for latency-only runs.

Axis 0 of every input is the batch axis. Samples are re-batched to `batch_size` unless the model fixes its
batch dimension, which then wins. An array one rank short of its input is taken as a single sample.
Files are always read with `allow_pickle=False`: a data file can never run code.
"""

from __future__ import annotations

import base64
import io
import json
import os
import zipfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from onnxprune.errors import InputError
from onnxprune.graph.kvcache import cache_inputs, empty_cache
from onnxprune.runtime.feeds import graph_inputs

_LABELS = "labels"
_UNNAMED = "<unnamed .npy files>"
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


@dataclass
class Dataset:
    feeds: list[dict[str, np.ndarray]]  # batches, each keyed by the model's (non-initializer) input names
    labels: np.ndarray | None  # int64 labels for all samples, in batch order, or None
    source: str  # where it came from, for reports
    batch_size: int | None = None  # samples per full batch; None when batches kept the sizes they came in

    def __len__(self) -> int:
        return sum(_feed_len(feed) for feed in self.feeds)

    def batches(self):
        return iter(self.feeds)


@dataclass(frozen=True)
class ImageOptions:
    """How images become tensors: pixels / 255, resized, centre-cropped, then (x - mean) / std per channel."""

    resize: tuple[int, ...] | None = None  # (s,): shorter side to s keeping the aspect; (h, w): exact size
    crop: tuple[int, ...] | None = None  # centre crop, (s,) or (h, w)
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    layout: str = "NCHW"  # or NHWC


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    dims: tuple[int | str | None, ...]  # int: fixed; str/None: dynamic (named or not)

    def shape_text(self) -> str:
        return "[" + ",".join(str(d) if d is not None else "?" for d in self.dims) + "]"


def model_inputs(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]] | None = None) -> list[InputSpec]:
    """The graph inputs that are not initializers, with `input_shapes` fixing dimensions (batch included)."""
    specs = []
    for inp in graph_inputs(model):  # -1 and 0 are dynamic dims there (paddle2onnx writes -1)
        if inp.elem_type == onnx.TensorProto.UNDEFINED:
            raise InputError(f"model input {inp.name!r} is not a tensor; onnxprune feeds tensors only")
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(inp.elem_type))
        dims = tuple(d if d is not None else (n if n != "?" and not n.lstrip("-").isdigit() else None)
                     for d, n in zip(inp.dims, inp.names))
        specs.append(InputSpec(inp.name, dtype, dims))
    for name, shape in (input_shapes or {}).items():
        index = next((i for i, s in enumerate(specs) if s.name == name), None)
        if index is None:
            raise InputError(f"--input-shapes names {name!r}, which is not a model input "
                             f"(inputs: {', '.join(s.name for s in specs)})")
        spec = specs[index]
        if spec.dims and len(shape) != len(spec.dims):
            raise InputError(f"--input-shapes gives {name!r} {len(shape)} dimensions; "
                             f"the model has {spec.shape_text()}")
        for given, fixed in zip(shape, spec.dims):
            if isinstance(fixed, int) and fixed != given:
                raise InputError(f"--input-shapes {name}:{'x'.join(map(str, shape))} contradicts the model's "
                                 f"fixed shape {spec.shape_text()}")
        specs[index] = InputSpec(name, spec.dtype, tuple(shape))
    return specs


def load_data(spec: str | os.PathLike | None, model: onnx.ModelProto, *, labels: str | None = None,
              batch_size: int = 32, input_shapes: dict[str, tuple[int, ...]] | None = None,
              random: int | None = None, seed: int = 0, image: ImageOptions | None = None,
              limit: int | None = None) -> Dataset:
    """Read data for `model` from `spec` (see the module docstring), checked against its inputs."""
    inputs = model_inputs(model, input_shapes)
    if batch_size < 1:
        raise InputError(f"batch size must be at least 1, got {batch_size}")
    if random is not None:
        if spec is not None:
            raise InputError("give either --data or --random, not both")
        if random < 1:
            raise InputError(f"--random needs a positive sample count, got {random}")
        state = set(cache_inputs(model))
        live = [s for s in inputs if s.name not in state]
        pieces, label_pieces = {s.name: [a] for s, a in zip(live, _random_arrays(live, random, seed))}, []
        source = f"random ({random} samples, seed {seed})"
    elif spec is None:
        raise InputError("no data given: pass --data FILE (npz, npy, JSON, a folder) or --random N")
    else:
        path = Path(spec)
        if not path.exists():
            raise InputError(f"data not found: {path}")
        pieces, label_pieces = _read(path, inputs, image or ImageOptions())
        source = str(path)
    if labels is not None:
        label_pieces = [_read_labels_file(Path(labels))]
    # a decoder's key/value cache inputs are state: data without them starts every batch with an empty past
    empty = [n for n in cache_inputs(model) if n not in pieces]
    inputs = [s for s in inputs if s.name not in empty]
    arrays = _assign(pieces, inputs, source)
    arrays = {s.name: [_conform(a, s, source) for a in arrays[s.name]] for s in inputs}
    label_array = np.concatenate([np.atleast_1d(p) for p in label_pieces]) if label_pieces else None
    dataset = _batch(arrays, label_array, inputs, batch_size, source, limit)
    if empty:
        dataset.feeds = [empty_cache(model, feed) for feed in dataset.feeds]
        dataset.source += f" (key/value cache: {len(empty)} inputs fed empty)"
    return dataset


def from_arrays(arrays: dict[str, np.ndarray], labels: np.ndarray | None = None, batch_size: int = 32,
                source: str = "arrays") -> Dataset:
    """A Dataset from whole arrays (axis 0 = samples), cut into batches of `batch_size`."""
    n = _count({k: [v] for k, v in arrays.items()}, source)
    feeds = [{k: v[i:i + batch_size] for k, v in arrays.items()} for i in range(0, n, batch_size)]
    return Dataset(feeds, None if labels is None else _check_labels(labels, n, source), source, batch_size)


def split_dataset(ds: Dataset, fraction: float, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Split samples at random into (`fraction` of them, the rest), keeping their order within each part.

    Used to carve a calibration set and a held-out set out of one source, so the two never overlap.
    """
    if not 0.0 < fraction < 1.0:
        raise InputError(f"split fraction must be between 0 and 1 (exclusive), got {fraction}")
    try:
        arrays = {k: np.concatenate([f[k] for f in ds.feeds]) for k in ds.feeds[0]}
    except ValueError:
        raise InputError(f"cannot split {ds.source}: its batches have different shapes") from None
    n = len(ds)
    first = np.sort(np.random.default_rng(seed).permutation(n)[: int(round(fraction * n))])
    if len(first) in (0, n):
        raise InputError(f"splitting {n} samples at {fraction} leaves one part empty")
    second = np.setdiff1d(np.arange(n), first)
    size = ds.batch_size or _feed_len(ds.feeds[0])
    parts = []
    for index, name in ((first, "first"), (second, "second")):
        labels = None if ds.labels is None else ds.labels[index]
        parts.append(from_arrays({k: v[index] for k, v in arrays.items()}, labels, size,
                                 f"{ds.source} ({name} {len(index)} of {n}, seed {seed})"))
    return parts[0], parts[1]


def _feed_len(feed: dict[str, np.ndarray]) -> int:
    return next((a.shape[0] for a in feed.values() if a.ndim), 1)


# ---- reading ------------------------------------------------------------------------------------------

def _read(path: Path, inputs: list[InputSpec], image: ImageOptions):
    """Return ({array name: [pieces]}, [label pieces]) from a file or folder."""
    pieces: dict[str, list[np.ndarray]] = defaultdict(list)
    label_pieces: list[np.ndarray] = []
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".npy", ".npz"))
        if not files:
            if any(p.is_dir() for p in path.iterdir()):
                array, labels = _read_image_folder(path, inputs, image)
                return {inputs[0].name: [array]}, [labels]
            raise InputError(f"{path} holds no .npy/.npz files and no class sub-folders of images")
    else:
        files = [path]
    names = {s.name for s in inputs}
    for file in files:
        if file.suffix == ".npz":
            for name, array in _load_npz(file).items():
                (label_pieces if name == _LABELS else pieces[name]).append(array)
        elif file.suffix == ".npy":
            array = _load_npy(file)
            if file.stem == _LABELS and path.is_dir():
                label_pieces.append(array)
            else:
                pieces[file.stem if file.stem in names else _UNNAMED].append(array)
        elif file.suffix == ".json":
            for name, array in _read_json_feeds(file):
                (label_pieces if name == _LABELS else pieces[name]).append(array)
        else:
            raise InputError(f"unsupported data file {file}: expected .npz, .npy, .json or a folder")
    return pieces, label_pieces


def _load_npy(path: Path) -> np.ndarray:
    return _np_load(path)


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    archive = _np_load(path)
    try:
        return {name: archive[name] for name in archive.files}
    except ValueError as exc:
        raise InputError(_pickle_message(path, exc)) from None
    finally:
        archive.close()


def _np_load(source, where: Path | str | None = None):
    where = where or source
    # np.load treats anything that is neither .npy nor zip as a pickle; say "corrupt", not "pickled"
    if isinstance(source, io.BytesIO):
        magic = source.getvalue()[:6]
    else:
        with open(source, "rb") as f:
            magic = f.read(6)
    if magic != b"\x93NUMPY" and not magic.startswith(b"PK"):
        raise InputError(f"cannot read {where}: not a .npy/.npz file (corrupt or a different format?)")
    try:
        return np.load(source, allow_pickle=False)
    except ValueError as exc:
        raise InputError(_pickle_message(where, exc)) from None
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise InputError(f"cannot read {where} as a numpy file (corrupt or not .npy/.npz?): {exc}") from None


def _pickle_message(where, exc: Exception) -> str:
    if "pickle" in str(exc):
        return (f"{where} holds pickled Python objects, which onnxprune never loads (allow_pickle=False); "
                "save plain numeric arrays")
    return f"cannot read {where}: {exc}"


def _read_json_feeds(path: Path):
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is not valid JSON: {exc}") from None
    feeds = [obj] if isinstance(obj, dict) else obj
    if not isinstance(feeds, list) or not feeds or not all(isinstance(f, dict) for f in feeds):
        raise InputError(f"{path}: expected a JSON list of feed dicts {{input name: array}} (Polygraphy format)")
    for i, feed in enumerate(feeds):
        for name, value in feed.items():
            yield name, _decode_json_array(value, f"{path} feed {i} {name!r}")


def _decode_json_array(value, where: str) -> np.ndarray:
    """Polygraphy's ndarray encoding ({"polygraphy_class": "ndarray", "array": b64}) or a nested list."""
    if isinstance(value, dict):
        payload = value.get("array")
        if payload is None and isinstance(value.get("values"), dict):
            payload = value["values"].get("array")
        if not isinstance(payload, str):
            raise InputError(f"{where}: expected an encoded ndarray "
                             "({\"polygraphy_class\": \"ndarray\", \"array\": base64}) or a nested list")
        try:
            data = base64.b64decode(payload.encode(), validate=True)
        except ValueError:
            data = payload.encode("latin-1")  # Polygraphy's older encoding, which it still reads
        loaded = _np_load(io.BytesIO(data), where)
        if isinstance(loaded, np.lib.npyio.NpzFile):  # older Polygraphy wrapped the array in an npz
            with loaded:
                return _load_npz_arrays(loaded, where)
        return loaded
    try:
        array = np.asarray(value)
    except ValueError:
        array = np.empty(0, dtype=object)
    if array.dtype == object or array.dtype.kind in "USV":
        raise InputError(f"{where}: not a numeric array (a ragged nested list, or strings?)")
    return array


def _load_npz_arrays(archive, where: str) -> np.ndarray:
    try:
        return archive[archive.files[0]]
    except (ValueError, IndexError) as exc:
        raise InputError(_pickle_message(where, exc)) from None


def _read_labels_file(path: Path) -> np.ndarray:
    if not path.exists():
        raise InputError(f"labels file not found: {path}")
    if path.suffix == ".npz":
        arrays = _load_npz(path)
        if _LABELS not in arrays and len(arrays) != 1:
            raise InputError(f"{path} has no array named 'labels' (arrays: {', '.join(arrays)})")
        return arrays.get(_LABELS, next(iter(arrays.values()), None))
    return _load_npy(path)


def _read_image_folder(root: Path, inputs: list[InputSpec], opts: ImageOptions) -> tuple[np.ndarray, np.ndarray]:
    """Images in class sub-folders -> ([N, ...] float array laid out for the first input, class indices)."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:  # pragma: no cover - depends on the install
        raise InputError("reading image folders needs Pillow: pip install pillow") from None
    spec = inputs[0]
    if len(inputs) != 1 or len(spec.dims) != 4:
        raise InputError(f"an image folder feeds a model with one 4-D input; this one has {len(inputs)} input(s), "
                         f"the first {spec.shape_text()}")
    layout = opts.layout.upper()
    if layout not in ("NCHW", "NHWC"):
        raise InputError(f"--layout must be NCHW or NHWC, got {opts.layout!r}")
    c_axis, h_axis, w_axis = (1, 2, 3) if layout == "NCHW" else (3, 1, 2)
    channels = spec.dims[c_axis] if isinstance(spec.dims[c_axis], int) else 3
    if channels not in (1, 3):
        raise InputError(f"input {spec.name!r} {spec.shape_text()} has {channels} channels on the {layout} channel "
                         "axis; images give 1 or 3 (wrong --layout?)")
    model_hw = tuple(spec.dims[a] for a in (h_axis, w_axis))
    if opts.crop is None and opts.resize is None and not all(isinstance(d, int) for d in model_hw):
        raise InputError(f"input {spec.name!r} {spec.shape_text()} has a dynamic image size; give --resize or --crop")
    mean, std = np.asarray(opts.mean, np.float32), np.asarray(opts.std, np.float32)
    if mean.size not in (1, channels) or std.size not in (1, channels) or np.any(std == 0):
        raise InputError(f"--mean/--std need 1 or {channels} values and a non-zero std")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    files = [(f, c) for c, name in enumerate(classes) for f in sorted((root / name).iterdir())
             if f.suffix.lower() in _IMAGE_SUFFIXES]
    if not files:
        raise InputError(f"{root}: no images ({', '.join(sorted(_IMAGE_SUFFIXES))}) in its class sub-folders")
    images = []
    for file, _ in files:
        try:
            with Image.open(file) as img:
                img = img.convert("L" if channels == 1 else "RGB")
                if opts.resize is not None:
                    img = img.resize(_resized(img.size, opts.resize), Image.BILINEAR)
                elif opts.crop is None:
                    img = img.resize((model_hw[1], model_hw[0]), Image.BILINEAR)
                if opts.crop is not None:
                    img = _centre_crop(img, opts.crop)
                pixels = np.asarray(img, dtype=np.float32) / 255.0
        except (UnidentifiedImageError, OSError) as exc:
            raise InputError(f"cannot read image {file}: {exc}") from None
        images.append(pixels.reshape(*pixels.shape[:2], channels))
    if len({im.shape for im in images}) > 1:
        raise InputError(f"{root}: images come out in different sizes; give --resize h,w or --crop")
    batch = (np.stack(images) - mean) / std  # NHWC; mean/std broadcast over the channel axis
    if layout == "NCHW":
        batch = batch.transpose(0, 3, 1, 2)
    return batch.astype(np.float32), np.array([c for _, c in files], dtype=np.int64)


def _resized(size: tuple[int, int], resize: tuple[int, ...]) -> tuple[int, int]:
    """PIL (width, height) for a resize to (h, w), or with the shorter side to s (torchvision's convention)."""
    if len(resize) == 2:
        return resize[1], resize[0]
    w, h = size
    s = resize[0]
    return (s, max(1, round(h * s / w))) if w <= h else (max(1, round(w * s / h)), s)


def _centre_crop(img, crop: tuple[int, ...]):
    ch, cw = (crop[0], crop[0]) if len(crop) == 1 else crop
    w, h = img.size
    if ch > h or cw > w:
        raise InputError(f"--crop {ch}x{cw} is larger than the (resized) image {h}x{w}")
    top, left = (h - ch) // 2, (w - cw) // 2
    return img.crop((left, top, left + cw, top + ch))


def _random_arrays(inputs: list[InputSpec], n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for spec in inputs:
        dynamic = [i for i, d in enumerate(spec.dims[1:], 1) if not isinstance(d, int)]
        if dynamic:
            raise InputError(f"input {spec.name!r} {spec.shape_text()} has dynamic dimension {dynamic[0]}; "
                             f"give its size with --input-shapes {spec.name}:1x...")
        shape = (n, *spec.dims[1:]) if spec.dims else ()
        kind = spec.dtype.kind
        if kind == "f":
            array = rng.standard_normal(shape).astype(spec.dtype)
        elif kind in "iu":  # 0/1 are valid as token ids, masks and indices alike
            array = rng.integers(0, 2, shape).astype(spec.dtype)
        elif kind == "b":
            array = rng.integers(0, 2, shape).astype(bool)
        else:
            raise InputError(f"cannot make random data for input {spec.name!r} of type {spec.dtype}")
        out.append(array)
    return out


# ---- checking and batching ----------------------------------------------------------------------------

def _assign(pieces: dict[str, list[np.ndarray]], inputs: list[InputSpec], source: str) -> dict[str, list]:
    """Map data array names onto model inputs; a single-input model takes a single array of any name."""
    names = [s.name for s in inputs]
    given = [k for k in pieces if k != _LABELS]
    if all(n in pieces for n in names):
        extra = [k for k in given if k not in names]
        if extra:
            raise InputError(f"{source}: array {extra[0]!r} matches no model input (inputs: {', '.join(names)})")
        return {n: pieces[n] for n in names}
    if len(names) == 1 and len(given) == 1:
        return {names[0]: pieces[given[0]]}
    missing = [n for n in names if n not in pieces]
    raise InputError(f"{source}: no array for model input {missing[0]!r} (data arrays: {', '.join(given) or 'none'}); "
                     "name the arrays after the model inputs")


def _conform(array: np.ndarray, spec: InputSpec, source: str) -> np.ndarray:
    """Check rank, fixed dimensions and dtype; add a batch axis to a single sample; cast safe dtypes."""
    array = np.asarray(array)
    if spec.dims and array.ndim == len(spec.dims) - 1:
        array = array[None]
    shape_text = "[" + ",".join(map(str, array.shape)) + "]"
    bad_rank = array.ndim != len(spec.dims)
    if bad_rank or any(isinstance(d, int) and d != a for d, a in zip(spec.dims[1:], array.shape[1:])):
        raise InputError(f"{source}: input {spec.name!r} expects shape {spec.shape_text()} "
                         f"but the data has {shape_text}")
    src, dst = array.dtype, spec.dtype
    if src != dst:
        if not (np.can_cast(src, dst, "same_kind") or (src.kind in "biu" and dst.kind == "f")):
            raise InputError(f"{source}: input {spec.name!r} expects {dst} but the data has {src}")
        array = array.astype(dst)
    return np.ascontiguousarray(array)


def _count(arrays: dict[str, list[np.ndarray]], source: str) -> int:
    counts = {k: sum(a.shape[0] for a in v) for k, v in arrays.items() if v and v[0].ndim}
    if len(set(counts.values())) > 1:
        detail = ", ".join(f"{k} {c}" for k, c in counts.items())
        raise InputError(f"{source}: inputs have different sample counts ({detail})")
    return next(iter(counts.values()), 1)


def _check_labels(labels, n: int, source: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim > 1 and all(d == 1 for d in labels.shape[1:]):
        labels = labels.reshape(len(labels))
    if labels.ndim != 1:
        raise InputError(f"{source}: labels must be a 1-D array of class indices, got shape {list(labels.shape)}")
    if labels.dtype.kind == "f" and np.all(np.mod(labels, 1) == 0):
        labels = labels.astype(np.int64)
    if labels.dtype.kind not in "iu":
        raise InputError(f"{source}: labels must be integer class indices, got {labels.dtype}")
    if len(labels) != n:
        raise InputError(f"{source}: {len(labels)} labels for {n} samples")
    return labels.astype(np.int64)


def _batch(arrays: dict[str, list[np.ndarray]], labels, inputs: list[InputSpec], batch_size: int,
           source: str, limit: int | None) -> Dataset:
    n = _count(arrays, source)
    if n == 0:
        raise InputError(f"{source} holds no samples")
    if labels is not None:
        labels = _check_labels(labels, n, source)
    fixed = {s.dims[0] for s in inputs if s.dims and isinstance(s.dims[0], int)}
    if len(fixed) > 1:
        raise InputError(f"the model's inputs fix different batch sizes: {sorted(fixed)}")
    size = next(iter(fixed)) if fixed else batch_size
    try:
        whole = {k: np.concatenate(v) if v[0].ndim else v[0] for k, v in arrays.items()}
    except ValueError:  # pieces differ in a dynamic dimension (e.g. sequence length): keep them as batches
        return _pieces_as_batches(arrays, labels, source, limit)
    if limit is not None:
        n = min(n, limit)
    usable = n - n % size if fixed else n
    if usable == 0:
        raise InputError(f"{source}: {n} samples, fewer than the model's fixed batch size {size}")
    if usable < n:
        source += f" (last {n - usable} samples dropped: the model's batch size is fixed at {size})"
    feeds = [{k: (v[i:min(i + size, usable)] if v.ndim else v) for k, v in whole.items()}
             for i in range(0, usable, size)]
    return Dataset(feeds, None if labels is None else labels[:usable], source, size)


def _pieces_as_batches(arrays, labels, source: str, limit: int | None) -> Dataset:
    counts = {len(v) for v in arrays.values()}
    if len(counts) != 1:
        raise InputError(f"{source}: batches differ in shape and the inputs have different numbers of them")
    feeds = [{k: v[i] for k, v in arrays.items()} for i in range(counts.pop())]
    if limit is not None:
        kept, total = [], 0
        for feed in feeds:
            if total >= limit:
                break
            kept.append(feed)
            total += _feed_len(feed)
        feeds = kept
    n = sum(_feed_len(f) for f in feeds)
    return Dataset(feeds, None if labels is None else labels[:n], source + " (batches as given)", None)
