"""End-to-end distillation: the whole pruned model learns the original's outputs.

The teacher runs in onnxruntime (no gradients needed), the student in torch with its float initializers as
parameters, its activations checkpointed at the graph's cut points (recomputed in the backward pass). Teacher outputs are kept when they are small (class scores) and recomputed per step when they are
not (a language model's logits: 50k floats per token).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxprune.train import require_torch
from onnxprune.train.distill import (
    as_tensors,
    distill_loss,
    output_losses,
    token_mask,
    train_steps,
)

_CACHE_BYTES = 256 << 20  # teacher outputs kept in memory up to this size; recomputed per step past it


@dataclass
class EndToEndResult:
    model: onnx.ModelProto
    row: dict = field(default_factory=dict)


class Teacher:
    """The original model's outputs per batch, from onnxruntime; cached while they fit `_CACHE_BYTES`."""

    def __init__(self, model: onnx.ModelProto, feeds: Sequence[dict[str, np.ndarray]], names: Sequence[str]):
        from onnxprune.graph.kvcache import feed_adapter
        from onnxprune.runtime.session import internal_session

        self.session = internal_session(model)
        self.adapt = feed_adapter(self.session)
        self.feeds, self.names = feeds, list(names)
        self.cache: dict[int, dict[str, np.ndarray]] = {}
        self.cached_bytes = 0

    def outputs(self, b: int) -> dict[str, np.ndarray]:
        if b in self.cache:
            return self.cache[b]
        values = dict(zip(self.names, self.session.run(self.names, self.adapt(self.feeds[b]))))
        size = sum(v.nbytes for v in values.values())
        if self.cached_bytes + size <= _CACHE_BYTES:
            self.cache[b] = values
            self.cached_bytes += size
        return values


def distill_end_to_end(pruned: onnx.ModelProto, original: onnx.ModelProto, feeds: Sequence[dict[str, np.ndarray]],
                       train: Sequence[int], held: Sequence[int], labels: Sequence[np.ndarray | None] | None = None,
                       *, steps: int, lr: float, temperature: float = 2.0, loss: str = "auto", seed: int = 0,
                       show_progress: bool = True, device: str = "cpu") -> EndToEndResult:
    """Train every float initializer of `pruned` so its outputs match `original`'s on the `train` batches of
    `feeds` (`labels[b]`, when given, adds cross-entropy). Returns the re-trained copy and a row of losses on
    the train and held-out batches before and after; `pruned` is left alone. The student trains on `device`
    (a torch device: resolve_device); the teacher runs in onnxruntime."""
    torch = require_torch()
    from onnxprune.train.blockwise import _adapted
    from onnxprune.train.graph_module import to_torch, write_back

    teacher_names = [o.name for o in original.graph.output]
    teacher = Teacher(original, feeds, teacher_names)
    kinds = output_losses(teacher.outputs(train[0] if train else 0), feeds[0], loss)
    teacher.names, teacher.cache, teacher.cached_bytes = list(kinds), {}, 0  # only what the loss reads
    student_feeds = _adapted(pruned, feeds)
    module = to_torch(pruned, trainable="weights").to(device)  # scalars (a Pow's exponent, an epsilon) stay
    # activations recomputed per segment in the backward pass: a deep model keeps its residual stream between
    # segments, not every layer's intermediates (SmolLM2 at 4 windows: 9.8 GiB peak before)
    module.checkpoint(module.cut_points())
    params = [p for p in module.params.values() if p.requires_grad]
    with_ce = labels is not None and loss == "auto"

    def batch_loss(b: int):
        out = module(as_tensors(student_feeds[b], device))
        target = teacher.outputs(b)
        mask = token_mask(feeds[b])
        mask_t = None if mask is None else torch.from_numpy(np.asarray(mask)).to(device)
        y = None if labels is None or labels[b] is None else torch.from_numpy(np.asarray(labels[b])).to(device)
        return sum(distill_loss(kind, out[name], torch.from_numpy(target[name]).to(device), temperature=temperature,
                                mask=mask_t, labels=y, with_ce=with_ce) for name, kind in kinds.items())

    def mean_loss(batches) -> float | None:
        if not batches:
            return None
        with torch.no_grad():
            return float(np.mean([float(batch_loss(b)) for b in batches]))

    start = time.perf_counter()
    row = {"outputs": {n: k for n, k in kinds.items()}, "params": int(sum(p.numel() for p in params)),
           "device": str(device),
           "calibration_before": mean_loss(train), "held_out_before": mean_loss(held)}
    losses = train_steps(params, batch_loss, list(train), steps=steps, lr=lr, seed=seed, label="end-to-end",
                         show_progress=show_progress)
    row.update(calibration_after=mean_loss(train), held_out_after=mean_loss(held),
               final_train_loss=float(np.mean(losses[-10:])) if losses else None,
               seconds=time.perf_counter() - start)
    return EndToEndResult(write_back(pruned, module), row)
