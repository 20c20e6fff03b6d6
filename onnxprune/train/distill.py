"""Distillation losses and the training loop shared by block-wise and end-to-end re-training.

The teacher is the original model; nothing here needs labels. Which loss fits an output is decided from what
the output looks like (`output_losses`): next-token logits of a causal LM and class scores get the KL divergence
at a temperature T (scaled by T², Hinton et al. 2015, so gradients keep their size whatever T), with padded
tokens masked by the attention mask; other outputs (embeddings, boxes, features) a mean squared error relative to
the target's own energy, or 1 - cosine. With labels, cross-entropy is added to the KL term.

torch is an optional extra (`pip install 'onnxprune[train]'`), imported on first use.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

import numpy as np

from onnxprune.errors import InputError
from onnxprune.runtime.linalg import DEVICES, cuda_device
from onnxprune.train import require_torch

_CACHE = re.compile(r"^(present|past_key_values)[._]")  # key/value cache outputs are state, not predictions


def output_losses(outputs: dict[str, np.ndarray], feed: dict[str, np.ndarray], loss: str = "auto") -> dict[str, str]:
    """{output name: loss kind} for the outputs distillation matches (a sample batch of the teacher's outputs).

    auto: the logits of a causal LM (KL) if there are any; else outputs of class scores [N, classes] (KL);
    else every float output but a key/value cache (relative MSE). A named `loss` applies to those outputs."""
    from onnxprune.evaluate.metrics import logits_name

    lm = logits_name(outputs, feed)
    if lm is not None:
        chosen = {lm: "kl"}
    else:
        scores = [n for n, v in outputs.items() if v.ndim == 2 and v.shape[1] > 1 and v.dtype.kind == "f"
                  and not _CACHE.match(n)]
        floats = [n for n, v in outputs.items() if v.dtype.kind == "f" and not _CACHE.match(n)]
        chosen = {n: "kl" for n in scores} if scores else {n: "mse" for n in floats}
    if not chosen:
        raise InputError("distillation needs a float output to match; this model has none")
    if loss == "auto":
        return chosen
    if loss in ("kl", "ce") and not all(k == "kl" for k in chosen.values()):
        raise InputError(f"--finetune-loss {loss} needs logits or class scores; output {next(iter(chosen))!r} "
                         "is neither (use mse or cosine)")
    return {n: loss for n in chosen}


def token_mask(feed: dict) -> object | None:
    """The attention mask of a batch of token sequences ([batch, seq] integers named like *mask*), else None."""
    found = [v for k, v in feed.items() if "mask" in k.lower() and getattr(v, "ndim", 0) == 2]
    return found[0] if len(found) == 1 else None


def distill_loss(kind: str, student, teacher, *, temperature: float = 2.0, mask=None, labels=None,
                 with_ce: bool = False):
    """One output's loss (a torch scalar). `mask` ([batch, seq], tokens) restricts a sequence output to real
    tokens; `labels` adds cross-entropy when `with_ce` (or is the whole loss for kind 'ce')."""
    torch = require_torch()
    f = torch.nn.functional
    s, t = student.float(), teacher.float()
    if kind in ("kl", "ce"):
        s2, t2 = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])
        keep = None
        if mask is not None and s.ndim == 3 and tuple(mask.shape) == tuple(s.shape[:2]):
            keep = mask.reshape(-1) != 0
            s2, t2 = s2[keep], t2[keep]
        loss = s.new_zeros(())
        if kind == "kl":
            log_p = f.log_softmax(s2 / temperature, dim=-1)
            log_q = f.log_softmax(t2 / temperature, dim=-1)
            loss = (log_q.exp() * (log_q - log_p)).sum(-1).mean() * temperature ** 2
        if labels is not None and (with_ce or kind == "ce") and s.ndim == 2:
            loss = loss + f.cross_entropy(s, labels.long())
        elif kind == "ce":  # no labels: the teacher's choices are the labels
            loss = f.cross_entropy(s2, t2.argmax(-1))
        return loss
    if kind == "cosine":
        return (1 - f.cosine_similarity(s.reshape(s.shape[0], -1), t.reshape(t.shape[0], -1), dim=-1)).mean()
    return relative_mse(s, t)


def relative_mse(s, t):
    """Mean squared error over the target's mean square: 0 is exact, 1 as bad as predicting zeros."""
    return ((s - t) ** 2).mean() / (t * t).mean().clamp_min(1e-12)


def train_steps(params: Sequence, batch_loss: Callable[[int], object], batches: Sequence[int], *, steps: int,
                lr: float, seed: int = 0, label: str = "distilling", show_progress: bool = True) -> list[float]:
    """AdamW on `params` for `steps` steps, learning rate on a cosine from `lr` to zero; each step takes the
    loss of one batch index drawn from `batches` (a shuffled pass, then another). Returns the losses (none when
    no parameter reaches the loss); the bar shows the running mean."""
    from onnxprune.report import progress

    torch = require_torch()
    if not params or not batches:
        return []
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 0.5 * (1 + math.cos(math.pi * i / steps)))
    rng = np.random.default_rng(seed)
    order: list[int] = []
    losses: list[float] = []
    with progress(label, steps, enabled=show_progress) as advance:
        for step in range(steps):
            if not order:
                order = list(rng.permutation(batches))
            loss = batch_loss(int(order.pop()))
            if not loss.requires_grad:  # no trained parameter reaches the loss (e.g. a mask's fill value)
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            losses.append(float(loss.detach()))
            running = float(np.mean(losses[-20:]))
            advance(1, f"loss {running:.4g}")
    return losses


def resolve_device(device: str) -> str:
    """The torch device re-training runs on: `auto` is CUDA when torch sees a GPU, else the CPU; `cuda` (or
    `cuda:N`) without one is an InputError naming what torch sees. The teacher stays in onnxruntime."""
    torch = require_torch()
    name = (device or "auto").strip().lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return "cpu"
    if name == "cuda" or name.startswith("cuda:"):
        return cuda_device(torch, name, "--finetune-device")
    raise InputError(f"--finetune-device {device!r}: expected one of {', '.join(DEVICES)} (or cuda:N)")


def as_tensors(feed: dict[str, np.ndarray], device: str = "cpu") -> dict:
    torch = require_torch()
    out = {}
    for k, v in feed.items():
        v = np.asarray(v)  # not ascontiguousarray: it makes a 0-d shape value 1-d
        out[k] = torch.as_tensor(v if v.flags.writeable and v.flags.c_contiguous else np.array(v)).to(device)
    return out
