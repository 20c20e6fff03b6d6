"""The dense factorisations of refits and refit scores (eigendecompositions, inverses, solves): numpy on the
CPU, or torch on a CUDA GPU when one is there.

On a wide model these dominate a data-aware prune: a 5,504-wide Gram matrix (a LLaMA MLP's down projection)
takes tens of seconds to decompose on two cores and well under one on a GPU. The device is chosen once per run
(`using`, set by prune_model from RunSettings.linalg_device, the CLI's --linalg-device): `auto` is the GPU only
when torch is installed and a CUDA device is visible, and it does not import torch to find out on a machine
without an NVIDIA driver (torch costs about half a gigabyte of memory and seconds of start-up). Matrices
narrower than GPU_MIN stay on the CPU either way: moving them costs more than it saves. Results come back as
float64 numpy arrays; callers never see the device.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os
from collections.abc import Iterator

import numpy as np

from onnxprune.errors import InputError

DEVICES = ("auto", "cpu", "cuda")
GPU_MIN = 1024  # narrower matrices stay on the CPU

_device: contextvars.ContextVar[str | None] = contextvars.ContextVar("onnxprune_linalg_device", default=None)


def _driver_visible() -> bool:
    """Whether an NVIDIA driver and device are visible, without importing torch."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return os.path.exists("/dev/nvidia0") or os.path.isdir("/proc/driver/nvidia/gpus")


def cuda_device(torch, device: str, option: str) -> str:
    """`device` ('cuda' or 'cuda:N', lower case) when torch sees that GPU, else an InputError naming `option`
    (--linalg-device, --finetune-device) and what torch sees."""
    if not torch.cuda.is_available():
        build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise InputError(f"{option} {device}: torch {torch.__version__} ({build}) sees no CUDA GPU; "
                         f"use {option} cpu")
    try:
        index = int(device.split(":", 1)[1]) if ":" in device else 0
    except ValueError:
        raise InputError(f"{option} {device!r}: expected cuda or cuda:N") from None
    if index >= torch.cuda.device_count():
        raise InputError(f"{option} {device}: torch sees {torch.cuda.device_count()} CUDA GPU(s)")
    return device


def resolve(device: str | None) -> str | None:
    """The torch device the factorisations run on, or None for numpy on the CPU: `auto` is CUDA when torch is
    installed and sees a GPU; `cuda` (or `cuda:N`) without one is an InputError saying what is missing."""
    name = (device or "auto").strip().lower()
    if name == "cpu":
        return None
    if name == "auto":
        if importlib.util.find_spec("torch") is None or not _driver_visible():
            return None
        import torch

        return "cuda" if torch.cuda.is_available() else None
    if name == "cuda" or name.startswith("cuda:"):
        if importlib.util.find_spec("torch") is None:
            raise InputError(f"--linalg-device {device} needs torch with CUDA: pip install 'onnxprune[train]'")
        import torch

        return cuda_device(torch, name, "--linalg-device")
    raise InputError(f"--linalg-device {device!r}: expected one of {', '.join(DEVICES)} (or cuda:N)")


@contextlib.contextmanager
def on_torch(device: str | None) -> Iterator[str | None]:
    """The enclosed factorisations through torch on `device` as given (None: numpy; 'cpu' is torch's CPU
    device, for tests of the torch path on a machine without a GPU); yields it."""
    token = _device.set(device)
    try:
        yield device
    finally:
        _device.reset(token)


def using(device: str | None):
    """Run the enclosed factorisations where `device` (a --linalg-device value) says; yields the torch device
    or None (numpy)."""
    return on_torch(resolve(device))


def current() -> str | None:
    return _device.get()


def _torch_for(a: np.ndarray):
    """(torch, device) when `a` goes through torch, else (None, None): numpy for every matrix with no device,
    and on a GPU for those narrower than GPU_MIN."""
    device = _device.get()
    if device is None or (device != "cpu" and a.shape[-1] < GPU_MIN):
        return None, None
    import torch

    return torch, device


def _to(torch, device, a: np.ndarray):
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64)).to(device)


def eigh(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (ascending) and eigenvectors of the symmetric matrix `a`, as np.linalg.eigh."""
    torch, device = _torch_for(a)
    if torch is None:
        return np.linalg.eigh(a)
    e, v = torch.linalg.eigh(_to(torch, device, a))
    return e.cpu().numpy(), v.cpu().numpy()


def inv(a: np.ndarray) -> np.ndarray:
    """The inverse of the square matrix `a`, as np.linalg.inv (LinAlgError when singular)."""
    torch, device = _torch_for(a)
    if torch is None:
        return np.linalg.inv(a)
    out, info = torch.linalg.inv_ex(_to(torch, device, a))
    if int(info.max()) != 0:
        raise np.linalg.LinAlgError("Singular matrix")
    return out.cpu().numpy()


def solve(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """x with a @ x = b, as np.linalg.solve (LinAlgError when `a` is singular)."""
    torch, device = _torch_for(a)
    if torch is None:
        return np.linalg.solve(a, b)
    out, info = torch.linalg.solve_ex(_to(torch, device, a), _to(torch, device, b))
    if int(info.max()) != 0:
        raise np.linalg.LinAlgError("Singular matrix")
    return out.cpu().numpy()
