"""Where the bytes of weights live: inline in the protobuf, or in external data files read lazily.

A model loaded with external data (`model_io.load_model`) is *lazy*: its TensorProtos keep only the metadata
and an `external_data` entry whose `location` is, in memory, an absolute path. Nothing reads the weights
until a stage needs one, and then `tensor_array` memory-maps just that tensor, so a 3 GB model costs
kilobytes until scored or sliced, and no more than the tensors in use at a time afterwards. New tensors
(sliced weights, refit layers) are streamed to a data file in a `Workspace` by a `TensorWriter`, so a pruned
model can reference the original's data file for the weights it keeps unchanged and the workspace for the
rest. Absolute locations never reach a file: `model_io.save_model` writes relative ones, and onnxruntime gets
the locations relative to the folder all data files share (`session_source`), memory-mapping them itself.
"""

from __future__ import annotations

import atexit
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

EXTERNAL = onnx.TensorProto.EXTERNAL
ALIGN = 4096  # offsets in the data files we write: numpy and onnxruntime can map every tensor in place

# element types stored as plain little-endian arrays (memory-mappable); others are decoded through onnx
_PLAIN = {
    onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.DOUBLE: np.float64, onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.INT8: np.int8, onnx.TensorProto.UINT8: np.uint8, onnx.TensorProto.INT16: np.int16,
    onnx.TensorProto.UINT16: np.uint16, onnx.TensorProto.INT32: np.int32, onnx.TensorProto.UINT32: np.uint32,
    onnx.TensorProto.INT64: np.int64, onnx.TensorProto.UINT64: np.uint64, onnx.TensorProto.BOOL: np.bool_,
}


