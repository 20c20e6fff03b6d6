"""Risks of a prune that are known before it runs, said as warnings (and kept in the report).

One so far: a language model (attention heads, or a causal-LM output of logits over input_ids) pruned without
calibration data. Its channels are then scored by weight magnitude alone, and one-shot structured pruning of a
pretrained decoder scored that way is known to collapse it, where activation scores and a least-squares refit
from a little calibration data keep it close (issue 21: SmolLM2-135M at --ratio 0.2, held-out perplexity x513,102
without data, x1.144 with --data and --recover lstsq).
"""

from __future__ import annotations

import onnx

from onnxprune.recipe import Recipe

# contrib and standard ops that hold attention heads themselves (the heads of a decomposed attention show as
# head groups in the analysis instead)
ATTENTION_OPS = {"Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedAttention",
                 "PackedMultiHeadAttention", "SparseAttention", "DecoderMaskedMultiHeadAttention"}

DATA_FREE_LANGUAGE_MODEL = (
    "pruning a {what} ({signs}) without calibration data scores channels by weight magnitude alone, which "
    "can collapse it ({harm}); pass --data FILE with --recover lstsq, and check the "
    "result with `onnxprune eval --reference`")


def language_model_signs(model: onnx.ModelProto, analysis=None) -> list[str]:
    """What marks `model` as a language model: 'attention heads' (head groups in `analysis`, or an attention op)
    and a causal-LM output ('causal-LM output <name>': rank-3 float output named like *logits* beside a rank-2
    input_ids, as the perplexity metric finds it at run time). Empty for anything else."""
    signs = []
    heads = analysis is not None and any(g.kv_groups or g.unit > 1 for g in analysis.groups)
    if heads or any(n.op_type in ATTENTION_OPS for n in model.graph.node):
        signs.append("attention heads")
    inputs = {i.name: i for i in model.graph.input}
    ids = inputs.get("input_ids")
    if ids is not None and _rank(ids) in (2, None):
        for out in model.graph.output:
            elem = out.type.tensor_type.elem_type
            if "logit" in out.name.lower() and _rank(out) in (3, None) and elem in _FLOATS:
                signs.append(f"causal-LM output {out.name}")
                break
    return signs


_FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}


def _rank(value: onnx.ValueInfoProto) -> int | None:
    tensor = value.type.tensor_type
    return len(tensor.shape.dim) if tensor.HasField("shape") else None


def data_free_warnings(model: onnx.ModelProto, recipe: Recipe, has_data: bool, analysis=None) -> list[str]:
    """The warnings a structured prune of `model` by `recipe` deserves before it runs (see the module
    docstring); empty with calibration data, for other models, and for a prune that removes nothing."""
    if has_data or recipe.mode != "structured" or not _removes_something(recipe):
        return []
    signs = language_model_signs(model, analysis)
    if not signs:
        return []
    causal = any(sign.startswith("causal-LM") for sign in signs)
    return [DATA_FREE_LANGUAGE_MODEL.format(
        what="language model" if causal else "transformer", signs=", ".join(signs),
        harm="perplexity up by orders of magnitude" if causal else "its outputs far from the original's")]


def _removes_something(recipe: Recipe) -> bool:
    if recipe.target_macs is not None or recipe.target_params is not None:
        return True
    return recipe.ratio is None or recipe.ratio > 0 or bool(recipe.head_ratio)
