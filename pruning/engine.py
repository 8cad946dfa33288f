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
from pruning.probe import blame_cut
from pruning.solver import InfeasibleTarget, MacBand, Solution, solve
from pruning.space import PruningError, PruningSpace, count_macs_params
from pruning.units import fmt_macs

#: ``repair(space, plan, band, solution) -> (plan, solution, notes)``: a post-solve check that may
#: re-solve with a corrected plan (the safety validator's ``repair_solution``); it raises to reject.
Repair = Callable[[PruningSpace, PruningPlan, MacBand, Solution], tuple[PruningPlan, Solution, list[str]]]


class OutOfBand(InfeasibleTarget):
    """The pruned model's counted MACs miss the band (one line naming the likely cause)."""


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
    mac_source: str = Field("analytic", description="analytic (exact prediction) or measured (cut copies counted)")
    measured_probes: int = 0
    frozen_groups: list[str] = Field(default_factory=list, description="groups never cut on this model, with the reason")
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
                    seed: int = 0, space: PruningSpace | None = None, repair: Repair | None = None, *,
                    strict: bool = True, fork: bool = False) -> tuple[nn.Module, PruneResult, PruningSpace]:
    """Prune a copy of ``model`` so its MACs land in ``band`` (the original is left untouched).

    Steps: analyse a copy (dependency graph, importance, MAC model) unless ``space`` is given, solve
    (analytically, or with measured probes where the MAC model missed on this model), let ``repair``
    correct the solved allocation, cut once, and re-count MACs on the pruned model. The first cut is
    optimistic: if it breaks the model, the original is analysed again with a trial cut (which freezes
    the groups that break it) and solved again; a recount that differs from an analytic prediction
    re-solves with measured probes and cuts again.

    ``fork=True`` cuts a copy of ``space`` (:meth:`PruningSpace.fork`), leaving it unapplied for the
    next candidate; otherwise the space's own model is cut. The returned space is the one that was cut
    (its ``pruning_history()`` rebuilds the pruned model). ``strict`` (the default) raises
    :class:`OutOfBand` with a one-line reason when the pruned model misses the band. Raises
    ``PruningError`` subclasses (``InfeasibleTarget`` among them) with one-line messages for bad plans
    and infeasible targets; whatever ``repair`` raises passes through.
    """
    t0 = time.perf_counter()
    owned = space is None  # analysed here: cut in place, optimistically (no trial cut first)
    if space is None:
        space = PruningSpace.build(model, example, plan, seed=seed, trial=False)
    t_build = time.perf_counter()
    notes: list[str] = []
    for attempt in range(MAX_CUT_REPAIRS + 1):
        _, solution, more = _solve(space, plan, band, repair)
        notes += more
        t_solve = time.perf_counter()
        in_place = owned and not fork
        try:
            work = space if in_place else space.fork()
            pruned, macs, params = cut_and_count(work, solution.cuts(), example)
        except Exception as exc:  # noqa: BLE001 - the cut breaks the model at this allocation
            if attempt == MAX_CUT_REPAIRS:
                raise _cut_error(model, exc) from None
            if in_place:  # the cut ruined the space's model: analyse the original again, with the trial cut
                trialed = space.trialed
                space = PruningSpace.build(model, example, plan, seed=seed)
                if not trialed:  # the trial cut freezes what breaks; solve again on that
                    notes.append(f"the cut failed ({type(exc).__name__}): analysed again with a trial cut")
                    continue
            if not _freeze_culprits(space, solution, exc, notes):  # same analysis, same group indices
                raise _cut_error(model, exc) from None
            continue
        if macs == solution.predicted_macs or solution.source == "measured" or attempt == MAX_CUT_REPAIRS:
            break
        notes.append(f"MAC prediction {solution.predicted_macs:.0f} differs from the recount {macs:.0f}: "
                     "re-solved with measured probes")
        if in_place:  # the space's own model was cut: analyse the original again
            space = PruningSpace.build(model, example, plan, seed=seed)
        space.mac_model.exact = False
    t_count = time.perf_counter()
    # The band verdict always comes from the count on the really pruned model, never from the prediction.
    result = PruneResult(
        base_macs=space.base_macs, base_params=sum(p.numel() for p in model.parameters()),
        target_macs=band.target_macs, predicted_macs=solution.predicted_macs, achieved_macs=macs, params=params,
        error_pct=band.error_pct(macs), in_band=band.contains(macs), band=band, ratio=solution.ratio,
        probes=solution.probes, prediction_exact=macs == solution.predicted_macs,
        granularity_pct=solution.granularity_pct, plan=solution.plan, allocation_digest=solution.digest(),
        kind_ratios=solved_kind_ratios(space, solution), notes=notes, solution=solution,
        mac_source=solution.source, measured_probes=solution.measured_probes,
        frozen_groups=[f.line() for f in space.frozen],
        seconds={"build": t_build - t0, "solve": t_solve - t_build, "apply": t_count - t_solve,  # cut + recount
                 "total": t_count - t0},
    )
    if strict and not result.in_band:
        raise OutOfBand(out_of_band_reason(result, len(space.frozen)))
    return pruned, result, work


MAX_CUT_REPAIRS = 3  # re-solves after a cut that breaks the model or misses its prediction


def _cut_error(model: nn.Module, exc: Exception) -> PruningError:
    return PruningError(f"cutting {type(model).__name__} to this allocation breaks it: "
                        f"{type(exc).__name__}: {str(exc).splitlines()[0][:140] if str(exc) else ''}")


def _freeze_culprits(space: PruningSpace, solution: Solution, exc: Exception, notes: list[str]) -> bool:
    """After a cut that broke the model: freeze the groups to blame (found on copies); False if none found."""
    blame, reason = blame_cut(space, solution.cuts())
    if not blame:
        return False
    space.freeze(blame, reason)
    space.refresh()
    notes.append(f"cut failed ({type(exc).__name__}); froze {len(blame)} groups: {reason[:160]}")
    return True


def _solve(space: PruningSpace, plan: PruningPlan, band: MacBand, repair: Repair | None
           ) -> tuple[PruningPlan, Solution, list[str]]:
    solution = solve(space, plan, band)
    if repair is None:
        return plan, solution, []
    return repair(space, plan, band, solution)


def out_of_band_reason(result: PruneResult, frozen: int) -> str:
    """One line: where the pruned model landed and the likely cause."""
    band = result.band
    line = (f"the pruned model has {fmt_macs(result.achieved_macs)} MACs, {result.error_pct:+.2f}% from the target "
            f"{fmt_macs(band.target_macs)} (band +{band.overshoot_pct:g}% / -{band.undershoot_pct:g}%): ")
    if result.granularity_pct > band.overshoot_pct + band.undershoot_pct:
        return line + (f"one alignment step (round_to={result.plan.round_to}, finer on narrow groups) of the finest "
                       f"group moves the MACs by {result.granularity_pct:.2f}% (use a smaller --round-to or a wider band)")
    if result.mac_source == "measured":
        return line + f"{result.measured_probes} measured cuts found none in the band (widen the band)"
    if frozen:
        return line + f"{frozen} groups cannot be cut on this model (see the profile's frozen groups)"
    return line + "the plan's shape cannot reach the band (widen the band or change the plan)"
