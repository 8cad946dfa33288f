"""Mask-based pruning with exact rollback and sparsity accounting over the prunable linears.

:class:`MaskedModel` keeps one boolean keep-mask per prunable linear (on the CPU, in the ``[out, in]``
layout of :attr:`~pruning.llm.stats.LinearInfo.weight`) and zeroes weights *in place* on the model's
device (indices are moved there per layer; a ``Conv1D``'s ``[in, out]`` storage is addressed through
:meth:`~pruning.llm.stats.LinearInfo.storage_index`).
Every :meth:`MaskedModel.prune` returns a :class:`PruneStep` holding, per layer, the flat indices it
zeroed and the original values at those indices (a clone, same dtype). :meth:`MaskedModel.rollback`
writes those values back, so undoing a step restores the weights bit-exactly without keeping model
copies. Steps form a stack: rollback undoes the most recent step.

A step serialises to plain tensors (:meth:`PruneStep.to_state` / :meth:`PruneStep.from_state`), which
is what a run persists per iteration; :meth:`MaskedModel.replay` re-applies persisted steps to a freshly
loaded original model (resume after preemption).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import nn

from pruning.llm.stats import LinearInfo, prunable_linears

__all__ = ["PruneStep", "MaskedModel", "weights_fingerprint"]


@dataclass
class PruneStep:
    """What one pruning step removed: ``{layer: (flat indices int64, original values)}``."""

    removed: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    iteration: int | None = None

    @property
    def count(self) -> int:
        return sum(int(i.numel()) for i, _ in self.removed.values())

    def layers(self) -> list[str]:
        return [n for n, (i, _) in self.removed.items() if i.numel()]

    def to_state(self) -> dict:
        """Plain-tensor dict for ``torch.save`` / ``store.put_torch`` (indices stored as int64)."""
        return {"iteration": self.iteration,
                "removed": {n: {"indices": i.clone(), "values": v.clone()} for n, (i, v) in self.removed.items()}}

    @classmethod
    def from_state(cls, state: Mapping) -> "PruneStep":
        return cls(removed={n: (d["indices"].long(), d["values"]) for n, d in state["removed"].items()},
                   iteration=state.get("iteration"))


def weights_fingerprint(model: nn.Module, layers: dict[str, LinearInfo] | None = None) -> str:
    """sha256 (first 16 hex) of the prunable weights' bytes: identifies the original model on resume."""
    import hashlib

    layers = layers if layers is not None else prunable_linears(model)
    h = hashlib.sha256()
    for name, info in layers.items():
        h.update(name.encode())
        h.update(info.module.weight.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


class MaskedModel:
    """A model plus keep-masks over its prunable linears."""

    def __init__(self, model: nn.Module, layers: dict[str, LinearInfo] | None = None):
        self.model = model
        self.layers = layers if layers is not None else prunable_linears(model)
        if not self.layers:
            raise ValueError("model has no prunable linear layers")
        for n, info in self.layers.items():
            if not info.module.weight.is_contiguous():
                raise ValueError(f"weight of {n} is not contiguous")
        self.masks: dict[str, torch.Tensor] = {
            n: torch.ones(i.weight.shape, dtype=torch.bool, device="cpu") for n, i in self.layers.items()}
        self.steps: list[PruneStep] = []
        self.total_params = sum(i.params for i in self.layers.values())

    # -- accounting ------------------------------------------------------------------------------
    def pruned_count(self, name: str) -> int:
        return int((~self.masks[name]).sum())

    def layer_sparsity(self, name: str) -> float:
        return self.pruned_count(name) / self.masks[name].numel()

    def sparsities(self) -> dict[str, float]:
        return {n: self.layer_sparsity(n) for n in self.layers}

    def overall_sparsity(self) -> float:
        """Pruned weights / all weights of the prunable linears (embeddings, head, norms excluded)."""
        return sum(self.pruned_count(n) for n in self.layers) / self.total_params

    def zero_fraction(self) -> float:
        """Fraction of exactly-zero weights actually in the prunable linears (checks masks against weights)."""
        z = sum(int((i.module.weight == 0).sum()) for i in self.layers.values())
        return z / self.total_params

    # -- pruning ---------------------------------------------------------------------------------
    @torch.no_grad()
    def prune(self, indices: Mapping[str, torch.Tensor], iteration: int | None = None) -> PruneStep:
        """Zero the given flat indices (already pruned ones are skipped) and push the step."""
        step = PruneStep(iteration=iteration)
        for name, idx in indices.items():
            if name not in self.layers:
                raise KeyError(f"unknown layer {name!r}")
            idx = torch.as_tensor(idx, dtype=torch.long).reshape(-1).cpu().unique()
            mask = self.masks[name].view(-1)
            idx = idx[mask[idx]]
            if idx.numel() == 0:
                continue
            info = self.layers[name]
            flat = info.module.weight.data.view(-1)
            dev_idx = info.storage_index(idx).to(flat.device)
            values = flat[dev_idx].clone()
            flat[dev_idx] = 0
            mask[idx] = False
            step.removed[name] = (idx, values.cpu())
        self.steps.append(step)
        return step

    @torch.no_grad()
    def rollback(self, step: PruneStep | None = None) -> PruneStep:
        """Undo the most recent step (``step`` must be it when given): values and masks restored exactly."""
        if not self.steps:
            raise RuntimeError("nothing to roll back")
        if step is not None and self.steps[-1] is not step:
            raise RuntimeError("only the most recent step can be rolled back")
        step = self.steps.pop()
        for name, (idx, values) in step.removed.items():
            info = self.layers[name]
            flat = info.module.weight.data.view(-1)
            flat[info.storage_index(idx).to(flat.device)] = values.to(flat.device, flat.dtype)
            self.masks[name].view(-1)[idx] = True
        return step

    @torch.no_grad()
    def replay(self, step: PruneStep, check_values: bool = True) -> PruneStep:
        """Re-apply a persisted step to the original weights (resume). Verifies the stored values match."""
        if check_values:
            for name, (idx, values) in step.removed.items():
                info = self.layers[name]
                cur = info.module.weight.data.view(-1)[info.storage_index(idx).to(info.module.weight.device)]
                if not torch.equal(cur.cpu(), values.to(cur.dtype)):
                    raise ValueError(f"persisted step {step.iteration} does not match the model's weights in {name}")
        new = self.prune({n: i for n, (i, _) in step.removed.items()}, iteration=step.iteration)
        return new

    def mask_state(self) -> dict[str, torch.Tensor]:
        return {n: m.clone() for n, m in self.masks.items()}
