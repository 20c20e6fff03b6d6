"""Block-wise distillation: each block of the pruned model learns the original's output of that block.

Blocks are cut where the calibration engine cuts stages (runtime/stages.py): at tensors the pruned model and
the original both compute, with the same shape — the residual stream after each block (the output of an Add of
two computed tensors) keeps its width unless the hidden size was pruned. A block is the nodes a `StagedRun`
runs for one such tensor. Two staged runs go over the data once each, side by side: the original's gives the
targets (its value of the block's output), the pruned model's gives the block's inputs *as the pruned model
computes them*, with the blocks before it already re-trained, so each block also learns to correct what came
in. Memory holds one block's parameters and optimizer state, plus the frontier of the two runs (spilled to disk
past the memory budget).

A block's new weights stay only when its loss on the held-out batches went down; else the block is rolled back.
An initializer that nodes outside the block also read (tied embeddings, shared constants) is not trained: the
blocks that read it before would no longer see what they were fitted to.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxprune.runtime.stages import FrontierStore, StagedRun, format_bytes
from onnxprune.train import require_torch
from onnxprune.train.distill import as_tensors, relative_mse, train_steps


@dataclass
class BlockwiseResult:
    model: onnx.ModelProto
    blocks: list[dict] = field(default_factory=list)   # one row per block (see `distill_blocks`)
    notes: list[str] = field(default_factory=list)
    passes: dict = field(default_factory=dict)


def _shapes(model: onnx.ModelProto) -> dict[str, tuple]:
    """Inferred shapes of every tensor (symbolic dims by name, unknown as None), from a weightless copy."""
    from onnxprune.io.model_io import weightless

    try:
        # data propagation follows shape arithmetic (Shape, Gather, Concat into Reshape): the residual stream of
        # an exported decoder gets its [batch, seq, hidden] instead of unknowns
        inferred = onnx.shape_inference.infer_shapes(weightless(model), strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - inference is a hint here; no shapes means no cut points
        return {}
    out = {}
    for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        t = vi.type.tensor_type
        if t.HasField("shape"):
            out[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                                 for d in t.shape.dim)
    return out


def block_boundaries(pruned: onnx.ModelProto, original: onnx.ModelProto) -> list[str]:
    """The tensors blocks end at, in graph order: outputs of an Add of two computed tensors (a residual join)
    that both models compute with the same known shape."""
    consts = {t.name for t in pruned.graph.initializer} | {o for n in pruned.graph.node if n.op_type == "Constant"
                                                           for o in n.output}
    made = {o for n in original.graph.node for o in n.output}
    inputs = {i.name for i in pruned.graph.input}
    outputs = {o.name for o in pruned.graph.output}
    shapes_p, shapes_o = _shapes(pruned), _shapes(original)
    # a symbolic dimension counts as known only when it is one of the graph inputs' (batch, sequence): shape
    # inference names other unknowns alike in both models (unk__3) whatever their sizes
    named = {d.dim_param for i in pruned.graph.input for d in i.type.tensor_type.shape.dim if d.dim_param}
    found = []
    for node in pruned.graph.node:
        if node.op_type != "Add" or len(node.input) != 2 or any(x in consts or x in inputs for x in node.input):
            continue
        name = node.output[0]
        if name not in made or name in outputs:
            continue
        a, b = shapes_p.get(name), shapes_o.get(name)
        if a is None or a != b or len(a) < 2 or any(d is None or isinstance(d, str) and d not in named for d in a):
            continue
        found.append(name)
    return found


def _readers(model: onnx.ModelProto) -> dict[str, set[int]]:
    readers: dict[str, set[int]] = {}
    for i, node in enumerate(model.graph.node):
        for x in node.input:
            readers.setdefault(x, set()).add(i)
    return readers


def _adapted(model: onnx.ModelProto, feeds: Sequence[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Feeds with an empty key/value cache in the shape `model` declares (a pruned decoder has fewer heads)."""
    from onnxprune.graph.kvcache import feed_adapter

    class Declared:  # what feed_adapter reads of a session
        def __init__(self, m):
            self._inputs = [type("Arg", (), {"name": i.name, "shape": [
                d.dim_value if d.HasField("dim_value") else d.dim_param for d in i.type.tensor_type.shape.dim]})
                for i in m.graph.input]

        def get_inputs(self):
            return self._inputs

    adapt = feed_adapter(Declared(model))
    return [adapt(f) for f in feeds]


