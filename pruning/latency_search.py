"""Latency solver: scale a plan's shape until the pruned model's MEASURED latency meets a budget.

MACs are only a proxy for latency (the paper's pruned ResNet-50 is 0.55x *slower* on CPU), so this
solver closes the loop on the real number: onnxruntime CPU latency (median of timed runs at the
deployment batch size) of the exported pruned model.

Search (on the MAC target, which the exact MAC solver turns into an allocation of the plan's shape):

1. Measure the unpruned model once: ``L0`` ms at ``M0`` MACs. A budget ``>= L0`` is an error.
2. First guess: latency proportional to MACs, aimed at the middle of the band
   ``[budget * (1 - undershoot), budget]``: ``m1 = M0 * aim / L0`` (clamped to what the plan's safety
   limits can reach).
3. Each probe: :func:`pruning.solver.solve` the MAC target (analytic, milliseconds), cut a copy of
   the model (:meth:`pruning.space.PruningSpace.pruned_copy`: a fork of the analysed space, i.e. a
   copy of the model and of its dependency graph, no new trace; the space itself stays unpruned), export to ONNX (parity-checked), time with
   onnxruntime. Noise handling: a median within ``remeasure_pct`` of the budget is re-measured (more
   runs on the same session, pooled) before it decides anything; a probe that contradicts
   monotonicity (more MACs yet faster than a probe over the budget with fewer MACs) is re-measured
   together with the bracket end it contradicts; a probe at the plan's floor is re-measured before
   the budget is called unreachable.
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
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field

from pruning.engine import cut_and_count
from pruning.groups import Allocation, Cut
from pruning.measure.export import export_onnx
from pruning.measure.latency import LatencyStats, available_cpus, cpu_name, latency_stats, make_ort_session, ort_feed
from pruning.plan import PruningPlan
from pruning.solver import InfeasibleTarget, MacBand, Solution, solve
from pruning.space import PruningError, PruningSpace
from pruning.units import fmt_macs

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
    """The answer of :class:`LatencySearch`: the plan scale whose measured latency meets the budget."""

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
# timing
# --------------------------------------------------------------------------------------------
class OrtTimer:
    """An onnxruntime CPU session plus the timed runs collected so far (re-measure = add runs)."""

    def __init__(self, onnx_path: str | Path, batch_size: int, threads: int, warmup: int = 3):
        self.sess = make_ort_session(onnx_path, threads)
        self.feed = ort_feed(self.sess, batch_size)
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
        return latency_stats(self.times, backend="onnxruntime-cpu", mode="ort", batch_size=self.batch_size,
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
# the search
# --------------------------------------------------------------------------------------------
class LatencySearchConfig(BaseModel):
    """What :class:`LatencySearch` aims at and how it measures (bad values are :class:`LatencyTargetError`)."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    target_ms: float = Field(description="latency budget: median ms per batch the pruned model must not exceed")
    batch_size: int = Field(8, description="batch size of the timed runs (the deployment batch size)")
    backend: str = Field("ort-cpu", description=f"latency backend, one of {BACKENDS}")
    threads: int | None = Field(None, description="intra-op threads of the timing sessions (None: all available CPUs)")
    max_probes: int = Field(8, description="timed measurements of candidates, re-measurements included")
    runs: int = Field(20, description="timed runs per measurement (a re-measurement adds as many, pooled)")
    warmup: int = Field(3, description="untimed runs when a timing session starts")
    undershoot_pct: float = Field(10.0, description="band floor below the budget, %: accept [target*(1-u), target]")
    remeasure_pct: float = Field(4.0, description="a median within this % of the budget is re-measured before deciding")
    round_to: int | None = Field(None, description="kept channels are a multiple of it (None: backend default, "
                                                   "DEFAULT_ROUND_TO; the plan's own round_to is replaced)")
    work_dir: str | Path | None = Field(None, description="where the ONNX exports go (None: a temporary directory)")


