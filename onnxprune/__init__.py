"""onnxprune: structured pruning of exported ONNX models."""

__version__ = "0.1.0"

from onnxprune.errors import OnnxPruneError  # noqa: E402

__all__ = ["OnnxPruneError", "__version__"]
