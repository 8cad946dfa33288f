"""Profiling Agent (Section 3.2.1): the computational landscape of a model, for prompts and rules.

Everything comes from a :class:`~pruning.space.PruningSpace` (DepGraph groups and the exact MAC
model), so it is cheap: one MAC prediction per kind and per stage, no weights touched.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from agents.limits import SafetyLimits
from pruning.groups import Cut
from pruning.plan import PruningPlan
from pruning.solver import MacBand
from pruning.space import PruningSpace, natural_key

PROBE_FRACTION = 0.5  # MAC shares are measured by cutting this fraction of a kind's / stage's units


class ProfileSummary(BaseModel):
    """What the strategists and the validator know about the model (no tensors)."""

    model_config = ConfigDict(extra="ignore")

    model_name: str | None = None
    dataset: str | None = None
    num_classes: int | None = None
    input_size: int | None = None
    family: str = Field(description="'cnn' or 'vit'")
    base_macs: float
    base_params: int | None = None
    stages: list[str] = Field(description="stage names in network order")
    kinds: list[str] = Field(description="group kinds present in this model")
    group_count: int
    groups_by_kind: dict[str, int] = Field(default_factory=dict)
    groups_by_stage: dict[str, int] = Field(default_factory=dict)
    min_channels_by_kind: dict[str, int] = Field(default_factory=dict, description="smallest prunable unit count per kind")
    attention_head_dims: list[int] = Field(default_factory=list, description="head_dim of each attention group (ViT)")
    mac_share_by_kind: dict[str, float] = Field(
        default_factory=dict, description=f"fraction of base MACs removed by cutting {PROBE_FRACTION:.0%} of that kind's units"
    )
    mac_share_by_stage: dict[str, float] = Field(default_factory=dict)
    layer_macs: dict[str, float] | None = Field(None, description="optional per-layer MACs supplied by the caller")
    min_reachable_macs: float | None = Field(None, description="MACs with every group at the layer cap (uniform shape)")
    taylor_available: bool = False
    known_modules: list[str] = Field(default_factory=list, description="module names of the model (ignored_layers check)")
    ignored_layers: list[str] = Field(default_factory=list, description="modules never pruned (stem, classifier, user's)")
    safe_ranges: dict[str, list[float]] = Field(default_factory=dict)
    sensitivity_by_stage: dict[str, float] = Field(
        default_factory=dict, description="share of the first-order Taylor saliency |w * dL/dw| (calibration "
        "gradients) in the stage's weights divided by its MAC share: > 1 = it costs more accuracy per MAC saved")
    sensitivity_by_kind: dict[str, float] = Field(default_factory=dict, description="the same per group kind")

    def sensitive(self, key: str) -> float | None:
        """Sensitivity of a plan coordinate ``'stage:NAME'`` / ``'kind:NAME'`` (None when not profiled)."""
        fam, name = key.split(":", 1)
        return (self.sensitivity_by_stage if fam == "stage" else self.sensitivity_by_kind).get(name)

    @property
    def first_stage(self) -> str | None:
        return self.stages[0] if self.stages else None

    @property
    def last_stage(self) -> str | None:
        return self.stages[-1] if self.stages else None

    @property
    def heaviest_stage(self) -> str | None:
        if not self.mac_share_by_stage:
            return self.last_stage
        return max(self.stages, key=lambda s: (self.mac_share_by_stage.get(s, 0.0), -self.stages.index(s)))

    def text(self, band: MacBand | None = None) -> str:
        """Compact description for prompts (a few lines; no module lists)."""
        g = 1e9
        lines = []
        name = self.model_name or "model"
        extra = []
        if self.input_size:
            extra.append(f"input {self.input_size}x{self.input_size}")
        if self.dataset:
            extra.append(f"dataset {self.dataset}" + (f" ({self.num_classes} classes)" if self.num_classes else ""))
        lines.append(f"Model: {name} (family {self.family}{', ' + ', '.join(extra) if extra else ''})")
        params = f", {self.base_params / 1e6:.3g} M params" if self.base_params else ""
        lines.append(f"Baseline MACs: {self.base_macs / g:.4g} G{params}")
        if band is not None:
            red = (1 - band.target_macs / self.base_macs) * 100
            lines.append(
                f"Target MACs: {band.target_macs / g:.4g} G (+{band.overshoot_pct:g}% / -{band.undershoot_pct:g}%), "
                f"accepted range {band.lower / g:.4g}-{band.upper / g:.4g} G, MAC reduction needed {red:.1f}%"
            )
        lines.append(
            f"Prunable groups: {self.group_count} (" + ", ".join(f"{k} {n}" for k, n in self.groups_by_kind.items()) + ")"
        )
        lines.append("Stages in order: " + ", ".join(self.stages))
        if self.mac_share_by_kind:
            lines.append(
                f"MAC sensitivity by kind (share of baseline MACs removed by cutting {PROBE_FRACTION:.0%} of its units): "
                + ", ".join(f"{k} {v:.1%}" for k, v in self.mac_share_by_kind.items())
            )
        if self.mac_share_by_stage:
            lines.append("MAC sensitivity by stage: " + ", ".join(f"{k} {v:.1%}" for k, v in self.mac_share_by_stage.items()))
        if self.sensitivity_by_stage or self.sensitivity_by_kind:
            lines.append(
                "Accuracy sensitivity (share of Taylor saliency |w*grad| / share of MACs; > 1 = pruning it costs "
                "more accuracy per MAC saved, prune it less): "
                + ", ".join(f"{k} {v:.2f}" for k, v in {**self.sensitivity_by_kind, **self.sensitivity_by_stage}.items())
            )
        if self.attention_head_dims:
            lines.append(f"Attention head_dim: {min(self.attention_head_dims)} (head_dim must stay >= 8)")
        if self.min_reachable_macs is not None:
            lines.append(f"Smallest MACs reachable with a uniform shape within the layer cap: {self.min_reachable_macs / g:.4g} G")
        crit = ["l1norm", "l2norm", "random"] + (["taylor"] if self.taylor_available else [])
        lines.append("Importance criteria available: " + ", ".join(crit)
                     + ("" if self.taylor_available else " (taylor unavailable: no calibration gradients)"))
        if self.safe_ranges:
            lines.append("Safe ranges: " + "; ".join(f"{k} {v[0]:g}..{v[1]:g}" for k, v in self.safe_ranges.items()))
        lines.append("Never pruned: the stem (first layer) and the classifier.")
        return "\n".join(lines)


def build_profile(
    space: PruningSpace,
    *,
    model_name: str | None = None,
    dataset: str | None = None,
    num_classes: int | None = None,
    input_size: int | None = None,
    base_params: int | None = None,
    taylor_available: bool = False,
    layer_macs: dict[str, float] | None = None,
    safe_ranges: dict[str, list[float]] | None = None,
    calibrated: nn.Module | None = None,
) -> ProfileSummary:
    """Profile ``space`` (an unapplied space; nothing is pruned); with ``calibrated`` (the same model with
    calibration gradients, as Taylor importance uses) also the per-stage / per-kind sensitivity."""
    groups = space.groups
    stages = sorted({g.stage for g in groups}, key=natural_key)
    kinds = [k for k in ("internal", "residual", "mlp", "qkv", "head", "proj") if any(g.kind == k for g in groups)]
    base = float(space.base_macs)

    def share(selected) -> float:
        alloc = {}
        for g in selected:
            d = int(g.channels * PROBE_FRACTION)
            if g.is_attention:
                d = min(d, max(0, g.channels - 1))
            if d > 0:
                alloc[g.index] = Cut(dims=d)
        if not alloc:
            return 0.0
        return round(max(0.0, base - float(space.predict_macs(alloc))) / base, 4)

    by_kind = {k: share([g for g in groups if g.kind == k]) for k in kinds}
    by_stage = {s: share([g for g in groups if g.stage == s]) for s in stages}
    min_ch: dict[str, int] = {}
    for g in groups:
        min_ch[g.kind] = min(min_ch.get(g.kind, g.channels), g.channels)
    try:
        probe = PruningPlan(importance="l2")
        min_reach = float(space.max_reduction_macs(probe))
    except Exception:  # noqa: BLE001 - informative only
        min_reach = None
    input_size = input_size or (int(space.example.shape[-1]) if getattr(space, "example", None) is not None else None)
    summary = ProfileSummary(
        model_name=model_name, dataset=dataset, num_classes=num_classes, input_size=input_size,
        family=space.family, base_macs=base, base_params=base_params, stages=stages, kinds=kinds,
        group_count=len(groups),
        groups_by_kind={k: sum(1 for g in groups if g.kind == k) for k in kinds},
        groups_by_stage={s: sum(1 for g in groups if g.stage == s) for s in stages},
        min_channels_by_kind=min_ch,
        attention_head_dims=[g.channels for g in groups if g.is_attention],
        mac_share_by_kind=by_kind, mac_share_by_stage=by_stage, layer_macs=layer_macs,
        min_reachable_macs=min_reach, taylor_available=taylor_available,
        known_modules=[n for n, _ in space.model.named_modules() if n],
        ignored_layers=list(getattr(space, "ignored_names", [])),
        safe_ranges=safe_ranges or {},
    )
    if calibrated is not None:
        summary.sensitivity_by_stage, summary.sensitivity_by_kind = taylor_sensitivity(space, calibrated, by_stage,
                                                                                        by_kind)
    if safe_ranges is None:  # the default validator limits for this dataset
        summary.safe_ranges = SafetyLimits.for_dataset(dataset).ranges(summary)
    return summary


def taylor_sensitivity(space: PruningSpace, calibrated: nn.Module, mac_share_by_stage: dict[str, float],
                       mac_share_by_kind: dict[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    """Per stage and per group kind: (share of the first-order Taylor saliency ``sum |w * grad|`` of the
    weights whose output channels the groups prune) / (share of the MACs cutting them removes).

    Cheap: the calibration gradients are already there for Taylor importance; no forward pass. Torch-Pruning's
    group scores are normalised per group, so they cannot compare groups; this raw saliency can.
    """
    modules = dict(calibrated.named_modules())
    mass: dict[str, float] = {}
    for g in space.groups:
        for name, is_out, _ in g.members:
            w = getattr(modules.get(name), "weight", None)
            if is_out and name not in mass and isinstance(w, nn.Parameter) and w.grad is not None:
                mass[name] = float((w.detach() * w.grad.detach()).abs().sum())

    def ratio(key, shares: dict[str, float]) -> dict[str, float]:
        sal: dict[str, float] = {}
        for g in space.groups:
            for name, is_out, _ in g.members:
                if is_out and name in mass:
                    sal[key(g)] = sal.get(key(g), 0.0) + mass[name] / max(1, _owners(name))
        total_sal, total_mac = sum(sal.values()), sum(shares.get(k, 0.0) for k in sal)
        if total_sal <= 0 or total_mac <= 0:
            return {}
        return {k: round((sal[k] / total_sal) / (shares[k] / total_mac), 3) for k in shares
                if k in sal and shares[k] > 0}

    owners: dict[str, int] = {}
    for g in space.groups:
        for name, is_out, _ in g.members:
            if is_out:
                owners[name] = owners.get(name, 0) + 1

    def _owners(name: str) -> int:
        return owners.get(name, 1)

    return ratio(lambda g: g.stage, mac_share_by_stage), ratio(lambda g: g.kind, mac_share_by_kind)