def is_external(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == EXTERNAL


def external_info(tensor: onnx.TensorProto) -> tuple[str, int, int | None]:
    """(location, offset, length or None) of an external tensor."""
    entries = {e.key: e.value for e in tensor.external_data}
    length = entries.get("length")
    return entries.get("location", ""), int(entries.get("offset", 0) or 0), None if length is None else int(length)


def numel(tensor: onnx.TensorProto) -> int:
    return math.prod(tensor.dims)


def nbytes(tensor: onnx.TensorProto) -> int:
    """Bytes of the tensor's data, without decoding it."""
    if is_external(tensor):
        _, _, length = external_info(tensor)
        if length is not None:
            return length
        dtype = _PLAIN.get(tensor.data_type)
        return numel(tensor) * (np.dtype(dtype).itemsize if dtype is not None else 4)
    if tensor.raw_data:
        return len(tensor.raw_data)
    dtype = _PLAIN.get(tensor.data_type)
    return numel(tensor) * (np.dtype(dtype).itemsize if dtype is not None else 4)


def set_external(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    """Point `tensor` at bytes in a file, dropping any inline data."""
    for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data",
                  "string_data"):
        tensor.ClearField(field)
    del tensor.external_data[:]
    tensor.data_location = EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def tensor_array(tensor: onnx.TensorProto) -> np.ndarray:
    """The tensor's values. External data of a plain type is memory-mapped read-only (pages are read when
    touched and released with the array); inline data is decoded by onnx."""
    if not is_external(tensor):
        return numpy_helper.to_array(tensor)
    location, offset, length = external_info(tensor)
    shape = tuple(tensor.dims)
    dtype = _PLAIN.get(tensor.data_type)
    if dtype is not None:
        dtype = np.dtype(dtype).newbyteorder("<")
        size = math.prod(shape) * dtype.itemsize
        if size == 0:
            return np.zeros(shape, dtype)
        if length is None or length == size:
            arr = np.memmap(location, dtype=dtype, mode="r", offset=offset, shape=shape)
            return arr if offset % dtype.itemsize == 0 else np.array(arr)
    inline = metadata_copy(tensor)
    inline.raw_data = read_bytes(tensor)
    return numpy_helper.to_array(inline)


def read_bytes(tensor: onnx.TensorProto) -> bytes:
    location, offset, length = external_info(tensor)
    with open(location, "rb") as f:
        f.seek(offset)
        return f.read() if length is None else f.read(length)


def metadata_copy(tensor: onnx.TensorProto) -> onnx.TensorProto:
    """A TensorProto with the tensor's name, type and shape and no data (never copies the weights)."""
    out = onnx.TensorProto(name=tensor.name, data_type=tensor.data_type, dims=list(tensor.dims))
    if tensor.doc_string:
        out.doc_string = tensor.doc_string
    return out


def write_payload(f, tensor: onnx.TensorProto, chunk: int = 64 << 20) -> int:
    """Append the tensor's bytes to the open file `f` at the next aligned offset; returns that offset.

    External bytes are copied in chunks, so writing a 3 GB model costs no more memory than one chunk."""
    pos = f.seek(0, os.SEEK_END)
    if pos % ALIGN:
        f.write(b"\0" * (ALIGN - pos % ALIGN))
        pos = f.tell()
    if is_external(tensor):
        copy_external(tensor, f, chunk)
    elif tensor.raw_data:
        f.write(tensor.raw_data)
    else:
        f.write(numpy_helper.from_array(numpy_helper.to_array(tensor)).raw_data)
    return pos


def copy_external(tensor: onnx.TensorProto, f, chunk: int = 64 << 20, size: int | None = None) -> None:
    """Append an external tensor's bytes (`size` of them; default its length, else the rest of its file) to the
    open file `f`, a chunk at a time."""
    location, offset, length = external_info(tensor)
    with open(location, "rb") as src:
        src.seek(offset)
        left = size if size is not None else length if length is not None else os.path.getsize(location) - offset
        while left > 0:
            block = src.read(min(chunk, left))
            if not block:
                raise OSError(f"external data of {tensor.name!r} ends early in {location}")
            f.write(block)
            left -= len(block)


class TensorWriter:
    """Appends arrays to one data file and returns external TensorProtos that reference them (absolute path)."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(Path(path).resolve())
        self._file = open(self.path, "ab+")

    def write(self, name: str, value: np.ndarray) -> onnx.TensorProto:
        value = np.asarray(value)
        pos = self._file.seek(0, os.SEEK_END)
        if pos % ALIGN:
            self._file.write(b"\0" * (ALIGN - pos % ALIGN))
            pos = self._file.tell()
        if value.dtype.kind in "biuf" and value.dtype.byteorder in "=|<":
            # plain little-endian numbers: written straight from the array's buffer
            data = np.ascontiguousarray(value)
            if data.size:
                self._file.write(data.data)
            tensor = onnx.TensorProto(name=name, data_type=onnx.helper.np_dtype_to_tensor_dtype(value.dtype),
                                      dims=list(value.shape))
            length = data.nbytes
        else:  # bfloat16, float8, strings ...: onnx knows their encoding
            encoded = numpy_helper.from_array(value, name)
            self._file.write(encoded.raw_data)
            length = len(encoded.raw_data)
            tensor = metadata_copy(encoded)
        self._file.flush()
        set_external(tensor, self.path, pos, length)
        return tensor

    def overwrite(self, tensor: onnx.TensorProto, value: np.ndarray) -> bool:
        """Write `value` over the bytes of `tensor` in place when it lives in this file with the same size."""
        if not is_external(tensor):
            return False
        location, offset, length = external_info(tensor)
        value = np.ascontiguousarray(value)
        if location != self.path or value.nbytes != length or value.dtype.kind not in "biuf":
            return False
        self._file.seek(offset)
        self._file.write(value.data)
        self._file.flush()
        return True

    def close(self) -> None:
        self._file.close()


class Workspace:
    """A private folder for the data files of models being rewritten; removed at exit (or by `close`).

    It is made beside `near` (the output's or the input's folder: same file system, so nothing is copied
    between disks, and a RAM-backed /tmp is not filled with gigabytes), else in the system's temp folder.
    """

    _open: list["Workspace"] = []

    def __init__(self, near: str | os.PathLike | None = None, one_file: bool = False):
        """`one_file`: the model whose rewrites it holds came in one .onnx file (its weights mapped in place,
        io/inline_map.py), and is saved in one file again."""
        self.one_file = one_file
        path = None
        for folder in ([near] if near else []) + [None]:
            try:
                path = tempfile.mkdtemp(prefix=".onnxprune-", dir=folder)
                break
            except OSError:
                continue
        self.path = Path(path)
        self._count = 0
        self._writer: TensorWriter | None = None
        Workspace._open.append(self)

    def writer(self) -> TensorWriter:
        if self._writer is None:
            self._writer = TensorWriter(self.path / "weights.data")
        return self._writer

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        shutil.rmtree(self.path, ignore_errors=True)
        if self in Workspace._open:
            Workspace._open.remove(self)


@atexit.register
def _close_workspaces() -> None:
    for ws in list(Workspace._open):
        ws.close()


def model_tensors(model: onnx.ModelProto):
    """Every TensorProto of the main graph: initializers and Constant-like attribute tensors."""
    yield from model.graph.initializer
    for node in model.graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                yield a.t


def is_lazy(model: onnx.ModelProto) -> bool:
    """Whether any weight of the model lives in an external file."""
    return any(is_external(t) for t in model.graph.initializer)


def keeps_data_files(model: onnx.ModelProto) -> bool:
    """Whether the model's weights live in data files beside it (as loaded with external data, or rewritten
    from such a model), as opposed to inline or mapped in place from one .onnx file: its saved form."""
    for tensor in model.graph.initializer:
        if not is_external(tensor):
            continue
        location = external_info(tensor)[0]
        if location.endswith(".onnx"):
            continue
        workspace = next((ws for ws in Workspace._open if location.startswith(str(ws.path) + os.sep)), None)
        if workspace is None or not workspace.one_file:
            return True
    return False


def external_folder(model: onnx.ModelProto) -> Path | None:
    """The folder of the first external data file (where a workspace for its rewrite goes by default)."""
    for t in model.graph.initializer:
        if is_external(t):
            return Path(external_info(t)[0]).parent
    return None


def session_source(model: onnx.ModelProto, options) -> bytes:
    """The serialised model for an onnxruntime session, external data included without reading it.

    External locations become relative to the folder all data files share, and onnxruntime is told that
    folder: it then memory-maps the files itself (the weights are not copied into the process)."""
    external = [t for t in model.graph.initializer if is_external(t)]
    if not external:
        return model.SerializeToString()
    locations = {external_info(t)[0] for t in external}
    base = os.path.commonpath([os.path.dirname(loc) for loc in locations])
    light = onnx.ModelProto()
    light.CopyFrom(model)  # no weight data in it: kilobytes
    for t in light.graph.initializer:
        if is_external(t):
            for e in t.external_data:
                if e.key == "location":
                    e.value = os.path.relpath(e.value, base)
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", base)
    return light.SerializeToString()
