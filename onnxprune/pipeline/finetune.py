"""Re-training after pruning: distil the pruned model from the original, and never leave it worse.

The recipe's `finetune` says what runs: `blockwise` (each block learns the original's output of that block,
onnxprune/train/blockwise.py), `end-to-end` (the whole model learns the original's outputs,
onnxprune/train/endtoend.py), or `both`, in that order. Only initializer values change; the graph, its names
and dtypes stay as they were.

Held-out data decides what is kept: the data given for it, or else a share of the calibration samples that is
never trained on. Each stage is measured there before and after (the metric the model is judged by: accuracy
with labels, perplexity for a causal LM, agreement with the original otherwise; ties are broken by the distance
to the original's outputs), and a stage that made it worse is rolled back. When nothing is kept the result is
the input model itself. The report puts calibration and held-out figures side by side: a small calibration set
is easy to memorise.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxprune.errors import InputError
from onnxprune.evaluate.data import Dataset, from_arrays, split_dataset
from onnxprune.recipe import Recipe

HOLDOUT = 0.2  # share of the calibration samples kept out of training when no held-out data is given


@dataclass
class FinetuneResult:
    model: onnx.ModelProto          # the re-trained model, or the input model itself when nothing was kept
    rolled_back: bool               # True when the input model came back unchanged
    report: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def finetune(pruned: onnx.ModelProto, original: onnx.ModelProto, calibration: Dataset | Sequence[dict],
             recipe: Recipe, *, eval_data: Dataset | None = None, memory_budget: int | None = None,
             show_progress: bool = False, device: str = "auto") -> FinetuneResult:
    """Distil `pruned` from `original` on `calibration` as `recipe`'s finetune settings say (see the module
    docstring). `eval_data` is the held-out set; without it a share (HOLDOUT) of the calibration samples is.
    `device` is the torch device training runs on (auto: CUDA when torch sees a GPU, else the CPU)."""
    from onnxprune.train.blockwise import distill_blocks
    from onnxprune.train.distill import resolve_device
    from onnxprune.train.endtoend import distill_end_to_end

    mode = recipe.finetune
    if mode == "none":
        return FinetuneResult(pruned, True, {"mode": "none"})
    device = resolve_device(device)
    calibration = calibration if isinstance(calibration, Dataset) else Dataset(list(calibration), None, "calibration")
    if not calibration.feeds:
        raise InputError("--finetune trains on calibration data: pass --data FILE")
    start = time.perf_counter()
    train_ds, held_ds = _split(calibration, eval_data, recipe)
    feeds = train_ds.feeds + held_ds.feeds
    train = list(range(len(train_ds.feeds)))
    held = list(range(len(train_ds.feeds), len(feeds)))
    labels = _batch_labels(train_ds) + _batch_labels(held_ds)
    judge = Judge(original, feeds[0], recipe.finetune_loss)
    before = {"calibration": judge(pruned, train_ds), "held_out": judge(pruned, held_ds)}
    report: dict = {"mode": mode, "steps": recipe.finetune_steps, "lr": recipe.finetune_lr,
                    "batch_size": recipe.finetune_batch_size, "device": device,
                    "calibration": {"source": train_ds.source, "samples": len(train_ds)},
                    "held_out": {"source": held_ds.source, "samples": len(held_ds)}}
    notes: list[str] = []
    model, current = pruned, before["held_out"]
    settings = {"steps": recipe.finetune_steps, "lr": recipe.finetune_lr, "seed": recipe.seed,
                "show_progress": show_progress, "device": device}
    if mode in ("blockwise", "both"):
        res = distill_blocks(model, original, feeds, train, held, list(judge.kinds),
                             memory_budget=memory_budget, **settings)
        notes.extend(res.notes)
        measured = judge(res.model, held_ds)
        kept = not judge.worse(measured, current)
        report["blockwise"] = {"blocks": res.blocks, "held_out": measured, "passes": res.passes,
                               "status": "kept" if kept else "rolled back"}
        rolled = [r["block"] for r in res.blocks if r.get("status") == "rolled back"]
        if rolled:
            notes.append(f"block-wise: {len(rolled)} of {len(res.blocks)} blocks were rolled back (their held-out "
                         "loss rose)")
        if kept:
            model, current = res.model, measured
        else:
            notes.append(f"block-wise distillation made the held-out {current['metric']} worse "
                         f"({_show(current)} -> {_show(measured)}): rolled back")
    if mode in ("end-to-end", "both"):
        res = distill_end_to_end(model, original, feeds, train, held, labels if any(
            x is not None for x in labels) else None, temperature=recipe.finetune_temperature,
            loss=recipe.finetune_loss, **settings)
        measured = judge(res.model, held_ds)
        kept = not judge.worse(measured, current)
        report["end_to_end"] = {**res.row, "held_out": measured, "status": "kept" if kept else "rolled back"}
        if kept:
            model, current = res.model, measured
        else:
            notes.append(f"end-to-end distillation made the held-out {current['metric']} worse "
                         f"({_show(current)} -> {_show(measured)}): rolled back")
    rolled_back = model is pruned
    after = {"calibration": judge(model, train_ds), "held_out": current}
    report["quality"] = {role: {"metric": before[role]["metric"], "before": before[role]["value"],
                                "after": after[role]["value"], "distance_before": before[role]["distance"],
                                "distance_after": after[role]["distance"]} for role in before}
    report["rolled_back"] = rolled_back
    report["seconds"] = time.perf_counter() - start
    if rolled_back:
        notes.append("re-training did not improve the held-out figures: the model is returned unchanged")
    return FinetuneResult(model, rolled_back, report, notes)


def _show(m: dict) -> str:
    return f"{m['value']:.4g}"


def _split(calibration: Dataset, eval_data: Dataset | None, recipe: Recipe) -> tuple[Dataset, Dataset]:
    """(training set, held-out set), both in batches of the recipe's finetune_batch_size."""
    if eval_data is None:
        if len(calibration) < 2:
            raise InputError("--finetune keeps a share of --data out of training to check its result; pass more "
                             "than one sample, or --eval-data")
        train, held = split_dataset(calibration, 1.0 - HOLDOUT, recipe.seed)
    else:
        train, held = calibration, eval_data
    return _rebatch(train, recipe.finetune_batch_size), _rebatch(held, recipe.finetune_batch_size)


