"""Loading and saving models: external data, safe paths, atomic writes.

This is where files become `onnx.ModelProto` and back. A corrupt, truncated or missing file becomes an
`InputError` with a one-line message; an output is written to a temporary file beside its target and renamed
into place only when complete, so an interrupted run never leaves a half-written model.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from onnxprune.errors import InputError, UnsupportedModelError
from onnxprune.io.inline_map import WireError, load_mapped, write_one_file
from onnxprune.io.paths import make_parent
from onnxprune.report import progress
from onnxprune.io.weights import (external_info, keeps_data_files, is_external, is_lazy, metadata_copy, model_tensors as _all_tensors,
                               nbytes, numel, read_bytes, set_external, tensor_array, write_payload)

# One-file models from this size on keep their weights in the file, memory-mapped (io/inline_map.py), so that
# copies of the model cost no weights; smaller ones are parsed whole.
MAP_INLINE_BYTES = 64 << 20
# Beyond this a single protobuf cannot be serialised; weights then go to an external data file.
_PROTOBUF_LIMIT = 2**31 - 1 - 64 * 2**20
MIN_OPSET, MAX_OPSET = 7, 23
_CONTROL_FLOW = {"If", "Loop", "Scan", "SequenceMap"}


def load_model(path: str | os.PathLike, check_external: bool = True, lazy: bool = True) -> onnx.ModelProto:
    """Read an ONNX model. Refuses external data outside the model's folder, missing or too short.

    With `lazy` (the default) external weights are not read: their locations become absolute paths and
    `weights.tensor_array` maps each tensor when a stage needs it (see onnxprune/weights.py); otherwise they
    are loaded into the protobuf.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"model file not found: {path}")
    if path.is_dir():
        raise InputError(f"expected an .onnx file, got a directory: {path}")
    model = _load_mapped(path) if lazy and path.stat().st_size >= MAP_INLINE_BYTES else None
    try:
        if model is None:
            with progress(f"loading {path.name}", None):
                model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError, onnx.onnx_cpp2py_export.checker.ValidationError) as exc:
        raise InputError(f"{path} is not a readable ONNX model (corrupt or truncated file?): {exc}") from None
    except Exception as exc:  # protobuf raises several types for garbage input
        raise InputError(f"{path} is not a readable ONNX model: {type(exc).__name__}: {exc}") from None
    if not model.graph.node and not model.graph.output:
        raise InputError(f"{path} is not an ONNX model (it holds no graph)")
    if check_external:
        _resolve_external_data(model, path.parent, lazy)
    return model


def _load_mapped(path: Path) -> onnx.ModelProto | None:
    """A large one-file model with its weights mapped in place (io/inline_map.py); None to load it as usual
    (nothing to map, or bytes the wire walk cannot follow: onnx.load then names the fault)."""
    try:
        with progress(f"mapping {path.name}", None):
            return load_mapped(path)
    except (WireError, DecodeError, ValueError, OSError):
        return None


def _resolve_external_data(model: onnx.ModelProto, base: Path, lazy: bool) -> None:
    """Check every external location; make it absolute (lazy) or read the data into the model."""
    base_resolved = base.resolve()
    sizes: dict[Path, int] = {}
    initializers = len(model.graph.initializer)
    for i, tensor in enumerate(_all_tensors(model)):
        if not is_external(tensor):
            continue
        location, offset, length = external_info(tensor)
        target = (base / location).resolve()
        if base_resolved not in target.parents and target != base_resolved:
            raise InputError(
                f"external data of tensor {tensor.name!r} points outside the model's folder ({location}); refusing to read it"
            )
        if not target.is_file():
            raise InputError(f"external data file missing for tensor {tensor.name!r}: {target}")
        size = sizes.setdefault(target, target.stat().st_size)
        if offset + (length if length is not None else 0) > size:
            raise InputError(f"external data of tensor {tensor.name!r} ends past the end of {target} "
                             f"(offset {offset} + length {length} > {size} bytes): truncated file?")
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = str(target)
        # attribute tensors (Constant values) are read now: they are small, and nodes are copied freely
        if not lazy or i >= initializers:
            _inline(tensor)


def _inline(tensor: onnx.TensorProto) -> None:
    data = read_bytes(tensor)
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.DEFAULT
    tensor.raw_data = data


def check_supported(model: onnx.ModelProto) -> None:
    """Refuse models onnxprune does not rewrite: control flow and opsets outside the tested range."""
    opset = default_opset(model)
    if opset is None:
        raise UnsupportedModelError("the model imports no default ('ai.onnx') opset")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise UnsupportedModelError(f"opset {opset} is not supported (supported: {MIN_OPSET}..{MAX_OPSET})")
    for node in model.graph.node:
        if node.op_type in _CONTROL_FLOW and node.domain in ("", "ai.onnx"):
            raise UnsupportedModelError(
                f"control flow is not supported: node {node.name or node.output[0]!r} is a {node.op_type}"
            )