def distill_blocks(pruned: onnx.ModelProto, original: onnx.ModelProto, feeds: Sequence[dict[str, np.ndarray]],
                   train: Sequence[int], held: Sequence[int], loss_outputs: Sequence[str], *, steps: int,
                   lr: float, seed: int = 0, memory_budget: int | None = None,
                   show_progress: bool = True, device: str = "cpu") -> BlockwiseResult:
    """Re-train `pruned` block by block against `original` (see the module docstring).

    `feeds` are batches; `train` and `held` index them (held-out batches are never trained on and decide whether
    a block keeps its new weights). `loss_outputs` are the model outputs the last block ends at. Blocks train on
    `device` (a torch device: resolve_device); both models' staged passes run in onnxruntime. Returns a copy
    of `pruned` with new initializer values; `pruned` is left alone."""
    require_torch()
    student = onnx.ModelProto()
    student.CopyFrom(pruned)
    boundaries = block_boundaries(student, original)
    requests = [[b] for b in boundaries] + [list(loss_outputs)]
    store = FrontierStore(memory_budget)
    teacher_run = StagedRun(original, feeds, requests, store, label="original")
    student_run = StagedRun(student, _adapted(student, feeds), requests, store, label="pruned")
    readers = _readers(student)
    index = {t.name: i for i, t in enumerate(student.graph.initializer)}
    result = BlockwiseResult(student)
    try:
        for k, request in enumerate(requests):
            nodes = {id(n) for n in student_run.stage_nodes(k)}
            positions = {i for i, n in enumerate(student.graph.node) if id(n) in nodes}
            row = {"block": k, "output": ",".join(request), "nodes": len(positions)}
            targets = _collect(teacher_run, request, store, k, budget=store.budget // 4 if k == len(boundaries)
                               and boundaries else None)
            if targets is None:
                row["status"] = "skipped: its targets do not fit the memory budget (left to end-to-end)"
                result.blocks.append(row)
                result.notes.append(f"the model's head after {boundaries[-1]!r} was not trained block-wise: its "
                                    "outputs over the calibration data exceed a quarter of --memory-budget")
                break
            sub = student_run.stage_model(k)
            own = [t.name for t in sub.graph.initializer if t.data_type in _FLOAT_TYPES
                   and readers.get(t.name, set()) <= positions]
            start = time.perf_counter()
            if own:
                tensors = _train_block(sub, own, student_run, k, request, store, train, held, steps=steps, lr=lr,
                                       seed=seed + k, label=f"block {k + 1}/{len(requests)}", row=row,
                                       show_progress=show_progress, device=device)
                for tensor in tensors:
                    student.graph.initializer[index[tensor.name]].CopyFrom(tensor)
            else:
                row.update(params=0, status="nothing to train")
            row["seconds"] = time.perf_counter() - start
            result.blocks.append(row)
            # the block's output with its new weights, for the blocks after it (the values themselves are not needed)
            collections.deque(student_run.step(), maxlen=0)
            for name in request:
                store.drop(_target_key(k, name))
        if not any(r.get("status") == "kept" for r in result.blocks):
            result.model = pruned  # nothing kept: the input itself, not an equal copy
        result.passes = {"original": teacher_run.passes, "pruned": student_run.passes,
                         "frontier_peak_bytes": store.peak_in_memory, "spilled_bytes": store.spilled}
        if store.spilled:
            result.notes.append(f"block-wise distillation kept at most {format_bytes(store.peak_in_memory)} of "
                                f"activations in memory and spilled {format_bytes(store.spilled)} to disk")
    finally:
        store.close()
    return result


def _train_block(sub: onnx.ModelProto, own: list[str], run: StagedRun, k: int, request: list[str],
                 store: FrontierStore, train: Sequence[int], held: Sequence[int], *, steps: int, lr: float, seed: int,
                 label: str, row: dict, show_progress: bool, device: str = "cpu") -> list[onnx.TensorProto]:
    """Train the block `sub` (request `k` of `run`) on its `own` initializers; fills `row` with its losses before
    and after; returns the new initializers when the held-out loss went down (else none: rolled back)."""
    torch = require_torch()
    from onnxprune.train.graph_module import to_torch, write_back

    module = to_torch(sub, trainable="weights").to(device)  # scalars (a Pow's exponent, an epsilon) stay
    trainable = []
    for key, param in module.params.items():
        param.requires_grad_(param.requires_grad and module.param_names[key] in own)
        if param.requires_grad:
            trainable.append(param)
    inputs = run.stage_inputs(k)

    def block_loss(b: int):
        out = module(as_tensors({x: run.value(x, b) for x in inputs}, device))
        return sum(relative_mse(out[name].float(), torch.from_numpy(np.asarray(
            store.get(_target_key(k, name), b))).float().to(device)) for name in request) / len(request)

    def mean_loss(batches) -> float:
        with torch.no_grad():
            return float(np.mean([float(block_loss(b)) for b in batches])) if batches else float("nan")

    before, calib_before = mean_loss(held), mean_loss(train)
    losses = train_steps(trainable, block_loss, list(train), steps=steps, lr=lr, seed=seed, label=label,
                         show_progress=show_progress)
    after, calib_after = mean_loss(held), mean_loss(train)
    kept = bool(losses) and (not held or after < before)
    row.update(params=int(sum(p.numel() for p in trainable)), calibration_before=calib_before,
               calibration_after=calib_after, held_out_before=before, held_out_after=after,
               final_train_loss=float(np.mean(losses[-10:])) if losses else None,
               status="kept" if kept else "rolled back" if losses else "nothing to train")
    if not kept:
        return []
    return [t for t in write_back(sub, module).graph.initializer if t.name in own]


_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}


def _target_key(k: int, name: str) -> str:
    return f"target {k}\0{name}"


def _collect(run: StagedRun, request: Sequence[str], store: FrontierStore, k: int, budget: int | None) -> bool | None:
    """Run the original's request `k`, keeping its values as the targets; None (nothing kept) when `budget` is
    given and the targets would pass it."""
    n = len(run.feeds)
    for b, values in enumerate(run.step()):
        if b == 0 and budget is not None and sum(np.asarray(v).nbytes for v in values.values()) * n > budget:
            return None
        for name in request:
            store.put(_target_key(k, name), b, np.asarray(values[name]))
    return True
