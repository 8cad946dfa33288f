"""Accuracy at equal MACs: the agent's pick vs Torch-Pruning baselines on the embedded digits ResNet-18.

For each MAC reduction (default 50, 80, 88 and 90 %; 90 % is below this model's floor with the stem kept and
``round_to`` 8, so it is reported as infeasible) and each seed (default 0, 1, 2):

- agent: ``run_search`` with the heuristic strategist, the safety validator and the Master agent; the
  prune callback builds a Taylor-calibrated ``PruningSpace`` from the ORIGINAL model and solves the plan
  onto the target with a tight band (+0.5 / -1 %); the fine-tune callback runs ``--search-epochs`` of
  inline fine-tuning (lr 0.02, BN recalibration) and scores the candidate on the VALIDATION split. The
  selected revision's pruned weights (before any fine-tuning) then get exactly the baselines' budget.
- agent_full: the same search, but each candidate is scored after the full final budget (``--epochs``), so
  the final fine-tuning of the pick repeats the very run it was selected on (~3x the search compute).
- uniform: ``tp.pruner.MetaPruner(global_pruning=False)``, Taylor importance, one ratio bisected.
- isomorphic: ``MetaPruner(global_pruning=True, isomorphic=True)`` (Isomorphic Pruning), Taylor, bisected.
- random: ``MetaPruner(global_pruning=True, isomorphic=True)`` with ``tp.importance.RandomImportance``.

All methods: stem conv and classifier ignored, ``round_to=8``, per-layer cap 0.9 (the engine's
``max_layer_ratio``; Torch-Pruning's ``max_pruning_ratio``), MACs counted with
``tp.utils.count_ops_and_params`` on the really pruned model, aimed at +-1 % of the target (a baseline whose
single ratio cannot get there keeps its closest probe and is flagged off target); the final
budget is ``--epochs`` of inline fine-tuning (constant SGD lr 0.02, BN recalibration on the calibration
split first, batch 64, seed = run seed), then TEST accuracy. Taylor gradients come from one pass over the
whole calibration split (179 images, one batch: order-independent, so identical for every seed); the seed
drives the fine-tuning shuffle / torch RNG, the random importance and the strategist's perturbations.
A reduction no method can reach (below the stem-plus-``round_to`` floor) is reported as infeasible.

Writes benchmarks/results/accuracy_at_equal_macs.csv and the table between the ``accuracy`` markers in
benchmarks/README.md. Usage::

    python benchmarks/accuracy_at_equal_macs.py [--reductions 50,80,88,90] [--seeds 0,1,2] [--epochs 3]
        [--search-epochs 1] [--max-revisions 8] [--extra-revisions 3] [--methods agent,agent_full,uniform,isomorphic,random]
"""
from __future__ import annotations

import argparse
import copy
import logging
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import pandas as pd
import torch
import torch_pruning as tp
from torch import nn

ROOT = Path(__file__).resolve().parent
if str(ROOT.parent) not in sys.path:
    sys.path.insert(0, str(ROOT.parent))

from agents.master import MasterAgent, MasterConfig  # noqa: E402
from agents.safety import SafetyValidator  # noqa: E402
from agents.search import Evaluated, Measured, SearchContext, run_search  # noqa: E402
from agents.strategists import HeuristicStrategist  # noqa: E402
from pruning.plan import PruningPlan  # noqa: E402
from pruning.solver import MacBand  # noqa: E402
from pruning.space import PruningSpace, count_macs_params, stem_and_head  # noqa: E402
from pruning.train import (  # noqa: E402
    DIGITS_RECOVERY_LR,
    FinetuneConfig,
    calibrate_copy,
    evaluate,
    finetune,
)
from pruning.train.data import DataConfig, DataSplits, build_data  # noqa: E402
from pruning.train.default_model import load_default_model  # noqa: E402
from tasks.memory_steps import MemorySteps  # noqa: E402

