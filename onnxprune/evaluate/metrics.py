"""Metrics on model outputs: accuracy, perplexity (absolute; lower is better), agreement with a reference.

Everything here takes outputs already computed (lists of {output name: array}, one per batch) and returns plain
dicts (JSON-ready once passed through `report.to_jsonable`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from onnxprune.errors import InputError


def accuracy(outputs: Sequence[dict[str, np.ndarray]], labels: np.ndarray, k: Sequence[int] = (1, 5)) -> dict:
    """Top-k accuracy (fractions) of the first output shaped [N, classes]; k larger than classes is skipped."""
    if not outputs:
        raise InputError("no outputs to compare: the data holds no batches")
    labels = np.asarray(labels)
    sizes = [len(scores) if name is not None else 0 for name, scores in map(_score_output, outputs)]
    if sizes[0] and sum(sizes) != len(labels):
        raise InputError(f"{len(labels)} labels for {sum(sizes)} outputs")
    counter, offset = TopK(k), 0
    for out, n in zip(outputs, sizes):
        counter.add(out, labels[offset:offset + n])  # an output without class scores: TopK says so
        offset += n
    return counter.result()


class TopK:
    """Top-k accuracy accumulated batch by batch (`accuracy` over all of them at once)."""

    def __init__(self, k: Sequence[int] = (1, 5)):
        self.k = k
        self.name: str | None = None
        self.hits: dict[int, int] = {}
        self.samples = 0
        self.batches = 0

    def add(self, outputs: dict[str, np.ndarray], labels: np.ndarray) -> None:
        self.batches += 1
        name, scores = _score_output(outputs)
        if name is None:
            raise InputError("accuracy needs an output of class scores shaped [N, classes]; this model has none")
        labels = np.asarray(labels)
        if len(labels) != len(scores):
            raise InputError(f"{self.samples + len(labels)} labels for {self.samples + len(scores)} outputs")
        if len(labels) and (labels.min() < 0 or labels.max() >= scores.shape[1]):
            raise InputError(f"labels range {labels.min()}..{labels.max()} but output {name!r} has "
                             f"{scores.shape[1]} classes")
        self.name = name
        ks = sorted({int(x) for x in self.k if 0 < int(x) <= scores.shape[1]})
        # stable sort of the negated scores: ties go to the lower class index, as argmax does
        ranked = np.argsort(-scores, axis=1, kind="stable")[:, : max(ks)]
        hits = ranked == labels[:, None]
        for kk in ks:
            self.hits[kk] = self.hits.get(kk, 0) + int(hits[:, :kk].any(axis=1).sum())
        self.samples += len(labels)

    def result(self) -> dict:
        if not self.batches:
            raise InputError("no outputs to compare: the data holds no batches")
        result: dict[str, Any] = {"output": self.name, "samples": int(self.samples)}
        for kk in sorted(self.hits):
            result[f"top{kk}"] = self.hits[kk] / self.samples if self.samples else float("nan")
        return result


def logits_name(outputs: dict[str, np.ndarray], feed: dict[str, np.ndarray]) -> str | None:
    """The output of a causal LM's next-token logits: named like *logits*, [batch, seq, vocab] float, with the
    feed's input_ids [batch, seq] all below vocab; None when there is none."""
    ids = feed.get("input_ids")
    if ids is None or np.ndim(ids) != 2:
        return None
    for name, value in outputs.items():
        if "logit" in name.lower() and value.ndim == 3 and value.dtype.kind == "f" and \
                value.shape[:2] == ids.shape and (ids.size == 0 or int(ids.max()) < value.shape[2]):
            return name
    return None


@dataclass(frozen=True)
class TokenNLL:
    """One batch of a causal LM's outputs reduced to what perplexity needs: the summed negative log-likelihood
    of its next tokens and how many there are (`lm_digest`)."""

    output: str
    nll: float
    tokens: int


