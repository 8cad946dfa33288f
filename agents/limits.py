"""The safety validator's hard limits (Appendix A.3.2), apart from the validator.

The Profiling Agent shows these ranges in the profile (``ProfileSummary.safe_ranges``) and the
validator and the heuristic strategist enforce them; keeping them here lets :mod:`agents.profiling`
use them without importing :mod:`agents.safety` (which depends on the profile).
"""
from __future__ import annotations

from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["SafetyLimits"]


class _Profile(Protocol):
    """What :meth:`SafetyLimits.ranges` reads of an :class:`agents.profiling.ProfileSummary` (no import: no cycle)."""

    family: str
    kinds: list[str]

    @property
    def first_stage(self) -> str | None: ...


class SafetyLimits(BaseModel):
    """Hard limits; ``for_dataset`` gives the paper's dataset-specific variants (A.3.2)."""

    model_config = ConfigDict(extra="forbid")

    max_stage_multiplier: float = Field(2.0, description="no stage is scaled above this")
    first_stage_max: float = Field(1.0, description="the first stage (right after the stem) is protected")
    kind_max: dict[str, float] = Field(
        default_factory=lambda: {"internal": 2.0, "residual": 2.0, "mlp": 1.6, "qkv": 1.2},
        description="absolute multiplier caps per kind (paper CIFAR caps: MLP 1.6, QKV 1.2)",
    )
    qkv_over_mlp_max: float = Field(1.0, description="qkv multiplier <= this x mlp multiplier (MLP is more robust)")
    max_layer_ratio: float = Field(0.9, gt=0, lt=1, description="no group loses more than this fraction")
    qkv_max_ratio: float = Field(0.85, gt=0, lt=1, description="effective QKV (head_dim) pruning ratio cap")
    vit_round_to: tuple[int, ...] = Field((8, 16), description="allowed rounding of transformer dims")
    min_head_dim: int = Field(8, ge=1)
    danger_tolerance: float = Field(0.05, ge=0)

    @classmethod
    def for_dataset(cls, dataset: str | None) -> "SafetyLimits":
        name = (dataset or "").lower()
        if "imagenet" in name:  # 1000 classes: conservative
            return cls(kind_max={"internal": 1.5, "residual": 1.5, "mlp": 1.0, "qkv": 0.8}, qkv_over_mlp_max=0.5,
                       max_layer_ratio=0.8, first_stage_max=0.75)
        return cls()

    def ranges(self, profile: _Profile) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {"stage multipliers": [0.0, self.max_stage_multiplier]}
        if profile.first_stage:
            out[f"stage {profile.first_stage}"] = [0.0, self.first_stage_max]
        for k in profile.kinds:
            if k in self.kind_max:
                out[f"{k} multiplier"] = [0.0, self.kind_max[k]]
        if profile.family == "vit":
            out["qkv/mlp multiplier ratio"] = [0.0, self.qkv_over_mlp_max]
            out["head/proj multiplier"] = [0.0, 0.0]
            out["round_to"] = [float(min(self.vit_round_to)), float(max(self.vit_round_to))]
            out["effective qkv ratio"] = [0.0, self.qkv_max_ratio]
        out["effective group ratio"] = [0.0, self.max_layer_ratio]
        return out
