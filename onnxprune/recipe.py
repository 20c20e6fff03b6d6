"""The recipe: everything a prune does, as one small serialisable object.

The CLI builds a `Recipe` from options or a file (`prune --recipe FILE`, options given on the command line
override the file), `prune_model` receives it whole, every JSON report embeds the resolved recipe (so
`prune --recipe report.json` replays a run to the same bytes), and a sweep is a list of recipes.

Run settings that do not change what the model becomes (data, providers, output paths, `strict`,
`input_shapes`, `memory_budget`) are not part of a recipe.

Files are TOML or JSON. TOML for recipes written by hand: it has comments and typed values, and `tomllib`
is in the standard library from Python 3.11, so it costs no dependency (YAML would need PyYAML, and guesses
types: `no` reads as False and `1e-3` as a string in YAML 1.1). JSON because reports embed the recipe: any
JSON object with a "recipe" key (a `prune --json` report, a sweep candidate) is a recipe file too.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import numbers
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onnxprune.choices import (
    ALLOCATIONS,
    FINETUNE_LOSSES,
    FINETUNE_MODES,
    GQA_MODES,
    MODES,
    QUANTIZATIONS,
    RECOVERIES,
)
from onnxprune.errors import InputError
from onnxprune.pipeline.score import all_criteria

# A recipe has one budget: a ratio (with its head ratio), a MAC target, a parameter target, or (unstructured)
# a threshold. An override that names one budget drops the others it does not name.
BUDGETS = {"ratio": ("ratio", "head_ratio"), "target_macs": ("target_macs",),
           "target_params": ("target_params",), "target_latency": ("target_latency",), "threshold": ("threshold",)}


@dataclass(frozen=True)
class Recipe:
    """What a prune does. Frozen: a recipe is a value (hashable, safe to share between candidates)."""

    criterion: str | None = None      # None: hybrid with calibration data (structured), else l1
    ratio: float | None = None        # None: 0.5 unless a target (or, unstructured, a threshold) is given
    head_ratio: float | None = None   # attention-head groups lose this share of heads (None: ratio)
    target_macs: float | None = None  # keep this fraction of the MACs ...
    target_params: float | None = None  # ... or of the parameters
    allocate: str = "global"          # how a target is spread over groups
    global_ranking: bool = False      # rank channels across groups (with ratio)
    round_to: int = 1                 # keep channel counts at a multiple of this
    exclude: tuple[str, ...] = ()     # node-name globs whose output channels stay
    prune_hidden: bool = False        # prune the hidden size of transformers too
    recover: str = "none"             # retraining-free recovery: none, bias, lstsq
    mode: str = "structured"          # or unstructured (magnitude weight zeroing)
    threshold: float | None = None    # unstructured: zero |w| below this instead of a ratio
    quantize: str | None = None       # quantize the pruned model: int8 (= static), dynamic, fp16, int4
    seed: int = 0                     # random scores, sample choices in recovery
    gqa_mode: str = "auto"            # grouped-query attention: whole kv groups, query heads in them, or auto
    keep_kv_cache: bool = False       # decoders: keep the key/value cache shapes (prune no kv heads)
    # keep this fraction of the measured latency (0.5), or a time ("12ms"), measured on this provider, batch
    # and threads: they are recipe fields because the plan depends on where the model was timed
    target_latency: float | str | None = None
    latency_provider: str = "cpu"
    latency_batch: int = 1
    latency_threads: int = 1
    finetune: str = "none"            # distil the pruned model from the original: blockwise, end-to-end, both
    finetune_steps: int = 100         # optimizer steps per block (blockwise) and in all (end-to-end)
    finetune_lr: float = 1e-4         # AdamW learning rate (cosine schedule to zero)
    finetune_batch_size: int = 8      # samples per training batch
    finetune_temperature: float = 2.0  # softmax temperature of the KL loss on logits
    finetune_loss: str = "auto"       # end-to-end loss: auto (KL on logits, else MSE; + CE with labels) ...
    drop_blocks: float | None = None  # depth: drop this many residual blocks (>= 1) or this share of them (< 1)

    def __post_init__(self) -> None:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        checked = check_values(values, option_name)
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    # ---- reading and writing ------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "recipe") -> Recipe:
        """A recipe from a mapping of field names; unknown keys, wrong types and values out of range are an
        InputError naming `source` and the key."""
        if not isinstance(data, Mapping):
            raise InputError(f"{source}: a recipe is a table of keys, got {type(data).__name__}")
        for key in data:
            check_key(key, source)
        try:
            values = check_values(dict(data), repr, strict_types=True)
        except InputError as exc:
            raise InputError(f"{source}: {exc}") from None
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Every field, JSON-ready (the exclude patterns as a list)."""
        out = dataclasses.asdict(self)
        out["exclude"] = list(self.exclude)
        return out

    def key(self) -> str:
        """Canonical JSON text: equal recipes give equal keys (sweeps use it to skip work already done)."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    # ---- deriving recipes ---------------------------------------------------------------------------

    def replace(self, **changes: Any) -> Recipe:
        """A copy with `changes`; naming one budget (ratio, target_macs, target_params, threshold) drops the
        others this recipe had, so `--target-macs` on the command line replaces a file's ratio."""
        named = [b for b in BUDGETS if b in changes and changes[b] is not None]
        if named:
            for budget, keys in BUDGETS.items():
                if budget not in named:
                    for key in keys:
                        if key not in changes and not (budget == "ratio" and key == "head_ratio"
                                                       and "ratio" in named):
                            changes[key] = None
        unknown = set(changes) - set(field_names())
        if unknown:
            raise TypeError(f"Recipe has no field(s) {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)

    def without_budget(self) -> Recipe:
        """The same recipe with no ratio, head ratio, target or threshold (a search fills one in)."""
        return dataclasses.replace(self, **{k: None for keys in BUDGETS.values() for k in keys})

    def resolved(self, has_data: bool) -> Recipe:
        """Defaults made explicit: the criterion (hybrid with calibration data for a structured prune, else
        l1) and the ratio (0.5 when no other budget is given). A report embeds the resolved recipe, so a
        replay does not depend on whether data was passed."""
        changes: dict[str, Any] = {}
        if self.criterion is None:
            changes["criterion"] = "hybrid" if has_data and self.mode == "structured" else "l1"
        no_budget = (self.target_macs is None and self.target_params is None and self.threshold is None
                     and self.target_latency is None)
        if self.ratio is None and no_budget:
            changes["ratio"] = 0.0 if self.drop_blocks else 0.5  # depth alone: no width pruning
        return dataclasses.replace(self, **changes) if changes else self

    @property
    def target(self) -> tuple[str, float] | None:
        """('macs' | 'params', fraction kept) when the recipe has a budget target."""
        if self.target_macs is not None:
            return "macs", self.target_macs
        if self.target_params is not None:
            return "params", self.target_params
        return None

    def describe(self, fields: list[str] | None = None) -> str:
        """Short text of the fields that differ from the defaults (or of `fields`), for tables and plots."""
        default = Recipe()
        names = fields if fields is not None else [f for f in field_names()
                                                   if getattr(self, f) != getattr(default, f)]
        parts = []
        for name in names:
            value = getattr(self, name)
            if isinstance(value, bool):
                parts.append(name.replace("_", "-") if value else f"no-{name.replace('_', '-')}")
            elif isinstance(value, tuple):
                parts.append(f"{name}={','.join(value)}")
            elif value is not None:
                parts.append(f"{name}={value:g}" if isinstance(value, float) else f"{name}={value}")
        return " ".join(parts) or "defaults"


def check_key(key: str, source: str) -> None:
    """An InputError naming `source` unless `key` is a recipe field (with the closest field as a hint)."""
    known = field_names()
    if key not in known:
        close = difflib.get_close_matches(str(key), known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f" (known keys: {', '.join(known)})"
        raise InputError(f"{source}: unknown key {key!r}{hint}")


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(Recipe)]


def default(name: str) -> Any:
    return next(f.default for f in dataclasses.fields(Recipe) if f.name == name)


def option_name(key: str) -> str:
    """The command-line option of a recipe field: 'round_to' -> '--round-to' ('global_ranking' is --global)."""
    return "--global" if key == "global_ranking" else "--" + key.replace("_", "-")


def as_recipe(recipe: Recipe | float | None, options: Mapping[str, Any], default_criterion: str = "l1") -> Recipe:
    """The recipe prune_model runs: `recipe` with keyword `options` applied, or a Recipe built from the
    options alone (then the criterion defaults to `default_criterion`, l1 as before recipes). A number in
    the recipe's place is the ratio, as prune_model's second argument was before recipes."""
    if isinstance(recipe, (int, float)) and not isinstance(recipe, bool):
        options = {"ratio": float(recipe), **options}
        recipe = None
    if recipe is None:
        return Recipe(**{"criterion": default_criterion, **options})
    if not isinstance(recipe, Recipe):
        raise TypeError(f"expected a Recipe, got {type(recipe).__name__}")
    return recipe.replace(**options) if options else recipe


# ---- files ---------------------------------------------------------------------------------------------

def load_recipe(path: str | Path) -> Recipe:
    """Read a recipe from a TOML or JSON file; a JSON object with a "recipe" key (a report) gives that."""
    path = Path(path)
    data = read_table(path, "recipe")
    source = str(path)
    if isinstance(data, dict) and isinstance(data.get("recipe"), dict):
        data, source = data["recipe"], f"{path} (recipe)"
    return Recipe.from_dict(data, source)


def read_table(path: Path, what: str) -> dict:
    """The top-level table of a TOML (.toml) or JSON (anything else) file, as a dict; errors name the file."""
    if not path.is_file():
        raise InputError(f"{what} file not found: {path}")
    text = path.read_bytes()
    if path.suffix.lower() == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            try:
                import tomli as tomllib  # type: ignore[no-redef]
            except ImportError:
                raise InputError(f"{path}: TOML needs Python 3.11 or `pip install tomli`; JSON works everywhere") \
                    from None
        try:
            data = tomllib.loads(text.decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise InputError(f"{path}: not valid TOML ({exc})") from None
    else:
        try:
            data = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            hint = " (TOML files need the .toml suffix)" if path.suffix.lower() != ".json" else ""
            raise InputError(f"{path}: not valid JSON ({exc}){hint}") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a table of keys at the top, got {type(data).__name__}")
    return data


# ---- validation ----------------------------------------------------------------------------------------

def _number(value, label: str, strict: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputError(f"{label} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise InputError(f"{label} must be finite, got {value}")
    return value


def _integer(value, label: str, strict: bool) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if not strict and isinstance(value, float) and value.is_integer():
            return int(value)
        raise InputError(f"{label} must be an integer, got {value!r}")
    return int(value)


def _boolean(value, label: str, strict: bool) -> bool:
    if not isinstance(value, bool):
        raise InputError(f"{label} must be true or false, got {value!r}")
    return value


def _string(value, label: str, strict: bool) -> str:
    if not isinstance(value, str):
        raise InputError(f"{label} must be a string, got {value!r}")
    return value


def _strings(value, label: str, strict: bool) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise InputError(f"{label} must be a list of strings, got {value!r}")
    return tuple(value)


def _choice(choices: Callable[[], tuple[str, ...]] | tuple[str, ...]):
    def check(value: str, label: str) -> None:
        options = choices() if callable(choices) else choices
        if value not in options:
            raise InputError(f"{label} must be one of {', '.join(options)}; got {value!r}")
    return check


def _criteria() -> tuple[str, ...]:
    return tuple(all_criteria())


_MS = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*ms\s*$", re.IGNORECASE)


def latency_ms(value) -> float | None:
    """'12ms' -> 12.0; None for anything that is not a time in milliseconds."""
    match = _MS.match(value) if isinstance(value, str) else None
    return float(match.group(1)) if match else None


def _latency_target(value, label: str, strict: bool) -> float | str:
    """A fraction of the measured latency in (0, 1] (a number, or its text), or milliseconds as "12ms"."""
    if isinstance(value, str):
        ms = latency_ms(value)
        if ms is not None:
            if ms <= 0:
                raise InputError(f"{label} must be a positive time, got {value!r}")
            return f"{ms:g}ms"
        try:
            value = float(value)
        except ValueError:
            raise InputError(f"{label} takes a fraction of the latency (0.5) or a time (12ms), got {value!r}") \
                from None
    value = _number(value, label, strict)
    _fraction_kept(value, label)
    return value


def _provider(value: str, label: str) -> None:
    from onnxprune.runtime.session import PROVIDERS

    if value.strip().lower() not in PROVIDERS and value not in PROVIDERS.values():
        raise InputError(f"{label} must be one of {', '.join(PROVIDERS)}; got {value!r}")


def _fraction_open(value: float, label: str) -> None:   # [0, 1)
    if not 0.0 <= value < 1.0:
        raise InputError(f"{label} must be in [0, 1), got {value}")


def _fraction_kept(value: float, label: str) -> None:   # (0, 1]
    if not 0.0 < value <= 1.0:
        raise InputError(f"{label} is the fraction to keep, in (0, 1]; got {value}")


def _positive(value: float, label: str) -> None:
    if value <= 0:
        raise InputError(f"{label} must be > 0, got {value}")
def _block_count(value: float, label: str) -> None:   # a count of blocks, or a share of them in [0, 1)
    if value < 0 or (value >= 1 and not float(value).is_integer()):
        raise InputError(f"{label} is a number of blocks (1, 2, ...) or a share of them in [0, 1), got {value:g}")


def _at_least(low):
    def check(value, label: str) -> None:
        if value < low:
            raise InputError(f"{label} must be >= {low}, got {value}")
    return check


# field -> (type check, value check or None, may be None)
_SPECS: dict[str, tuple[Callable, Callable | None, bool]] = {
    "criterion": (_string, _choice(_criteria), True),
    "ratio": (_number, _fraction_open, True),
    "head_ratio": (_number, _fraction_open, True),
    "target_macs": (_number, _fraction_kept, True),
    "target_params": (_number, _fraction_kept, True),
    "allocate": (_string, _choice(ALLOCATIONS), False),
    "global_ranking": (_boolean, None, False),
    "round_to": (_integer, _at_least(1), False),
    "exclude": (_strings, None, False),
    "prune_hidden": (_boolean, None, False),
    "recover": (_string, _choice(RECOVERIES), False),
    "mode": (_string, _choice(MODES), False),
    "threshold": (_number, _at_least(0), True),
    "quantize": (_string, _choice(QUANTIZATIONS), True),
    "seed": (_integer, _at_least(0), False),
    "gqa_mode": (_string, _choice(GQA_MODES), False),
    "keep_kv_cache": (_boolean, None, False),
    "target_latency": (_latency_target, None, True),
    "latency_provider": (_string, _provider, False),
    "latency_batch": (_integer, _at_least(1), False),
    "latency_threads": (_integer, _at_least(1), False),
    "finetune": (_string, _choice(FINETUNE_MODES), False),
    "finetune_steps": (_integer, _at_least(1), False),
    "finetune_lr": (_number, _positive, False),
    "finetune_batch_size": (_integer, _at_least(1), False),
    "finetune_temperature": (_number, _positive, False),
    "finetune_loss": (_string, _choice(FINETUNE_LOSSES), False),
    "drop_blocks": (_number, _block_count, True),
}


def check_values(values: dict[str, Any], label: Callable[[str], str], strict_types: bool = False,
                 rules: bool = True) -> dict[str, Any]:
    """Type- and range-check recipe `values` (a partial dict is fine), then (with `rules`) the rules between
    fields; returns them normalised (ints as floats for fractions, lists as tuples, quantize "none" as None).
    `label(key)` names a field in messages: an option (--ratio) or a file's key."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        kind, check, nullable = _SPECS[key]
        if key == "quantize" and value == "none":  # TOML has no null: "none" means no quantization
            value = None
        if value is None:
            if not nullable:
                raise InputError(f"{label(key)} must be given a value, got nothing")
            out[key] = None
            continue
        value = kind(value, label(key), strict_types)
        if check is not None:
            check(value, label(key))
        out[key] = value
    if rules:
        _check_rules({**{f: default(f) for f in _SPECS}, **out}, label)
    return out


def _check_rules(r: dict[str, Any], label: Callable[[str], str]) -> None:
    if r["mode"] == "structured":
        budgets = [k for k in ("ratio", "target_macs", "target_params", "target_latency") if r[k] is not None]
        if len(budgets) > 1:
            raise InputError(f"give one of {label('ratio')}, {label('target_macs')}, {label('target_params')}, "
                             f"{label('target_latency')} (got {', '.join(label(k) for k in budgets)})")
        if r["head_ratio"] is not None and (r["target_macs"] is not None or r["target_params"] is not None
                                            or r["target_latency"] is not None):
            raise InputError(f"{label('head_ratio')} goes with {label('ratio')}, not with "
                             f"{label('target_macs')}/{label('target_params')}/{label('target_latency')}")
        if r["target_latency"] is not None and r["allocate"] == "uniform":
            raise InputError(f"{label('allocate')} uniform spreads a MAC or parameter target evenly; "
                             f"{label('target_latency')} allocates by measured latency (global scores or "
                             "sensitivity)")
        if r["threshold"] is not None:
            raise InputError(f"{label('threshold')} is for {label('mode')} unstructured")
        return
    if r["drop_blocks"]:
        raise InputError(f"{label('drop_blocks')} is for structured pruning")
    if r["head_ratio"] is not None:
        raise InputError(f"{label('head_ratio')} goes with {label('ratio')} (structured), "
                         f"not with {label('mode')} unstructured")
    if r["prune_hidden"]:
        raise InputError(f"{label('prune_hidden')} is for structured pruning")
    if r["finetune"] != "none":  # training would fill the zeroed weights in again
        raise InputError(f"{label('finetune')} is for structured pruning")
    extra = [k for k, bad in (("recover", r["recover"] != "none"), ("target_macs", r["target_macs"] is not None),
                              ("target_params", r["target_params"] is not None),
                              ("target_latency", r["target_latency"] is not None),
                              ("criterion", r["criterion"] not in (None, "l1")),
                              ("allocate", r["allocate"] != "global"), ("global_ranking", r["global_ranking"]),
                              ("round_to", r["round_to"] != 1)) if bad]
    if extra:
        raise InputError(f"{label('mode')} unstructured prunes weights by magnitude only; drop "
                         f"{', '.join(label(k) for k in extra)}")
    if r["ratio"] is not None and r["threshold"] is not None:
        raise InputError(f"give one of {label('ratio')} and {label('threshold')} with {label('mode')} unstructured")
