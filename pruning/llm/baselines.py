"""One-shot baselines: magnitude, uniform Wanda, and OWL (outlier-weighted layerwise sparsity).

All operate on a :class:`~pruning.llm.masks.MaskedModel` (so they can be undone exactly) and use the
same activation norms (dense model, calibration text) as the agent.

OWL (Yin et al., 2024): the layerwise outlier distribution ``D_l`` is the fraction of a decoder block's
Wanda scores above ``M`` times their mean. Blocks with more outliers keep more weights:
``keep_l = (D_l - min D) / (max D - min D) * 2 * lambda``, re-centred so that the mean keep ratio is
``1 - target``; block sparsities ``S_l = 1 - keep_l`` span at most ``2 * lambda`` and average to the
target (blocks have equal size, so the weighted average is the target too). Inside a block every
linear gets ``S_l``, pruned per output row by Wanda score. ``M = 5``, ``lambda = 0.08``.
"""
from __future__ import annotations

from collections import defaultdict

import torch

from pruning.llm.masks import MaskedModel, PruneStep
from pruning.llm.wanda import magnitude_scores, select_prune_indices, wanda_scores

__all__ = ["magnitude_prune", "wanda_prune", "prune_to_allocation", "owl_outlier_ratios", "owl_allocation",
           "owl_prune", "OWL_M", "OWL_LAMBDA"]

OWL_M = 5.0
OWL_LAMBDA = 0.08


def prune_to_allocation(mm: MaskedModel, allocation: dict[str, float], norms: dict[str, torch.Tensor] | None,
                        *, nm: tuple[int, int] | None = None, per_row: bool = True,
                        iteration: int | None = None) -> PruneStep:
    """Bring each named layer to its sparsity (Wanda scores when ``norms`` is given, else magnitude)."""
    indices = {}
    for name, s in allocation.items():
        w = mm.layers[name].weight
        scores = wanda_scores(w, norms[name]) if norms is not None else magnitude_scores(w)
        indices[name] = select_prune_indices(scores, mm.masks[name], s, nm=nm, per_row=per_row)
    return mm.prune(indices, iteration=iteration)


def magnitude_prune(mm: MaskedModel, sparsity: float, *, per_row: bool = False,
                    nm: tuple[int, int] | None = None) -> PruneStep:
    """Uniform magnitude pruning; layer-wise comparison group by default (as in the Wanda paper's baseline)."""
    return prune_to_allocation(mm, {n: sparsity for n in mm.layers}, None, nm=nm, per_row=per_row)


def wanda_prune(mm: MaskedModel, norms: dict[str, torch.Tensor], sparsity: float, *,
                nm: tuple[int, int] | None = None) -> PruneStep:
    """Uniform Wanda: every layer at ``sparsity`` (or N:M), per output row."""
    return prune_to_allocation(mm, {n: sparsity for n in mm.layers}, norms, nm=nm)


def owl_outlier_ratios(mm: MaskedModel, norms: dict[str, torch.Tensor], m: float = OWL_M) -> dict[int, float]:
    """``{block: D_block}``: fraction of the block's Wanda scores (all its linears together) above m x mean."""
    by_block: dict[int, list[torch.Tensor]] = defaultdict(list)
    for name, info in mm.layers.items():
        by_block[info.block].append(wanda_scores(info.weight, norms[name]).reshape(-1))
    out = {}
    for b, parts in sorted(by_block.items()):
        s = torch.cat(parts)
        out[b] = float((s > m * s.mean()).float().mean())
    return out


def owl_allocation(ratios: dict[int, float], target: float, lam: float = OWL_LAMBDA) -> dict[int, float]:
    """Block sparsities spanning at most ``2 * lam`` and averaging to ``target`` (more outliers, less pruning)."""
    if not 0 < target < 1:
        raise ValueError(f"target sparsity must lie in (0, 1), got {target}")
    blocks = sorted(ratios)
    d = torch.tensor([ratios[b] for b in blocks], dtype=torch.float64)
    span = float(d.max() - d.min())
    keep = (d - d.min()) / span * (2 * lam) if span > 0 else torch.zeros_like(d)
    keep = keep - keep.mean() + (1 - target)
    sparsity = (1 - keep).clamp(0.0, 1.0)
    return {b: float(s) for b, s in zip(blocks, sparsity)}


def owl_prune(mm: MaskedModel, norms: dict[str, torch.Tensor], target: float, *, m: float = OWL_M,
              lam: float = OWL_LAMBDA) -> tuple[PruneStep, dict[int, float]]:
    """OWL with per-row Wanda inside each block; returns the step and the block allocation."""
    alloc = owl_allocation(owl_outlier_ratios(mm, norms, m), target, lam)
    per_layer = {n: alloc[i.block] for n, i in mm.layers.items()}
    return prune_to_allocation(mm, per_layer, norms), alloc
