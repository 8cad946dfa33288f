"""Wanda scores and the choice of weights to prune (per output row, unstructured or N:M).

Wanda (Sun et al., 2023): ``S_ij = |W_ij| * ||X_j||_2`` where ``X_j`` is input feature j over the
calibration tokens; within each output row, the weights with the lowest scores are removed.

Scores are computed and sorted on the weight's device (the GPU in a CUDA run), one layer at a time;
the chosen indices come back to the CPU. All selection functions are *incremental*: they take the current keep-mask and return flat indices
(into ``weight.view(-1)``) of weights to remove *in addition*, so that already pruned weights stay
pruned and a step can be undone exactly by restoring just those indices.
"""
from __future__ import annotations

import torch

__all__ = ["wanda_scores", "magnitude_scores", "row_prune_indices", "layer_prune_indices", "nm_prune_indices",
           "select_prune_indices", "parse_nm", "row_count"]


def wanda_scores(weight: torch.Tensor, act_norm: torch.Tensor) -> torch.Tensor:
    """``|W| * ||X||`` broadcast over rows: ``weight [out, in]``, ``act_norm [in]`` -> ``[out, in]`` float32."""
    if weight.ndim != 2 or act_norm.ndim != 1 or weight.shape[1] != act_norm.shape[0]:
        raise ValueError(f"shape mismatch: weight {tuple(weight.shape)} vs act_norm {tuple(act_norm.shape)}")
    return weight.detach().float().abs() * act_norm.to(weight.device).float()[None, :]


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().float().abs()


def parse_nm(nm: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """``"2:4"`` -> ``(2, 4)`` (N zeros in every group of M consecutive inputs); None passes through."""
    if nm is None or nm == "":
        return None
    if isinstance(nm, tuple):
        n, m = nm
    else:
        try:
            n, m = (int(x) for x in str(nm).split(":"))
        except ValueError:
            raise ValueError(f"N:M pattern must look like '2:4', got {nm!r}") from None
    if not (0 < n < m):
        raise ValueError(f"N:M pattern needs 0 < N < M, got {n}:{m}")
    return n, m


def row_count(sparsity: float, in_features: int) -> int:
    """Pruned weights per row for a layer sparsity (rounded to the nearest integer)."""
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must lie in [0, 1], got {sparsity}")
    return min(in_features, int(round(sparsity * in_features)))


def _masked(scores: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    s = scores.float().clone()
    if keep is not None:
        s[~keep.to(s.device)] = float("-inf")  # already pruned: sorted first, never "un-pruned"
    return s


def _new_only(chosen_flat: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    chosen_flat = chosen_flat.unique()
    if keep is None:
        return chosen_flat
    return chosen_flat[keep.reshape(-1)[chosen_flat]]


def row_prune_indices(scores: torch.Tensor, keep: torch.Tensor | None, sparsity: float) -> torch.Tensor:
    """New flat indices so that every row has ``round(sparsity * in)`` pruned weights (lowest scores first)."""
    rows, cols = scores.shape
    k = row_count(sparsity, cols)
    if k == 0:
        return torch.empty(0, dtype=torch.long)
    order = torch.argsort(_masked(scores, keep), dim=1, stable=True)[:, :k]
    flat = (torch.arange(rows, device=order.device)[:, None] * cols + order).reshape(-1)
    return _new_only(flat.cpu(), None if keep is None else keep.cpu())


def layer_prune_indices(scores: torch.Tensor, keep: torch.Tensor | None, sparsity: float) -> torch.Tensor:
    """New flat indices so that the whole layer has ``round(sparsity * numel)`` pruned weights (layer-wise)."""
    k = row_count(sparsity, scores.numel())
    if k == 0:
        return torch.empty(0, dtype=torch.long)
    order = torch.argsort(_masked(scores, keep).reshape(-1), stable=True)[:k]
    return _new_only(order.cpu(), None if keep is None else keep.cpu())


def nm_prune_indices(scores: torch.Tensor, keep: torch.Tensor | None, n: int, m: int) -> torch.Tensor:
    """New flat indices giving at least ``n`` zeros in every group of ``m`` consecutive inputs of each row."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"in_features {cols} is not a multiple of M={m}")
    s = _masked(scores, keep).reshape(rows, cols // m, m)
    order = torch.argsort(s, dim=2, stable=True)[:, :, :n]  # position inside each group
    base = (torch.arange(rows)[:, None, None] * cols + torch.arange(cols // m)[None, :, None] * m).to(order.device)
    flat = (base + order).reshape(-1)
    return _new_only(flat.cpu(), None if keep is None else keep.cpu())


def select_prune_indices(scores: torch.Tensor, keep: torch.Tensor | None, sparsity: float, *,
                         nm: tuple[int, int] | None = None, per_row: bool = True) -> torch.Tensor:
    """Dispatch: N:M (``sparsity`` ignored beyond > 0), per-row unstructured, or layer-wise unstructured."""
    if nm is not None:
        return nm_prune_indices(scores, keep, *nm) if sparsity > 0 else torch.empty(0, dtype=torch.long)
    return row_prune_indices(scores, keep, sparsity) if per_row else layer_prune_indices(scores, keep, sparsity)
