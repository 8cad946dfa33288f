"""The one prune path: analyse -> solve onto the MAC band -> (repair) -> cut once -> re-count MACs.

Every caller prunes through :func:`prune_to_target`: the CLI's ``solve``, the search's in-memory steps
and the store-backed steps of a run (``tasks/``). The latency search solves through the same
:class:`~pruning.space.PruningSpace` and :func:`~pruning.solver.solve`, with measured probes on top.
"""
from __future__ import annotations

import time
from typing import Callable

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from pruning.groups import Allocation
from pruning.plan import PruningPlan
from pruning.solver import MacBand, Solution, solve
from pruning.space import PruningSpace, count_macs_params

#: ``repair(space, plan, band, solution) -> (plan, solution, notes)``: a post-solve check that may
#: re-solve with a corrected plan (the safety validator's ``repair_solution``); it raises to reject.
Repair = Callable[[PruningSpace, PruningPlan, MacBand, Solution], tuple[PruningPlan, Solution, list[str]]]


class PruneResult(BaseModel):
    """What the solver promised and what the really pruned model measured."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

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
    plan: PruningPlan = Field(description="the plan as executed (after repair; channel_ratio = solver ratio)")
    allocation_digest: str = Field(description="identity of the solved allocation (equal digests = same model)")
    kind_ratios: dict[str, float] = Field(default_factory=dict, description="largest pruned fraction per group kind")
    notes: list[str] = Field(default_factory=list, description="repairs made after solving, prediction mismatches")
    seconds: dict[str, float]
    solution: Solution | None = Field(None, exclude=True, description="the solved allocation (not serialised)")

    @property
    def macs_reduction(self) -> float:
        return 1 - self.achieved_macs / self.base_macs


def solved_kind_ratios(space: PruningSpace, solution: Solution) -> dict[str, float]:
    """Largest pruned fraction per group kind of a solved allocation (head dims for attention groups)."""
    out: dict[str, float] = {}
    for g in space.groups:
        dims, heads = solution.allocation.get(g.index, (0, 0))
        r = dims / g.channels if g.channels else 0.0
        if heads:
            r = max(r, heads / max(1, g.ch_groups))
        out[g.kind] = round(max(out.get(g.kind, 0.0), r), 4)
    return out


def cut_and_count(space: PruningSpace, allocation: Allocation, example: torch.Tensor) -> tuple[nn.Module, float, int]:
    """Cut the space's model once with ``allocation`` and count the pruned model: ``(pruned, macs, params)``."""
    pruned = space.apply(allocation)
    macs, params = count_macs_params(pruned, example)
    return pruned, macs, params


def prune_to_target(model: nn.Module, example: torch.Tensor, plan: PruningPlan, band: MacBand,
                    seed: int = 0, space: PruningSpace | None = None, repair: Repair | None = None,
                    ) -> tuple[nn.Module, PruneResult, PruningSpace]:
    """Prune a copy of ``model`` so its MACs land in ``band`` (the original is left untouched).

    Steps: analyse a copy (dependency graph, importance, MAC model) unless ``space`` is given (then
    that space's model is cut), solve the ratio analytically, let ``repair`` correct the solved
    allocation, cut once, and re-count MACs on the pruned model. Raises ``PruningError`` subclasses
    (``InfeasibleTarget`` among them) with one-line messages for bad plans and infeasible targets;
    whatever ``repair`` raises passes through.
    """
    t0 = time.perf_counter()
    if space is None:
        space = PruningSpace.build(model, example, plan, seed=seed)
    t_build = time.perf_counter()
    solution: Solution = solve(space, plan, band)
    notes: list[str] = []
    if repair is not None:
        plan, solution, notes = repair(space, plan, band, solution)
    t_solve = time.perf_counter()
    kind_ratios = solved_kind_ratios(space, solution)
    pruned, macs, params = cut_and_count(space, solution.cuts(), example)
    t_count = time.perf_counter()
    if abs(macs - solution.predicted_macs) > 0.5:
        notes.append(f"MAC prediction {solution.predicted_macs:.0f} differs from the recount {macs:.0f}")
    # The band verdict always comes from the count on the really pruned model, never from the prediction.
    result = PruneResult(
        base_macs=space.base_macs, base_params=sum(p.numel() for p in model.parameters()),
        target_macs=band.target_macs, predicted_macs=solution.predicted_macs, achieved_macs=macs, params=params,
        error_pct=band.error_pct(macs), in_band=band.contains(macs), band=band, ratio=solution.ratio,
        probes=solution.probes, prediction_exact=macs == solution.predicted_macs,
        granularity_pct=solution.granularity_pct, plan=solution.plan, allocation_digest=solution.digest(),
        kind_ratios=kind_ratios, notes=notes, solution=solution,
        seconds={"build": t_build - t0, "solve": t_solve - t_build, "apply": t_count - t_solve,  # cut + recount
                 "total": t_count - t0},
    )
    return pruned, result, space
