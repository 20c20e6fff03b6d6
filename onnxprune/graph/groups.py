"""Channel spaces, the members that slice with them, and the groups they form.

A *space* is opened where a layer creates channels (a Conv's output channels, a Gemm's output features).
Joins (a residual Add, an SE gate Mul) merge spaces with a union-find; the merged spaces are a
`ChannelGroup`. A `Member` is one constant input of one node that must be sliced along one axis when the
group loses channels. Freezing records a reason; a group with any reason is not pruned.

Grouped-query attention couples two spaces of different sizes: H_q = g·H_kv query heads read H_kv key/value heads,
query heads j·g .. j·g+g-1 the k/v head j (`couple`). How the coupling is pruned is a mode (`resolve_coupling`):
"kv-groups" folds the k/v space into the query space (their segments become folded, see layout.py) and prunes
whole KV groups of g heads; "query-heads" freezes the k/v heads and prunes query heads evenly inside every KV group
(the query space in H_kv blocks of whole heads).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from onnxprune.graph.layout import ChannelAxis


@dataclass
class Member:
    node: str            # node name
    op_type: str
    input_index: int     # which input of the node is the constant
    tensor: str          # the constant's name
    axis: int
    layout: ChannelAxis
    role: str            # "out": creates the channels; "in": reads them; "pass": carries them (BN, bias)
    scored: bool = True  # biases and running statistics do not take part in magnitude scores


@dataclass(frozen=True)
class Repeat:
    """An Expand that repeats its input along `axis` (length 1 -> `count`): repeat_kv of grouped-query attention."""

    node: str
    axis: int
    count: int


@dataclass(frozen=True)
class HeadRepeat:
    """k/v heads repeated for their query heads: Expand `expand` (k/v heads on `kv_axis` of its output, the repeat
    on `kv_axis + 1`), merged by a Reshape into `query_tensor`, one head per query head. The rewrite sets the
    repeat count to the query heads kept per k/v head kept."""

    expand: str
    kv_axis: int
    kv_tensor: str     # the Expand's input (k/v heads)
    query_tensor: str  # the Reshape's output (query heads)


@dataclass
class Space:
    size: int
    source: str              # node that opened it
    op_type: str
    reasons: list[str] = field(default_factory=list)
    # Grouped convolutions split channels into `blocks` equal blocks: every block keeps the same number of
    # channels, and with `tied` the same local indices (the conv's weight is shared along its input axis).
    blocks: int = 1
    tied: bool = False
    # Attention features split into heads of `unit` consecutive channels: whole heads go or stay, because the
    # head_dim axis of every [.., H, D] tensor (and the attention scale, 1/sqrt(D)) must not change.
    unit: int = 1
    # A query space of grouped-query attention: its heads read the k/v heads of space `kv`, `per_kv` query heads
    # of `head_dim` features per k/v head (until resolve_coupling settles it)
    kv: int | None = None
    per_kv: int = 0
    head_dim: int = 0
    kv_groups: int = 0  # after resolve_coupling: how many KV groups the query heads form
    gqa_mode: str = ""
    gqa_auto: bool = False  # gqa_mode was chosen by "auto"


@dataclass
class ChannelGroup:
    id: int
    size: int
    spaces: list[int]
    sources: list[str]
    members: list[Member]
    reasons: list[str]
    tensors: list[str]
    blocks: int = 1
    tied: bool = False
    unit: int = 1  # channels go in whole units (attention heads of `unit` features)
    head_dim: int = 0   # grouped-query attention: features per head,
    kv_groups: int = 0  # the number of KV groups the query heads form,
    gqa_mode: str = ""  # and how they prune ("kv-groups": whole groups; "query-heads": evenly inside each)
    gqa_auto: bool = False  # the mode was chosen by gqa_mode "auto" (its head steps are shared out over layers)

    @property
    def prunable(self) -> bool:
        return not self.reasons and self.size > 1

    @property
    def reason(self) -> str:
        if self.reasons:
            return "; ".join(dict.fromkeys(self.reasons))
        return "only one channel" if self.size <= 1 else ""

    def __str__(self) -> str:
        state = "prunable" if self.prunable else f"frozen ({self.reason})"
        if self.kv_groups:
            return (f"group {self.id}: {self.size // self.head_dim} heads of {self.head_dim} in {self.kv_groups} KV "
                    f"groups ({self.gqa_mode}) from {', '.join(self.sources[:3])}: {state}")
        if self.unit > 1:
            return (f"group {self.id}: {self.size // self.unit} heads of {self.unit} from "
                    f"{', '.join(self.sources[:3])}: {state}")
        return f"group {self.id}: {self.size} channels from {', '.join(self.sources[:3])}: {state}"


class SpaceSet:
    """Union-find over spaces; a union of spaces of different sizes freezes both."""

    def __init__(self) -> None:
        self.spaces: list[Space] = []
        self._parent: list[int] = []

    def new(self, size: int, source: str, op_type: str, reason: str | None = None) -> int:
        self.spaces.append(Space(size, source, op_type, [reason] if reason else []))
        self._parent.append(len(self._parent))
        return len(self._parent) - 1

    def find(self, i: int) -> int:
        while self._parent[i] != i:
            self._parent[i] = self._parent[self._parent[i]]
            i = self._parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        sa, sb = self.spaces[ra], self.spaces[rb]
        if sa.size != sb.size:
            reason = f"joined with channels of a different count ({sa.size} vs {sb.size})"
            sa.reasons.append(reason)
            sb.reasons.append(reason)
        lo, hi = min(ra, rb), max(ra, rb)
        self._parent[hi] = lo
        self.spaces[lo].reasons.extend(self.spaces[hi].reasons)
        self.spaces[hi].reasons = []
        self.constrain(lo, self.spaces[hi].blocks, self.spaces[hi].tied)
        self.constrain_unit(lo, self.spaces[hi].unit)
        moved = self.spaces[hi]
        if moved.kv is not None:
            moved.kv, kv = None, moved.kv
            self.couple(lo, kv, moved.per_kv, moved.head_dim)

    def constrain(self, i: int, blocks: int, tied: bool) -> None:
        space = self.spaces[self.find(i)]
        if blocks <= 1:
            return
        if space.blocks > 1 and space.blocks != blocks:
            space.reasons.append(f"read by grouped layers with different group counts ({space.blocks}, {blocks})")
            return
        if space.unit > 1 and (space.size % blocks or space.size // blocks % space.unit):
            space.reasons.append(f"{blocks} blocks do not hold whole heads of {space.unit}")
            return
        space.blocks = blocks
        space.tied = space.tied or tied

    def constrain_unit(self, i: int, unit: int) -> None:
        """Channels of space `i` go in whole units of `unit` consecutive channels (heads)."""
        space = self.spaces[self.find(i)]
        if unit <= 1 or unit == space.unit:
            return
        merged = math.lcm(unit, space.unit)
        if space.size % merged:
            space.reasons.append(f"split into heads of {space.unit} and of {unit} features")
            return
        if space.blocks > 1 and (space.tied or space.size // space.blocks % merged):
            space.reasons.append("both grouped-convolution blocks and attention heads")
            return
        space.unit = merged

    def couple(self, queries: int, kv: int, per_kv: int, head_dim: int) -> None:
        """Heads of `head_dim` features: query head h of space `queries` reads k/v head h // `per_kv` of space `kv`.

        One head each (per_kv 1) is an ordinary join. Two couplings of one query space in the same grouping (its
        keys and its values) make the k/v spaces lose the same heads."""
        if per_kv == 1:
            self.union(queries, kv)
            return
        root = self.spaces[self.find(queries)]
        self.constrain_unit(queries, head_dim)
        self.constrain_unit(kv, head_dim)
        if self.find(kv) == self.find(queries):
            root.reasons.append("query and key/value heads are the same channels")
        elif root.kv is None:
            root.kv, root.per_kv, root.head_dim = kv, per_kv, head_dim
        elif (root.per_kv, root.head_dim) == (per_kv, head_dim):
            self.union(root.kv, kv)
        else:
            root.reasons.append(f"query heads read key/value heads in two groupings ({root.per_kv} and {per_kv} "
                                "query heads per key/value head)")

    def fold(self, kv: int, queries: int) -> None:
        """Make the (already folded) k/v space `kv` part of the query space's group, which keeps its own size and
        constraints; the lower index stays the root, as in `union`."""
        rk, rq = self.find(kv), self.find(queries)
        lo, hi = min(rk, rq), max(rk, rq)
        if lo == rk:
            q, k = self.spaces[rq], self.spaces[rk]
            for name in ("size", "blocks", "tied", "unit", "head_dim", "kv_groups", "gqa_mode", "gqa_auto"):
                setattr(k, name, getattr(q, name))
        self._parent[hi] = lo
        self.spaces[lo].reasons.extend(r for r in self.spaces[hi].reasons if r not in self.spaces[lo].reasons)
        self.spaces[hi].reasons = []

    def freeze(self, i: int, reason: str) -> None:
        reasons = self.spaces[self.find(i)].reasons
        if reason not in reasons:
            reasons.append(reason)

    def reasons(self, i: int) -> list[str]:
        return self.spaces[self.find(i)].reasons

    def roots(self) -> list[int]:
        return sorted({self.find(i) for i in range(len(self._parent))})
