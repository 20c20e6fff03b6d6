"""Short node names for tables: the part that tells layers apart, not the path every name shares.

Exporters name nodes by their module path: `/model/model/layers.3/mlp/gate_proj/MatMul`. In an 80-column table
every such name is cut to `/model/model/lay…`, the same for every group. `ShortNames` is built from all the
names a table shows and drops

- the leading segments that all of them share (`/model/model/`), but never a segment that holds a digit (a
  layer index such as `layers.3` or `h.0` tells layers apart even where every name has it);
- wrapper segments left in front (`model`, `module`, `base_model`, `_orig_mod`, as in `/model/lm_head`);
- a last segment that is only the op type (`MatMul`, `Conv`), which the column does not need.

A short name that would stand for two names keeps its op type, or its full form. Reports written with --json
keep the full names.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_WRAPPERS = {"model", "module", "base_model", "_orig_mod"}
_OP_TYPE = re.compile(r"[A-Z][A-Za-z]*")
_PATH = re.compile(r"/[^\s,:;()]+")  # a name inside a sentence (a reason): starts with '/'


def _segments(name: str) -> list[str]:
    return [s for s in name.split("/") if s]


class ShortNames:
    """`short(name)` for the names of one table (see the module docstring); names it was not built from are
    shortened by the same prefix."""

    def __init__(self, names: Iterable[str]):
        paths = [_segments(n) for n in dict.fromkeys(names) if "/" in n]
        prefix: list[str] = []
        if len(paths) > 1:
            for parts in zip(*(p[:-1] for p in paths)):  # a name keeps at least its last segment
                if len(set(parts)) > 1 or any(c.isdigit() for c in parts[0]):
                    break
                prefix.append(parts[0])
        self.prefix = prefix
        self._short: dict[str, str] = {}
        full = {n: self._shorten(n, keep_op=True) for n in {"/".join([""] + p) for p in paths}}
        short = {n: self._shorten(n, keep_op=False) for n in full}
        taken: dict[str, int] = {}
        for value in short.values():
            taken[value] = taken.get(value, 0) + 1
        for name in full:
            self._short[name] = short[name] if taken[short[name]] == 1 else full[name]

    def _shorten(self, name: str, keep_op: bool) -> str:
        parts = _segments(name)
        if "/" not in name:
            return name
        if parts[:len(self.prefix)] == self.prefix:
            parts = parts[len(self.prefix):]
        while len(parts) > 1 and parts[0] in _WRAPPERS:
            parts = parts[1:]
        if not keep_op and len(parts) > 1 and _OP_TYPE.fullmatch(parts[-1]):
            parts = parts[:-1]
        return "/".join(parts)

    def __call__(self, name: str) -> str:
        if name not in self._short:
            self._short[name] = self._shorten(name, keep_op=True)
        return self._short[name]

    def text(self, text: str) -> str:
        """`text` (a frozen group's reason) with the names in it shortened, op types kept."""
        return _PATH.sub(lambda m: self._shorten(m.group(0), keep_op=True), text)

    def listing(self, names: list[str], limit: int = 2) -> str:
        """The first `limit` names, a later one without the segments it shares with the first
        (`layers.0/self_attn/q_proj, k_proj`), and `+N` for the rest."""
        shown = [self(n) for n in names[:limit]]
        first = shown[0].split("/") if shown else []
        out = shown[:1]
        for name in shown[1:]:
            parts = name.split("/")
            common = 0
            while common < min(len(first), len(parts)) - 1 and first[common] == parts[common]:
                common += 1
            out.append("/".join(parts[common:]))
        return ", ".join(out) + (f" +{len(names) - limit}" if len(names) > limit else "")