try:  # the shared README writer of the MAC-targeting benchmark
    from benchmarks.mac_targeting import update_readme  # noqa: E402
except ImportError:  # pragma: no cover - run as a plain script from benchmarks/
    from mac_targeting import update_readme  # type: ignore  # noqa: E402

warnings.filterwarnings("ignore")
logging.getLogger("agents").setLevel(logging.WARNING)

MARKER = "accuracy"
CSV = ROOT / "results" / "accuracy_at_equal_macs.csv"
# agent: candidates scored after --search-epochs; agent_full: after the full final budget (--epochs), so the
# selected revision's final fine-tuning repeats exactly the run it was selected on (same weights, same seed)
METHODS = ("agent", "agent_full", "uniform", "isomorphic", "random")
LAYER_CAP = 0.9  # engine max_layer_ratio == Torch-Pruning max_pruning_ratio for the baselines
ROUND_TO = 8
SECTION = """## Accuracy at equal MACs (`benchmarks/accuracy_at_equal_macs.py`)

The embedded default (timm ResNet-18 trained on scikit-learn digits, 32×32) pruned to 50, 80 and 88 %
fewer MACs. 90 % cannot be reached by any method here: the stem conv (2.4 M of the 37.2 M MACs at
32×32) and the `layer1` residual stream coupled to it stay unpruned, and with `round_to` 8 even every
other group cut to 8 channels leaves 3.8 M MACs (floors below the table); 88 % is about the lowest the
per-layer cap of 0.9 allows, so it stands in for the extreme budget.

- *agent*: `run_search` with the heuristic strategist, safety validator and Master agent. Each revision
  prunes the original model (Taylor-calibrated `PruningSpace`, solved onto the target with a +0.5 / −1 %
  band), gets 1 epoch of inline fine-tuning and is scored on the **validation** split. The selected
  revision's pruned weights (before any fine-tuning) then get the same final budget as the baselines.
- *agent_full*: the same, but every candidate is scored after the full final budget, so the final
  fine-tuning of the pick repeats the run it was selected on (it spends ~3× the search compute and, like
  picking the best of several training runs, also profits from the fine-tuning noise).
- Baselines, plain Torch-Pruning `MetaPruner` with its single `pruning_ratio` bisected onto the same
  MACs: *uniform* (local, `GroupTaylorImportance`), *isomorphic* (global + isomorphic, Taylor),
  *random* (global + isomorphic, `RandomImportance`).

All: stem conv and classifier kept, `round_to` 8, per-layer cap 0.9, MACs re-counted on the pruned
model; final budget = the same inline fine-tuning (constant SGD lr 0.02, BN recalibration, batch 64,
seed-controlled shuffle), then **test** accuracy, mean ± std over seeds. Taylor gradients: one pass
over the whole calibration split (identical for every seed). `search_s` = time to reach the budget
(agents: the whole search, per-candidate fine-tuning included; baselines: the bisection, done once per
budget for the seed-independent Taylor baselines), `total_s` adds the final fine-tuning; `steps` =
agent revisions / bisection probes.
"""


# ----------------------------------------------------------------------------------------------- helpers
def pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.2f}"


def mean_std(xs: list[float]) -> tuple[float | None, float | None]:
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def copy_with_grads(model: nn.Module) -> nn.Module:
    """Deep copy that keeps ``.grad`` (deepcopy drops it); Taylor importance needs the gradients."""
    grads = {n: p.grad for n, p in model.named_parameters()}
    clone = copy.deepcopy(model)
    for n, p in clone.named_parameters():
        if grads[n] is not None:
            p.grad = grads[n].clone()
    return clone