class LatencySearch:
    """Find the scale of ``plan`` whose measured median latency lies in ``[target*(1-under), target]``.

    ``space`` must be unapplied; it is never cut here (each candidate is cut on a copy,
    :meth:`PruningSpace.pruned_copy`), so the caller prunes the answer with ``space.apply(solution.cuts())``.
    ``round_to=None`` replaces the plan's ``round_to`` by the backend default (:data:`DEFAULT_ROUND_TO`);
    pass ``round_to=plan.round_to`` to keep the plan's. Use once: :meth:`run` returns the solution.
    """

    def __init__(self, space: PruningSpace, plan: PruningPlan, config: LatencySearchConfig,
                 log: Callable[[str], None] | None = None):
        c = self.config = config
        self.say = log or (lambda _msg: None)
        if c.backend not in BACKENDS:
            raise LatencyTargetError(f"unknown latency backend '{c.backend}'; available: {', '.join(BACKENDS)}")
        if not c.target_ms > 0:
            raise LatencyTargetError(f"latency budget must be positive, got {c.target_ms} ms")
        if c.batch_size < 1 or c.max_probes < 1 or c.runs < 1:
            raise LatencyTargetError("batch_size, max_probes and runs must be >= 1")
        if getattr(space, "_applied", False):
            raise PruningError("the space was already applied; build a new one from the original model")
        self.space = space
        self.round_to = int(c.round_to or DEFAULT_ROUND_TO[c.backend])
        self.plan = plan.model_copy(update={"round_to": self.round_to})
        space.validate(self.plan)
        self.threads = int(c.threads or available_cpus())
        self.threads_txt = f"{self.threads} thread{'s' if self.threads != 1 else ''}"
        self.input_size = tuple(int(s) for s in space.example.shape[1:])
        self.target_ms = c.target_ms
        self.lower_ms = c.target_ms * (1 - c.undershoot_pct / 100)
        self.aim_ms = (c.target_ms + self.lower_ms) / 2
        self.base_macs = float(space.base_macs)
        self.probes: list[LatencyProbe] = []
        self.measured = 0
        self.candidates: dict[float, tuple[LatencyProbe, Allocation, float]] = {}  # macs -> (probe, alloc, ratio)
        self.timers: dict[int, OrtTimer] = {}  # live sessions of the bracket ends, for re-measuring
        self.base: LatencyStats | None = None
        self.floor_macs = 0.0
        self.work = Path()

    def run(self) -> LatencySolution:
        """Measure the unpruned model, then probe plan scales until one lands in the band."""
        t_start = time.perf_counter()
        with contextlib.ExitStack() as stack:
            work_dir = self.config.work_dir
            if work_dir is None:
                work_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="latsolve_"))
            self.work = Path(work_dir)
            self.work.mkdir(parents=True, exist_ok=True)
            self.measure_base()
            try:
                self.floor_macs = float(self.space.max_reduction_macs(self.plan))
            except InfeasibleTarget as exc:
                raise LatencyInfeasible(str(exc)) from None
            best = self.search()
            if best is None:
                best = self.best_met()
        return self.solution(best, t_start)

    # -- measuring ------------------------------------------------------------------------
    def measure_base(self) -> None:
        """Time the unpruned model (probe 0); a budget not below it is :class:`LatencyInfeasible`."""
        c, space = self.config, self.space
        t0 = time.perf_counter()
        exp = export_for_timing(space.model, self.input_size, self.work / "base.onnx")
        base = self.base = OrtTimer(exp.path, c.batch_size, self.threads, c.warmup).measure(c.runs)
        with contextlib.suppress(OSError):
            Path(exp.path).unlink()
        base_params = sum(p.numel() for p in space.model.parameters())
        self.probes.append(LatencyProbe(probe=0, macs=self.base_macs, params=base_params, median_ms=base.median_ms,
                                        p90_ms=base.p90_ms, runs=base.runs, verdict="base", export_s=exp.seconds,
                                        seconds=time.perf_counter() - t0))
        self.say(f"unpruned: {fmt_macs(self.base_macs)} MACs, {base.median_ms:.2f} ms median (p90 {base.p90_ms:.2f}) "
                 f"at batch {c.batch_size}, {self.threads_txt}")
        if c.target_ms >= base.median_ms:
            raise LatencyInfeasible(
                f"latency budget {c.target_ms:g} ms is not below the unpruned model's {base.median_ms:.2f} ms "
                f"(median, batch {c.batch_size}, {c.backend}, {self.threads_txt}); nothing to prune")

    def solve_at(self, mac_target: float) -> tuple[float, Solution]:
        """The MAC solver's allocation for ``mac_target`` (clamped to the reachable range)."""
        mac_target = min(max(mac_target, self.floor_macs), self.base_macs * 0.999)
        band = MacBand(target_macs=mac_target, overshoot_pct=0.5, undershoot_pct=50.0)
        try:
            sol = solve(self.space, self.plan, band)
        except InfeasibleTarget:  # below the floor after all: take the floor allocation
            sol = solve(self.space, self.plan, MacBand(target_macs=self.floor_macs * 1.001, overshoot_pct=0.5,
                                                       undershoot_pct=50.0))
        return mac_target, sol

    def verdict_of(self, ms: float) -> str:
        return "over" if ms > self.target_ms else ("in_band" if ms >= self.lower_ms else "under")

    def measure_probe(self, mac_target: float, sol: Solution) -> LatencyProbe:
        """Cut a copy by ``sol``, export it, time it (re-measured while too close to the budget to decide)."""
        c = self.config
        t = time.perf_counter()
        model = self.space.pruned_copy(sol.cuts())
        idx = len(self.probes)
        exp = export_for_timing(model, self.input_size, self.work / f"probe{idx}.onnx")
        params = sum(p.numel() for p in model.parameters())
        del model
        timer = OrtTimer(exp.path, c.batch_size, self.threads, c.warmup)
        with contextlib.suppress(OSError):
            Path(exp.path).unlink()  # the session holds the graph; large models would fill the disk
        st = timer.measure(c.runs)
        self.measured += 1
        p = LatencyProbe(probe=idx, mac_target=mac_target, ratio=sol.ratio, macs=sol.predicted_macs,
                         params=params, median_ms=st.median_ms, p90_ms=st.p90_ms, runs=st.runs,
                         verdict=self.verdict_of(st.median_ms), export_s=exp.seconds, seconds=0.0)
        self.timers[idx] = timer
        self.probes.append(p)
        self.candidates[p.macs] = (p, sol.cuts(), sol.ratio)
        self.say(f"probe {idx}: target {fmt_macs(mac_target)} -> {fmt_macs(p.macs)} MACs, "
                 f"{p.median_ms:.2f} ms median (p90 {p.p90_ms:.2f}, {p.runs} runs) -> {p.verdict}")
        # near the budget one measurement is not enough to decide: pool more runs
        while (abs(p.median_ms - self.target_ms) <= self.target_ms * c.remeasure_pct / 100
               and self.measured < c.max_probes and p.measurements < 3):
            self.remeasure(p)
        p.seconds = time.perf_counter() - t
        return p

    def remeasure(self, p: LatencyProbe) -> None:
        """More timed runs on the same session, pooled with the earlier ones."""
        st = self.timers[p.probe].measure(self.config.runs)
        self.measured += 1
        p.median_ms, p.p90_ms, p.runs, p.measurements = st.median_ms, st.p90_ms, st.runs, p.measurements + 1
        p.verdict = self.verdict_of(p.median_ms)
        self.say(f"probe {p.probe} re-measured: {p.median_ms:.2f} ms median (p90 {p.p90_ms:.2f}, {p.runs} runs)"
                 f" -> {p.verdict}")

    def check_inversion(self, p: LatencyProbe) -> None:
        """More MACs measured faster than fewer MACs across the budget: one of them was noise.
        Re-measure the new probe and the most contradicting bracket end once each."""
        others = [q for q in self.probes if q.probe > 0 and q is not p and q.probe in self.timers]
        if p.verdict == "over":
            bad = [q for q in others if q.verdict != "over" and q.macs > p.macs]
            q = max(bad, key=lambda q: q.macs, default=None)
        else:
            bad = [q for q in others if q.verdict == "over" and q.macs < p.macs]
            q = min(bad, key=lambda q: q.macs, default=None)
        if q is None:
            return
        for r in (p, q):
            if self.measured < self.config.max_probes and r.measurements < 3:
                self.remeasure(r)

    def drop_timers(self) -> None:
        """Keep sessions only for the tightest probe over and the tightest probe not over the budget."""
        over = [q for q in self.probes if q.probe > 0 and q.verdict == "over"]
        rest = [q for q in self.probes if q.probe > 0 and q.verdict != "over"]
        keep = {min(over, key=lambda q: q.macs).probe} if over else set()
        if rest:
            keep.add(max(rest, key=lambda q: q.macs).probe)
        for k in [k for k in self.timers if k not in keep]:
            del self.timers[k]

    # -- choosing the next probe ----------------------------------------------------------
    def next_target(self) -> float:
        """Secant on (MACs, median ms) toward ``aim_ms``, safeguarded inside the bracket."""
        aim_ms = self.aim_ms
        over = sorted((p for p in self.probes if p.median_ms > self.target_ms), key=lambda p: p.macs)
        under = sorted((p for p in self.probes if p.probe > 0 and p.median_ms < self.lower_ms), key=lambda p: p.macs)
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

    def step_past(self, prev: LatencyProbe) -> tuple[float, Solution] | None:
        """The channel grid mapped the next target onto the measured ``prev``: step halfway toward the
        other side of the bracket instead (None when that lands on a measured model too)."""
        target_ms = self.target_ms
        over = [p.macs for p in self.probes if p.median_ms > target_ms and p.macs > prev.macs]
        under = [p.macs for p in self.probes if p.probe > 0 and p.median_ms <= target_ms and p.macs < prev.macs]
        other = min(over) if prev.verdict == "under" and over else (max(under) if under else self.floor_macs)
        mac_target, sol = self.solve_at((prev.macs + other) / 2)
        if sol.predicted_macs in self.candidates:
            self.say("channel granularity: no unmeasured model between the bracket ends")
            return None
        return mac_target, sol

    def search(self) -> LatencyProbe | None:
        """Probe until one lands in the band (returned), the probes run out or the grid is exhausted (None)."""
        c = self.config
        mac_target = self.base_macs * self.aim_ms / self.base.median_ms  # first guess: latency ~ MACs
        while self.measured < c.max_probes:
            mac_target, sol = self.solve_at(mac_target)
            if sol.predicted_macs in self.candidates:  # the channel grid maps this target onto a measured model
                prev = self.candidates[sol.predicted_macs][0]
                if prev.verdict == "in_band":
                    return prev
                step = self.step_past(prev)
                if step is None:
                    return None
                mac_target, sol = step
            p = self.measure_probe(mac_target, sol)
            if p.verdict != "in_band":
                self.check_inversion(p)
            at_floor = p.macs <= self.floor_macs * 1.005
            if p.verdict == "over" and at_floor and self.measured < c.max_probes and p.measurements < 2:
                self.remeasure(p)  # do not call a budget unreachable on one noisy measurement
            in_band = [q for q in self.probes if q.verdict == "in_band"]
            if in_band:
                return max(in_band, key=lambda q: q.macs)
            if p.verdict == "over" and at_floor:
                raise LatencyInfeasible(
                    f"latency budget {c.target_ms:g} ms is below what the safety limits can reach: the smallest "
                    f"model this plan allows ({fmt_macs(p.macs)} MACs, max_layer_ratio={self.plan.max_layer_ratio}) "
                    f"measures {p.median_ms:.2f} ms; reachable range is about {p.median_ms:.2f}-"
                    f"{self.base.median_ms:.2f} ms (batch {c.batch_size}, {c.backend}, {self.threads_txt})")
            self.drop_timers()
            mac_target = self.next_target()
        return None

    # -- the answer -----------------------------------------------------------------------
    def best_met(self) -> LatencyProbe:
        """No probe in the band: the slowest probe that met the budget, else :class:`LatencyNotMet`."""
        met = [p for p in self.probes if p.probe > 0 and p.median_ms <= self.target_ms]
        if not met:
            fastest = min((p for p in self.probes if p.probe > 0), key=lambda p: p.median_ms, default=None)
            detail = (f"; fastest candidate {fastest.median_ms:.2f} ms at {fmt_macs(fastest.macs)} MACs"
                      if fastest else "")
            raise LatencyNotMet(f"no candidate met the {self.target_ms:g} ms budget within "
                                f"{self.config.max_probes} measured probes{detail}")
        return max(met, key=lambda p: p.median_ms)

    def solution(self, best: LatencyProbe, t_start: float) -> LatencySolution:
        c, base = self.config, self.base
        _, alloc, ratio = self.candidates[best.macs]
        return LatencySolution(
            target_ms=c.target_ms, lower_ms=self.lower_ms, backend=c.backend, batch_size=c.batch_size,
            threads=self.threads, device=cpu_name(), input_size=self.input_size, round_to=self.round_to,
            base_macs=self.base_macs, base_median_ms=base.median_ms, base_p90_ms=base.p90_ms,
            achieved_ms=best.median_ms, achieved_p90_ms=best.p90_ms, macs=best.macs,
            mac_target=best.mac_target or best.macs, ratio=ratio, met=best.median_ms <= c.target_ms,
            in_band=self.lower_ms <= best.median_ms <= c.target_ms, measured_probes=self.measured,
            probes=self.probes, plan=self.plan.scaled(min(ratio, 0.999)),
            allocation={g: (cut.dims, cut.heads) for g, cut in alloc.items()},
            seconds=time.perf_counter() - t_start,
        )


