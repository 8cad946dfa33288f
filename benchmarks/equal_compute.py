"""Equal compute: the agent's pick vs plain Torch-Pruning at equal MACs AND equal total fine-tuning compute.

Three architectures from different families, each trained from scratch on the embedded digits data at
32x32: the default timm ResNet-18, a timm MobileNetV3 (``mobilenetv3_small_100``) and a small timm ViT
(``vit_tiny_patch16_224`` re-configured: img_size 32, patch 4, width 64, depth 4, 2 heads). Budgets: 50 %,
80 % and the extreme one each architecture allows (the largest whole-percent reduction the engine's global
allocation reaches with the stem kept, ``round_to`` 8 and the per-layer cap 0.9, minus one point).

Methods (all prune the same Taylor-calibrated original, stem and classifier kept, ``round_to`` 8, cap 0.9):

- agent: ``run_search`` (heuristic strategist with the profiling step's Taylor sensitivity, safety
  validator, Master) with K candidates per revision and successive-halving rungs of inline fine-tuning
  (``RungSchedule``): every in-band candidate gets ``rungs[0]`` epochs, the best ``keep`` fraction (ranked
  against every result at that rung so far) continues to ``rungs[-1]``. Selection on the validation split;
  the pick then continues from its searched weights for ``--final-epochs``.
- uniform / isomorphic / random: ``tp.pruner.MetaPruner`` local Taylor / global-isomorphic Taylor /
  global-isomorphic random importance, one ratio bisected onto the target (``accuracy_at_equal_macs``).
  ViTs: attention heads kept, head dims pruned (``num_heads``, ``prune_head_dims``), ``head_dim`` updated.

Equal compute: compute = sum over every fine-tuning of epochs x MACs of the model trained. The agent's
total (the whole search, every rung of every candidate, plus its final fine-tuning) is measured per seed;
each baseline then fine-tunes for ``agent compute / its MACs`` epochs (whole epochs plus a partial one), so
it gets the agent's search as extra epochs. Test split: one stratified 60/10/15/15 split per seed
(``split_seed = seed``), with the original trained on that split's train part (cached), so the 5 seeds are
5 independent test sets (5 x 270 images) and the seed spread includes the split's; the paired difference
agent - best baseline on the same test images is reported per cell.

``--prepare`` trains and caches the originals only (the first run does it otherwise; its seconds are in the
log). Writes benchmarks/results/equal_compute.csv and the table between the ``equal-compute`` markers of
benchmarks/README.md. Usage::

    python benchmarks/equal_compute.py [--archs resnet18,mobilenetv3,vit] [--budgets 50,80,extreme]
        [--seeds 0,1,2,3,4] [--k 2] [--max-revisions 3] [--rungs 1,2] [--final-epochs 2] [--threads 1]
"""
from __future__ import annotations

import argparse
import io
import logging
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import pandas as pd
import torch
import torch_pruning as tp
from torch import nn

ROOT = Path(__file__).resolve().parent
if str(ROOT.parent) not in sys.path:
    sys.path.insert(0, str(ROOT.parent))

from agents.master import MasterAgent, MasterConfig  # noqa: E402
from agents.safety import SafetyValidator  # noqa: E402
from agents.search import Evaluated, Measured, RungSchedule, SearchContext, run_search  # noqa: E402
from agents.strategists import HeuristicStrategist  # noqa: E402
from pruning.plan import PruningPlan  # noqa: E402
from pruning.solver import MacBand  # noqa: E402
from pruning.space import count_macs_params, stem_and_head  # noqa: E402
from pruning.train import DIGITS_RECOVERY_LR, FinetuneConfig, calibrate_copy, evaluate, finetune  # noqa: E402
from pruning.train.data import DataConfig, DataSplits, build_data  # noqa: E402
from pruning.train.default_model import default_cache_dir  # noqa: E402
from tasks.memory_steps import MemorySteps  # noqa: E402

try:
    from benchmarks import accuracy_at_equal_macs as aem  # noqa: E402
except ImportError:  # pragma: no cover - run as a plain script from benchmarks/
    import accuracy_at_equal_macs as aem  # type: ignore  # noqa: E402

warnings.filterwarnings("ignore")
logging.getLogger("agents").setLevel(logging.WARNING)

