"""Depth pruning: score residual blocks on calibration data and drop the least influential ones.

A block's influence (ShortGPT, Men et al. 2024) is 1 - the mean cosine similarity between the residual stream
entering it and leaving it, over every token (or, for a CNN, every spatial position) of the calibration data:
a block whose output barely differs from its input adds little, and the stream can pass it by. The blocks are
found by onnxprune.graph.blocks; dropping is its rewrite. One model pass over the calibration data scores
every block, whose stream tensors are the only outputs computed (no logits are kept).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxprune.errors import InputError
from onnxprune.graph.blocks import (
    Block,
    drop_blocks,
    find_blocks,
    renumber_cache,
    unfuse_skip_norms,
)
from onnxprune.graph.kvcache import cache_inputs, empty_cache
from onnxprune.pipeline.activations import only_outputs
from onnxprune.runtime.session import internal_session


@dataclass
class DepthResult:
    model: onnx.ModelProto
    blocks: list[Block]
    influence: list[float]
    dropped: list[int]
    notes: list[str] = field(default_factory=list)
    renamed: dict[str, str] = field(default_factory=dict)  # cache entries renumbered: old name -> new

    def as_dict(self) -> dict:
        return {"blocks": len(self.blocks), "dropped": self.dropped,
                "influence": [round(float(v), 6) for v in self.influence],
                "attention_blocks": sum(b.attention for b in self.blocks),
                "removed_cache": [n for b in self.blocks if b.index in self.dropped
                                  for n in (*b.cache_inputs, *b.cache_outputs)],
                "renamed_cache": self.renamed}


def blocks_to_drop(drop: float, n_blocks: int) -> int:
    """`drop` as a count: an integer is a number of blocks, a fraction in (0, 1) a share of them (rounded)."""
    count = int(drop) if float(drop).is_integer() and drop >= 1 else math.floor(drop * n_blocks + 0.5)
    if count >= n_blocks:
        raise InputError(f"--drop-blocks {drop:g} would drop {count} of the model's {n_blocks} residual blocks; "
                         "at least one must stay")
    return count


def block_influence(model: onnx.ModelProto, blocks: list[Block], feeds) -> np.ndarray:
    """1 - mean cosine(stream in, stream out) of every block over the feeds' tokens (positions)."""
    names = list(dict.fromkeys([n for b in blocks for n in (b.input, b.output)]))
    probe = only_outputs(model, names)
    sess = internal_session(probe, prepack=False)
    wanted = {i.name for i in sess.get_inputs()} if hasattr(sess, "get_inputs") else None
    has_cache = bool(cache_inputs(model))
    sums, counts = np.zeros(len(blocks)), np.zeros(len(blocks))
    for feed in feeds:
        if has_cache:
            feed = empty_cache(model, feed)
        if wanted is not None:
            feed = {k: v for k, v in feed.items() if k in wanted}
        values = dict(zip(names, sess.run(names, feed)))
        for k, b in enumerate(blocks):
            x, y = _rows(values[b.input]), _rows(values[b.output])
            num = np.einsum("ij,ij->i", x, y)
            den = np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)
            cos = num / np.maximum(den, 1e-12)
            sums[k] += float(cos.sum())
            counts[k] += len(cos)
    if not counts.any():
        raise InputError("depth scoring needs calibration data: the data holds no batches")
    return 1.0 - sums / np.maximum(counts, 1)


def _rows(value: np.ndarray) -> np.ndarray:
    """Stream values as rows of features: [.., hidden] for token streams, channels (axis 1) for images."""
    value = np.asarray(value, dtype=np.float64)
    if value.ndim >= 4:  # [N, C, H, W]: one row per position
        value = np.moveaxis(value, 1, -1)
    return value.reshape(-1, value.shape[-1])


def prune_depth(model: onnx.ModelProto, drop: float, feeds) -> DepthResult:
    """Drop the `drop` least influential residual blocks of `model` (a count, or a share of its blocks)."""
    feeds = list(feeds or [])
    if not feeds:
        raise InputError("--drop-blocks scores blocks on calibration data (block influence): pass --data FILE")
    unfused, fused = unfuse_skip_norms(model)
    blocks = find_blocks(unfused)
    if not blocks:
        raise InputError("--drop-blocks found no residual blocks (out = x + f(x) on one stream) in this model")
    count = blocks_to_drop(drop, len(blocks))
    influence = block_influence(unfused, blocks, feeds)
    order = np.argsort(influence, kind="stable")
    dropped = sorted(int(i) for i in order[:count])
    pruned = drop_blocks(unfused, [blocks[i] for i in dropped]) if dropped else model
    renamed = renumber_cache(pruned, blocks, dropped) if dropped else {}
    notes = []
    if dropped and fused:
        notes.append(f"depth: {fused} fused skip norms were written as Add + norm to expose the residual stream "
                     "(the same computation, unfused)")
    if renamed:
        notes.append(f"the remaining layers' key/value cache entries are renumbered from 0 ({len(renamed)} renamed, "
                     "e.g. " + ", ".join(f"{a} -> {b}" for a, b in list(renamed.items())[:2]) + ")")
    if dropped:
        text = ", ".join(f"{i} ({influence[i]:.4f})" for i in dropped)
        kind = "decoder layers" if all(b.attention for b in blocks) else "residual blocks"
        notes.append(f"depth: dropped {len(dropped)} of {len(blocks)} {kind} by block influence "
                     f"(1 - cosine of stream in and out): {text}")
        removed = [n for i in dropped for n in (*blocks[i].cache_inputs, *blocks[i].cache_outputs)]
        if removed:
            notes.append(f"the key/value cache of the dropped layers goes: {len(removed)} inputs and outputs "
                         "removed (see the interface table)")
    return DepthResult(pruned, blocks, [float(v) for v in influence], dropped, notes, renamed)


def depth_interface(model: onnx.ModelProto, depth: DepthResult) -> list[dict]:
    """Interface rows of the cache inputs and outputs depth pruning changed: a dropped layer's go ("after"
    None), the layers after it are renumbered ("renamed": the new name)."""
    gone = {n for b in depth.blocks if b.index in depth.dropped for n in (*b.cache_inputs, *b.cache_outputs)}
    rows = []
    for kind, values in (("input", model.graph.input), ("output", model.graph.output)):
        for v in values:
            if v.name not in gone and v.name not in depth.renamed:
                continue
            dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                    for d in v.type.tensor_type.shape.dim]
            row = {"name": v.name, "kind": kind, "before": dims, "after": None}
            if v.name in depth.renamed:
                row.update(after=dims, renamed=depth.renamed[v.name])
            rows.append(row)
    return rows


def keep_inputs(feeds, model: onnx.ModelProto) -> list[dict]:
    """Feeds with only the inputs `model` has (a dropped layer's past key/value leaves the data), and an empty
    past for a cache the data does not hold."""
    names = {i.name for i in model.graph.input}
    cache = cache_inputs(model)
    out = []
    for feed in feeds:
        kept = {k: v for k, v in feed.items() if k in names}
        if any(n not in kept for n in cache):  # an empty past where the data has none
            kept = {**empty_cache(model, kept), **kept}
        out.append(kept)
    return out
