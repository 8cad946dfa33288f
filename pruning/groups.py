"""The vocabulary of a pruning space: a prunable group, a cut of it, and an allocation of cuts."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Cut:
    """What to remove from one group: ``dims`` channels per channel-group (head dims for attention), ``heads`` whole heads."""

    dims: int = 0
    heads: int = 0


@dataclass
class GroupInfo:
    """One prunable group (a set of coupled channels) and its scores."""

    index: int
    root: str  # module whose channels define the group
    root_is_out: bool  # out- or in-channel pruning of the root
    kind: str
    stage: str
    scope: str  # isomorphic tag: groups with the same structure are ranked together
    channels: int  # prunable units per channel-group (head_dim for attention)
    ch_groups: int  # replication of the units (num_heads for attention, groups for group convs)
    importance: torch.Tensor  # per unit, len == channels
    head_importance: torch.Tensor | None = None  # per head, attention groups only
    members: list[tuple[str, bool, int]] = field(default_factory=list)  # (module, is_out, full length)
    attention: str | None = None  # name of the timm attention module whose heads this group holds
    #: per member: units removed from it per root unit removed (int), or, where that differs between
    #: root units (a split or slice of the root's channels), the count per root index (tensor, len == full)
    member_weights: list[int | torch.Tensor] = field(default_factory=list)
    params: list[str] = field(default_factory=list)  # unwrapped parameters pruned with the group (layer scales, ...)

    @property
    def is_attention(self) -> bool:
        return self.head_importance is not None

    def kept(self, cut: Cut) -> int:
        """Root-dimension length after ``cut``."""
        return (self.ch_groups - cut.heads) * (self.channels - cut.dims)

    @property
    def full(self) -> int:
        return self.ch_groups * self.channels


Allocation = dict[int, Cut]


def pruned_root_indices(g: GroupInfo, cut: Cut) -> list[int]:
    """Root-dimension indices removed by ``cut``: lowest-importance units (and heads), replicated per group."""
    order = torch.argsort(g.importance, stable=True)
    dim_idx = set(order[: cut.dims].tolist())
    heads = set()
    if cut.heads and g.head_importance is not None:
        heads = set(torch.argsort(g.head_importance, stable=True)[: cut.heads].tolist())
    return [h * g.channels + j for h in range(g.ch_groups) for j in range(g.channels) if h in heads or j in dim_idx]


@dataclass
class FrozenGroup:
    """A group that is never cut because cutting it breaks the graph or the forward pass."""

    root: str
    modules: list[str]
    reason: str

    def line(self) -> str:
        return f"{self.root}: {self.reason}"