MARKER = "equal-compute"
CSV = ROOT / "results" / "equal_compute.csv"
METHODS = ("agent", "uniform", "isomorphic", "random")
ARCHS = {  # timm name, constructor overrides, recovery LR (SGD for CNNs, AdamW for the ViT), original training
    "resnet18": dict(timm="resnet18", kwargs={}, lr=DIGITS_RECOVERY_LR, train_epochs=8, train_lr=0.05),
    "mobilenetv3": dict(timm="mobilenetv3_small_100", kwargs={}, lr=DIGITS_RECOVERY_LR, train_epochs=15,
                        train_lr=0.1),
    "vit": dict(timm="vit_tiny_patch16_224", kwargs=dict(img_size=32, patch_size=4, embed_dim=64, depth=4,
                                                         num_heads=2), lr=1e-3, train_epochs=20, train_lr=2e-3),
}
SECTION = """## Accuracy at equal MACs and equal compute (`benchmarks/equal_compute.py`)

Three architectures trained from scratch on the embedded digits (32×32): timm ResNet-18, MobileNetV3-small
and a small ViT (patch 4, width 64, depth 4, 2 heads). Budgets 50 %, 80 % and the extreme one each allows.
The agent (heuristic strategist with Taylor sensitivity from the profiling step, K candidates per revision,
successive-halving rungs of inline fine-tuning, selection on validation) against plain Torch-Pruning
`MetaPruner` with one ratio bisected onto the same MACs: *uniform* (local Taylor), *isomorphic* (global
isomorphic Taylor), *random* (global isomorphic random importance). **Every method gets the same total
fine-tuning compute** (epochs × MACs of the model trained): the agent's whole search (every rung of every
candidate) plus its pick's final fine-tuning; a baseline fine-tunes for that compute divided by its MACs.
Test accuracy: one stratified split per seed (`split_seed = seed`, original trained on that split's train
part), so the seeds are independent test sets of 270 images; *paired diff* = agent − best baseline on the
same test images, mean ± std over seeds; *beyond the spread* = the paired mean exceeds its std.
"""


# ----------------------------------------------------------------------------------------------- models
def make_model(arch: str) -> nn.Module:
    import timm

    a = ARCHS[arch]
    return timm.create_model(a["timm"], num_classes=10, pretrained=False, **a["kwargs"])


def train_original(arch: str, data: DataSplits) -> nn.Module:
    """From scratch with a one-cycle LR (SGD nesterov for CNNs, AdamW for the ViT), label smoothing 0.05."""
    a = ARCHS[arch]
    torch.manual_seed(0)
    model = make_model(arch)
    steps = a["train_epochs"] * len(data.train)
    if arch == "vit":
        opt = torch.optim.AdamW(model.parameters(), lr=a["train_lr"], weight_decay=0.05)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=a["train_lr"], momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=a["train_lr"], total_steps=steps, pct_start=0.25)
    for _ in range(a["train_epochs"]):
        model.train()
        for x, y in data.train:
            loss = nn.functional.cross_entropy(model(x), y, label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def original(arch: str, split: int, data: DataSplits) -> tuple[nn.Module, float]:
    """The arch trained on split ``split``'s train part, cached (loaded with weights_only=True); (model, seconds)."""
    path = default_cache_dir() / "equal-compute" / f"{arch}-split{split}.pt"
    t = time.perf_counter()
    if path.exists():
        model = make_model(arch)
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval(), 0.0
    model = train_original(arch, data)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)
    return model, time.perf_counter() - t


# ----------------------------------------------------------------------------------------------- training
def ft(model: nn.Module, data: DataSplits, arch: str, epochs: float, seed: int, reduction: float,
       recalibrate: bool) -> float:
    """``epochs`` (fractional: whole epochs, then part of one) of recovery fine-tuning; returns epochs done."""
    aem.clear_grads(model)
    whole, part = int(epochs), epochs - int(epochs)
    batches = len(data.train)
    cfg = dict(lr=ARCHS[arch]["lr"], seed=seed, mac_reduction=reduction, progress_bar=False)
    if whole:
        finetune(model, data, FinetuneConfig(epochs=whole, bn_recalibration=recalibrate, **cfg), progress=False)
        recalibrate = False
    n = int(round(part * batches))
    if n:
        finetune(model, data, FinetuneConfig(epochs=1, max_train_batches=n, bn_recalibration=recalibrate,
                                             **{**cfg, "seed": seed + 7}), progress=False)
    return whole + n / batches


