"""The one place that builds onnxruntime sessions and runs batches through them (Polygraphy's loader layer).

Two kinds of caller share it:

* onnxprune's own checks and calibration runs (`internal_session`, `run`, `Runner`): CPU, idle threads that do
  not spin (they alternate with numpy's linear algebra and with each other), no prepacking for one-shot runs,
  the layout optimisations left out for float16/bfloat16 graphs (they crash onnxruntime 1.32's CPU provider on
  some of them), and onnx's reference evaluator where onnxruntime has no kernel for a type (bfloat16, float64
  Conv);
* what a user runs and times (`open_session`, `run_batches`): exactly the provider asked for, its threads and
  optimisation level, and an error, not a silent CPU fallback, when the provider does not start.

A model may be a path, serialized bytes, an `onnx.ModelProto` (lazily loaded ones are memory-mapped by
onnxruntime from their own files; in-memory ones past protobuf's 2 GB limit go through a temporary file with
external data) or a session already built.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import onnx

from onnxprune.errors import InputError, first_line, require_onnxruntime
from onnxprune.graph.kvcache import feed_adapter
from onnxprune.io.model_io import save_model
from onnxprune.io.weights import (
    is_external,
    is_lazy,
    nbytes,
    session_source,
    tensor_array,
)
from onnxprune.report import progress

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "dml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
}
INSTALL_HINTS = {
    "CUDAExecutionProvider": "pip uninstall onnxruntime && pip install 'onnxprune[gpu]' (and a matching CUDA/cuDNN)",
    "TensorrtExecutionProvider": "pip uninstall onnxruntime && pip install 'onnxprune[gpu]' (and TensorRT)",
}
OPT_LEVELS = ("disable", "basic", "extended", "all")
ModelLike = Any  # str | os.PathLike | bytes | onnx.ModelProto | onnxruntime.InferenceSession

_INLINE_LIMIT = 2**31 - 256 * 2**20  # past this, an in-memory model cannot be serialised in one protobuf


class SessionError(InputError):
    """onnxruntime could not load a model or run a batch; `detail` is onnxruntime's own message, on one line."""

    def __init__(self, message: str, detail: str):
        super().__init__(message)
        self.detail = detail


def provider_name(provider: str) -> str:
    """'cpu' / 'cuda' / ... or a full onnxruntime name -> the full name; unknown names are an InputError."""
    if provider in PROVIDERS.values():
        return provider
    name = PROVIDERS.get(provider.strip().lower())
    if name is None:
        raise InputError(f"unknown execution provider {provider!r} (known: {', '.join(PROVIDERS)})")
    return name


def check_providers(providers: Iterable[str]) -> list[str]:
    """Full names of `providers`, each available in this onnxruntime build, else an InputError with a hint."""
    ort = require_onnxruntime()
    available = ort.get_available_providers()
    names = [provider_name(p) for p in providers]
    for name in names:
        if name not in available:
            hint = INSTALL_HINTS.get(name, "install an onnxruntime build that includes it")
            raise InputError(f"{name} is not available in this onnxruntime (available: {', '.join(available)}); "
                             f"hint: {hint}")
    if not names:
        raise InputError("no execution provider given")
    return names