def default_opset(model: onnx.ModelProto) -> int | None:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return None


def save_model(model: onnx.ModelProto, path: str | os.PathLike, *, overwrite: bool = False,
               external_data: bool | None = None) -> Path:
    """Write `model` to `path` atomically. Lazy models, large ones (or `external_data=True`) keep their
    weights in `path`.data beside it.

    Weights are streamed to the data file one tensor at a time (external ones copied in chunks from their
    files), so saving costs no more memory than the model's structure. The temporary files live in the target
    folder so the final `os.replace` is a rename on one file system.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise InputError(f"output exists: {path} (pass --overwrite to replace it)")
    make_parent(path)
    if external_data is None:  # the input's form: one file unless it came with data files (or is too large)
        external_data = keeps_data_files(model) or model_bytes(model) > _PROTOBUF_LIMIT
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    data_name = path.name + ".data"
    tmp_data = Path(tmp + ".data")
    try:
        if external_data:
            out = copy_without_initializers(model)
            total = sum(nbytes(t) for t in model.graph.initializer)
            with open(tmp_data, "wb") as f, progress(f"writing {path.name}", total) as advance:
                for tensor in model.graph.initializer:
                    if not is_external(tensor) and nbytes(tensor) < 1024:
                        out.graph.initializer.append(tensor)
                        continue
                    meta = metadata_copy(tensor)
                    offset = write_payload(f, tensor)
                    set_external(meta, data_name, offset, f.tell() - offset)
                    out.graph.initializer.append(meta)
                    advance(f.tell() - offset)
            onnx.save_model(out, tmp)
            os.replace(tmp_data, path.parent / data_name)
        elif is_lazy(model):  # asked for one file: the weights are streamed into it
            with open(tmp, "wb") as f, progress(f"writing {path.name}", None):
                write_one_file(model, f)
        else:
            onnx.save_model(model, tmp)
        _readable(tmp)
        os.replace(tmp, path)
    except BaseException:
        for leftover in (Path(tmp), tmp_data):
            if leftover.exists():
                leftover.unlink()
        raise
    return path


def _readable(tmp: str) -> None:
    """mkstemp makes the file 0600; a model gets a new file's usual permissions (as its .data file has)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)


def copy_without_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every field of the model and its graph except the graph's initializers (no weight is copied)."""
    out = onnx.ModelProto()
    for field, value in model.ListFields():
        if field.name != "graph":
            _copy_field(out, field, value)
    for field, value in model.graph.ListFields():
        if field.name != "initializer":
            _copy_field(out.graph, field, value)
    return out


def _copy_field(target, field, value) -> None:
    # protobuf 6+ has is_repeated; older releases only the label
    repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED
    if repeated:
        getattr(target, field.name).extend(value)
    elif field.type == field.TYPE_MESSAGE:
        getattr(target, field.name).CopyFrom(value)
    else:
        setattr(target, field.name, value)


def model_bytes(model: onnx.ModelProto) -> int:
    """Serialised size in bytes (weights in external files counted as if inline), to within a few bytes per
    initializer.

    `ByteSize()` walks every weight (a third of a second on a 100 MB model); the graph without its large
    initializers plus their payload lengths gives the same figure for the cost of a copy of the small parts.
    """
    payload = sum(nbytes(t) for t in model.graph.initializer if is_external(t) or numel(t) > 64)
    return weightless(model).ByteSize() + payload


def weightless(model: onnx.ModelProto, max_elements: int = 64) -> onnx.ModelProto:
    """A copy whose large initializers are graph inputs of the same type and shape, without their data.

    Shape inference and the checker then work on kilobytes instead of the whole model; small initializers
    (shape targets, axes, scalars) stay, so shape arithmetic can still be propagated.
    """
    out = onnx.ModelProto()
    graph = model.graph
    # copy everything but the graph's initializers, then put back only the small ones
    out.CopyFrom(onnx.ModelProto(ir_version=model.ir_version, opset_import=model.opset_import,
                                 producer_name=model.producer_name, functions=model.functions))
    out.graph.name = graph.name
    out.graph.node.extend(graph.node)
    out.graph.input.extend(graph.input)
    out.graph.output.extend(graph.output)
    out.graph.value_info.extend(graph.value_info)
    declared = {i.name for i in graph.input}
    for t in graph.initializer:
        if numel(t) <= max_elements:
            if is_external(t):  # the checker and shape inference read small constants (shape targets)
                t = onnx.numpy_helper.from_array(tensor_array(t), t.name)
            out.graph.initializer.append(t)
        elif t.name not in declared:
            out.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return out
