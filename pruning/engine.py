"""One readable path from a model and a MAC target to a pruned model whose MACs were counted."""
from __future__ import annotations

import time

import torch
from pydantic import BaseModel
from torch import nn

from pruning.plan import PruningPlan
from pruning.solver import MacBand, Solution, solve
from pruning.space import PruningSpace, count_macs_params


class PruneResult(BaseModel):
    """What the solver promised and what the really pruned model measured."""

    base_macs: float
    base_params: int
    target_macs: float
    predicted_macs: float
    achieved_macs: float
    params: int
    error_pct: float
    in_band: bool
    band: MacBand
    ratio: float
    probes: int
    real_prunes: int = 1
    prediction_exact: bool
    granularity_pct: float
    plan: PruningPlan
    seconds: dict[str, float]

    @property
    def macs_reduction(self) -> float:
        return 1 - self.achieved_macs / self.base_macs


def prune_to_target(model: nn.Module, example: torch.Tensor, plan: PruningPlan, band: MacBand,
                    seed: int = 0, space: PruningSpace | None = None) -> tuple[nn.Module, PruneResult, PruningSpace]:
    """Prune a copy of ``model`` so its MACs land in ``band`` (the original is left untouched).

    Steps: analyse the copy (dependency graph, importance, MAC model), solve the ratio analytically,
    cut once, and re-count MACs on the pruned model. Raises ``PruningError`` subclasses with one-line
    messages for bad plans and infeasible targets.
    """
    t0 = time.perf_counter()
    if space is None:
        space = PruningSpace.build(model, example, plan, seed=seed)
    t_build = time.perf_counter()
    solution: Solution = solve(space, plan, band)
    t_solve = time.perf_counter()
    pruned = space.apply(solution.cuts())
    t_apply = time.perf_counter()
    macs, params = count_macs_params(pruned, example)
    t_count = time.perf_counter()
    # The band verdict always comes from the count on the really pruned model, never from the prediction.
    base_params = sum(p.numel() for p in model.parameters())
    result = PruneResult(
        base_macs=space.base_macs, base_params=base_params, target_macs=band.target_macs,
        predicted_macs=solution.predicted_macs, achieved_macs=macs, params=params,
        error_pct=band.error_pct(macs), in_band=band.contains(macs), band=band, ratio=solution.ratio,
        probes=solution.probes, prediction_exact=macs == solution.predicted_macs, granularity_pct=solution.granularity_pct, plan=solution.plan,
        seconds={"build": t_build - t0, "solve": t_solve - t_build, "apply": t_apply - t_solve,
                 "count": t_count - t_apply, "total": t_count - t0},
    )
    return pruned, result, space
