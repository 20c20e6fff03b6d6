"""One exception family. The CLI turns each into a one-line message and an exit code."""


class OnnxPruneError(Exception):
    """Base class for errors a user can act on. `exit_code` is what the CLI returns."""

    exit_code = 2


class InputError(OnnxPruneError):
    """Bad input: a missing or corrupt file, a wrong option value, data that does not fit the model."""


class UnsupportedModelError(OnnxPruneError):
    """The model uses something onnxprune refuses to touch (control flow, an unsupported opset)."""


class ValidationError(OnnxPruneError):
    """A rewritten model failed a post-condition (checker, shape inference, onnxruntime, output shapes)."""


class ContainedFaultError(OnnxPruneError):
    """--strict: a handler fault or a failed validation was contained (the result would have been written)."""


class GateFailed(OnnxPruneError):
    """An evaluation gate (--max-drop, --min-agreement, tolerances) was missed."""

    exit_code = 1


class MissingDependency(OnnxPruneError):
    """An optional dependency is needed for this command."""


def require_onnxruntime():
    """Import onnxruntime lazily, with an install hint when neither the CPU nor the GPU build is present."""
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise MissingDependency(
            "onnxruntime is not installed: pip install 'onnxprune[cpu]' (or 'onnxprune[gpu]' for CUDA)"
        ) from exc
    return onnxruntime


def require_torch():
    """Import torch lazily (re-training, onnxprune/train), with an install hint when it is missing."""
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise MissingDependency("re-training needs torch: pip install 'onnxprune[train]'") from exc
    return torch


class UnsupportedOpError(UnsupportedModelError):
    """An op the training bridge (onnxprune/train) cannot run in torch: raised when the module is built."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's text on one line (onnxruntime and the checker spread the useful part over several), at
    most `limit` characters; the exception type when it has no text."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