# ----------------------------------------------------------------------------------------------- baselines
def tp_prune_any(calibrated: nn.Module, example: torch.Tensor, method: str, ratio: float, seed: int) -> nn.Module:
    """:func:`accuracy_at_equal_macs.tp_prune` for CNNs; for timm ViTs the heads are kept and head dims pruned."""
    heads = {m.qkv: m.num_heads for m in calibrated.modules() if hasattr(m, "qkv") and hasattr(m, "num_heads")}
    if not heads:
        return aem.tp_prune(calibrated, example, method, ratio, seed)
    m = aem.copy_with_grads(calibrated)
    heads = {mod.qkv: mod.num_heads for mod in m.modules() if hasattr(mod, "qkv") and hasattr(mod, "num_heads")}
    if method == "random":
        torch.manual_seed(seed)
        imp = tp.importance.RandomImportance()
    else:
        imp = tp.importance.GroupTaylorImportance()
    pruner = tp.pruner.MetaPruner(
        m, example, importance=imp, pruning_ratio=ratio, global_pruning=method != "uniform",
        isomorphic=method != "uniform", ignored_layers=stem_and_head(m), round_to=aem.ROUND_TO,
        max_pruning_ratio=aem.LAYER_CAP, num_heads=heads, prune_head_dims=True, prune_num_heads=False)
    pruner.step()
    for mod in m.modules():
        if hasattr(mod, "qkv") and hasattr(mod, "num_heads"):
            mod.head_dim = mod.qkv.out_features // (3 * mod.num_heads)
            mod.attn_dim = mod.head_dim * mod.num_heads
            mod.scale = mod.head_dim ** -0.5
    return aem.clear_grads(m).eval()


# ----------------------------------------------------------------------------------------------- agent
class Agent:
    """run_search with rungs on in-memory steps; counts the compute of every fine-tuning (epochs x MACs)."""

    def __init__(self, arch, orig, calibrated, example, data, band, base_macs, seed, args):
        self.arch, self.data, self.seed, self.args = arch, data, seed, args
        self.reduction = 1 - band.target_macs / base_macs
        self.compute = 0.0
        self.epochs = 0.0
        self.example = example
        self.rungs = RungSchedule(epochs=args.rungs, keep=args.keep)
        val = lambda m: evaluate(m, data.val, progress_bar=False).top1  # noqa: E731 - selection on VALIDATION
        self.bridge = MemorySteps(orig, example, band, val, finetune=self._inline, calibrated_model=calibrated,
                                  validator=SafetyValidator(dataset="digits"), seed=seed, rungs=self.rungs)
        self.models: dict[tuple[int, int], nn.Module] = {}

    def _inline(self, model: nn.Module, epochs: float) -> nn.Module:
        macs, _ = count_macs_params(model, self.example)
        done = ft(model, self.data, self.arch, epochs, self.seed, self.reduction, recalibrate=True)
        self.compute += done * macs
        self.epochs += done
        return model

    def _finetune_and_evaluate(self, measured: Measured) -> Evaluated:
        e = self.bridge.finetune_and_evaluate(measured)
        self.models[(measured.revision, measured.candidate)] = measured.model
        return e

    def run(self):
        profile = self.bridge.profile(model_name=self.arch, dataset="digits", num_classes=10)
        ctx = SearchContext(band=self.bridge.band, profile=profile, seed=self.seed,
                            base_plan=PruningPlan(importance="taylor", round_to=aem.ROUND_TO),
                            baseline_accuracy=self.bridge.baseline_accuracy(), candidates_per_revision=self.args.k,
                            rungs=self.rungs)
        master = MasterAgent(MasterConfig(max_revisions=self.args.max_revisions,
                                          extra_revisions=self.args.extra_revisions))
        return run_search(ctx, HeuristicStrategist(limits=self.bridge.validator.limits), self.bridge.validator,
                          master, self.bridge.prune_and_measure, self._finetune_and_evaluate)


