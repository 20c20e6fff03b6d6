"""Channel spaces, the members that slice with them, and the groups they form.

A *space* is opened where a layer creates channels (a Conv's output channels, a Gemm's output features).
Joins (a residual Add, an SE gate Mul) merge spaces with a union-find; the merged spaces are a
`ChannelGroup`. A `Member` is one constant input of one node that must be sliced along one axis when the
group loses channels. Freezing records a reason; a group with any reason is not pruned.
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

    def constrain(self, i: int, blocks: int, tied: bool) -> None:
        space = self.spaces[self.find(i)]
        if blocks <= 1:
            return
        if space.blocks > 1 and space.blocks != blocks:
            space.reasons.append(f"read by grouped layers with different group counts ({space.blocks}, {blocks})")
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
        if space.blocks > 1:
            space.reasons.append("both grouped-convolution blocks and attention heads")
            return
        space.unit = merged

    def freeze(self, i: int, reason: str) -> None:
        reasons = self.spaces[self.find(i)].reasons
        if reason not in reasons:
            reasons.append(reason)

    def reasons(self, i: int) -> list[str]:
        return self.spaces[self.find(i)].reasons

    def roots(self) -> list[int]:
        return sorted({self.find(i) for i in range(len(self._parent))})
