"""The pruning plan: the *shape* of an allocation, which the MAC solver scales onto a budget."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Criterion = Literal["taylor", "l1", "l2", "random"]

#: Group kinds the engine assigns. CNNs: ``internal`` (channels inside a block) and ``residual``
#: (channels shared by a residual stream). ViTs: ``mlp`` (fc1 hidden units), ``qkv`` (attention head
#: dims), ``head`` (whole attention heads) and ``proj`` (the embedding / residual width).
GROUP_KINDS = ("internal", "residual", "mlp", "qkv", "head", "proj")


def default_kind_multiplier(kind: str) -> float:
    """Multiplier of a kind a plan does not list: 0.0 for ``head`` (whole heads are kept), else 1.0."""
    return 0.0 if kind == "head" else 1.0


class PruningPlan(BaseModel):
    """How to prune, independent of how much: multipliers shape the allocation, ``channel_ratio`` scales it.

    The effective ratio of a group is ``min(max_layer_ratio, channel_ratio * stage_mult * kind_mult)``;
    the MAC solver searches ``channel_ratio`` so that the pruned model lands on the target.
    """

    model_config = ConfigDict(extra="forbid")

    importance: Criterion = Field("l2", description="channel importance; taylor needs calibration batches")
    channel_ratio: float = Field(0.3, ge=0.0, lt=1.0, description="base fraction of channels removed per group")
    allocation: Literal["global", "uniform"] = Field(
        "global",
        description="global: rank channels across isomorphic groups (Isomorphic Pruning); uniform: same ratio per group",
    )
    stage_multipliers: dict[str, float] = Field(
        default_factory=dict, description="per-stage scale of the ratio (stage names from the profile; 0 = keep)"
    )
    kind_multipliers: dict[str, float] = Field(
        default_factory=dict, description=f"per-kind scale of the ratio, kinds: {', '.join(GROUP_KINDS)}"
    )
    round_to: int = Field(8, ge=1, le=64, description="kept channels are a multiple of this (SIMD friendly)")
    narrow_alignment: bool = Field(
        True, description="a group narrower than 8 x round_to aligns to the largest power of two <= its width / 8 "
                          "(>= 1), so narrow layers can still be cut down to max_layer_ratio; False: round_to everywhere")
    max_layer_ratio: float = Field(0.9, gt=0.0, lt=1.0, description="no group loses more than this fraction")
    min_head_dim: int = Field(8, ge=1, description="attention head_dim never drops below this")
    ignored_layers: list[str] = Field(
        default_factory=list, description="extra module names never pruned (the stem and classifier always are)"
    )

    @field_validator("stage_multipliers", "kind_multipliers")
    @classmethod
    def _non_negative(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {k: x for k, x in v.items() if not (0.0 <= x <= 10.0)}
        if bad:
            raise ValueError(f"multipliers must lie in [0, 10], got {bad}")
        return v

    @field_validator("kind_multipliers")
    @classmethod
    def _known_kinds(cls, v: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(v) - set(GROUP_KINDS))
        if unknown:
            raise ValueError(f"unknown group kinds {unknown}; known: {list(GROUP_KINDS)}")
        return v

    def multiplier(self, stage: str, kind: str) -> float:
        """Combined multiplier of a group in ``stage`` of ``kind``."""
        return self.stage_multipliers.get(stage, 1.0) * self.kind_multipliers.get(kind, default_kind_multiplier(kind))

    def align(self, channels: int) -> int:
        """Kept channels of a group ``channels`` wide are a multiple of this (``round_to`` unless narrow)."""
        if not self.narrow_alignment or channels >= 8 * self.round_to:
            return self.round_to
        step = 1
        while step * 2 <= min(self.round_to, channels // 8):
            step *= 2
        return step

    def scaled(self, channel_ratio: float) -> "PruningPlan":
        """The same shape with another base ratio."""
        return self.model_copy(update={"channel_ratio": channel_ratio})
