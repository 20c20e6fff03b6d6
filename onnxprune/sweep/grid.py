"""Candidates of a sweep: recipes from comma lists on the command line or a grid file.

Every combination of the listed values is a candidate, except that budgets are alternatives: `--ratio
0.25,0.5 --target-macs 0.4` gives three budgets (two ratios and one MAC target), not their product, since a
recipe has one budget (`--target-latency 0.8,0.6,0.4` or `12ms,8ms` is a budget axis too). Combinations
that are not valid recipes (`--mode unstructured` with `--recover lstsq`) are skipped with their reason; recipes that resolve to the same one are tried once.

A grid file (TOML, or JSON with the same keys):

    [base]            # fields every candidate shares (a recipe)
    recover = "lstsq"

    [grid]            # lists: every combination, as the comma lists are
    ratio = [0.25, 0.5, 0.75]
    criterion = ["l1", "hybrid"]

    [[candidate]]     # extra candidates, each a recipe over [base]
    target_macs = 0.4
    allocate = "sensitivity"
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onnxprune.errors import InputError
from onnxprune.recipe import Recipe, check_key, check_values, field_names, option_name, read_table

BUDGET_KEYS = ("ratio", "target_macs", "target_params", "target_latency", "threshold")


@dataclass
class Grid:
    base: dict[str, Any] = field(default_factory=dict)          # recipe fields every candidate has
    lists: dict[str, list[Any]] = field(default_factory=dict)   # field -> values to combine
    extra: list[dict[str, Any]] = field(default_factory=list)   # explicit candidates over `base`


def parse_list(key: str, text: str) -> list[Any]:
    """'0.25,0.5' for --ratio -> [0.25, 0.5], each value checked as the recipe field `key` is."""
    kind = type(Recipe.__dataclass_fields__[key].default)
    values: list[Any] = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            raise InputError(f"{option_name(key)} takes a comma-separated list, got {text!r}")
        value: Any = item
        if key in ("ratio", "head_ratio", "target_macs", "target_params", "threshold", "drop_blocks"):
            value = _convert(float, item, key)
        elif key in ("round_to", "seed") or kind is int:
            value = _convert(int, item, key)
        elif kind is float:
            value = _convert(float, item, key)
        elif kind is bool:
            if item.lower() not in ("true", "false", "yes", "no", "on", "off"):
                raise InputError(f"{option_name(key)} takes true/false values, got {item!r}")
            value = item.lower() in ("true", "yes", "on")
        elif key == "criterion" and item == "default":
            value = None
        if key in BUDGET_KEYS + ("head_ratio",) and item.lower() == "none":
            value = None
        values.append(check_values({key: value}, option_name, rules=False)[key])
    return values


def _convert(kind, item: str, key: str):
    try:
        return kind(item)
    except ValueError:
        raise InputError(f"{option_name(key)}: {item!r} is not {'an integer' if kind is int else 'a number'}") \
            from None


def load_grid(path: str | Path) -> Grid:
    """A Grid from a TOML or JSON file; unknown sections or keys, and values that are not valid for their
    recipe field, are one-line errors naming the file and the key."""
    path = Path(path)
    data = read_table(path, "grid")
    unknown = set(data) - {"base", "grid", "candidate"}
    if unknown:
        raise InputError(f"{path}: unknown section {min(unknown)!r} (a grid file has [base], [grid] and "
                         "[[candidate]])")
    base = data.get("base", {})
    Recipe.from_dict(base, f"{path} [base]")
    lists: dict[str, list[Any]] = {}
    grid = data.get("grid", {})
    if not isinstance(grid, dict):
        raise InputError(f"{path}: [grid] must be a table of lists")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise InputError(f"{path} [grid]: {key!r} must be a non-empty list of values")
        check_key(key, f"{path} [grid]")
        try:
            lists[key] = [check_values({key: v}, repr, strict_types=True, rules=False)[key] for v in values]
        except InputError as exc:
            raise InputError(f"{path} [grid]: {exc}") from None
    extra = data.get("candidate", [])
    if not isinstance(extra, list) or not all(isinstance(c, dict) for c in extra):
        raise InputError(f"{path}: [[candidate]] entries must be tables")
    for i, entry in enumerate(extra):
        Recipe.from_dict(entry, f"{path} [[candidate]] {i + 1}")
    return Grid(dict(base), lists, [dict(c) for c in extra])


def expand(base: Recipe, grid: Grid, has_data: bool) -> tuple[list[Recipe], list[str]]:
    """The distinct resolved recipes of the grid over `base`, in order, and why skipped combinations were."""
    base = base.replace(**grid.base) if grid.base else base
    budgets = [{key: value} for key in BUDGET_KEYS for value in grid.lists.get(key, [])]
    others = {k: v for k, v in grid.lists.items() if k not in BUDGET_KEYS}
    combos: list[dict[str, Any]] = []
    for values in itertools.product(*(others[k] for k in others)):
        changes = dict(zip(others, values))
        for budget in budgets or [{}]:
            combos.append({**changes, **budget})
    if not grid.lists:
        combos = [] if grid.extra else [{}]
    combos += grid.extra
    recipes: list[Recipe] = []
    seen: set[str] = set()
    skipped: list[str] = []
    for changes in combos:
        try:
            recipe = base.replace(**changes).resolved(has_data)
        except InputError as exc:
            skipped.append(f"{_describe(changes)}: {exc}")
            continue
        if recipe.key() not in seen:
            seen.add(recipe.key())
            recipes.append(recipe)
    return recipes, skipped


def _describe(changes: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in changes.items()) or "base recipe"


def varying_fields(recipes: list[Recipe]) -> list[str]:
    """The recipe fields whose value differs between `recipes` (what tells candidates apart)."""
    names = [n for n in field_names() if len({repr(getattr(r, n)) for r in recipes}) > 1]
    return names or ["ratio"]

