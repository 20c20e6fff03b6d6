"""The choices a recipe, the CLI and the pipeline stages accept, declared once.

Criteria are not listed here: they are a registry (pipeline/score.py), so adding one is adding its function.
"""

MODES = ("structured", "unstructured")
ALLOCATIONS = ("global", "uniform", "sensitivity")
RECOVERIES = ("none", "bias", "lstsq")
# grouped-query attention: whole key/value groups, query heads evenly inside every group, or "auto" (whole groups
# when they can meet the share of heads to remove, else query heads: graph/analysis.py gqa_mode_for)
GQA_MODES = ("auto", "kv-groups", "query-heads")
FINETUNE_MODES = ("none", "blockwise", "end-to-end", "both")  # re-training by distillation (pipeline/finetune.py)
FINETUNE_LOSSES = ("auto", "kl", "mse", "cosine", "ce")

# quantization: the canonical modes, and the other names the CLI and recipes accept for them
QUANTIZE_MODES = ("static", "dynamic", "fp16", "int4")
QUANTIZE_ALIASES = {"int8": "static", "int8-static": "static", "int8-dynamic": "dynamic", "float16": "fp16",
                    "int4-weight": "int4"}
QUANTIZATIONS = ("int8", "static", "dynamic", "fp16", "int4")  # what `--quantize` and a recipe take
