"""ONNX element types as torch dtypes. Every float type computes in float32 (float64 stays float64): a float16
or bfloat16 model trains in float32 and is cast back when written."""

from __future__ import annotations

import onnx
import torch

T = onnx.TensorProto
_TORCH = {
    T.FLOAT: torch.float32, T.FLOAT16: torch.float32, T.BFLOAT16: torch.float32, T.DOUBLE: torch.float64,
    T.INT8: torch.int8, T.UINT8: torch.uint8, T.INT16: torch.int16, T.UINT16: torch.uint16, T.INT32: torch.int32,
    T.UINT32: torch.uint32, T.INT64: torch.int64, T.UINT64: torch.uint64, T.BOOL: torch.bool,
}


def torch_dtype(onnx_type: int) -> torch.dtype:
    """The dtype a tensor of `onnx_type` has in the module (float16/bfloat16 compute in float32)."""
    try:
        return _TORCH[onnx_type]
    except KeyError:
        raise TypeError(f"element type {T.DataType.Name(onnx_type)} has no torch dtype in the training bridge") \
            from None


def supported(onnx_type: int) -> bool:
    return onnx_type in _TORCH
