"""Weights stored inside a single .onnx file, mapped where they lie instead of parsed into the protobuf.

`onnx.load` reads a 650 MB model into 650 MB of protobuf, and every copy a rewrite makes (the normalised
model, the pruned one, the refit one) holds the weights again. A one-file model is a ModelProto whose graph's
initializers carry their bytes in `raw_data` fields. This module walks the file's protobuf wire format (field
tags and lengths only: the pages of the weights are never touched), rebuilds the model's bytes without the
large `raw_data` fields, parses that (kilobytes), and points each of those initializers at its bytes in the
.onnx file itself as ONNX external data (location, offset, length). The model is then *lazy* like one loaded
with external data (see weights.py): tensors are memory-mapped when a stage needs them, onnxruntime maps or
reads them itself, and `model_io.save_model` writes the output in one file again.

Only the main graph's initializers with raw_data of at least MIN_BYTES are mapped; everything else (small
tensors, typed repeated fields, subgraphs, Constant nodes) is parsed as usual.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import onnx

from onnxprune.io.weights import copy_external, external_info, is_external, metadata_copy, nbytes, set_external

MIN_BYTES = 1024

# field numbers (onnx.proto): ModelProto.graph, GraphProto.initializer, TensorProto.raw_data
_MODEL_GRAPH, _GRAPH_INITIALIZER, _TENSOR_RAW_DATA = 7, 5, 9
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


class WireError(ValueError):
    """The bytes are not a well-formed protobuf message."""


def _varint(buf, pos: int, end: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= end or shift > 63:
            raise WireError("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _fields(buf, start: int, end: int):
    """(field number, wire type, field start, payload start, payload end) of each field in buf[start:end]."""
    pos = start
    while pos < end:
        begin = pos
        tag, pos = _varint(buf, pos, end)
        number, wire = tag >> 3, tag & 7
        if wire == _VARINT:
            _, stop = _varint(buf, pos, end)
            payload = pos
        elif wire == _I64:
            payload, stop = pos, pos + 8
        elif wire == _I32:
            payload, stop = pos, pos + 4
        elif wire == _LEN:
            length, payload = _varint(buf, pos, end)
            stop = payload + length
        else:
            raise WireError(f"unsupported wire type {wire}")
        if stop > end or number == 0:
            raise WireError("field runs past its message")
        yield number, wire, begin, payload, stop
        pos = stop


def _message(number: int, body: bytes) -> bytes:
    return _encode_varint(number << 3 | _LEN) + _encode_varint(len(body)) + body


def _strip_tensor(buf, start: int, end: int) -> tuple[bytes, tuple[int, int] | None]:
    """A TensorProto's bytes without a large raw_data field, and (offset, length) of that field's payload."""
    kept, mapped = [], None
    for number, wire, begin, payload, stop in _fields(buf, start, end):
        if number == _TENSOR_RAW_DATA and wire == _LEN and stop - payload >= MIN_BYTES:
            mapped = (payload, stop - payload)
            continue
        kept.append(bytes(buf[begin:stop]))
    return b"".join(kept), mapped


def _strip_graph(buf, start: int, end: int, spans: list) -> bytes:
    out = []
    for number, wire, begin, payload, stop in _fields(buf, start, end):
        if number == _GRAPH_INITIALIZER and wire == _LEN:
            body, mapped = _strip_tensor(buf, payload, stop)
            spans.append(mapped)
            out.append(_message(number, body) if mapped else bytes(buf[begin:stop]))
        else:
            out.append(bytes(buf[begin:stop]))
    return b"".join(out)


def load_mapped(path: str | os.PathLike) -> onnx.ModelProto | None:
    """The model in `path` with its large inline initializers mapped in place (see the module docstring);
    None when it has none to map. Raises WireError for bytes that are not a protobuf message."""
    path = Path(path).resolve()
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return None
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            spans: list[tuple[int, int] | None] = []
            parts = []
            for number, wire, begin, payload, stop in _fields(buf, 0, len(buf)):
                if number == _MODEL_GRAPH and wire == _LEN:
                    parts.append(_message(number, _strip_graph(buf, payload, stop, spans)))
                else:
                    parts.append(bytes(buf[begin:stop]))
    if not any(spans):
        return None
    model = onnx.ModelProto.FromString(b"".join(parts))
    if len(model.graph.initializer) != len(spans):
        raise WireError("initializers do not match the file's fields")
    for tensor, span in zip(model.graph.initializer, spans):
        if span is not None:
            set_external(tensor, str(path), span[0], span[1])
    return model


def write_one_file(model: onnx.ModelProto, f, chunk: int = 64 << 20) -> None:
    """Write `model` as one .onnx file to the open binary file `f`, its external tensors inline, streaming
    their bytes (no more memory than one chunk, whatever the weights).

    The model's bytes are those of the model with its external initializers left out, followed by a second
    `graph` field holding just those initializers with their raw_data: protobuf merges repeated occurrences of
    an embedded message, so a reader sees one graph with every initializer (the external ones last)."""
    light = onnx.ModelProto()
    light.CopyFrom(model)  # external tensors carry no data: kilobytes
    external = [t for t in light.graph.initializer if is_external(t)]
    if not external:
        f.write(model.SerializeToString())
        return
    kept = [t for t in light.graph.initializer if not is_external(t)]
    del light.graph.initializer[:]
    light.graph.initializer.extend(kept)
    f.write(light.SerializeToString())
    heads = []
    for tensor in external:
        _, _, length = external_info(tensor)
        size = nbytes(tensor) if length is None else length
        meta = metadata_copy(tensor).SerializeToString()
        raw_head = _encode_varint(_TENSOR_RAW_DATA << 3 | _LEN) + _encode_varint(size)
        heads.append((tensor, meta, raw_head, size))
    bodies = [len(meta) + len(raw_head) + size for _, meta, raw_head, size in heads]
    graph_len = sum(len(_encode_varint(_GRAPH_INITIALIZER << 3 | _LEN)) + len(_encode_varint(n)) + n for n in bodies)
    f.write(_encode_varint(_MODEL_GRAPH << 3 | _LEN) + _encode_varint(graph_len))
    for (tensor, meta, raw_head, size), body in zip(heads, bodies):
        f.write(_encode_varint(_GRAPH_INITIALIZER << 3 | _LEN) + _encode_varint(body) + meta + raw_head)
        copy_external(tensor, f, chunk, size)
