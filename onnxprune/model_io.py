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

# Beyond this a single protobuf cannot be serialised; weights then go to an external data file.
_PROTOBUF_LIMIT = 2**31 - 1 - 64 * 2**20
MIN_OPSET, MAX_OPSET = 7, 23
_CONTROL_FLOW = {"If", "Loop", "Scan", "SequenceMap"}


def load_model(path: str | os.PathLike, check_external: bool = True) -> onnx.ModelProto:
    """Read an ONNX model with its external data. Refuses external data outside the model's folder."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"model file not found: {path}")
    if path.is_dir():
        raise InputError(f"expected an .onnx file, got a directory: {path}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError, onnx.onnx_cpp2py_export.checker.ValidationError) as exc:
        raise InputError(f"{path} is not a readable ONNX model (corrupt or truncated file?): {exc}") from None
    except Exception as exc:  # protobuf raises several types for garbage input
        raise InputError(f"{path} is not a readable ONNX model: {type(exc).__name__}: {exc}") from None
    if not model.graph.node and not model.graph.output:
        raise InputError(f"{path} is not an ONNX model (it holds no graph)")
    if check_external:
        _load_external_data(model, path.parent)
    return model


def _load_external_data(model: onnx.ModelProto, base: Path) -> None:
    from onnx.external_data_helper import load_external_data_for_model, uses_external_data

    base_resolved = base.resolve()
    external = [t for t in _all_tensors(model) if uses_external_data(t)]
    for tensor in external:
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = (base / location).resolve()
        if base_resolved not in target.parents and target != base_resolved:
            raise InputError(
                f"external data of tensor {tensor.name!r} points outside the model's folder ({location}); refusing to read it"
            )
        if not target.exists():
            raise InputError(f"external data file missing for tensor {tensor.name!r}: {target}")
    if external:
        try:
            load_external_data_for_model(model, str(base))
        except Exception as exc:
            raise InputError(f"could not read external data from {base}: {exc}") from None


def _all_tensors(model: onnx.ModelProto):
    yield from model.graph.initializer
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t


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
    """Write `model` to `path` atomically. Large models (or `external_data=True`) keep weights beside it.

    The temporary files live in the target folder so the final `os.replace` is a rename on one file system.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise InputError(f"output exists: {path} (pass --overwrite to replace it)")
    if not path.parent.exists():
        raise InputError(f"output folder does not exist: {path.parent}")
    if external_data is None:
        external_data = model.ByteSize() > _PROTOBUF_LIMIT
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    data_name = path.name + ".data"
    tmp_data = Path(tmp + ".data")
    try:
        if external_data:
            model = _copy(model)  # save_model moves tensors to external data in place
            onnx.save_model(model, tmp, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=tmp_data.name, size_threshold=1024)
            # the location recorded in the model must be the final name of the data file
            final_model = onnx.load(tmp, load_external_data=False)
            for tensor in _all_tensors(final_model):
                for entry in tensor.external_data:
                    if entry.key == "location":
                        entry.value = data_name
            onnx.save_model(final_model, tmp)
            os.replace(tmp_data, path.parent / data_name)
        else:
            onnx.save_model(model, tmp)
        os.replace(tmp, path)
    except BaseException:
        for leftover in (Path(tmp), tmp_data):
            if leftover.exists():
                leftover.unlink()
        raise
    return path


def model_bytes(model: onnx.ModelProto) -> int:
    """Serialised size in bytes, to within a few bytes per initializer.

    `ByteSize()` walks every weight (a third of a second on a 100 MB model); the graph without its large
    initializers plus their payload lengths gives the same figure for the cost of a copy of the small parts.
    """
    payload = 0
    for t in model.graph.initializer:
        n = 1
        for d in t.dims:
            n *= d
        if n > 64:
            payload += len(t.raw_data) or t.ByteSize()
    return weightless(model).ByteSize() + payload


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


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
        n = 1
        for d in t.dims:
            n *= d
        if n <= max_elements:
            out.graph.initializer.append(t)
        elif t.name not in declared:
            out.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return out
