"""Tied groups: two channel groups that must keep the same width.

Many attention blocks read their inner width from the input (``B, N, C = x.shape`` and then
``qkv.reshape(B, N, 3, heads, C // heads)`` or ``x.reshape(B, N, C)``: CAFormer, DaViT, Twins, PVT-v2,
CoaT). Torch-Pruning puts the attention's inner channels (qkv heads) and the residual stream that
feeds it in different groups, so cutting one without the other breaks the reshape. Freezing both
leaves the whole stage uncut; tying them keeps them prunable: the residual group (the *leader*) is cut
as the solver says, and every attention group tied to it (a *follower*) keeps the same width, spread
over its heads. Ties are found by the trial cut (:mod:`pruning.probe`): a cut that breaks the
attention when the widths differ and works when they are equal.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

from pruning.groups import Allocation, Cut, GroupInfo

Ties = dict[str, str]  # follower root -> leader root


def leaders(groups: Iterable[GroupInfo], ties: Ties) -> dict[int, list[GroupInfo]]:
    """Leader group index -> its follower groups (ties whose groups are both still prunable)."""
    by_root = {g.root: g for g in groups}
    out: dict[int, list[GroupInfo]] = {}
    for follower, leader in ties.items():
        if follower in by_root and leader in by_root:
            out.setdefault(by_root[leader].index, []).append(by_root[follower])
    return out


def tie_step(leader: GroupInfo, fols: list[GroupInfo], align: int = 1) -> int:
    """Kept widths of a tied set are multiples of this: the leader's alignment and every follower's heads."""
    return math.lcm(align, leader.ch_groups, *(f.ch_groups for f in fols))


def closure(groups: list[GroupInfo], ties: Ties, indices: set[int]) -> set[int]:
    """``indices`` plus every group tied to one of them (a tied set is cut together or not at all)."""
    out = set(indices)
    for lead, fols in leaders(groups, ties).items():
        members = {lead} | {f.index for f in fols}
        if out & members:
            out |= members
    return out


def apply_ties(groups: list[GroupInfo], ties: Ties, alloc: Allocation, align: Callable[[GroupInfo], int] | None = None,
               min_head_dim: int = 1) -> Allocation:
    """``alloc`` with every follower cut to its leader's kept width (rounded down to :func:`tie_step`,
    never below ``min_head_dim`` per head); followers lose head dims only, never whole heads."""
    if not ties:
        return alloc
    out = dict(alloc)
    for lead_index, fols in leaders(groups, ties).items():
        lead = groups[lead_index]
        step = tie_step(lead, fols, align(lead) if align else 1)
        kept = lead.kept(out.get(lead_index, Cut()))
        kept -= kept % step
        floor = max(f.ch_groups * min(min_head_dim, f.channels) for f in fols)
        kept = min(lead.full, max(kept, -(-floor // step) * step))
        lead_cut = Cut(dims=lead.channels - kept // lead.ch_groups)
        for g, cut in [(lead, lead_cut)] + [(f, Cut(dims=f.channels - kept // f.ch_groups)) for f in fols]:
            if cut.dims:
                out[g.index] = cut
            else:
                out.pop(g.index, None)
    return out