def _rebatch(ds: Dataset, size: int) -> Dataset:
    """The same samples in batches of `size` (kept as they are when batches differ in shape, e.g. padding)."""
    try:
        arrays = {k: np.concatenate([f[k] for f in ds.feeds]) for k in ds.feeds[0]}
    except ValueError:
        return ds
    if any(a.ndim == 0 for a in arrays.values()):
        return ds
    return from_arrays(arrays, ds.labels, size, ds.source)


def _batch_labels(ds: Dataset) -> list[np.ndarray | None]:
    if ds.labels is None:
        return [None] * len(ds.feeds)
    out, at = [], 0
    for feed in ds.feeds:
        n = next((a.shape[0] for a in feed.values() if a.ndim), 1)
        out.append(ds.labels[at:at + n])
        at += n
    return out


class Judge:
    """Measures a model on a data set batch by batch (no outputs kept): the metric it is judged by, and its
    distance to the original's outputs (the distillation loss, in numpy) to break ties."""

    def __init__(self, original: onnx.ModelProto, sample_feed: dict, loss: str):
        from onnxprune.graph.kvcache import feed_adapter
        from onnxprune.runtime.session import internal_session
        from onnxprune.train.distill import output_losses

        self.teacher = internal_session(original)
        self.adapt = feed_adapter(self.teacher)
        names = [o.name for o in original.graph.output]
        first = dict(zip(names, self.teacher.run(names, self.adapt(sample_feed))))
        self.kinds = output_losses(first, sample_feed, loss)
        name = next(iter(self.kinds))
        # a causal LM is judged by its perplexity alone: its logits are too large to compare for a tie-break
        self.lm = self.kinds[name] in ("kl", "ce") and first[name].ndim == 3 and "input_ids" in sample_feed

    def __call__(self, model: onnx.ModelProto, ds: Dataset) -> dict:
        from onnxprune.evaluate.metrics import perplexity
        from onnxprune.graph.kvcache import feed_adapter
        from onnxprune.runtime.session import internal_session

        student = internal_session(model)
        adapt = feed_adapter(student)
        names = list(self.kinds)
        labels = _batch_labels(ds)
        nll = tokens = hits = count = 0.0  # summed over batches
        distances = []
        for b, feed in enumerate(ds.feeds):
            out = dict(zip(names, student.run(names, adapt(feed))))
            first = names[0]
            if self.lm:
                lm = perplexity([out], [feed], first)
                nll += lm["nll"] * lm["tokens"]
                tokens += lm["tokens"]
                continue
            ref = dict(zip(names, self.teacher.run(names, self.adapt(feed))))
            if self.kinds[first] in ("kl", "ce"):
                mine = out[first].argmax(-1)
                truth = labels[b] if labels[b] is not None else ref[first].argmax(-1)
                hits += float((mine == truth).sum())
                count += mine.size
            else:
                a, r = out[first].reshape(len(out[first]), -1), ref[first].reshape(len(ref[first]), -1)
                cos = (a * r).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(r, axis=1), 1e-12)
                hits += float(cos.sum())
                count += len(cos)
            distances.append(float(np.mean([_distance(self.kinds[n], out[n], ref[n]) for n in names])))
        if self.lm:
            nll = nll / max(tokens, 1)
            return {"metric": "perplexity", "value": float(np.exp(nll)), "distance": nll, "samples": len(ds)}
        if self.kinds[names[0]] in ("kl", "ce"):
            metric, value = ("accuracy" if ds.labels is not None else "agreement"), 100.0 * hits / max(count, 1)
        else:
            metric, value = "cosine", 100.0 * hits / max(count, 1)
        return {"metric": metric, "value": value, "distance": float(np.mean(distances)), "samples": len(ds)}

    @staticmethod
    def worse(after: dict, before: dict) -> bool:
        """Whether `after` is worse than `before`: the metric first (perplexity: lower is better), then, when
        it is the same, the distance to the original."""
        a, b = after["value"], before["value"]
        if after["metric"] == "perplexity":
            a, b = -a, -b
        if abs(a - b) > 1e-9 * max(abs(a), abs(b), 1.0):
            return a < b
        return after["distance"] > before["distance"]


def _distance(kind: str, out: np.ndarray, ref: np.ndarray) -> float:
    if out.ndim == 3:  # one sequence at a time: a batch of a language model's logits is large
        return float(np.mean([_distance(kind, o, r) for o, r in zip(out, ref)]))
    out, ref = out.astype(np.float32), ref.astype(np.float32)
    if kind in ("kl", "ce"):
        def log_softmax(x):
            x = x - x.max(-1, keepdims=True)
            return x - np.log(np.exp(x).sum(-1, keepdims=True))
        lq, lp = log_softmax(ref), log_softmax(out)
        return float((np.exp(lq) * (lq - lp)).sum(-1).mean())
    return float(((out - ref) ** 2).mean() / max((ref * ref).mean(), 1e-12))
