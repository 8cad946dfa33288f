"""Profiling: total MACs/params, a per-layer table, and per-stage / per-group summaries.

MACs are counted exactly like ``torch_pruning.utils.count_ops_and_params`` (it is what counts them).
"""
from __future__ import annotations

import pandas as pd
import torch
import torch_pruning as tp
from pydantic import BaseModel
from torch import nn
from torch_pruning.utils import op_counter

from pruning.models import model_family
from pruning.space import PruningSpace, _stage_names, _stage_of


class LayerProfile(BaseModel):
    name: str
    type: str
    in_shape: list[int]
    out_shape: list[int]
    macs: float
    params: int
    share: float  # fraction of total MACs
    stage: str


class StageProfile(BaseModel):
    stage: str
    layers: int
    macs: float
    params: int
    share: float


class GroupProfile(BaseModel):
    group: int
    root: str
    stage: str
    kind: str
    units: int
    replicas: int


class FrozenProfile(BaseModel):
    """A group that is never cut on this model, and why (Torch-Pruning cannot index it, or cutting it
    breaks the forward pass)."""

    root: str
    modules: list[str]
    reason: str


class ModelProfile(BaseModel):
    """Everything the Profiling Agent and the user need to know about the model's compute."""

    model: str
    family: str
    input_size: int
    macs: float
    params: int
    layers: list[LayerProfile]
    stages: list[StageProfile]
    groups: list[GroupProfile] = []
    frozen: list[FrozenProfile] = []
    mac_prediction: str | None = None  # "exact" (checked on a trial cut) or "measured" (the solver counts cut copies)

    def frames(self) -> dict[str, pd.DataFrame]:
        """The tables as pandas DataFrames: ``layers``, ``stages``, ``groups``."""
        return {
            "layers": pd.DataFrame([l.model_dump() for l in self.layers]),
            "stages": pd.DataFrame([s.model_dump() for s in self.stages]),
            "groups": pd.DataFrame([g.model_dump() for g in self.groups]),
        }

    def summary(self, top: int = 10) -> str:
        """A compact human-readable report."""
        lines = [f"{self.model} ({self.family}) @ {self.input_size}x{self.input_size}: "
                 f"{self.macs / 1e9:.3f} G MACs, {self.params / 1e6:.2f} M params, "
                 f"{len(self.layers)} counted layers, {len(self.groups)} prunable groups"
                 + (f", {len(self.frozen)} frozen" if self.frozen else "")
                 + (f", MAC prediction {self.mac_prediction}" if self.mac_prediction else "")]
        lines.append("stage            MACs(G)   share  params(M)")
        for s in self.stages:
            lines.append(f"{s.stage:<15} {s.macs / 1e9:8.3f} {s.share * 100:6.1f}% {s.params / 1e6:9.2f}")
        lines.append(f"top {top} layers by MACs:")
        for l in sorted(self.layers, key=lambda l: -l.macs)[:top]:
            lines.append(f"  {l.name:<40} {l.type:<14} {l.macs / 1e6:9.1f} M  {l.share * 100:5.1f}%")
        if self.frozen:
            lines.append(f"frozen groups (never cut, {len(self.frozen)}):")
            lines += [f"  {f.root}: {f.reason}" for f in self.frozen[:top]]
            if len(self.frozen) > top:
                lines.append(f"  ... and {len(self.frozen) - top} more")
        return "\n".join(lines)


@torch.no_grad()
def profile_model(model: nn.Module, example: torch.Tensor, name: str = "", space: PruningSpace | None = None) -> ModelProfile:
    """Profile ``model`` on ``example`` (batch of 1); pass a built ``space`` to include the prunable groups."""
    shapes: dict[nn.Module, tuple[list[int], list[int]]] = {}

    def hook(mod, inputs, output):
        if inputs and isinstance(inputs[0], torch.Tensor) and isinstance(output, torch.Tensor):
            shapes[mod] = (list(inputs[0].shape), list(output.shape))

    handles = [m.register_forward_hook(hook) for m in model.modules() if op_counter.is_supported_instance(m)]
    try:
        model.eval()(example)
    finally:
        for h in handles:
            h.remove()
    macs, params, layer_macs, layer_params = tp.utils.count_ops_and_params(model, example, layer_wise=True)
    stages = _stage_names(model)
    counted_parents: list[str] = []
    layers = []
    for lname, mod in model.named_modules():
        if mod is model or not op_counter.is_supported_instance(mod) or mod not in shapes:
            continue
        if any(lname.startswith(p + ".") for p in counted_parents):
            continue
        counted_parents.append(lname)
        m_macs = float(layer_macs.get(mod) or 0.0)
        layers.append(LayerProfile(
            name=lname, type=type(mod).__name__, in_shape=shapes[mod][0], out_shape=shapes[mod][1],
            macs=m_macs, params=int(layer_params.get(mod) or 0), share=m_macs / macs if macs else 0.0,
            stage=_stage_of(lname, stages),
        ))
    by_stage: dict[str, StageProfile] = {}
    for l in layers:
        s = by_stage.setdefault(l.stage, StageProfile(stage=l.stage, layers=0, macs=0.0, params=0, share=0.0))
        s.layers += 1
        s.macs += l.macs
        s.params += l.params
        s.share += l.share
    groups, frozen, prediction = [], [], None
    if space is not None:
        groups = [GroupProfile(group=g.index, root=g.root, stage=g.stage, kind=g.kind, units=g.channels,
                               replicas=g.ch_groups) for g in space.groups]
        frozen = [FrozenProfile(root=f.root, modules=f.modules, reason=f.reason) for f in space.frozen]
        prediction = {True: "exact", False: "measured"}.get(space.mac_model.exact)
    return ModelProfile(
        model=name or type(model).__name__, family=model_family(model), input_size=int(example.shape[-1]),
        macs=float(macs), params=int(params), layers=layers,
        stages=sorted(by_stage.values(), key=lambda s: -s.macs), groups=groups, frozen=frozen,
        mac_prediction=prediction,
    )
