"""Latency solver: scale a plan's shape until the pruned model's MEASURED latency meets a budget.

MACs are only a proxy for latency (the paper's pruned ResNet-50 is 0.55x *slower* on CPU), so this
solver closes the loop on the real number: onnxruntime CPU latency (median of timed runs at the
deployment batch size) of the exported pruned model.

Search (on the MAC target, which the exact MAC solver turns into an allocation of the plan's shape):

1. Measure the unpruned model once: ``L0`` ms at ``M0`` MACs. A budget ``>= L0`` is an error.
2. First guess: latency proportional to MACs, aimed at the middle of the band
   ``[budget * (1 - undershoot), budget]``: ``m1 = M0 * aim / L0`` (clamped to what the plan's safety
   limits can reach).
3. Each probe: :func:`pruning.solver.solve` the MAC target (analytic, milliseconds), cut a deep copy
   of the analysed space (:func:`copy_space`, ~0.2 s for ResNet-50; the space itself stays unpruned),
   export to ONNX (parity-checked), time with onnxruntime. Noise handling: a median within
   ``remeasure_pct`` of the budget is re-measured (more runs on the same session, pooled) before it
   decides anything; a probe that contradicts monotonicity (more MACs yet faster than a probe over
   the budget with fewer MACs) is re-measured together with the bracket end it contradicts; a probe
   at the plan's floor is re-measured before the budget is called unreachable.
4. Next MAC target: secant between the tightest measured points below and above the budget (the
   unpruned model is always a point above), safeguarded to stay strictly inside the bracket (falls
   back to bisection when the secant stalls); with no point below yet, secant extrapolation from the
   two smallest points above. A probe at the plan's floor that is still over budget proves the budget
   unreachable within the safety limits (:class:`LatencyInfeasible`).
5. Stop at the first probe inside the band; otherwise, after ``max_probes`` measurements, return the
   slowest probe that met the budget (``in_band=False``) or raise :class:`LatencyNotMet`.

``max_probes`` counts every timed measurement of a pruned candidate (re-measurements included); the
one measurement of the unpruned model is extra. Latency is measured in absolute milliseconds on the
machine at hand: a busy machine makes every probe slower, which the solver sees as a harder budget.

``round_to`` (kept channels are a multiple of it) defaults per backend to the multiple its kernels
like best: see :data:`DEFAULT_ROUND_TO` for the measurement.
"""
from __future__ import annotations

import contextlib
import copy
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch_pruning as tp
from pydantic import BaseModel, ConfigDict, Field

from pruning.measure.export import export_onnx
from pruning.measure.latency import LatencyStats, _ort_feed, _stats, available_cpus, cpu_name, make_ort_session
from pruning.plan import PruningPlan
from pruning.solver import InfeasibleTarget, MacBand, solve
from pruning.space import Allocation, Cut, PruningError, PruningSpace, count_macs_params

BACKENDS = ("ort-cpu",)

#: Default ``round_to`` per latency backend. Measured with ``python benchmarks/latency.py --round-to-sweep``
#: (onnxruntime 1.32 CPU, 2 intra-op threads, batch 8, 224x224, random weights; round_to 8/16/32 solved
#: to the same MAC target by the MAC solver; all variants timed interleaved in one process; AMD EPYC
#: Zen 4 with AVX-512, 2 vCPUs, machine under load). Median speedup over round_to 8 at equal MACs:
#:
#:     ResNet-50 @ 2.06 G   round_to 16: 1.047x (20 runs), 1.043x (40 runs)
#:                          round_to 32: 1.055x (20 runs), 1.032x (40 runs)
#:     DeiT-Tiny @ 0.62 G   round_to 16: 0.999x, round_to 32: 1.008x (20 runs; no effect)
#:
#: 16 and 32 are equally fast; 16 is finer (closer MAC/latency steps, fewer parameters at the same
#: MACs, ViT head_dim not limited to 32/64). MLAS's NCHWc convolutions use 16-channel blocks on AVX-512
#: (``NchwcBlockSize = 16``; 8 on AVX2), so multiples of 16 leave no partial blocks on either.
#: Tables: benchmarks/README.md, "round_to on onnxruntime CPU".
DEFAULT_ROUND_TO: dict[str, int] = {"ort-cpu": 16}