def open_session(model: ModelLike, provider: str = "cpu", threads: int | None = None, opt_level: str = "all", *,
                 prepack: bool = True, spinning: bool = True, fallback: bool = False, quiet: bool = False,
                 shared_arena: bool = False, memory_pattern: bool | None = None):
    """An InferenceSession on exactly `provider` (CPU as fallback for ops the provider lacks, as onnxruntime does).

    A session that starts on anything else than the requested provider (onnxruntime silently falls back when
    e.g. the CUDA libraries are missing) is an InputError, so a GPU run can never quietly be a CPU run. A model
    onnxruntime cannot load is a SessionError; with `fallback`, one it has no kernel for runs in onnx's
    reference evaluator instead. `spinning=False` lets idle threads sleep; `prepack=False` saves a packed copy
    of every MatMul weight for a session run once; `shared_arena` allocates from the one CPU arena all such
    sessions of this process share (`use_shared_arena`); `memory_pattern` is onnxruntime's (None: off exactly
    with the shared arena, see below).
    """
    ort = require_onnxruntime()
    if isinstance(model, (ort.InferenceSession, ReferenceSession)):
        return model
    name = check_providers([provider])[0]
    if opt_level not in OPT_LEVELS:
        raise InputError(f"unknown graph optimization level {opt_level!r} (choose from {', '.join(OPT_LEVELS)})")
    options = ort.SessionOptions()
    options.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[opt_level]
    if threads:
        options.intra_op_num_threads = threads
    # 3: onnxruntime's warnings (unused initializers ...) would break the tables; 4: a check that is expected
    # to fail sometimes (bisection) prints nothing, its error reaches the caller as an exception
    options.log_severity_level = 4 if quiet else 3
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    shared = shared_arena and name == "CPUExecutionProvider" and use_shared_arena()
    if shared:
        options.add_session_config_entry("session.use_env_allocators", "1")
    # onnxruntime's memory pattern plans one block for all of a run's tensors after a session's first run, and
    # maps it afresh on the second and third runs (about 1 GiB each for ResNet-50's statistics at batch 32, up to
    # 4x the run's time: tools/time_statistics_session.py), while a stage runs once per batch. Without it every
    # tensor of a shared-arena session comes from the arena, whose pages earlier stages have faulted in.
    options.enable_mem_pattern = not shared if memory_pattern is None else memory_pattern
    chain = [name] if name == "CPUExecutionProvider" else [name, "CPUExecutionProvider"]
    try:
        if isinstance(model, onnx.ModelProto) and not is_lazy(model) and _weight_bytes(model) >= _INLINE_LIMIT:
            with tempfile.TemporaryDirectory(prefix="onnxprune-") as tmp:
                path = os.path.join(tmp, "model.onnx")
                save_model(model, path, external_data=True)
                session = ort.InferenceSession(path, options, providers=chain)
        else:
            source = session_source(model, options) if isinstance(model, onnx.ModelProto) else model
            source = os.fspath(source) if isinstance(source, os.PathLike) else source
            session = ort.InferenceSession(source, options, providers=chain)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types for invalid models
        detail = first_line(exc)
        if fallback and isinstance(model, onnx.ModelProto) and "NOT_IMPLEMENTED" in str(exc):
            # the evaluator may lack the op too: then onnxruntime's reason stands
            with contextlib.suppress(Exception):
                return ReferenceSession(model)
        raise SessionError(f"onnxruntime cannot load {model_label(model)}: {detail}", detail) from None
    if session.get_providers()[0] != name:
        raise InputError(f"{name} was requested but onnxruntime started {session.get_providers()}; "
                         f"hint: {INSTALL_HINTS.get(name, 'check the provider installation')}")
    return session


def internal_session(model: onnx.ModelProto, prepack: bool = True, shared_arena: bool = False,
                     memory_pattern: bool | None = None):
    """A CPU session for onnxprune's own checks and calibration runs (see the module docstring)."""
    return open_session(model, opt_level="extended" if is_half(model) else "all", prepack=prepack, spinning=False,
                        memory_pattern=memory_pattern,
                        fallback=True, quiet=True, shared_arena=shared_arena)


_shared_arena: bool | None = None  # None: not tried yet


def _release_options():
    ort = require_onnxruntime()
    options = ort.RunOptions()
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return options


def use_shared_arena() -> bool:
    """Register, once per process, the CPU arena that sessions opened with `shared_arena` allocate from; False
    when this onnxruntime cannot.

    Calibration runs a model stage by stage, a short-lived session per stage. With an arena of its own, each
    session maps and faults in fresh pages for its activations; one arena for all of them is mapped once (it
    stays at the largest stage's working set, and hands free regions back after each stage's last batch): a
    ResNet-50 staged run is twice as fast. Regions grow by what is asked (not by powers of two). Outputs kept
    for later stages are copied out of it (runtime.stages.kept_copy), so the arena holds one batch's work. Such
    sessions plan no memory pattern (see `open_session`): a pattern's block is mapped afresh on a session's second
    and third runs, and a stage's session runs once a batch.
    """
    global _shared_arena
    if _shared_arena is None:
        ort = require_onnxruntime()
        try:
            info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, 1, -1, -1))  # 1: kSameAsRequested
            _shared_arena = True
        except Exception:  # noqa: BLE001 - an onnxruntime without the API: sessions keep their own arenas
            _shared_arena = False
    return _shared_arena


def load_error(model: onnx.ModelProto, fallback: bool = True) -> str | None:
    """onnxruntime's reason for refusing to load `model` (one line), or None when it loads; with `fallback`, a
    model onnxruntime has no kernel for but onnx's reference evaluator runs (bfloat16, float64 Conv) loads."""
    try:
        if fallback:
            internal_session(model, prepack=False)
        else:
            open_session(model)
    except SessionError as exc:
        return exc.detail
    return None