# ----------------------------------------------------------------------------------------------- main loop
def extreme_budget(calibrated: nn.Module, example: torch.Tensor, base_macs: float) -> float:
    floor = aem.engine_floor(calibrated, example, base_macs)
    return float(math.floor(100 * (1 - floor["global"] / base_macs)) - 1)


def run_cell(arch, red, seed, orig, calibrated, example, data, base_macs, args, rows):
    target = base_macs * (1 - red / 100)
    band = MacBand(target_macs=target, overshoot_pct=args.overshoot, undershoot_pct=args.undershoot)
    common = {"arch": arch, "reduction_pct": red, "seed": seed, "target_macs": target}
    t = time.perf_counter()
    agent = Agent(arch, orig, calibrated, example, data, band, base_macs, seed, args)
    res = agent.run()
    best = res.best
    if best is None or not best.is_candidate:
        rows.append({**common, "method": "agent", "status": "no in-band revision", "wall_s": time.perf_counter() - t})
        print(rows[-1], flush=True)
        return
    model = agent.models[(best.revision, best.candidate)]
    search_epochs, search_compute = agent.epochs, agent.compute
    final = ft(model, data, arch, args.final_epochs, seed, red / 100, recalibrate=False)
    macs, params = count_macs_params(model, example)
    budget = search_compute + final * macs
    rows.append({**common, "method": "agent", "status": "ok", "achieved_macs": macs, "params": params,
                 "error_pct": (macs - target) / target * 100, "search_epochs": search_epochs,
                 "pick_epochs": best.rungs[-1].epochs + final if best.rungs else final, "finetune_epochs": final,
                 "compute_gmac_epochs": budget / 1e9, "revisions": len({r.revision for r in res.history}),
                 "candidates": len(res.history), "tuned": sum(r.accuracy_after is not None for r in res.history),
                 "advanced": sum(len(r.rungs) > 1 for r in res.history), "plan": aem.plan_text(best.plan),
                 "val_acc": evaluate(model, data.val, progress_bar=False).top1,
                 "test_acc": evaluate(model, data.test, progress_bar=False).top1, "wall_s": time.perf_counter() - t})
    print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rows[-1].items()}, flush=True)
    for method in [m for m in args.methods if m != "agent"]:
        t = time.perf_counter()
        b = aem.bisect_ratio(calibrated, example, method, target, seed, args.tolerance, args.max_probes,
                             prune=tp_prune_any)
        model = b["model"]
        macs, params = count_macs_params(model, example)
        epochs = budget / macs
        done = ft(model, data, arch, epochs, seed, red / 100, recalibrate=True)
        err = (macs - target) / target * 100
        rows.append({**common, "method": method, "achieved_macs": macs, "params": params, "error_pct": err,
                     "status": "ok" if abs(err) <= args.tolerance else f"off target ({err:+.2f} %)",
                     "finetune_epochs": done, "pick_epochs": done, "compute_gmac_epochs": done * macs / 1e9,
                     "probes": b["probes"], "plan": f"tp {method} r={b['ratio']:.4f}",
                     "val_acc": evaluate(model, data.val, progress_bar=False).top1,
                     "test_acc": evaluate(model, data.test, progress_bar=False).top1,
                     "wall_s": time.perf_counter() - t})
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rows[-1].items()}, flush=True)


def run(args) -> tuple[pd.DataFrame, dict]:
    torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    rows, meta = [], {"originals": {}, "extreme": {}}
    for arch in args.archs:
        for seed in args.seeds:
            data = build_data(DataConfig(seed=seed, split_seed=seed))
            orig, train_s = original(arch, seed, data)
            example = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
            base_macs, base_params = count_macs_params(orig, example)
            torch.manual_seed(0)
            calibrated = calibrate_copy(orig, data.calib, args.calib_batches)
            test = evaluate(orig, data.test, progress_bar=False).top1
            meta["originals"].setdefault(arch, []).append({"test_acc": test, "macs": base_macs, "params": base_params,
                                                           "train_s": train_s})
            budgets = []
            for b in args.budgets:
                if b == "extreme":
                    if arch not in meta["extreme"]:
                        meta["extreme"][arch] = extreme_budget(calibrated, example, base_macs)
                    budgets.append(meta["extreme"][arch])
                else:
                    budgets.append(float(b))
            print(f"{arch} split {seed}: {base_macs / 1e6:.2f} M MACs, test {100 * test:.2f} %, trained in "
                  f"{train_s:.0f} s; budgets {budgets}", flush=True)
            for red in budgets:
                run_cell(arch, red, seed, orig, calibrated, example, data, base_macs, args, rows)
            pd.DataFrame(rows).to_csv(args.csv, index=False)  # partial results survive an interruption
    meta["wall_s"] = time.perf_counter() - t_all
    return pd.DataFrame(rows), meta