class LatencyTargetError(PruningError):
    """A latency budget cannot be met as asked (one-line message)."""


class LatencyInfeasible(LatencyTargetError):
    """The budget lies outside what pruning within the plan's safety limits can reach."""


class LatencyNotMet(LatencyTargetError):
    """No measured candidate met the budget within the probe limit."""


class LatencyProbe(BaseModel):
    """One measured model: the unpruned one (probe 0) or a candidate."""

    probe: int = Field(description="0 = unpruned model; candidates count from 1")
    mac_target: float | None = Field(None, description="MAC target handed to the MAC solver")
    ratio: float | None = Field(None, description="plan base ratio the MAC solver chose")
    macs: float = Field(description="MACs per image of the measured model (exact prediction == count)")
    params: int
    median_ms: float
    p90_ms: float
    runs: int = Field(description="timed runs behind the median (pooled over re-measurements)")
    measurements: int = Field(1, description="1 + number of re-measurements")
    verdict: str = Field(description="base | over | in_band | under")
    export_s: float = 0.0
    seconds: float = Field(0.0, description="wall time of this probe (solve + copy + cut + export + timing)")


class LatencySolution(BaseModel):
    """The answer of :func:`solve_latency`: the plan scale whose measured latency meets the budget."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    target_ms: float
    lower_ms: float = Field(description="band floor: target_ms * (1 - undershoot_pct / 100)")
    backend: str
    batch_size: int
    threads: int
    device: str
    input_size: tuple[int, int, int]
    round_to: int
    base_macs: float
    base_median_ms: float
    base_p90_ms: float
    achieved_ms: float = Field(description="median latency of the chosen model, as measured by the solver")
    achieved_p90_ms: float
    macs: float
    mac_target: float
    ratio: float
    met: bool = Field(description="achieved_ms <= target_ms")
    in_band: bool = Field(description="lower_ms <= achieved_ms <= target_ms")
    measured_probes: int = Field(description="timed measurements of candidates (re-measurements included)")
    probes: list[LatencyProbe]
    plan: PruningPlan
    allocation: dict[int, tuple[int, int]]
    seconds: float

    def cuts(self) -> Allocation:
        return {g: Cut(dims=d, heads=h) for g, (d, h) in self.allocation.items()}

    @property
    def speedup(self) -> float:
        return self.base_median_ms / self.achieved_ms


# --------------------------------------------------------------------------------------------
# copying an analysed space
# --------------------------------------------------------------------------------------------
def copy_space(space: PruningSpace) -> PruningSpace:
    """Deep copy of an (unapplied) space: model, dependency graph and groups copied consistently.

    Plain ``copy.deepcopy`` fails on two things the dependency graph holds: the ``torch_pruning.ops``
    module and autograd nodes (``grad_fn``) from tracing; both are read-only after tracing, so the copy
    shares them. The graph's linked nodes also recurse deeper than Python's default limit, so the copy
    runs in a thread with a large stack and a raised recursion limit.
    """
    if getattr(space, "_applied", False):
        raise PruningError("cannot copy a space that was already applied")
    memo: dict[int, object] = {id(tp.ops): tp.ops}
    for node in space.pruner.DG.module2node.values():
        for gf in (node.grad_fn, getattr(node.module, "grad_fn", None)):
            if gf is not None:
                memo[id(gf)] = gf
    result: dict[str, object] = {}

    def run() -> None:
        old = sys.getrecursionlimit()
        sys.setrecursionlimit(max(old, 200_000))
        try:
            result["space"] = copy.deepcopy(space, memo)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            result["error"] = exc
        finally:
            sys.setrecursionlimit(old)

    old_stack = threading.stack_size()
    threading.stack_size(512 * 2**20)
    try:
        worker = threading.Thread(target=run, name="copy_space")
        worker.start()
    finally:
        threading.stack_size(old_stack)
    worker.join()
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    return result["space"]  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------
class OrtTimer:
    """An onnxruntime CPU session plus the timed runs collected so far (re-measure = add runs)."""

    def __init__(self, onnx_path: str | Path, batch_size: int, threads: int, warmup: int = 3):
        self.sess = make_ort_session(onnx_path, threads)
        self.feed = _ort_feed(self.sess, batch_size)
        self.batch_size, self.threads, self.warmup = batch_size, threads, warmup
        self.times: list[float] = []
        for _ in range(warmup):
            self.sess.run(None, self.feed)

    def once(self) -> float:
        t0 = time.perf_counter()
        self.sess.run(None, self.feed)
        ms = (time.perf_counter() - t0) * 1e3
        self.times.append(ms)
        return ms

    def measure(self, runs: int) -> LatencyStats:
        for _ in range(runs):
            self.once()
        return self.stats()

    def stats(self) -> LatencyStats:
        return _stats(self.times, backend="onnxruntime-cpu", mode="ort", batch_size=self.batch_size,
                      threads=self.threads, warmup=self.warmup, device=cpu_name())


def time_interleaved(timers: dict[str, OrtTimer], runs: int) -> dict[str, LatencyStats]:
    """Round-robin ``runs`` timed runs over several sessions (order rotates each round, so slow drift
    and the position in the round hit every model alike); returns each model's stats."""
    names = list(timers)
    for i in range(runs):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            timers[name].once()
    return {n: t.stats() for n, t in timers.items()}


