"""Calibration runs stage by stage: every node of a model runs once over the whole calibration set.

Recovery refits layers in graph order, and each refit needs what the model *as refit so far* computes at the
layer's input; running the model up to every layer again costs depth x model passes. A `StagedRun` instead
is told up front the tensors it will be asked for, in order (its *requests*). For each request it runs only
the nodes not run yet that the requested tensors depend on, as one small onnxruntime session of just those
nodes, fed from the tensors earlier stages left for later ones (the *frontier*), for every batch. A tensor
leaves the frontier once no later stage reads it. The model may be edited between requests (weights of nodes
that have not run yet): a stage is built from the model as it is when it runs. So a whole recovery costs one
pass of the pruned model plus one of the original (its targets), whatever the depth — the pattern
onnxruntime-based layer-wise quantizers use.

The frontier lives in a `FrontierStore`: in memory up to a byte budget, in .npy files past it.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import tempfile
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from onnxprune.errors import InputError
from onnxprune.graph.ir import ancestor_nodes
from onnxprune.runtime.session import Runner, SessionError, internal_session

_NP_TO_ONNX = {np.dtype(k): v for k, v in (
    (np.float32, onnx.TensorProto.FLOAT), (np.float16, onnx.TensorProto.FLOAT16),
    (np.float64, onnx.TensorProto.DOUBLE), (np.int64, onnx.TensorProto.INT64), (np.int32, onnx.TensorProto.INT32),
    (np.int8, onnx.TensorProto.INT8), (np.uint8, onnx.TensorProto.UINT8), (np.bool_, onnx.TensorProto.BOOL),
    (np.int16, onnx.TensorProto.INT16), (np.uint16, onnx.TensorProto.UINT16))}


def default_memory_budget() -> int:
    """A quarter of the machine's physical memory: room for the model's own weights and onnxruntime."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 4 << 30


def parse_bytes(text: str | int | None) -> int | None:
    """'8G', '512M', '3.5GiB', '1000000' -> bytes (None stays None)."""
    if text is None or isinstance(text, int):
        return text
    value = str(text).strip().upper().removesuffix("B").removesuffix("I")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(value[-1:], 1)
    number = value[:-1] if value[-1:] in "KMGT" else value
    try:
        result = int(float(number) * scale)
    except ValueError:
        raise InputError(f"--memory-budget takes a size such as 8G or 512M, got {text!r}") from None
    if result <= 0:
        raise InputError(f"--memory-budget must be positive, got {text!r}")
    return result


