"""Gradients for the first-order Taylor criterion (`--criterion taylor`).

Removing a weight w changes the loss by about g·w (its gradient times itself, Molchanov et al., CVPR 2019);
a channel's importance is |g·w| summed over every weight the channel's group removes (onnxprune/pipeline/
score.py reduces the per-weight products kept here). Before pruning there is no teacher to differ from, so the
loss is one the unpruned model itself defines on calibration data: cross-entropy with the labels when the data
has them; for a causal LM, next-token cross-entropy on the data's tokens; for a classifier without labels, its
own top-1 choices as the labels; for any other model half the mean square of its outputs.
Gradients are summed over the calibration batches before the product is taken (as Torch-Pruning does).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from onnxprune.train import require_torch
from onnxprune.train.distill import as_tensors, output_losses, token_mask


@dataclass
class GradientStats:
    products: dict[str, np.ndarray] = field(default_factory=dict)  # initializer -> |Σ_batches g ⊙ w|
    loss: str = ""        # what the gradients are of
    passes: float = 0.0   # forward + backward passes over the calibration data
    tensors: dict = field(default_factory=dict)  # (no activation statistics: the data criteria's interface)


def self_loss(outputs: dict, feed: dict[str, np.ndarray], labels: np.ndarray | None = None):
    """(loss, description) of the unpruned model on one batch (see the module docstring)."""
    torch = require_torch()
    f = torch.nn.functional
    sample = {k: v.detach().numpy() for k, v in outputs.items()}
    kinds = output_losses(sample, feed)
    name, kind = next(iter(kinds.items()))
    y = outputs[name].float()
    if kind == "kl" and y.ndim == 3 and "input_ids" in feed:
        ids = torch.from_numpy(np.asarray(feed["input_ids"]))
        mask = token_mask(feed)
        use = torch.ones(ids.shape, dtype=torch.bool) if mask is None else torch.from_numpy(np.asarray(mask) != 0)
        use = use[:, :-1] & use[:, 1:]
        return f.cross_entropy(y[:, :-1][use], ids[:, 1:][use]), "next-token cross-entropy"
    if kind == "kl":
        if labels is not None:
            return f.cross_entropy(y, torch.from_numpy(np.asarray(labels)).long()), "cross-entropy with the labels"
        return f.cross_entropy(y, y.detach().argmax(-1)), "cross-entropy with the model's own top-1"
    return sum(0.5 * (outputs[n].float() ** 2).mean() for n in kinds), "half the mean square of the outputs"


def gradient_stats(prep, feeds: Sequence[dict[str, np.ndarray]], labels: np.ndarray | None = None,
                   **_: object) -> GradientStats:
    """|g·w| of every trainable initializer of the prepared model, g the gradient of `self_loss` summed over
    `feeds`. Other keywords (memory_budget, seed, source) are accepted for the statistics interface."""
    require_torch()
    from onnxprune.train.blockwise import _adapted
    from onnxprune.train.graph_module import to_torch

    module = to_torch(prep.model, trainable="weights")
    stats = GradientStats()
    at = 0
    for feed in _adapted(prep.model, feeds):
        n = next((v.shape[0] for v in feed.values() if np.ndim(v)), 1)
        batch_labels = None if labels is None else labels[at:at + n]
        at += n
        loss, stats.loss = self_loss(module(as_tensors(feed)), feed, batch_labels)
        loss.backward()
        stats.passes += 1.0 / max(len(feeds), 1)
    for key, param in module.params.items():
        if param.grad is not None:
            stats.products[module.param_names[key]] = (param.detach() * param.grad).abs().numpy()
    return stats
