"""Input shapes and the random feeds that validation, MAC counts and the oracle run the model on.

Exporters leave input dims dynamic in several ways: a symbolic name (`batch`), no dim at all, or a number that
is not a size (paddle2onnx writes `dim_value: -1`, some tools 0). The shapes come, in order of preference,
from `--input-shapes NAME:1x3x48x192` (Polygraphy's convention), from the calibration data, or from a guess:
1 for the batch dim and for any other dynamic dim. A guess for a dim other than the batch is checked by
running the original model on it; when that fails, a one-line error names the input and the option.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from onnxprune.errors import InputError, ValidationError, first_line
from onnxprune.graph.kvcache import sample_cache
from onnxprune.io.weights import is_lazy
from onnxprune.runtime.session import run


@dataclass(frozen=True)
class InputDims:
    name: str
    elem_type: int
    dims: tuple  # int > 0: static; None: dynamic (symbolic, missing, 0 or negative)
    names: tuple  # the symbolic names (or "?") of the dims, for messages

    def text(self) -> str:
        return "[" + ",".join(str(d) if d is not None else n for d, n in zip(self.dims, self.names)) + "]"


def is_static(dim: onnx.TensorShapeProto.Dimension) -> bool:
    """A dim that is a size: dim_value > 0 (-1 and 0 are what some exporters write for a dynamic dim)."""
    return dim.HasField("dim_value") and dim.dim_value > 0


def graph_inputs(model: onnx.ModelProto) -> list[InputDims]:
    """The model's data inputs (not initializers), each with its static dims and None for dynamic ones."""
    inits = {t.name for t in model.graph.initializer}
    out = []
    for value in model.graph.input:
        if value.name in inits:
            continue
        t = value.type.tensor_type
        dims = tuple(d.dim_value if is_static(d) else None for d in t.shape.dim)
        names = tuple(d.dim_param or (str(d.dim_value) if d.HasField("dim_value") else "?") for d in t.shape.dim)
        out.append(InputDims(value.name, t.elem_type, dims, names))
    return out


def resolve_shapes(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]] | None = None,
                   feed: dict[str, np.ndarray] | None = None) -> tuple[dict[str, tuple[int, ...]], list[str]]:
    """One concrete shape per data input, and the inputs whose non-batch dims were guessed.

    `input_shapes` (the option) wins, then the shapes of `feed` (a calibration batch), then the guess.
    """
    shapes, guessed = {}, []
    given = dict(input_shapes or {})
    inputs = graph_inputs(model)
    known = {i.name for i in inputs}
    for name in given:
        if name not in known:
            raise InputError(f"--input-shapes names {name!r}, which is not a model input "
                             f"(inputs: {', '.join(sorted(known))})")
    for inp in inputs:
        if inp.name in given:
            shape = tuple(int(d) for d in given[inp.name])
            if inp.dims and len(shape) != len(inp.dims):
                raise InputError(f"--input-shapes gives {inp.name!r} {len(shape)} dimensions; the model has "
                                 f"{inp.text()}")
            bad = [(d, s) for d, s in zip(inp.dims, shape) if d is not None and d != s]
            if bad:
                raise InputError(f"--input-shapes {inp.name}:{'x'.join(map(str, shape))} contradicts the model's "
                                 f"fixed shape {inp.text()}")
            shapes[inp.name] = shape
        elif feed is not None and inp.name in feed:
            shape = tuple(np.shape(feed[inp.name]))
            if inp.dims and shape and inp.dims[0] is None:
                shape = (1,) + shape[1:]  # one sample is enough to validate
            shapes[inp.name] = shape
        else:
            shapes[inp.name] = tuple(d if d is not None else 1 for d in inp.dims)
            if any(d is None for d in inp.dims[1:]):
                guessed.append(inp.name)
    return shapes, guessed


_NP = {
    onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16, onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.INT64: np.int64, onnx.TensorProto.INT32: np.int32, onnx.TensorProto.BOOL: np.bool_,
    onnx.TensorProto.UINT8: np.uint8, onnx.TensorProto.INT8: np.int8, onnx.TensorProto.INT16: np.int16,
    onnx.TensorProto.UINT16: np.uint16, onnx.TensorProto.UINT32: np.uint32, onnx.TensorProto.UINT64: np.uint64,
}


def np_dtype(elem_type: int):
    """The numpy dtype for an ONNX element type (bfloat16 through ml_dtypes, which onnx depends on)."""
    if elem_type == onnx.TensorProto.BFLOAT16:
        import ml_dtypes

        return ml_dtypes.bfloat16
    return _NP.get(elem_type)