def run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Every output of `model` on one feed, in a one-shot internal session; SessionError when onnxruntime
    cannot load the model or run the feed."""
    runner = Runner(internal_session(model, prepack=False), "the sample feed")
    return list(runner.run(feed).values())


class Runner:
    """A session and the loop that feeds it: a decoder's empty key/value cache is given the shape this model
    takes, and a failed batch is a SessionError naming `what`."""

    def __init__(self, session, what: str = "a batch"):
        self.session = session
        self.what = what
        self.names = [o.name for o in session.get_outputs()]
        self._adapt = feed_adapter(session)

    def run(self, feed: dict[str, np.ndarray], names: Sequence[str] | None = None, *,
            release: bool = False, into: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """The outputs `names` (default all) of one feed; `release` hands the arena's free regions back to the
        system after this run (the last batch of a stage: the next stage's session has other sizes). `into`:
        arrays of the right shape and type that onnxruntime writes those outputs to directly (C-contiguous,
        kept alive by the caller); only for onnxruntime sessions (`binds`)."""
        wanted = list(names) if names is not None else self.names
        options = _release_options() if release else None
        try:
            if into:
                return self._run_bound(self._adapt(feed), wanted, into, options)
            values = self.session.run(wanted, self._adapt(feed), options)
        except Exception as exc:  # noqa: BLE001 - shape or type mismatches surface here as onnxruntime errors
            detail = first_line(exc)
            raise SessionError(f"onnxruntime failed on {self.what}: {detail}", detail) from None
        return dict(zip(wanted, values))

    @property
    def binds(self) -> bool:
        """Whether `run` can write outputs into given arrays (onnxruntime sessions, not the reference one)."""
        return hasattr(self.session, "io_binding")

    def _run_bound(self, feed, wanted, into, options) -> dict[str, np.ndarray]:
        binding = self.session.io_binding()
        inputs = {name: np.ascontiguousarray(value) for name, value in feed.items()}  # alive through the run:
        for name, value in inputs.items():  # onnxruntime reads a bound numpy input's memory without a reference
            binding.bind_cpu_input(name, value)
        for name in wanted:
            if name in into:
                out = into[name]
                binding.bind_output(name, "cpu", 0, out.dtype, list(out.shape), out.ctypes.data)
            else:
                binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding, options)
        made = binding.get_outputs()  # in binding order; .numpy() borrows onnxruntime's buffer
        return {name: into[name] if name in into else made[i].numpy() for i, name in enumerate(wanted)}


def run_batches(model: ModelLike, feeds, provider: str = "cpu", *, threads: int | None = None,
                opt_level: str = "all", show_progress: bool = False, reduce=None) -> list:
    """Run every feed (a list of feed dicts, or a Dataset's batches) on `provider`; returns {output name: array}
    per feed, or `reduce(outputs, feed)` of each when given (so that a batch's outputs, a language model's
    logits say, are not kept once reduced to what a metric needs)."""
    runner = Runner(open_session(model, provider, threads, opt_level))
    feeds = list(feeds.batches() if hasattr(feeds, "batches") else feeds)
    outputs = []
    with progress("running", len(feeds), enabled=show_progress) as advance:
        for i, feed in enumerate(feeds):
            runner.what = f"batch {i}"
            out = runner.run(feed)
            outputs.append(out if reduce is None else reduce(out, feed))
            advance()
    return outputs


class ReferenceSession:
    """onnx's reference evaluator behind the calls onnxprune makes of a session: for models whose types
    onnxruntime's CPU provider has no kernel for (bfloat16 anything, float64 Conv). Slow, but exact."""

    def __init__(self, model: onnx.ModelProto):
        from onnx.reference import ReferenceEvaluator

        if is_lazy(model):  # the evaluator reads weights from the protobuf: give it a copy with them inline
            inline = onnx.ModelProto()
            inline.CopyFrom(model)
            for t in inline.graph.initializer:
                if is_external(t):
                    t.CopyFrom(onnx.numpy_helper.from_array(np.asarray(tensor_array(t)), t.name))
            model = inline
        self._evaluator = ReferenceEvaluator(model)
        self._model = model

    def run(self, names, feed, run_options=None):  # run_options: onnxruntime's, nothing to set here
        return self._evaluator.run(list(names) if names else None, feed)

    def get_outputs(self):
        return self._model.graph.output

    def get_providers(self) -> list[str]:
        return ["onnx.reference"]


def is_half(model: onnx.ModelProto) -> bool:
    """Whether the model computes in float16 or bfloat16 (weights or inputs/outputs)."""
    half = (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
    return any(t.data_type in half for t in model.graph.initializer) or any(
        v.type.tensor_type.elem_type in half for v in list(model.graph.input) + list(model.graph.output))


def _weight_bytes(model: onnx.ModelProto) -> int:
    return sum(nbytes(t) for t in model.graph.initializer)


def model_label(model: ModelLike) -> str:
    if isinstance(model, (str, os.PathLike)):
        return os.fspath(model)
    if isinstance(model, onnx.ModelProto):
        return model.graph.name or "<in-memory model>"
    return "<in-memory model>"