def lm_digest(outputs: dict[str, np.ndarray], feed: dict[str, np.ndarray]):
    """A batch's outputs as a `TokenNLL` when they are a causal LM's logits for the feed's input_ids, else as
    they are: a [batch, seq, vocab] block of logits is reduced as soon as it is computed, so metrics over many
    tokens never hold more than one batch of them (run_batches' `reduce`)."""
    name = logits_name(outputs, feed)
    if name is None:
        return outputs
    total, tokens = _nll_sum(outputs[name], feed)
    return TokenNLL(name, total, tokens)


def metric_digest(dataset):
    """The `reduce` for run_batches whose outputs a quality metric will judge on `dataset`: a language model's
    logits become `TokenNLL`s, except where labels ask for accuracy (which reads the scores)."""
    return lm_digest if dataset.labels is None else None


def is_lm_digest(outputs: Sequence) -> bool:
    return bool(outputs) and isinstance(outputs[0], TokenNLL)


def perplexity(outputs: Sequence[dict[str, np.ndarray]], feeds: Sequence[dict[str, np.ndarray]],
               name: str | None = None) -> dict:
    """Token-level perplexity of a causal LM: exp of the mean negative log-likelihood of each next token.

    The logits at position t predict input_ids[t + 1]; a prediction counts when both positions are real tokens
    (attention_mask 1 at t and t + 1, or every position without a mask). Log-softmax in float64, one sample at a
    time (a [seq, vocab] slice), so a 32k vocabulary costs no more than one row of logits.
    """
    if len(outputs) != len(feeds) or not feeds:
        raise InputError("perplexity needs the feeds the outputs came from")
    if is_lm_digest(outputs):  # reduced batch by batch already (lm_digest)
        name = outputs[0].output
        total, tokens = sum(o.nll for o in outputs), sum(o.tokens for o in outputs)
    else:
        name = name or logits_name(outputs[0], feeds[0])
        if name is None:
            raise InputError("perplexity needs an output of logits [batch, seq, vocab] (named like 'logits') and "
                             "input_ids [batch, seq] in the data")
        total, tokens = 0.0, 0
        for out, feed in zip(outputs, feeds):
            t, n = _nll_sum(out[name], feed)
            total, tokens = total + t, tokens + n
    if tokens == 0:
        raise InputError("perplexity: the data holds no pair of consecutive real tokens")
    nll = total / tokens
    return {"output": name, "tokens": tokens, "nll": nll, "perplexity": float(np.exp(nll))}


def _nll_sum(logits: np.ndarray, feed: dict[str, np.ndarray]) -> tuple[float, int]:
    """Summed next-token negative log-likelihood of one batch, and the number of tokens it counts."""
    ids = np.asarray(feed["input_ids"])
    mask = _token_mask([feed])
    real = np.ones(ids.shape, bool) if mask is None or mask.shape != ids.shape else mask
    total, tokens = 0.0, 0
    for b in range(ids.shape[0]):
        use = real[b, :-1] & real[b, 1:]
        if not use.any():
            continue
        x = logits[b, :-1][use].astype(np.float64)
        top = x.max(axis=1, keepdims=True)
        log_z = np.log(np.exp(x - top).sum(axis=1)) + top[:, 0]
        total += float(np.sum(log_z - x[np.arange(len(x)), ids[b, 1:][use]]))
        tokens += int(use.sum())
    return total, tokens


def compare_outputs(candidate_outputs: Sequence[dict[str, np.ndarray]],
                    reference_outputs: Sequence[dict[str, np.ndarray]], *,
                    atol: float | None = None, rtol: float | None = None,
                    feeds: Sequence[dict[str, np.ndarray]] | None = None) -> dict:
    """Per output: max/mean absolute error, mean and worst per-sample cosine similarity, top-1 agreement for
    outputs shaped [N, classes], and (with atol/rtol) how many elements miss |c - r| <= atol + rtol * |r|.

    With the `feeds` the outputs came from, a [batch, seq, ...] output whose feed has an attention mask of
    [batch, seq] is compared on real tokens only (padded positions hold whatever the model leaves there).
    The top-level `top1_agreement` is that of the first class-score output (None if there is none).
    """
    comparison = OutputComparison(atol, rtol)
    if feeds is not None and len(feeds) != len(reference_outputs):
        feeds = None
    for i, (c, r) in enumerate(zip(candidate_outputs, reference_outputs)):
        comparison.add(c, r, feeds[i] if feeds is not None else None)
    return comparison.result()