class FrontierStore:
    """Per-batch arrays by tensor name: in memory while the total stays under `budget` bytes, else written to
    .npy files in a folder of their own (removed by `close`) and read back whole on each `get`, so a spilled
    batch costs memory only while its reader holds it (a memory map would keep its pages resident)."""

    def __init__(self, budget: int | None = None, folder: str | os.PathLike | None = None):
        self.budget = default_memory_budget() if budget is None else budget
        self._near = folder
        self._folder: Path | None = None
        self._values: dict[str, dict[int, np.ndarray]] = {}
        self.in_memory = 0
        self.peak_in_memory = 0
        self.spilled = 0  # bytes ever written to disk
        self.reused = 0  # bytes kept in pages a dropped tensor left (see `_pages_for`)
        self._files = 0
        self._maps: dict[tuple[str, int], mmap.mmap] = {}  # the pages of each mapped in-memory value
        self._spare: list[mmap.mmap] = []  # pages of dropped tensors, oldest first, to refill
        self._spare_bytes = self._mapped = self._peak_mapped = 0

    def put(self, name: str, batch: int, value: np.ndarray) -> None:
        """Keep `value` (a copy: see `kept_copy`), or spill it past the budget."""
        value = np.asarray(value)
        if self.in_memory + value.nbytes > self.budget and value.nbytes:
            value = self._spill(name, batch, value)
            self._values.setdefault(name, {})[batch] = value
            return
        pages = self._pages_for(value.nbytes) if value.nbytes >= MAPPED_BYTES else None
        self._keep(name, batch, kept_copy(value, pages), pages)

    def reserve(self, name: str, batch: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray | None:
        """An array of `shape` and `dtype` kept as `name`'s value for `batch`, for onnxruntime to write into
        (so the output is never copied); None when it is under MAPPED_BYTES or would not fit in the budget (then
        `put` the value as computed)."""
        count = int(np.prod(shape, dtype=np.int64))
        size = count * np.dtype(dtype).itemsize
        if size < MAPPED_BYTES or self.in_memory + size > self.budget:
            return None
        pages = self._pages_for(size)
        value = np.frombuffer(pages, dtype=dtype, count=count).reshape(shape)
        self._keep(name, batch, value, pages)
        return value

    def _keep(self, name: str, batch: int, value: np.ndarray, pages: mmap.mmap | None) -> None:
        if pages is not None:
            self._maps[name, batch] = pages
            self._mapped += len(pages)
            self._trim()
        self.in_memory += value.nbytes
        self.peak_in_memory = max(self.peak_in_memory, self.in_memory)
        self._values.setdefault(name, {})[batch] = value

    def holds(self, name: str, batch: int, value: np.ndarray) -> bool:
        """Whether `value` is the very array kept as `name` of `batch` (a `reserve`d one once written)."""
        return self._values.get(name, {}).get(batch) is value

    def get(self, name: str, batch: int) -> np.ndarray:
        value = self._values[name][batch]
        return np.load(value) if isinstance(value, Path) else value

    def drop(self, name: str, batch: int | None = None) -> None:
        """Forget `name` (of one `batch`, else of all); its pages are kept for reuse (`_pages_for`) when
        nothing outside the store holds it."""
        batches = self._values.get(name, {})
        chosen = list(batches) if batch is None else [b for b in (batch,) if b in batches]
        for b in chosen:
            value = batches.pop(b)
            if isinstance(value, Path):
                with contextlib.suppress(OSError):  # already gone with its folder
                    os.unlink(value)
                continue
            self.in_memory -= value.nbytes
            pages = self._maps.pop((name, b), None)
            if pages is not None:
                self._mapped -= len(pages)
                held = weakref.ref(_root(value))  # every view of the array keeps its root alive
                del value
                if held() is None:  # no caller holds the array or a view of it: the pages are free to refill
                    self._spare.append(pages)
                    self._spare_bytes += len(pages)
        if not batches:
            self._values.pop(name, None)

    def _pages_for(self, size: int) -> mmap.mmap:
        """Pages for a value of `size` bytes: those a dropped tensor left, of at least `size` bytes and under twice
        it (the smallest such), refilled instead of faulting in fresh zeroed ones (frontier tensors come and go
        in a few sizes, and mapping a fresh 100 MB costs more than copying into it), else a fresh map. Spare
        pages never take the store's resident bytes past the highest the live frontier reached (`_trim`), so
        reuse does not raise the store's peak."""
        fits = [k for k, pages in enumerate(self._spare) if size <= len(pages) < 2 * size]
        if not fits:
            return mmap.mmap(-1, size, **_PRIVATE)
        pages = self._spare.pop(min(fits, key=lambda k: len(self._spare[k])))
        self._spare_bytes -= len(pages)
        self.reused += size
        return pages

    def _trim(self) -> None:
        """Unmap the oldest spare pages while live and spare maps together exceed the live maps' peak."""
        self._peak_mapped = max(self._peak_mapped, self._mapped)
        while self._spare and self._mapped + self._spare_bytes > self._peak_mapped:
            self._spare_bytes -= len(self._spare.pop(0))  # the oldest go first

    def _spill(self, name: str, batch: int, value: np.ndarray) -> Path:
        if self._folder is None:
            near = self._near if self._near and os.access(self._near, os.W_OK) else None
            self._folder = Path(tempfile.mkdtemp(prefix=".onnxprune-frontier-", dir=near))
        self._files += 1  # a fresh name each time: a dropped one may still be being read
        path = self._folder / f"{self._files}.npy"
        np.save(path, value, allow_pickle=False)
        self.spilled += value.nbytes
        return path

    def close(self) -> None:
        for name in list(self._values):
            self.drop(name)
        self._spare.clear()
        self._spare_bytes = 0
        if self._folder is not None:
            import shutil

            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None


MAPPED_BYTES = 1 << 20  # frontier arrays from this size on get pages of their own
_PRIVATE = {"flags": mmap.MAP_PRIVATE} if hasattr(mmap, "MAP_PRIVATE") else {}  # not shared memory (POSIX)


def kept_copy(value: np.ndarray, pages: mmap.mmap | None = None) -> np.ndarray:
    """`value` copied for the frontier: from MAPPED_BYTES on into an anonymous memory map of its own (`pages`
    when given: a map of at least its size), which goes back to the system whole when the array is dropped;
    smaller arrays copied only when they borrow memory.

    Frontier arrays live across stages while each batch's short-lived arrays come and go around them. Kept in
    onnxruntime's arena (an output borrows its buffer), a dropped one frees a block the arena only hands back
    when its whole region is free; kept in the malloc heap (a numpy copy: glibc serves arrays below its
    adaptive mmap threshold, which rises to 32 MiB, from the heap), a dropped one leaves a hole the heap cannot
    return. Either way the process kept about as much again as the frontier had spilled (1.5 GiB above a
    0.9 GiB frontier on SmolLM2 with 262k tokens, tools/trace_stages.py); in maps of their own, 0.25-0.35 GiB."""
    if value.nbytes >= MAPPED_BYTES:
        pages = pages if pages is not None else mmap.mmap(-1, value.nbytes, **_PRIVATE)
        out = np.frombuffer(pages, dtype=value.dtype, count=value.size).reshape(value.shape)
        out[...] = value
        return out
    return value.copy() if value.base is not None else value


def _root(array: np.ndarray) -> np.ndarray:
    """The last array in `array`'s chain of bases: numpy points every view straight at it, so while any view of
    the memory lives, so does the root."""
    while isinstance(array.base, np.ndarray):
        array = array.base
    return array


@dataclass
class _Stage:
    nodes: list[int]                 # indices into the model's node list, in graph order
    inputs: list[str]                # tensors the stage reads from the frontier or the feeds
    outputs: list[str]               # tensors it computes that later stages or the caller need
    requested: list[str]
    dropped: list[str] = field(default_factory=list)  # frontier tensors no later stage reads


class StagedRun:
    """Runs `model` over `feeds` one request at a time, each node once (see the module docstring).

    `requests` lists, in the order they will be asked for, the tensors wanted at each step. `step()` runs the
    next request and yields, batch by batch, {name: value} of the requested tensors.
    """

    def __init__(self, model: onnx.ModelProto, feeds: Sequence[dict[str, np.ndarray]],
                 requests: Sequence[Sequence[str]], store: FrontierStore | None = None, label: str = "model"):
        """`store` may be shared with another run (its budget then covers both); `label` names the model in
        errors and also keeps this run's tensors apart in a shared store."""
        self.model = model
        self.feeds = list(feeds)
        self.store = store if store is not None else FrontierStore()
        self._own_store = store is None
        self.label = label
        self.node_runs = 0  # node evaluations over all batches, for the pass count
        self.bound = 0  # outputs onnxruntime wrote straight into the store's pages
        self.sessions = 0
        nodes = list(model.graph.node)
        self._nodes = nodes
        self._stages = self._plan(nodes, [list(dict.fromkeys(r)) for r in requests])
        self._next = 0

    def stage_nodes(self, k: int) -> list[onnx.NodeProto]:
        """The nodes request `k` runs (each node belongs to the first request that needs it)."""
        return [self._nodes[i] for i in self._stages[k].nodes]

    def stage_inputs(self, k: int) -> list[str]:
        """The tensors request `k` reads (frontier tensors and feeds); `value` gives them before it runs."""
        return list(self._stages[k].inputs)

    def stage_model(self, k: int) -> onnx.ModelProto:
        """Request `k`'s nodes as a model of their own (its frontier inputs in, what it hands on out), built
        from the model as it is now; call it before `step` runs request `k` (re-training trains it)."""
        return self._submodel(self._stages[k])

    def value(self, name: str, batch: int) -> np.ndarray:
        """A feed or a frontier tensor of `batch`, as the next request will read it."""
        return self._value(name, batch)

    @property
    def passes(self) -> float:
        """Node evaluations so far, in units of one pass of the whole model over the calibration set."""
        return self.node_runs / max(len(self._nodes) * len(self.feeds), 1)

    def _plan(self, nodes, requests) -> list[_Stage]:
        consts = {t.name for t in self.model.graph.initializer}
        feeds = set(self.feeds[0]) if self.feeds else set()
        producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
        done: set[int] = set()
        stages, reads_at = [], {}  # reads_at: tensor -> last stage that reads it
        for k, names in enumerate(requests):
            for name in names:
                if name not in producer and name not in feeds:
                    raise InputError(f"calibration asked for tensor {name!r}, which no node computes")
            need = ancestor_nodes(nodes, names, producer, done)
            order = sorted(need)
            done |= need
            made = {o for i in order for o in nodes[i].output if o}
            inputs = list(dict.fromkeys(x for i in order for x in nodes[i].input
                                        if x and x not in made and x not in consts))
            missing = [x for x in inputs if x not in producer and x not in feeds]
            if missing:
                raise InputError(f"calibration of the {self.label}: input {missing[0]!r} is neither fed by the "
                                 f"data nor computed by a node")
            for x in inputs + names:
                reads_at[x] = k
            stages.append(_Stage(order, inputs, [], names))
        # what each stage must keep for later stages, and when a frontier tensor can go
        last = dict(reads_at)
        for k, stage in enumerate(stages):
            made = [o for i in stage.nodes for o in self._nodes[i].output if o]
            stage.outputs = [o for o in made if last.get(o, -1) > k or o in stage.requested]
        for name, k in last.items():
            if name not in feeds:
                stages[k].dropped.append(name)
        return stages

    def step(self) -> Iterator[dict[str, np.ndarray]]:
        """Run the next request; yields the requested tensors of each batch, in batch order."""
        if self._next >= len(self._stages):
            raise RuntimeError("StagedRun: every request has been run")
        k = self._next
        self._next += 1
        stage = self._stages[k]
        runner = self._runner(stage) if stage.nodes else None
        dropped = set(stage.dropped)
        try:
            yield from self._batches(stage, runner, dropped)
        finally:  # also when the caller stops early (zip(feeds, step()) never resumes the last yield)
            for name in stage.dropped:
                self.store.drop(self._key(name))

    def _batches(self, stage: _Stage, runner: Runner | None, dropped: set[str]) -> Iterator[dict[str, np.ndarray]]:
        first = None  # batch 0's input shapes, and the shapes and types of what it made
        for b in range(len(self.feeds)):
            produced = {}
            if runner is not None:
                runner.what = f"calibration batch {b} of the {self.label}"
                feed = {x: self._value(x, b) for x in stage.inputs}
                produced = self._run(runner, stage, feed, b, dropped, first)
                if first is None:
                    first = ({x: v.shape for x, v in feed.items()},
                             {n: (v.shape, v.dtype) for n, v in produced.items()})
                self.node_runs += len(stage.nodes)
                size = sum(v.nbytes for v in produced.values())
                if size > self.store.budget:
                    raise InputError(f"--memory-budget {format_bytes(self.store.budget)} is too small: one calibration "
                                     f"batch of the {self.label} stage up to {stage.requested[0]!r} makes "
                                     f"{format_bytes(size)}; raise --memory-budget or lower --batch-size")
                for name, value in produced.items():
                    if name not in dropped and not self.store.holds(self._key(name), b, value):
                        self.store.put(self._key(name), b, value)
            yield {name: produced[name] if name in produced else self._value(name, b) for name in stage.requested}

    def _run(self, runner: Runner, stage: _Stage, feed, b: int, dropped: set[str], first) -> dict[str, np.ndarray]:
        """One batch of a stage. From the second batch on, when the inputs have batch 0's shapes, the outputs
        the frontier keeps are written by onnxruntime straight into the store's pages (`FrontierStore.reserve`),
        so they are neither allocated in the arena nor copied out of it; should the shapes differ after all
        (shapes that depend on values), the batch runs again the plain way."""
        release = b == len(self.feeds) - 1
        into = {}
        if first is not None and runner.binds and all(v.shape == first[0][x] for x, v in feed.items()):
            for name, (shape, dtype) in first[1].items():
                if name not in dropped and dtype in _NP_TO_ONNX:
                    kept = self.store.reserve(self._key(name), b, shape, dtype)
                    if kept is not None:
                        into[name] = kept
        if not into:
            return runner.run(feed, stage.outputs, release=release)
        try:
            produced = runner.run(feed, stage.outputs, release=release, into=into)
            self.bound += len(into)
            return produced
        except SessionError:
            for name in into:
                self.store.drop(self._key(name), b)
            return runner.run(feed, stage.outputs, release=release)

    def _key(self, name: str) -> str:
        return f"{self.label}\0{name}"

    def _value(self, name: str, batch: int) -> np.ndarray:
        feed = self.feeds[batch]
        if name in feed:
            return feed[name]
        return self.store.get(self._key(name), batch)

    def _runner(self, stage: _Stage) -> Runner:
        sub = self._submodel(stage)
        self.sessions += 1
        try:
            return Runner(internal_session(sub, shared_arena=True))
        except SessionError as exc:
            raise InputError(f"calibration of the {self.label}: onnxruntime cannot run the stage up to "
                             f"{', '.join(stage.requested[:3])}: {exc.detail}") from None

    def _submodel(self, stage: _Stage) -> onnx.ModelProto:
        """The stage's nodes as a model of their own: frontier tensors in, what later stages read out."""
        model = self.model
        nodes = [self._nodes[i] for i in stage.nodes]
        used = {x for n in nodes for x in n.input if x}
        graph = onnx.GraphProto(name=f"stage_{stage.requested[0]}")
        graph.node.extend(nodes)
        declared = {i.name: i for i in model.graph.input}
        for x in stage.inputs:
            if x in declared:  # a graph input keeps its declaration (a decoder's cache dims among them)
                graph.input.append(declared[x])
                continue
            sample = self._value(x, 0)
            elem = _NP_TO_ONNX.get(sample.dtype)
            if elem is None:
                try:  # bfloat16, float8 ... (ml_dtypes), as onnx names them
                    elem = onnx.helper.np_dtype_to_tensor_dtype(sample.dtype)
                except (KeyError, TypeError, ValueError):
                    elem = None
            if elem is None:
                raise InputError(f"calibration: tensor {x!r} has dtype {sample.dtype}, which onnxprune cannot feed")
            graph.input.append(onnx.helper.make_tensor_value_info(
                x, elem, [f"{x}_d{i}" for i in range(sample.ndim)]))
        graph.initializer.extend(t for t in model.graph.initializer if t.name in used)
        graph.output.extend(onnx.ValueInfoProto(name=o) for o in stage.outputs)
        out = onnx.ModelProto(ir_version=model.ir_version, producer_name="onnxprune-stage")
        out.opset_import.extend(model.opset_import)
        out.functions.extend(model.functions)
        out.graph.CopyFrom(graph)
        return out

    def close(self) -> None:
        if self._own_store:
            self.store.close()


def format_bytes(n: int) -> str:
    """1536 -> '1.5 KiB'."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