# ----------------------------------------------------------------------------------------------- report
def summarize(df: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    out, verdicts = [], []
    for (arch, red), cell in df.groupby(["arch", "reduction_pct"], sort=False):
        means = {}
        for method, g in cell.groupby("method", sort=False):
            ok = g[g["test_acc"].notna()] if "test_acc" in g else g.iloc[0:0]
            m, s = aem.mean_std(list(ok["test_acc"])) if len(ok) else (None, None)
            means[method] = m
            out.append({"arch": arch, "reduction_pct": red, "method": method, "n": len(ok), "seeds": len(g),
                        "off_target": int((ok["status"] != "ok").sum()), "test_acc_mean": m, "test_acc_std": s,
                        "macs_mean": ok["achieved_macs"].mean() if len(ok) else None,
                        "epochs_mean": ok["pick_epochs"].mean() if len(ok) else None,
                        "search_epochs": ok["search_epochs"].mean() if "search_epochs" in ok and len(ok) else None,
                        "compute_mean": ok["compute_gmac_epochs"].mean() if len(ok) else None,
                        "wall_s": g["wall_s"].mean()})
        on = {m for m, g in cell.groupby("method") if (g["status"] == "ok").all()}  # every seed on target
        base = {k: v for k, v in means.items() if k != "agent" and v is not None and k in on}
        if means.get("agent") is None or not base:
            off = ", ".join(f"{k} {100 * v:.2f} %" for k, v in means.items() if k != "agent" and v is not None)
            verdicts.append(f"- {arch} {red:g} %: no baseline reached the target within ±1 % on every seed "
                            f"(agent {100 * (means.get('agent') or float('nan')):.2f} %; off-target baselines at "
                            f"more MACs: {off or 'none'}).")
            continue
        best = max(base, key=base.get)
        a = cell[cell.method == "agent"].set_index("seed")["test_acc"]
        b = cell[cell.method == best].set_index("seed")["test_acc"]
        diffs = [100 * (a[s] - b[s]) for s in a.index if s in b.index and pd.notna(a[s]) and pd.notna(b[s])]
        dm = statistics.fmean(diffs) if diffs else float("nan")
        ds = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
        v = aem.verdict_of(dm, ds)
        verdicts.append(f"- {arch} {red:g} %: agent − best on-target baseline ({best}) paired diff {dm:+.2f} ± {ds:.2f} "
                        f"points over {len(diffs)} seeds — {v}.")
    return pd.DataFrame(out), verdicts


def markdown(summary: pd.DataFrame, verdicts: list[str], meta: dict, args) -> str:
    org = "; ".join(f"{a}: {statistics.fmean(o['test_acc'] for o in v) * 100:.2f} % test, "
                    f"{v[0]['macs'] / 1e6:.2f} M MACs" for a, v in meta["originals"].items())
    lines = [f"Originals (mean over splits): {org}. Extreme budgets: "
             + ", ".join(f"{a} {r:g} %" for a, r in meta["extreme"].items()) + f". Seeds {list(args.seeds)}; agent: "
             f"K = {args.k}, ≤ {args.max_revisions} revisions, rungs {args.rungs} epochs (keep {args.keep:g}), "
             f"final {args.final_epochs} epoch(s) of its pick; baselines: the agent's total compute as epochs.", "",
             "| arch | MAC reduction | method | test acc % (mean ± std) | M MACs | pick's epochs | compute "
             "(G MAC·epochs) | wall s | on target |", "|---|---|---|---|---|---|---|---|---|"]
    for _, r in summary.iterrows():
        acc = "—" if r.test_acc_mean is None or pd.isna(r.test_acc_mean) else \
            f"{100 * r.test_acc_mean:.2f} ± {100 * r.test_acc_std:.2f}" + (" †" if r.off_target else "")
        f = lambda x, spec: "—" if x is None or pd.isna(x) else format(x, spec)  # noqa: E731
        ep = f(r.epochs_mean, ".2f") + (f" (search {r.search_epochs:.1f})" if r.method == "agent"
                                        and r.search_epochs is not None and not pd.isna(r.search_epochs) else "")
        lines.append(f"| {r.arch} | {r.reduction_pct:g} % | {r.method} | {acc} | {f(r.macs_mean / 1e6 if r.macs_mean else None, '.3f')} | "
                     f"{ep} | {f(r.compute_mean, '.3f')} | {r.wall_s:.1f} | {r.n - r.off_target}/{r.seeds} |")
    lines += ["", "† some seed of that baseline could not get within ±1 % of the target MACs (its accuracy is "
              "then at the MACs shown).", "", *verdicts, "",
              f"Wall time {meta['wall_s'] / 60:.1f} min, {args.threads} torch thread(s); {args.machine}."]
    return "\n".join(lines)


def write_readme(table: str) -> None:
    """Section heading + explanation (added once) above the markers, table between them."""
    readme = ROOT / "README.md"
    text = readme.read_text() if readme.exists() else "# Benchmarks\n"
    start = f"<!-- {MARKER}:start -->"
    if start not in text:
        text = text.rstrip("\n") + "\n\n" + SECTION + f"\n{start}\n<!-- {MARKER}:end -->\n"
        readme.write_text(text)
    aem.update_readme(table, marker=MARKER)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", type=lambda s: aem.parse_list(str, s), default=list(ARCHS))
    ap.add_argument("--budgets", type=lambda s: aem.parse_list(str, s), default=["50", "80", "extreme"])
    ap.add_argument("--seeds", type=lambda s: aem.parse_list(int, s), default=[0, 1, 2, 3, 4])
    ap.add_argument("--methods", type=lambda s: aem.parse_list(str, s), default=list(METHODS))
    ap.add_argument("--k", type=int, default=2, help="agent candidates per revision")
    ap.add_argument("--max-revisions", type=int, default=2)
    ap.add_argument("--extra-revisions", type=int, default=2)
    ap.add_argument("--rungs", type=lambda s: aem.parse_list(float, s), default=[0.25, 1.0],
                    help="cumulative inline epochs at the end of each rung")
    ap.add_argument("--keep", type=float, default=0.5, help="fraction of results at a rung that advance")
    ap.add_argument("--final-epochs", type=float, default=1.0, help="fine-tuning of the agent's pick after search")
    ap.add_argument("--overshoot", type=float, default=0.5)
    ap.add_argument("--undershoot", type=float, default=1.0)
    ap.add_argument("--tolerance", type=float, default=1.0)
    ap.add_argument("--max-probes", type=int, default=12)
    ap.add_argument("--prepare", action="store_true", help="only train and cache the originals of every split")
    ap.add_argument("--calib-batches", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--machine", default="CPU, 1 of 2 shared cores")
    ap.add_argument("--no-readme", action="store_true")
    ap.add_argument("--csv", type=Path, default=CSV)
    args = ap.parse_args(argv)
    bad = sorted(set(args.methods) - set(METHODS)) + sorted(set(args.archs) - set(ARCHS))
    if bad:
        ap.error(f"unknown methods/architectures {bad}")
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    if args.prepare:
        torch.set_num_threads(args.threads)
        for arch in args.archs:
            for seed in args.seeds:
                data = build_data(DataConfig(seed=seed, split_seed=seed))
                model, secs = original(arch, seed, data)
                print(f"{arch} split {seed}: test {100 * evaluate(model, data.test, progress_bar=False).top1:.2f} %, "
                      f"trained in {secs:.0f} s", flush=True)
        return
    df, meta = run(args)
    df.to_csv(args.csv, index=False)
    summary, verdicts = summarize(df)
    table = markdown(summary, verdicts, meta, args)
    if not args.no_readme:
        write_readme(table)
    print(table)


if __name__ == "__main__":
    main()
