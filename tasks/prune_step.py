"""The prune step of one candidate, shared by the store-backed steps (``tasks.steps``) and the
in-memory steps (``tasks.memory_steps``): one call of :func:`pruning.engine.prune_to_target`, with the
safety validator's post-solve repair, and every way it can fail turned into a recorded status."""
from __future__ import annotations

import time

import torch
from torch import nn

from agents.safety import SafetyValidator, UnsafePlanError
from agents.search import Measured
from pruning.engine import prune_to_target
from pruning.errors import first_line
from pruning.plan import PruningPlan
from pruning.solver import InfeasibleTarget, MacBand, solve
from pruning.space import PruningError, PruningSpace
from tasks.contexts import SpaceCache


def prune_candidate(model: nn.Module, example: torch.Tensor, plan: PruningPlan, band: MacBand, *, seed: int = 0,
                    validator: SafetyValidator | None = None, in_place: bool = False,
                    spaces: SpaceCache | None = None,
                    ) -> tuple[Measured, nn.Module | None, PruningSpace | None]:
    """Prune ``model`` with ``plan`` scaled onto ``band``; returns ``(measured, pruned, space)``.

    ``in_place=True`` analyses and cuts ``model`` itself (the caller passes a fresh copy, e.g. with
    Taylor calibration gradients); otherwise a copy is analysed and ``model`` is left untouched. With
    ``spaces`` the analysis is done once per criterion and cached there, and every call cuts a fork of
    the cached space (``model`` is only analysed on a miss). An infeasible target, an allocation the
    validator cannot make safe, or a plan the engine rejects becomes ``Measured.status`` ``infeasible``
    / ``rejected`` / ``error`` with the reason, and ``pruned`` is None; a cut that misses the band is
    an ``ok`` record with ``in_band`` False (the Master Agent learns from its MAC error).
    """
    repair = None
    if validator is not None:
        def repair(space, p, b, solution):
            return validator.repair_solution(space, p, b, solution, solve)
    t = time.perf_counter()
    try:
        if spaces is not None:
            space = spaces.get(model, example, plan, seed, in_place=in_place)
        else:
            space = PruningSpace(model, example, plan, seed=seed) if in_place else None
        pruned, res, space = prune_to_target(model, example, plan, band, seed=seed, space=space, repair=repair,
                                             strict=False, fork=spaces is not None)
    except (PruningError, UnsafePlanError) as exc:  # InfeasibleTarget is a PruningError
        status = ("infeasible" if isinstance(exc, InfeasibleTarget)
                  else "rejected" if isinstance(exc, UnsafePlanError) else "error")
        return Measured(plan=plan, status=status, error=first_line(exc),
                        timings={"solve": time.perf_counter() - t}), None, None
    timings = {k: v for k, v in res.seconds.items() if k != "total"}
    measured = Measured(plan=res.plan, solver_ratio=res.ratio, predicted_macs=float(res.predicted_macs),
                        achieved_macs=float(res.achieved_macs), allocation_digest=res.allocation_digest,
                        params=int(res.params), error_pct=res.error_pct, in_band=res.in_band,
                        kind_ratios=res.kind_ratios, notes=list(res.notes) + _frozen_note(res), timings=timings)
    return measured, pruned, space


def _frozen_note(res) -> list[str]:
    if not res.frozen_groups:
        return []
    return [f"{len(res.frozen_groups)} groups cannot be cut on this model (e.g. {res.frozen_groups[0][:120]})"]
