"""Where a channel space's channels sit along one axis of a tensor.

A tensor axis that carries prunable channels is described by a `ChannelAxis`: its length and a list of
`Segment`s. A segment says that the channels of one space occupy the positions

    offset + sum(o_i * stride_i) + c * inner + j        for c < channels, j < inner, o_i < count_i

`inner` is how many features one channel became (Flatten of C×H×W gives inner = H·W), the `outers` are
blocks repeated in front of it (Flatten of H×W×C in NHWC order gives one outer of H·W blocks of stride C).
Concat shifts offsets; Split and Slice cut the axis at segment boundaries. Every position of an axis belongs
to exactly one segment, so a tensor built from a frozen input still has a (frozen) segment for it.

Attention heads: a Reshape of H·D features into [H, D] leaves the space on the head axis, where channel c sits
at position c // D (`divisor` = D). Such a space is pruned in whole heads only (its `unit` in groups.py), so the
D axis never changes and the head axis loses exactly the heads whose channels all went. Merging [H, D] back
(trailing = D) gives the plain, one-position-per-channel segment again.

Grouped-query attention: the key/value heads of a KV group are read by `g` query heads. Pruned by whole KV groups,
the k/v tensors' segments are *folded* into the query space (`fold` = (g, D)): query channel c (head c // D)
stands for k/v channel (c // (g·D))·D + c % D, so the g query heads of a KV group share its k/v positions and a
k/v position survives exactly when its KV group does.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np


@dataclass(frozen=True)
class Segment:
    space: int
    channels: int
    inner: int = 1
    offset: int = 0
    outers: tuple[tuple[int, int], ...] = ()
    modulo: int = 0  # > 0: channel c sits at local index c % modulo (a grouped conv's weight, axis 1)
    divisor: int = 0  # > 0: channel c sits at index c // divisor (the head axis of H·D attention features)
    fold: tuple[int, int] = ()  # (g, D): query channel c stands for k/v channel (c // (g·D))·D + c % D

    @property
    def base_channels(self) -> int:
        """Channels the positions are computed from: the k/v channels of a folded segment."""
        return self.channels // self.fold[0] if self.fold else self.channels

    @property
    def slots(self) -> int:
        """Distinct channel indices along the axis before `inner` and `outers` (heads, local indices or channels)."""
        if self.modulo:
            return self.modulo
        if self.divisor:
            return self.base_channels // self.divisor
        return self.base_channels

    @property
    def size(self) -> int:
        n = self.slots * self.inner
        for count, _ in self.outers:
            n *= count
        return n

    def positions(self, channels: np.ndarray | None = None) -> np.ndarray:
        """Positions along the axis of the given channels (all when None), as an array [n_channels, per_channel]."""
        chans = np.arange(self.channels) if channels is None else np.asarray(channels, dtype=np.int64)
        if self.fold:
            group, head = self.fold
            chans = chans // (group * head) * head + chans % head
        if self.modulo:
            chans = chans % self.modulo
        if self.divisor:
            chans = chans // self.divisor
        pos = self.offset + chans[:, None] * self.inner + np.arange(self.inner)[None, :]
        for count, stride in self.outers:
            pos = (pos[:, None, :] + (np.arange(count) * stride)[None, :, None]).reshape(len(chans), -1)
        return pos

    def span(self) -> tuple[int, int]:
        """Smallest and one-past-largest position."""
        last = self.offset + self.slots * self.inner - 1 + sum((c - 1) * s for c, s in self.outers)
        return self.offset, last + 1

    def shifted(self, delta: int) -> "Segment":
        return replace(self, offset=self.offset + delta)

    def expanded(self, trailing: int, leading: int, axis_length: int) -> "Segment":
        """The segment after the axis is merged with `leading` dims before it and `trailing` dims after it."""
        outers = tuple((c, s * trailing) for c, s in self.outers)
        if leading > 1:
            outers = outers + ((leading, axis_length * trailing),)
        if self.divisor and self.inner == 1 and trailing == self.divisor:
            # [H, D] merged back into H·D features: channel c is at h·D + (c % D) = c again
            return Segment(self.space, self.channels, 1, self.offset * trailing, outers, self.modulo, fold=self.fold)
        return Segment(self.space, self.channels, self.inner * trailing, self.offset * trailing, outers, self.modulo,
                       self.divisor, self.fold)

    def folded(self, space: int, group: int, head: int) -> "Segment":
        """This k/v segment in the coordinates of the query space it is folded into (see the module docstring)."""
        return replace(self, space=space, channels=self.channels * group, fold=(group, head))

    def same_structure(self, other: "Segment") -> bool:
        return (self.channels, self.inner, self.offset, self.outers, self.modulo, self.divisor, self.fold) == (
            other.channels, other.inner, other.offset, other.outers, other.modulo, other.divisor, other.fold)


@dataclass(frozen=True)
class ChannelAxis:
    """The channel-carrying axis of one tensor: its index (non-negative), length and segments."""

    axis: int
    length: int
    segments: tuple[Segment, ...]

    def with_axis(self, axis: int) -> "ChannelAxis":
        return replace(self, axis=axis)

    def spaces(self) -> list[int]:
        return [s.space for s in self.segments]

    def expanded(self, new_axis: int, trailing: int, leading: int) -> "ChannelAxis":
        segs = tuple(s.expanded(trailing, leading, self.length) for s in self.segments)
        return ChannelAxis(new_axis, self.length * trailing * leading, segs)

    def cut(self, start: int, stop: int) -> "ChannelAxis | None":
        """The part in [start, stop), or None when a segment straddles a boundary."""
        inside = []
        for seg in self.segments:
            lo, hi = seg.span()
            if lo >= start and hi <= stop:
                inside.append(seg.shifted(-start))
            elif hi <= start or lo >= stop:
                continue
            else:
                pos = seg.positions()
                if pos.min() >= start and pos.max() < stop:
                    inside.append(seg.shifted(-start))
                elif pos.max() < start or pos.min() >= stop or not ((pos >= start) & (pos < stop)).any():
                    continue
                else:
                    return None
        return ChannelAxis(0, stop - start, tuple(inside))

    def kept_positions(self, kept: dict[int, np.ndarray], find) -> np.ndarray:
        """Sorted positions that survive, given kept channel indices per (root) space."""
        parts = []
        for seg in self.segments:
            root = find(seg.space)
            chans = kept.get(root)
            parts.append(seg.positions(chans).ravel())
        if not parts:
            return np.arange(self.length)
        return np.unique(np.concatenate(parts))


def concat_axes(parts: list[ChannelAxis], axis: int) -> ChannelAxis:
    segs: list[Segment] = []
    offset = 0
    for part in parts:
        segs.extend(s.shifted(offset) for s in part.segments)
        offset += part.length
    return ChannelAxis(axis, offset, tuple(segs))
