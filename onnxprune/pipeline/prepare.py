"""Stage 1, prepare: normalise the graph and find its channel groups (graph/analysis.py).

A `Prepared` model is read-only for every later stage: scoring, planning, applying (which returns its faults as
values), recovery and sensitivity leave it as they found it, so one prepared model serves many plans (bisection
steps, `--max-drop` candidates, sweep candidates).
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from onnxprune.choices import GQA_MODES
from onnxprune.errors import InputError
from onnxprune.graph.analysis import Analysis, analyze_graph
from onnxprune.graph.ir import GraphView
from onnxprune.graph.normalize import normalize
from onnxprune.io.model_io import check_supported
from onnxprune.io.weights import TensorWriter, Workspace, external_folder, is_lazy, keeps_data_files
from onnxprune.recipe import Recipe


@dataclass
class Prepared:
    """A normalised model with its graph view and channel groups.

    A lazily loaded model (weights in external files) gets a `workspace` for the data files of its rewrites,
    made on first use beside its data (or set by the caller, e.g. beside the output)."""

    model: onnx.ModelProto
    view: GraphView
    analysis: Analysis
    workspace: Workspace | None = None

    def writer(self) -> TensorWriter | None:
        """Where sliced and refit weights are streamed (None: the model is in memory, so are they)."""
        if not is_lazy(self.model):
            return None
        if self.workspace is None:
            self.workspace = Workspace(near=external_folder(self.model),
                                       one_file=not keeps_data_files(self.model))
        return self.workspace.writer()


def prepare(model: onnx.ModelProto, exclude: tuple[str, ...] = (), prune_hidden: bool = False,
            gqa_mode: str = "kv-groups", keep_kv_cache: bool = False, head_share: float | None = None) -> Prepared:
    """Normalise and analyse `model`; `prune_hidden` lets LayerNorm pass channels (the hidden size becomes
    prunable, approximately: normalisation statistics change). Grouped-query attention prunes whole KV groups
    (`gqa_mode="kv-groups"`), query heads evenly inside every KV group (`"query-heads"`), or whichever can meet
    `head_share`, the share of heads the run removes (`"auto"`, see graph.analysis.gqa_mode_for);
    `keep_kv_cache` keeps a decoder's key/value cache inputs and outputs as they are (their heads then stay)."""
    if gqa_mode not in GQA_MODES:
        raise InputError(f"unknown gqa_mode {gqa_mode!r} (choose from {', '.join(GQA_MODES)})")
    check_supported(model)
    normalized = normalize(model)
    view = GraphView(normalized)
    return Prepared(normalized, view, analyze_graph(view, tuple(exclude), prune_hidden, gqa_mode, keep_kv_cache,
                                                    head_share))


def prepare_recipe(model: onnx.ModelProto, recipe: Recipe) -> Prepared:
    """prepare() with the recipe's graph settings (exclude patterns, hidden size, decoder options; gqa_mode
    "auto" decides by the share of heads the recipe removes)."""
    share = head_share(recipe) if recipe.gqa_mode == "auto" else None
    return prepare(model, recipe.exclude, recipe.prune_hidden, recipe.gqa_mode, recipe.keep_kv_cache, share)


def head_share(recipe: Recipe) -> float | None:
    """The share of attention heads a recipe removes, as far as it says: its head ratio, else its ratio, else
    what a MAC or parameter target leaves out; None when unknown (a --max-drop search)."""
    if recipe.head_ratio is not None:
        return recipe.head_ratio
    if recipe.ratio is not None:
        return recipe.ratio
    target = recipe.target
    return None if target is None else 1.0 - target[1]