def export_for_timing(model: torch.nn.Module, input_size: Sequence[int], path: str | Path):
    """ONNX export (TorchScript exporter, opset 17, dynamic batch) with onnxruntime parity check."""
    return export_onnx(model, tuple(input_size), path, atol=1e-3, rtol=1e-4)


# --------------------------------------------------------------------------------------------
# the solver
# --------------------------------------------------------------------------------------------
def solve_latency(
    space: PruningSpace,
    plan: PruningPlan,
    target_ms: float,
    batch_size: int = 8,
    backend: str = "ort-cpu",
    threads: int | None = None,
    max_probes: int = 8,
    runs: int = 20,
    warmup: int = 3,
    undershoot_pct: float = 10.0,
    remeasure_pct: float = 4.0,
    round_to: int | None = None,
    work_dir: str | Path | None = None,
    log: Callable[[str], None] | None = None,
) -> LatencySolution:
    """Find the scale of ``plan`` whose measured median latency lies in ``[target*(1-under), target]``.

    ``space`` must be unapplied; it is never cut here (candidates are cut on copies), so the caller
    prunes the answer with ``space.apply(solution.cuts())``. ``round_to=None`` replaces the plan's
    ``round_to`` by the backend default (:data:`DEFAULT_ROUND_TO`); pass ``round_to=plan.round_to`` to
    keep the plan's.
    """
    t_start = time.perf_counter()
    say = log or (lambda _msg: None)
    if backend not in BACKENDS:
        raise LatencyTargetError(f"unknown latency backend '{backend}'; available: {', '.join(BACKENDS)}")
    if not target_ms > 0:
        raise LatencyTargetError(f"latency budget must be positive, got {target_ms} ms")
    if batch_size < 1 or max_probes < 1 or runs < 1:
        raise LatencyTargetError("batch_size, max_probes and runs must be >= 1")
    if getattr(space, "_applied", False):
        raise PruningError("the space was already applied; build a new one from the original model")
    round_to = int(round_to or DEFAULT_ROUND_TO[backend])
    plan = plan.model_copy(update={"round_to": round_to})
    space.validate(plan)
    threads = int(threads or available_cpus())
    threads_txt = f"{threads} thread{'s' if threads != 1 else ''}"
    input_size = tuple(int(s) for s in space.example.shape[1:])
    lower_ms = target_ms * (1 - undershoot_pct / 100)
    aim_ms = (target_ms + lower_ms) / 2
    base_macs = float(space.base_macs)
    probes: list[LatencyProbe] = []
    measured = 0
    candidates: dict[float, tuple[LatencyProbe, Allocation, float]] = {}  # macs -> (probe, alloc, ratio)

    with contextlib.ExitStack() as stack:
        if work_dir is None:
            work_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="latsolve_"))
        work = Path(work_dir)
        work.mkdir(parents=True, exist_ok=True)

        # -- the unpruned model -----------------------------------------------------------
        t0 = time.perf_counter()
        exp = export_for_timing(space.model, input_size, work / "base.onnx")
        base = OrtTimer(exp.path, batch_size, threads, warmup).measure(runs)
        with contextlib.suppress(OSError):
            Path(exp.path).unlink()
        base_params = sum(p.numel() for p in space.model.parameters())
        probes.append(LatencyProbe(probe=0, macs=base_macs, params=base_params, median_ms=base.median_ms,
                                   p90_ms=base.p90_ms, runs=base.runs, verdict="base", export_s=exp.seconds,
                                   seconds=time.perf_counter() - t0))
        say(f"unpruned: {base_macs / 1e9:.4g} G MACs, {base.median_ms:.2f} ms median (p90 {base.p90_ms:.2f}) "
            f"at batch {batch_size}, {threads_txt}")
        if target_ms >= base.median_ms:
            raise LatencyInfeasible(
                f"latency budget {target_ms:g} ms is not below the unpruned model's {base.median_ms:.2f} ms "
                f"(median, batch {batch_size}, {backend}, {threads_txt}); nothing to prune")

        try:
            floor_macs = float(space.max_reduction_macs(plan))
        except InfeasibleTarget as exc:
            raise LatencyInfeasible(str(exc)) from None

        def solve_at(mac_target: float):
            mac_target = min(max(mac_target, floor_macs), base_macs * 0.999)
            band = MacBand(target_macs=mac_target, overshoot_pct=0.5, undershoot_pct=50.0)
            try:
                sol = solve(space, plan, band)
            except InfeasibleTarget:  # below the floor after all: take the floor allocation
                sol = solve(space, plan, MacBand(target_macs=floor_macs * 1.001, overshoot_pct=0.5,
                                                 undershoot_pct=50.0))
            return mac_target, sol

        timers: dict[int, OrtTimer] = {}  # live sessions of the bracket ends, for re-measuring

        def verdict_of(ms: float) -> str:
            return "over" if ms > target_ms else ("in_band" if ms >= lower_ms else "under")

        def remeasure(p: LatencyProbe) -> None:
            """More timed runs on the same session, pooled with the earlier ones."""
            nonlocal measured
            st = timers[p.probe].measure(runs)
            measured += 1
            p.median_ms, p.p90_ms, p.runs, p.measurements = st.median_ms, st.p90_ms, st.runs, p.measurements + 1
            p.verdict = verdict_of(p.median_ms)
            say(f"probe {p.probe} re-measured: {p.median_ms:.2f} ms median (p90 {p.p90_ms:.2f}, {p.runs} runs)"
                f" -> {p.verdict}")

        def measure(mac_target: float, sol) -> LatencyProbe:
            nonlocal measured
            t = time.perf_counter()
            cand = copy_space(space)
            model = cand.apply(sol.cuts())
            idx = len(probes)
            exp = export_for_timing(model, input_size, work / f"probe{idx}.onnx")
            params = sum(p.numel() for p in model.parameters())
            del cand, model
            timer = OrtTimer(exp.path, batch_size, threads, warmup)
            with contextlib.suppress(OSError):
                Path(exp.path).unlink()  # the session holds the graph; large models would fill the disk
            st = timer.measure(runs)
            measured += 1
            p = LatencyProbe(probe=idx, mac_target=mac_target, ratio=sol.ratio, macs=sol.predicted_macs,
                             params=params, median_ms=st.median_ms, p90_ms=st.p90_ms, runs=st.runs,
                             verdict=verdict_of(st.median_ms), export_s=exp.seconds, seconds=0.0)
            timers[idx] = timer
            probes.append(p)
            candidates[p.macs] = (p, sol.cuts(), sol.ratio)
            say(f"probe {idx}: target {mac_target / 1e9:.4g} G -> {p.macs / 1e9:.4g} G MACs, "
                f"{p.median_ms:.2f} ms median (p90 {p.p90_ms:.2f}, {p.runs} runs) -> {p.verdict}")
            # near the budget one measurement is not enough to decide: pool more runs
            while (abs(p.median_ms - target_ms) <= target_ms * remeasure_pct / 100 and measured < max_probes
                   and p.measurements < 3):
                remeasure(p)
            p.seconds = time.perf_counter() - t
            return p

        def check_inversion(p: LatencyProbe) -> None:
            """More MACs measured faster than fewer MACs across the budget: one of them was noise.
            Re-measure the new probe and the most contradicting bracket end once each."""
            others = [q for q in probes if q.probe > 0 and q is not p and q.probe in timers]
            if p.verdict == "over":
                bad = [q for q in others if q.verdict != "over" and q.macs > p.macs]
                q = max(bad, key=lambda q: q.macs, default=None)
            else:
                bad = [q for q in others if q.verdict == "over" and q.macs < p.macs]
                q = min(bad, key=lambda q: q.macs, default=None)
            if q is None:
                return
            for r in (p, q):
                if measured < max_probes and r.measurements < 3:
                    remeasure(r)

        def drop_timers() -> None:
            """Keep sessions only for the tightest probe over and the tightest probe not over the budget."""
            over = [q for q in probes if q.probe > 0 and q.verdict == "over"]
            rest = [q for q in probes if q.probe > 0 and q.verdict != "over"]
            keep = {min(over, key=lambda q: q.macs).probe} if over else set()
            if rest:
                keep.add(max(rest, key=lambda q: q.macs).probe)
            for k in [k for k in timers if k not in keep]:
                del timers[k]

        def next_target() -> float:
            """Secant on (MACs, median ms) toward ``aim_ms``, safeguarded inside the bracket."""
            over = sorted((p for p in probes if p.median_ms > target_ms), key=lambda p: p.macs)
            under = sorted((p for p in probes if p.probe > 0 and p.median_ms < lower_ms), key=lambda p: p.macs)
            if under:  # bracketed: tightest under (largest MACs) and tightest over (smallest MACs)
                a, b = under[-1], over[0]
                if b.median_ms > a.median_ms:
                    m = a.macs + (aim_ms - a.median_ms) * (b.macs - a.macs) / (b.median_ms - a.median_ms)
                else:
                    m = (a.macs + b.macs) / 2
                lo, hi = a.macs, b.macs
                margin = 0.1 * (hi - lo)
                if not (lo + margin <= m <= hi - margin):  # secant outside / hugging a side: bisect
                    m = (lo + hi) / 2
                return m
            # no point below yet: extrapolate from the two smallest points above the budget
            a, b = over[0], over[1] if len(over) > 1 else over[0]
            if b is not a and b.median_ms > a.median_ms:
                slope = (b.median_ms - a.median_ms) / (b.macs - a.macs)
                m = a.macs - (a.median_ms - aim_ms) / slope
            else:
                m = a.macs * aim_ms / a.median_ms
            return min(m, a.macs * 0.98)

        # -- first guess: latency proportional to MACs ---------------------------------------
        mac_target = base_macs * aim_ms / base.median_ms
        best: LatencyProbe | None = None
        while measured < max_probes:
            mac_target, sol = solve_at(mac_target)
            if sol.predicted_macs in candidates:  # the channel grid maps this target onto a measured model
                prev = candidates[sol.predicted_macs][0]
                if prev.verdict == "in_band":
                    best = prev
                    break
                # step halfway toward the other side of the bracket instead
                over = [p.macs for p in probes if p.median_ms > target_ms and p.macs > prev.macs]
                under = [p.macs for p in probes if p.probe > 0 and p.median_ms <= target_ms and p.macs < prev.macs]
                other = min(over) if prev.verdict == "under" and over else (max(under) if under else floor_macs)
                mac_target2, sol = solve_at((prev.macs + other) / 2)
                if sol.predicted_macs in candidates:
                    say("channel granularity: no unmeasured model between the bracket ends")
                    break
                mac_target = mac_target2
            p = measure(mac_target, sol)
            if p.verdict != "in_band":
                check_inversion(p)
            at_floor = p.macs <= floor_macs * 1.005
            if p.verdict == "over" and at_floor and measured < max_probes and p.measurements < 2:
                remeasure(p)  # do not call a budget unreachable on one noisy measurement
            in_band = [q for q in probes if q.verdict == "in_band"]
            if in_band:
                best = max(in_band, key=lambda q: q.macs)
                break
            if p.verdict == "over" and at_floor:
                raise LatencyInfeasible(
                    f"latency budget {target_ms:g} ms is below what the safety limits can reach: the smallest "
                    f"model this plan allows ({p.macs / 1e9:.4g} G MACs, max_layer_ratio={plan.max_layer_ratio}) "
                    f"measures {p.median_ms:.2f} ms; reachable range is about {p.median_ms:.2f}-"
                    f"{base.median_ms:.2f} ms (batch {batch_size}, {backend}, {threads_txt})")
            drop_timers()
            mac_target = next_target()

        if best is None:
            met = [p for p in probes if p.probe > 0 and p.median_ms <= target_ms]
            if not met:
                fastest = min((p for p in probes if p.probe > 0), key=lambda p: p.median_ms, default=None)
                detail = (f"; fastest candidate {fastest.median_ms:.2f} ms at {fastest.macs / 1e9:.4g} G MACs"
                          if fastest else "")
                raise LatencyNotMet(
                    f"no candidate met the {target_ms:g} ms budget within {max_probes} measured probes{detail}")
            best = max(met, key=lambda p: p.median_ms)

    _, alloc, ratio = candidates[best.macs]
    return LatencySolution(
        target_ms=target_ms, lower_ms=lower_ms, backend=backend, batch_size=batch_size, threads=threads,
        device=cpu_name(), input_size=input_size, round_to=round_to, base_macs=base_macs,
        base_median_ms=base.median_ms, base_p90_ms=base.p90_ms, achieved_ms=best.median_ms,
        achieved_p90_ms=best.p90_ms, macs=best.macs, mac_target=best.mac_target or best.macs, ratio=ratio,
        met=best.median_ms <= target_ms, in_band=lower_ms <= best.median_ms <= target_ms,
        measured_probes=measured, probes=probes, plan=plan.scaled(min(ratio, 0.999)),
        allocation={g: (c.dims, c.heads) for g, c in alloc.items()}, seconds=time.perf_counter() - t_start,
    )


class LatencyPruneResult(BaseModel):
    """:func:`prune_to_latency`: the solution plus what the really pruned model counts."""

    solution: LatencySolution
    achieved_macs: float
    params: int
    base_params: int
    prediction_exact: bool


def prune_to_latency(model: torch.nn.Module, example: torch.Tensor, plan: PruningPlan, target_ms: float,
                     seed: int = 0, space: PruningSpace | None = None, **kwargs):
    """Prune a copy of ``model`` so that its measured latency meets ``target_ms`` (see :func:`solve_latency`).

    Returns ``(pruned_model, LatencyPruneResult, space)``; the original model is left untouched.
    """
    if space is None:
        space = PruningSpace.build(model, example, plan, seed=seed)
    solution = solve_latency(space, plan, target_ms, **kwargs)
    pruned = space.apply(solution.cuts())
    macs, params = count_macs_params(pruned, example)
    result = LatencyPruneResult(solution=solution, achieved_macs=macs, params=params,
                                base_params=sum(p.numel() for p in model.parameters()),
                                prediction_exact=macs == solution.macs)
    return pruned, result, space

