"""Retraining-free recovery of a pruned model from calibration data.

`bias` (FLAP, An et al., AAAI'24): a removed input channel c of a linear layer y = W x + b contributed
W[:, c] x_c; replacing x_c by its calibration mean keeps the layer's expected output, so

    b' = b + sum over removed columns j of W[:, j] * mean(x_j)

where, for a Conv, the columns are im2col patch entries (channel, kernel offset) and the means include padding.

`lstsq` (He et al., ICCV'17; ThiNet; Kwon et al., NeurIPS'22): every affected Conv/Gemm/MatMul is refit, in
graph order, so that on calibration data its output from the *pruned* model's input (earlier layers already
refit, so errors do not accumulate) matches the unpruned model's output:

    min_{W, b}  || [X_p 1] [W; b] - Y ||^2 + lambda || W - W0 ||^2

W0 being the pruned layer's own weights, so lambda -> infinity keeps them and fits only the bias (the best
bias compensation for the pruned inputs) and lambda -> 0 is plain least squares. A layer whose (biased) output
is added to a residual stream r (a transformer's attention output projection and second MLP layer) is fit to
the original *sum* instead, Y = (y + r)_original - r_now: it then also absorbs the drift that earlier pruning
left in the stream, which the LayerNorm after the sum would otherwise pass on. Rows at padded token
positions (attention mask 0 in the feed) are left out of every fit. Only the Gram matrices
A = X^T X and B = X^T Y are accumulated, in float64, so memory does not grow with the calibration set;
lambda is chosen on a held-out quarter of the calibration samples (scaled by the mean diagonal of A), and the
final fit uses all samples; the alphas share one eigendecomposition (`RidgePath`, searched coarse to fine:
`select_alpha`; on a CUDA GPU with --linalg-device, runtime/linalg.py). Layers that read the same
tensor are fit from one capture of it, and each capture runs only the nodes it needs. For a Conv the rows
of X are im2col patches of its input (subsampled positions, fixed seed); all output channels share A, so one
solve per layer and lambda.


The stage is split along its seams: layers.py (which layers, their weights), im2col.py (rows of each
fit), ridge.py (the maths, pure numpy), bias.py and lstsq.py (the two methods)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import onnx

from onnxprune.choices import RECOVERIES
from onnxprune.errors import InputError
from onnxprune.pipeline.recover.bias import fit_bias
from onnxprune.pipeline.recover.layers import Params, find_layers
from onnxprune.pipeline.recover.lstsq import fit_lstsq

MODES = RECOVERIES


@dataclass

class RecoveryResult:
    model: onnx.ModelProto
    mode: str
    layers: list[dict] = field(default_factory=list)  # per layer: node, method, alpha, holdout errors
    notes: list[str] = field(default_factory=list)
    passes: dict = field(default_factory=dict)  # model passes of the staged runs (see runtime/stages.py)


def recover(prep, plan, pruned: onnx.ModelProto, feeds: Sequence[dict[str, np.ndarray]], mode: str = "lstsq", *,
            seed: int = 0, holdout: float = 0.25, max_rows: int = 2048, staged: bool = True,
            memory_budget: int | None = None) -> RecoveryResult:
    """Recover `pruned` (made from `prep` by `plan`) on calibration `feeds`; returns a new model."""
    if mode not in MODES:
        raise InputError(f"unknown recovery {mode!r} (choose from {', '.join(MODES)})")
    out = onnx.ModelProto()
    out.CopyFrom(pruned)
    result = RecoveryResult(out, mode)
    if mode == "none" or not plan.kept:
        return result
    feeds = list(feeds)
    if not feeds:
        raise InputError(f"--recover {mode} needs calibration data (--data)")
    layers, notes = find_layers(prep, plan, all_affected=(mode == "lstsq"))
    result.notes.extend(notes)
    params = Params(out, prep.writer())
    if mode == "bias":
        fit_bias(prep, layers, params, feeds, seed, max_rows, result)
    else:
        fit_lstsq(prep, layers, params, feeds, seed, holdout, max_rows, result, staged, memory_budget)
    return result