def solve_latency(space: PruningSpace, plan: PruningPlan, target_ms: float,
                  log: Callable[[str], None] | None = None, **options) -> LatencySolution:
    """:class:`LatencySearch` of ``plan``'s scale for ``target_ms``; ``options`` are :class:`LatencySearchConfig` fields."""
    return LatencySearch(space, plan, LatencySearchConfig(target_ms=target_ms, **options), log=log).run()

class LatencyPruneResult(BaseModel):
    """:func:`prune_to_latency`: the solution plus what the really pruned model counts."""

    solution: LatencySolution
    achieved_macs: float
    params: int
    base_params: int
    prediction_exact: bool


def prune_to_latency(model: torch.nn.Module, example: torch.Tensor, plan: PruningPlan, target_ms: float,
                     seed: int = 0, space: PruningSpace | None = None, **options):
    """Prune a copy of ``model`` so that its measured latency meets ``target_ms`` (see :class:`LatencySearch`;
    ``options``: ``log`` and the :class:`LatencySearchConfig` fields).

    Returns ``(pruned_model, LatencyPruneResult, space)``; the original model is left untouched.
    """
    if space is None:
        space = PruningSpace.build(model, example, plan, seed=seed)
    solution = solve_latency(space, plan, target_ms, **options)
    pruned, macs, params = cut_and_count(space, solution.cuts(), example)
    result = LatencyPruneResult(solution=solution, achieved_macs=macs, params=params,
                                base_params=sum(p.numel() for p in model.parameters()),
                                prediction_exact=macs == solution.macs)
    return pruned, result, space