def clear_grads(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.grad = None
    return model


def ft_config(epochs: int, seed: int, reduction: float) -> FinetuneConfig:
    """The digits recovery setting used everywhere: constant SGD lr 0.02, BN recalibration first."""
    return FinetuneConfig(epochs=epochs, lr=DIGITS_RECOVERY_LR, bn_recalibration=True, seed=seed,
                          mac_reduction=reduction, progress_bar=False)


def final_finetune(model: nn.Module, data: DataSplits, epochs: int, seed: int, reduction: float) -> dict:
    t = time.perf_counter()
    clear_grads(model)
    if epochs > 0:
        finetune(model, data, ft_config(epochs, seed, reduction), progress=False)
    val = evaluate(model, data.val, progress_bar=False).top1
    test = evaluate(model, data.test, progress_bar=False).top1
    return {"val_acc": val, "test_acc": test, "finetune_s": time.perf_counter() - t}


# ----------------------------------------------------------------------------------------------- baselines
def tp_prune(calibrated: nn.Module, example: torch.Tensor, method: str, ratio: float, seed: int) -> nn.Module:
    """One plain Torch-Pruning prune of a copy of the (gradient-carrying) original at ``ratio``."""
    m = copy_with_grads(calibrated)
    if method == "random":
        torch.manual_seed(seed)  # RandomImportance draws from the global RNG: same scores at every probe
        imp = tp.importance.RandomImportance()
    else:
        imp = tp.importance.GroupTaylorImportance()
    pruner = tp.pruner.MetaPruner(
        m, example, importance=imp, pruning_ratio=ratio, global_pruning=method != "uniform",
        isomorphic=method != "uniform", ignored_layers=stem_and_head(m), round_to=ROUND_TO,
        max_pruning_ratio=LAYER_CAP)
    pruner.step()
    return clear_grads(m).eval()


def bisect_ratio(calibrated: nn.Module, example: torch.Tensor, method: str, target: float, seed: int,
                 tol_pct: float, max_probes: int, prune: Callable = None) -> dict:
    """Bisection on MetaPruner's single ratio (every probe re-prunes and re-counts); the closest probe wins.

    MACs(ratio) is a step function (``round_to`` channels) and not always monotone (Torch-Pruning skips a
    group whose rounding would remove every channel), so the bisection keeps the closest probe and, when no
    probe lands within ``tol_pct``, keeps bisecting between neighbouring probes that straddle the target
    (at most ``max_probes`` more). ``prune`` (default :func:`tp_prune`) does one prune at a ratio.
    """
    prune = prune or tp_prune
    t0 = time.perf_counter()
    probes: list[tuple[float, float]] = []
    best: tuple[float, float, nn.Module] | None = None

    def probe(r: float) -> float:
        nonlocal best
        m = prune(calibrated, example, method, r, seed)
        macs, _ = count_macs_params(m, example)
        probes.append((r, macs))
        if best is None or abs(macs - target) < abs(best[1] - target):
            best = (r, macs, m)
        return macs

    lo, hi = 0.0, 0.99
    while len(probes) < max_probes:
        mid = (lo + hi) / 2
        macs = probe(mid)
        if abs(macs - target) / target * 100 <= tol_pct / 2:
            break
        if macs > target:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-4:
            break
    extra = 0
    while abs(best[1] - target) / target * 100 > tol_pct and extra < max_probes:
        # not yet within the band: bisect the adjacent probe pair (in ratio order) that straddles the target
        # with the MAC count closest to it; ends when that jump is located (a single step wider than the band)
        pts = sorted(probes)
        pairs = [(a, b) for a, b in zip(pts, pts[1:])
                 if (a[1] - target) * (b[1] - target) < 0 and b[0] - a[0] > 1e-5]
        if not pairs:
            break
        a, b = min(pairs, key=lambda ab: min(abs(ab[0][1] - target), abs(ab[1][1] - target)))
        probe((a[0] + b[0]) / 2)
        extra += 1
    r, macs, model = best
    return {"model": model, "ratio": r, "macs": macs, "probes": len(probes), "search_s": time.perf_counter() - t0}


# ----------------------------------------------------------------------------------------------- agent
class AgentRun:
    """run_search with engine callbacks; keeps each in-band candidate's pre-fine-tuning weights."""

    def __init__(self, original: nn.Module, calibrated: nn.Module, example: torch.Tensor, data: DataSplits,
                 band: MacBand, base_macs: float, seed: int, search_epochs: int, max_revisions: int,
                 extra_revisions: int):
        self.data, self.band, self.seed = data, band, seed
        reduction = 1 - band.target_macs / base_macs
        val = lambda m: evaluate(m, data.val, progress_bar=False).top1  # noqa: E731 - selection on VALIDATION

        def inline(m: nn.Module) -> nn.Module:
            clear_grads(m)
            if search_epochs > 0:
                finetune(m, data, ft_config(search_epochs, seed, reduction), progress=False)
            return m

        self.bridge = MemorySteps(original, example, band, val, finetune=inline, calibrated_model=calibrated,
                                   validator=SafetyValidator(dataset="digits"), seed=seed)
        self.master = MasterAgent(MasterConfig(max_revisions=max_revisions, extra_revisions=extra_revisions))
        self.pruned: dict[int, nn.Module] = {}

    def _finetune_and_evaluate(self, measured: Measured) -> Evaluated:
        self.pruned[measured.revision] = clear_grads(copy.deepcopy(measured.model)).cpu()
        return self.bridge.finetune_and_evaluate(measured)

    def run(self):
        profile = self.bridge.profile(model_name="resnet18", dataset="digits", num_classes=10)
        ctx = SearchContext(band=self.band, profile=profile, base_plan=PruningPlan(importance="taylor", round_to=ROUND_TO),
                            baseline_accuracy=self.bridge.baseline_accuracy(), seed=self.seed)
        return run_search(ctx, HeuristicStrategist(limits=self.bridge.validator.limits), self.bridge.validator,
                          self.master, self.bridge.prune_and_measure, self._finetune_and_evaluate)


def plan_text(plan: PruningPlan) -> str:
    parts = [plan.importance, plan.allocation, f"rt{plan.round_to}"]
    parts += [f"{k}x{v:g}" for k, v in sorted(plan.kind_multipliers.items())]
    parts += [f"{k}x{v:g}" for k, v in sorted(plan.stage_multipliers.items())]
    return " ".join(parts)


# ----------------------------------------------------------------------------------------------- feasibility
def engine_floor(calibrated: nn.Module, example: torch.Tensor, base_macs: float) -> dict:
    """Smallest MACs the engine reaches with the stem kept, round_to 8 and the 0.9 cap (uniform and global)."""
    out = {}
    for alloc in ("uniform", "global"):
        plan = PruningPlan(importance="taylor", allocation=alloc, round_to=ROUND_TO, max_layer_ratio=LAYER_CAP)
        space = PruningSpace.build(calibrated, example, plan)
        out[alloc] = float(space.predict_macs(space.allocate(plan, LAYER_CAP)))
    # every group at its minimum (one round_to step, no cap): the absolute floor with round_to 8
    plan = PruningPlan(importance="taylor", allocation="uniform", round_to=ROUND_TO, max_layer_ratio=0.999)
    space = PruningSpace.build(calibrated, example, plan)
    from pruning.groups import Cut
    out["absolute"] = float(space.predict_macs({g.index: Cut(dims=g.channels - ROUND_TO) for g in space.groups}))
    return out


# ----------------------------------------------------------------------------------------------- main loop
def run(args) -> tuple[pd.DataFrame, dict]:
    torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    original, info = load_default_model()
    data = build_data(DataConfig(seed=0))
    example = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    base_macs, base_params = count_macs_params(original, example)
    unpruned = {"val_acc": evaluate(original, data.val, progress_bar=False).top1,
                "test_acc": evaluate(original, data.test, progress_bar=False).top1,
                "macs": base_macs, "params": base_params}
    torch.manual_seed(0)
    calibrated = calibrate_copy(original, data.calib, args.calib_batches)  # whole calib split: one batch
    floor = engine_floor(calibrated, example, base_macs)
    meta = {"unpruned": unpruned, "floor": floor, "sizes": data.sizes, "threads": torch.get_num_threads(),
            "epochs": args.epochs}
    print(f"unpruned: {base_macs / 1e6:.3f} M MACs, val {pct(unpruned['val_acc'])} %, test {pct(unpruned['test_acc'])} %;"
          f" floors (M MACs): {', '.join(f'{k} {v / 1e6:.3f}' for k, v in floor.items())}", flush=True)

    rows = []
    bisected: dict[tuple, dict] = {}
    for red in args.reductions:
        target = base_macs * (1 - red / 100)
        band = MacBand(target_macs=target, overshoot_pct=args.overshoot, undershoot_pct=args.undershoot)
        if band.upper < floor["absolute"]:  # below what any allocation can reach: nothing to compare
            for seed in args.seeds:
                for method in args.methods:
                    rows.append({"reduction_pct": red, "target_macs": target, "seed": seed, "method": method,
                                 "final_epochs": args.epochs, "search_s": 0.0,
                                 "status": f"infeasible: floor {floor['absolute'] / 1e6:.3f} M MACs "
                                           f"({100 * (1 - floor['absolute'] / base_macs):.1f} % reduction)"})
            print(f"{red:g} %: infeasible for every method (target {target / 1e6:.3f} M < floor "
                  f"{floor['absolute'] / 1e6:.3f} M MACs)", flush=True)
            continue
        for seed in args.seeds:
            for method in args.methods:
                row = {"reduction_pct": red, "target_macs": target, "seed": seed, "method": method,
                       "final_epochs": args.epochs}
                t = time.perf_counter()
                if method.startswith("agent"):
                    search_epochs = args.search_epochs if method == "agent" else args.epochs
                    agent = AgentRun(original, calibrated, example, data, band, base_macs, seed, search_epochs,
                                     args.max_revisions, args.extra_revisions)
                    res = agent.run()
                    search_s = time.perf_counter() - t
                    best = res.best
                    hist = "; ".join(
                        f"r{r.revision} {r.move or ''} {r.status}"
                        + (f" {r.error_pct:+.2f}%" if r.error_pct is not None else "")
                        + (f" val {100 * r.accuracy_after:.1f}" if r.accuracy_after is not None else "")
                        for r in res.history)
                    row.update(search_s=search_s, revisions=len(res.history), search_history=hist,
                               in_band_revisions=sum(r.is_candidate for r in res.history),
                               search_epochs=search_epochs, stop_reason=res.stop_reason[:120])
                    if best is None or not best.is_candidate:
                        reasons = "; ".join(sorted({(r.error or r.status)[:90] for r in res.history}))
                        row.update(status="no in-band revision", note=reasons[:300])
                        rows.append(row)
                        print(row, flush=True)
                        continue
                    model = agent.pruned[best.revision]
                    row.update(status="ok", achieved_macs=best.achieved_macs, params=best.params,
                               selected_revision=best.revision, selection_val_acc=best.accuracy_after,
                               plan=plan_text(best.plan), note=best.move or "")
                else:
                    key = (red, method) if method != "random" else (red, method, seed)
                    reused = key in bisected
                    if not reused:  # Taylor baselines do not depend on the seed: bisect once per budget
                        bisected[key] = bisect_ratio(calibrated, example, method, target, seed, args.tolerance,
                                                     args.max_probes)
                    b = bisected[key]
                    model = copy.deepcopy(b["model"])
                    macs, params = count_macs_params(model, example)
                    err = (macs - target) / target * 100
                    row.update(search_s=b["search_s"], achieved_macs=macs, params=params, ratio=round(b["ratio"], 5),
                               probes=b["probes"], plan=f"tp {method} r={b['ratio']:.4f}",
                               note="bisection reused (seed-independent)" if reused else "",
                               status="ok" if abs(err) <= args.tolerance else f"off target ({err:+.2f} %)")
                ft = final_finetune(model, data, args.epochs, seed, red / 100)
                row.update(ft, error_pct=(row["achieved_macs"] - target) / target * 100,
                           total_s=time.perf_counter() - t)
                rows.append(row)
                print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    meta["wall_s"] = time.perf_counter() - t_all
    return pd.DataFrame(rows), meta


# ----------------------------------------------------------------------------------------------- report
def summarize(df: pd.DataFrame) -> pd.DataFrame:
    out = []
    for (red, method), g in df.groupby(["reduction_pct", "method"], sort=False):
        ok = g[g["test_acc"].notna()] if "test_acc" in g else g.iloc[0:0]  # off-target rows are kept, flagged
        acc_m, acc_s = mean_std(list(ok["test_acc"])) if len(ok) else (None, None)
        err_m, _ = mean_std(list(ok["error_pct"])) if len(ok) else (None, None)
        row = {"reduction_pct": red, "method": method, "n": int((g["status"] == "ok").sum()), "seeds": len(g),
               "off_target": int(len(ok) - (ok["status"] == "ok").sum()),
               "test_acc_mean": acc_m, "test_acc_std": acc_s,
               "macs_mean": ok["achieved_macs"].mean() if len(ok) else None,
               "err_min": ok["error_pct"].min() if len(ok) else None,
               "err_max": ok["error_pct"].max() if len(ok) else None, "err_mean": err_m,
               "search_s": g["search_s"].mean(),
               "steps": (g["revisions"] if "revisions" in g and g["revisions"].notna().any()
                         else g["probes"] if "probes" in g else pd.Series(dtype=float)).mean(), "total_s": g["total_s"].mean() if "total_s" in g else None,
               "plans": "; ".join(sorted(set(ok["plan"].astype(str)))) if len(ok) else "",
               "statuses": ", ".join(sorted(set(g["status"].astype(str))))}
        out.append(row)
    return pd.DataFrame(out)


def markdown(df: pd.DataFrame, summary: pd.DataFrame, meta: dict, args) -> str:
    u = meta["unpruned"]
    lines = [
        f"Unpruned: {u['macs'] / 1e6:.3f} M MACs, {u['params'] / 1e6:.2f} M params, test accuracy "
        f"{pct(u['test_acc'])} % (val {pct(u['val_acc'])} %); splits {meta['sizes']}. Seeds {list(args.seeds)}; "
        f"final budget {args.epochs} inline epoch(s) for every method; the agents' searches additionally spent "
        f"{args.search_epochs} (agent) / {args.epochs} (agent_full) epoch(s) per in-band candidate (max "
        f"{args.max_revisions} revisions, {args.extra_revisions} after the first in-band one).",
        "",
        "| MAC reduction | method | test acc % (mean ± std) | achieved M MACs | MAC error % (min…max) | "
        "search_s | total_s | steps | on target | what was pruned |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for _, r in summary.iterrows():
        acc = "—" if r.test_acc_mean is None or pd.isna(r.test_acc_mean) else \
            f"{100 * r.test_acc_mean:.2f} ± {100 * r.test_acc_std:.2f}" + (" †" if r.off_target else "")
        macs = "—" if r.macs_mean is None or pd.isna(r.macs_mean) else f"{r.macs_mean / 1e6:.3f}"
        err = "—" if r.err_min is None or pd.isna(r.err_min) else f"{r.err_min:+.2f}…{r.err_max:+.2f}"
        tot = "—" if r.total_s is None or pd.isna(r.total_s) else f"{r.total_s:.1f}"
        what = r.plans if r.n or r.off_target else r.statuses
        steps = "—" if r.steps is None or pd.isna(r.steps) else f"{r.steps:.1f}"
        lines.append(f"| {r.reduction_pct:g} % | {r.method} | {acc} | {macs} | {err} | {r.search_s:.1f} | {tot} | "
                     f"{steps} | {r.n}/{r.seeds} | {what[:160]} |")
    lines.append("")
    lines.append("*on target*: seeds whose pruned model is within the band (agent +0.5/−1 %, baselines ±1 %). "
                 "† = some seed of that baseline could not get within ±1 % (its single ratio moves the MACs in "
                 "steps larger than the band, or, for global random pruning at high ratios, Torch-Pruning skips "
                 "groups whose rounding would empty them); its accuracy is then measured at the MACs shown, not at "
                 "the target, and it is left out of the verdicts below (mentioned only when it beats the agent). "
                 "Verdicts: *beyond the seed spread* = the mean difference exceeds the larger of the two std's.")
    lines.append("")
    lines.extend(verdicts(summary, meta))
    lines.append("")
    lines.append(f"Floors with the stem kept and `round_to` 8 (M MACs): engine uniform {meta['floor']['uniform'] / 1e6:.3f}, "
                 f"engine global {meta['floor']['global'] / 1e6:.3f} (cap 0.9), any allocation "
                 f"{meta['floor']['absolute'] / 1e6:.3f} (every group at 8 channels) = "
                 f"{100 * (1 - meta['floor']['absolute'] / u['macs']):.1f} % reduction at most. "
                 f"Wall time of this run: {meta['wall_s'] / 60:.1f} min ({meta['threads']} torch threads); "
                 f"{args.machine}.")
    return "\n".join(lines)


def verdicts(summary: pd.DataFrame, meta: dict) -> list[str]:
    out = []
    u = meta["unpruned"]["test_acc"]
    s50 = summary[summary.reduction_pct == 50]
    if len(s50):
        rows = [r for _, r in s50.iterrows() if r.test_acc_mean is not None and not pd.isna(r.test_acc_mean)]
        lost = ", ".join(f"{r.method} {100 * (u - r.test_acc_mean):.2f}" for r in rows)
        yes = [r.method for r in rows if u - r.test_acc_mean <= 0.02]
        no = [r.method for r in rows if u - r.test_acc_mean > 0.02]
        verdict = ("**yes** for every method" if not no else
                   f"**yes** for {', '.join(yes) or 'none'}, **no** for {', '.join(no)}")
        out.append(f"- Check: inline fine-tuning ({meta['epochs']} epochs, lr 0.02, BN recalibration) recovers a "
                   f"50 %-MAC pruned model to within 2 points of the unpruned test accuracy "
                   f"({100 * u:.2f} %): {verdict} (points lost, mean over seeds: {lost}).")
    for red, g in summary.groupby("reduction_pct", sort=False):
        if g.statuses.str.startswith("infeasible").all():
            out.append(f"- {red:g} %: infeasible for every method ({g.iloc[0].statuses.removeprefix('infeasible: ')}).")
            continue
        base = g[~g.method.str.startswith("agent") & g.test_acc_mean.notna()]
        on = base[base.off_target == 0]  # compared: baselines on target (within +-1 %) for every seed
        for _, a in g[g.method.str.startswith("agent")].iterrows():
            name = a.method
            if a.test_acc_mean is None or pd.isna(a.test_acc_mean):
                out.append(f"- {red:g} %: {name} found no in-band revision ({a.statuses}).")
                continue
            better_off = [f"{r.method} {100 * r.test_acc_mean:.2f} % at MAC error {r.err_min:+.2f}…{r.err_max:+.2f} %"
                          for _, r in base[base.off_target > 0].iterrows() if r.test_acc_mean > a.test_acc_mean]
            extra = f" Off-target baselines above it: {'; '.join(better_off)}." if better_off else ""
            if not len(on):
                what = "no baseline reached the budget within ±1 % for every seed" if len(base) else "no baseline run"
                out.append(f"- {red:g} %: {what}; {name} {100 * a.test_acc_mean:.2f} ± {100 * a.test_acc_std:.2f} %."
                           f"{extra}")
                continue
            b = on.loc[on.test_acc_mean.idxmax()]
            diff = 100 * (a.test_acc_mean - b.test_acc_mean)
            spread = 100 * max(a.test_acc_std or 0.0, b.test_acc_std or 0.0)
            verdict = verdict_of(diff, spread, "the seed spread")
            out.append(f"- {red:g} %: {name} {100 * a.test_acc_mean:.2f} ± {100 * a.test_acc_std:.2f} % vs best "
                       f"on-target baseline ({b.method}) {100 * b.test_acc_mean:.2f} ± {100 * b.test_acc_std:.2f} %: "
                       f"{diff:+.2f} points — {verdict}.{extra}")
    return out


def verdict_of(diff: float, spread: float, what: str = "the spread") -> str:
    """Words for a difference in points against its spread (both >= 0 spreads)."""
    if diff >= 0:
        return f"better, beyond {what}" if diff > spread else f"at least as accurate, within {what}"
    return f"slightly below, within {what}" if -diff <= spread else f"worse, beyond {what}"


def write_readme(table: str) -> None:
    """Section heading + explanation (added, or refreshed in place) above the markers, table between them."""
    readme = ROOT / "README.md"
    text = readme.read_text() if readme.exists() else "# Benchmarks\n"
    start = f"<!-- {MARKER}:start -->"
    heading = SECTION.splitlines()[0]
    if start not in text:  # first run: add the section heading and explanation
        text = text.rstrip("\n") + "\n\n" + SECTION + f"\n{start}\n<!-- {MARKER}:end -->\n"
    elif heading in text and text.index(heading) < text.index(start):
        text = text[: text.index(heading)] + SECTION + "\n" + text[text.index(start):]
    readme.write_text(text)
    update_readme(table, marker=MARKER)


def parse_list(kind: Callable, text: str) -> list:
    return [kind(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reductions", type=lambda s: parse_list(float, s), default=[50.0, 80.0, 88.0, 90.0],
                    help="MAC reductions in %% (comma separated); 90 is below the round_to-8 floor of this model "
                         "(reported as infeasible), 88 is the closest feasible budget")
    ap.add_argument("--seeds", type=lambda s: parse_list(int, s), default=[0, 1, 2])
    ap.add_argument("--methods", type=lambda s: parse_list(str, s), default=list(METHODS))
    ap.add_argument("--epochs", type=int, default=3, help="final inline fine-tuning epochs (every method)")
    ap.add_argument("--search-epochs", type=int, default=1, help="inline epochs per agent candidate")
    ap.add_argument("--max-revisions", type=int, default=8)
    ap.add_argument("--extra-revisions", type=int, default=3, help="agent revisions after the first in-band one")
    ap.add_argument("--overshoot", type=float, default=0.5, help="agent band above target, %%")
    ap.add_argument("--undershoot", type=float, default=1.0, help="agent band below target, %%")
    ap.add_argument("--tolerance", type=float, default=1.0, help="baselines: |MAC error| allowed, %%")
    ap.add_argument("--max-probes", type=int, default=24, help="baseline bisection probes (before the grid)")
    ap.add_argument("--calib-batches", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; 1 is much faster than 2 when the cores are shared (OpenMP contention)")
    ap.add_argument("--machine", default="CPU, 2 shared cores")
    ap.add_argument("--no-readme", action="store_true", help="do not touch benchmarks/README.md")
    ap.add_argument("--csv", type=Path, default=CSV)
    args = ap.parse_args(argv)
    bad = sorted(set(args.methods) - set(METHODS))
    if bad:
        ap.error(f"unknown methods {bad}; choose from {list(METHODS)}")

    df, meta = run(args)
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    df.insert(0, "unpruned_test_acc", meta["unpruned"]["test_acc"])
    df.to_csv(args.csv, index=False)
    summary = summarize(df)
    table = markdown(df, summary, meta, args)
    if not args.no_readme:
        write_readme(table)
    print(table)


if __name__ == "__main__":
    main()