class OutputComparison:
    """`compare_outputs` accumulated batch by batch: two models' outputs are compared as they come, and
    nothing but per-sample figures is kept (a language model's logits over many tokens never are)."""

    def __init__(self, atol: float | None = None, rtol: float | None = None):
        self.atol, self.rtol = atol, rtol
        self.names: list[str] | None = None
        self.entries: dict[str, dict] = {}

    def add(self, cand: dict[str, np.ndarray], ref: dict[str, np.ndarray], feed: dict | None = None) -> None:
        if list(cand) != list(ref):
            raise InputError(f"the models' outputs differ: candidate {', '.join(cand)}; reference {', '.join(ref)}")
        mask = _token_mask([feed]) if feed is not None else None
        for name, r in ref.items():
            c = cand[name]
            if c.shape != r.shape:
                raise InputError(f"output {name!r} has shape {list(c.shape)} in the candidate, "
                                 f"{list(r.shape)} in the reference")
            e = self.entries.get(name)
            if e is None:
                e = self.entries[name] = {"shape": list(r.shape), "max": 0.0, "sum": 0.0, "size": 0, "cos": [],
                                          "agree": 0, "scores": _is_scores(r), "masked": False, "violations": 0}
            elif r.ndim:
                e["shape"][0] += r.shape[0]
            if not r.ndim and e["size"]:
                continue  # a scalar output is compared once, as a whole-data output would be
            masked = mask is not None and r.ndim >= 3 and mask.shape == r.shape[:2]
            e["masked"] |= masked
            if not r.ndim:
                self._add_part(e, c, r, None)
                continue
            step = max(1, (1 << 22) // max(r[:1].size, 1))  # float64 copies of a few million values at a time
            for s in range(0, max(len(r), 1), step):
                self._add_part(e, c[s:s + step], r[s:s + step], mask[s:s + step] if masked else None)

    def _add_part(self, e: dict, c: np.ndarray, r: np.ndarray, mask: np.ndarray | None) -> None:
        c64, r64 = c.astype(np.float64), r.astype(np.float64)
        if mask is not None:
            real = mask.reshape(mask.shape + (1,) * (r.ndim - 2))
            c64, r64 = c64 * real, r64 * real
        diff = np.abs(c64 - r64)
        if diff.size:
            e["max"] = max(e["max"], float(diff.max()))
            e["sum"] += float(diff.sum())
        e["size"] += diff.size
        if r.ndim == 0 or len(r):
            e["cos"].append(_cosine_per_sample(c64, r64))
        if e["scores"]:
            e["agree"] += int((c.argmax(axis=1) == r.argmax(axis=1)).sum())
        if self.atol is not None or self.rtol is not None:
            close = np.isclose(c64, r64, rtol=self.rtol or 0.0, atol=self.atol or 0.0, equal_nan=True)
            e["violations"] += int(close.size - close.sum())

    def result(self) -> dict:
        if not self.entries:
            raise InputError("no outputs to compare: the data holds no batches")
        per_output = {}
        for name, e in self.entries.items():
            cosine = np.concatenate(e["cos"]) if e["cos"] else np.ones(1)
            entry: dict[str, Any] = {"shape": e["shape"], "max_abs_err": e["max"],
                                     "mean_abs_err": e["sum"] / e["size"] if e["size"] else 0.0}
            if e["masked"]:
                entry["real_tokens_only"] = True
            entry["cosine"], entry["cosine_min"] = float(cosine.mean()), float(cosine.min())
            if e["scores"]:
                entry["top1_agreement"] = e["agree"] / e["shape"][0] if e["shape"][0] else float("nan")
            if self.atol is not None or self.rtol is not None:
                entry["tolerance_violations"] = e["violations"]
                entry["within_tolerance"] = e["violations"] == 0
            per_output[name] = entry
        first_scores = next((e["top1_agreement"] for e in per_output.values() if "top1_agreement" in e), None)
        return {"top1_agreement": first_scores, "outputs": per_output}


# Metrics where a smaller value is better (the sweep's drop and Pareto front read this).
LOWER_IS_BETTER = frozenset({"perplexity"})


def quality_metric(outputs: Sequence[dict[str, np.ndarray]], reference_outputs: Sequence[dict[str, np.ndarray]] | None,
                   labels: np.ndarray | None, feeds: Sequence[dict[str, np.ndarray]] | None = None) -> tuple[str, float]:
    """The one figure a model is judged by on a data set, as (metric, value): top-1 accuracy (%) with
    labels, else top-1 agreement (%) with the reference outputs, else (outputs that are not class scores)
    100 x the mean cosine similarity of the first output, on real tokens when the `feeds` carry an attention
    mask; for a causal LM (next-token logits with input_ids in the feeds) its token-level perplexity. Used by
    sweep (and, through sensitivity.model_metric, prune's report and sensitivity); metrics in LOWER_IS_BETTER
    rank the other way."""
    if labels is not None:
        return "accuracy", 100.0 * accuracy(outputs, labels, (1,))["top1"]
    if is_lm_digest(outputs) or (feeds and outputs and logits_name(outputs[0], feeds[0]) is not None):
        # a causal LM: lower is better
        return "perplexity", perplexity(outputs, feeds)["perplexity"]
    cmp = compare_outputs(outputs, reference_outputs, feeds=feeds)
    if cmp["top1_agreement"] is not None:
        return "agreement", 100.0 * cmp["top1_agreement"]
    first = next(iter(cmp["outputs"].values()))
    return "cosine", 100.0 * first["cosine"]


# ---- helpers ------------------------------------------------------------------------------------------


def _token_mask(feeds) -> np.ndarray | None:
    """The feeds' attention masks ([batch, seq], integer or bool, an input named like *mask*), concatenated."""
    if not feeds:
        return None
    parts = []
    for feed in feeds:
        found = [v for k, v in feed.items() if "mask" in k.lower() and v.ndim == 2 and v.dtype.kind in "iub"]
        if len(found) != 1:
            return None
        parts.append(found[0] != 0)
    try:
        return np.concatenate(parts)
    except ValueError:  # batches padded to different lengths: outputs would not concatenate either
        return None


def _is_scores(array: np.ndarray) -> bool:
    return array.ndim == 2 and array.shape[1] > 1 and array.dtype.kind == "f"


def _score_output(outputs: dict[str, np.ndarray]) -> tuple[str | None, np.ndarray | None]:
    return next(((n, a) for n, a in outputs.items() if _is_scores(a)), (None, None))


def _cosine_per_sample(c: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Cosine similarity of each sample's flattened output; two zero vectors count as identical."""
    c2 = c.reshape(len(c), -1) if c.ndim else c.reshape(1, -1)
    r2 = r.reshape(len(r), -1) if r.ndim else r.reshape(1, -1)
    if c2.size == 0:
        return np.ones(1)
    dot = (c2 * r2).sum(axis=1)
    norms = np.linalg.norm(c2, axis=1) * np.linalg.norm(r2, axis=1)
    both_zero = (np.linalg.norm(c2, axis=1) == 0) & (np.linalg.norm(r2, axis=1) == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        cosine = np.where(norms > 0, dot / np.where(norms > 0, norms, 1.0), 0.0)
    return np.where(both_zero, 1.0, cosine)