def random_feed(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded random data of the given shapes: normal floats, 0/1 integers and booleans."""
    rng = np.random.default_rng(seed)
    feed = {}
    for inp in graph_inputs(model):
        dtype = np_dtype(inp.elem_type)
        shape = shapes[inp.name]
        if dtype is None:
            raise ValidationError(f"input {inp.name!r} has a type onnxprune cannot generate data for")
        if dtype == np.bool_:
            feed[inp.name] = rng.random(shape) > 0.5
        elif np.dtype(dtype).kind in "iu":
            feed[inp.name] = rng.integers(0, 2, size=shape).astype(dtype)
        else:
            feed[inp.name] = rng.standard_normal(shape).astype(np.float32).astype(dtype)
    return feed


def sample_feed(model: onnx.ModelProto, seed: int = 0, batch: int = 1,
                input_shapes: dict[str, tuple[int, ...]] | None = None) -> dict[str, np.ndarray]:
    """One random input per graph input; dynamic dims (symbolic, missing, 0 or -1) become `batch` (first) or 1,
    unless `input_shapes` gives them (see onnxprune.runtime.feeds)."""
    shapes, _ = resolve_shapes(model, input_shapes)
    if batch != 1:
        for inp in graph_inputs(model):
            if inp.dims and inp.dims[0] is None and inp.name not in (input_shapes or {}):
                shapes[inp.name] = (batch,) + shapes[inp.name][1:]
    return random_feed(model, shapes, seed)


def validation_feed(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]] | None = None,
                    data: list[dict[str, np.ndarray]] | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """The feed a pruned model is validated on (see the module docstring).

    When a non-batch dim had to be guessed, the original model is run on the feed first: a guess it cannot run
    on is an InputError that names the input and --input-shapes, not a failed prune.
    """
    first = data[0] if data else None
    shapes, guessed = resolve_shapes(model, input_shapes, first)
    if first is not None and input_shapes is None and all(k in first for k in shapes):
        # one sample of the first batch where the batch dim is dynamic: the checks are about shapes and
        # running, and a language model's logits for a whole batch can be gigabytes
        dynamic = {i.name for i in graph_inputs(model) if i.dims[:1] == (None,)}
        lead = {np.shape(first[k])[:1] for k in shapes}
        one = len(lead) == 1 and all(k in dynamic for k in shapes)
        feed = {k: np.asarray(v)[:1] if (one or shapes[k][:1] == (1,)) and np.ndim(v) else np.asarray(v)
                for k, v in first.items() if k in shapes}
        return feed
    feed = random_feed(model, shapes, seed)
    if input_shapes is None:
        feed = sample_cache(model, feed)  # a decoder's cache starts empty (unless its shapes were given)
    if guessed and not is_lazy(model):
        # a large (lazily loaded) model is not run an extra time up front: a guess it cannot run on shows
        # when even its unpruned rewrite fails validation, and is reported then (containment.prune_validated)
        check_guess(model, feed, guessed)
    return feed


def check_guess(model: onnx.ModelProto, feed: dict[str, np.ndarray], guessed: list[str] | None = None) -> None:
    """InputError naming the input and --input-shapes when the original model cannot run on `feed`, whose
    dynamic dims were guessed (`guessed`: the inputs to name first; default: every input with a dynamic dim)."""
    inputs = {i.name: i for i in graph_inputs(model)}
    if guessed is None:
        guessed = [n for n, i in inputs.items() if None in i.dims]
    if not guessed:
        return
    try:
        got = [np.shape(o) for o in run(model, feed)]
        declared = declared_output_shapes(model, feed)
        if declared is not None and [tuple(d) for d in declared] != got:
            raise ValueError(f"its outputs have shapes {got}, not the {declared} it declares")
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises several types
        name = guessed[0]
        batch_only = bool(inputs[name].dims) and inputs[name].dims[0] is None and None not in inputs[name].dims[1:]
        example = "x".join(str(d) if d is not None else (("N" if batch_only else "1") if i == 0 else
                                                         n.upper() if n != "?" else "D")
                           for i, (d, n) in enumerate(zip(inputs[name].dims, inputs[name].names)))
        if batch_only:
            what = "a dynamic batch dim, and the model does not run with batch 1"
        else:
            what = "dynamic dims that cannot be guessed (the model does not run with 1 there"
            what += f": {first_line(exc)})"
        raise InputError(f"input {name!r} {inputs[name].text()} has {what}; give its shape with "
                         f"--input-shapes {name}:{example}") from None


def declared_output_shapes(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[tuple] | None:
    """Output shapes from the model's declarations, with symbolic dims bound by the feed; None if unknowable."""
    bound: dict[str, int] = {}
    for inp in model.graph.input:
        if inp.name not in feed:
            continue
        for d, n in zip(inp.type.tensor_type.shape.dim, np.shape(feed[inp.name])):
            if d.dim_param:
                bound[d.dim_param] = n
    shapes = []
    for out in model.graph.output:
        t = out.type.tensor_type
        if not t.HasField("shape"):
            return None
        dims = []
        for d in t.shape.dim:
            if d.HasField("dim_value") and d.dim_value > 0:
                dims.append(d.dim_value)
            elif d.dim_param in bound:
                dims.append(bound[d.dim_param])
            else:
                return None
        shapes.append(tuple(dims))
    return shapes
