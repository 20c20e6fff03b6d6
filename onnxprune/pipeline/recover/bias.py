"""`bias` recovery (FLAP): a removed input channel's mean contribution folded into the layer's bias."""

from __future__ import annotations

import numpy as np

from onnxprune.pipeline.activations import Probe, token_rows
from onnxprune.pipeline.recover.im2col import layer_rows
from onnxprune.pipeline.recover.layers import current_params, original_wt, write_layer
from onnxprune.report import progress


def fit_bias(prep, layers, params, feeds, seed, max_rows, result) -> None:
    """FLAP: one pass over the original model, means of the removed columns folded into the biases."""
    layers = [l for l in layers if len(l.removed_columns())]
    probe = Probe(prep.model, [l.node.input[0] for l in layers])
    rng = np.random.default_rng(seed)
    sums = {l.node.name: 0.0 for l in layers}
    counts = {l.node.name: 0 for l in layers}
    with progress("recovery (bias): calibration batches", len(feeds)) as advance:
        for feed in feeds:
            _bias_sums(probe.run(feed), feed, layers, rng, max_rows, sums, counts)
            advance()
    result.passes = {"original": probe.node_runs / max(len(prep.model.graph.node) * len(feeds), 1)}
    for l in layers:
        if l.kind == "matmul" and l.bias_add is None:
            result.notes.append(f"MatMul {l.node.name}: no bias Add to fold the removed channels into")
            continue
        mean = sums[l.node.name] / max(counts[l.node.name], 1)
        removed = l.removed_columns()
        w_full = original_wt(prep, l)
        shift = (mean[removed] @ w_full[removed])[l.out_kept]
        wt, bias = current_params(l, params)
        bias = (np.zeros(wt.shape[1]) if bias is None else bias) + shift
        write_layer(l, params, wt, bias, params.get(l.node.name, 1).dtype)
        result.layers.append({"node": l.node.name, "method": "bias", "alpha": None,
                              "shift": float(np.abs(shift).max()) if shift.size else 0.0})


def _bias_sums(values, feed, layers, rng, max_rows, sums, counts) -> None:
    for l in layers:
        x_in = values[l.node.input[0]]
        x, _, _ = layer_rows(l, x_in, None, rng, max_rows, token_rows(feed, x_in.shape))
        sums[l.node.name] = sums[l.node.name] + x.sum(axis=0)
        counts[l.node.name] += len(x)
