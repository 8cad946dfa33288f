"""CPU latency of pruned models (paper Table 3 layout): ours vs plain Torch-Pruning at the same MACs.

For each case (timm model, random weights, 224x224; latency does not depend on weight values):

- ``original``: the unpruned model;
- ``ours``: the MAC solver at the paper's target and band with the default plan (round_to 8), cut once;
- ``ours-rt{N}``: the same MAC target with the latency-aware ``round_to`` of the ort-cpu backend
  (``pruning.latency_search.DEFAULT_ROUND_TO``);
- ``ours-latency`` (``--latency-solver``, ResNet-50 by default): the latency solver with the budget
  ``original median * ours MACs / original MACs``, i.e. "CPU speedup = MAC reduction factor";
- ``tp``: plain Torch-Pruning (MetaPruner, GroupMagnitudeImportance p=2, global_pruning + isomorphic,
  round_to 8, only the classifier ignored; DeiT: num_heads passed and head_dim updated as in TP's timm
  ViT example) with its one ``pruning_ratio`` bisected until its MACs are within +-1 % of ``ours``;
- ConvNeXt-B case only: ``convnext_small`` unpruned, the official variant at about the same MACs
  (the paper's "ConvNeXt-S-8.2G" row is ConvNeXt-B pruned to ConvNeXt-S MACs).

All variants of a case are exported to ONNX (parity-checked) and timed with onnxruntime CPU in ONE
process, interleaved round-robin (order rotating each round), batch 8, so slow drift hits all alike.
GPU columns are measured with ``pruning.measure.latency.benchmark_torch_gpu`` when CUDA is present, else n/a.

Writes benchmarks/results/latency.csv and the table between the latency markers in benchmarks/README.md.
``--round-to-sweep`` instead measures round_to 8/16/32 at equal MACs (ResNet-50 2.06G, DeiT-Tiny 0.62G)
and writes benchmarks/results/round_to.csv and the round_to table.

Usage: python benchmarks/latency.py [--models resnet50 ...] [--runs 30] [--threads 2]
       python benchmarks/latency.py --round-to-sweep [--runs 40]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pandas as pd
import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from mac_targeting import tp_ratio_bisection, update_readme  # noqa: E402

from pruning.latency_search import (  # noqa: E402
    DEFAULT_ROUND_TO,
    OrtTimer,
    export_for_timing,
    solve_latency,
    time_interleaved,
)
from pruning.measure.export import model_size_mb  # noqa: E402
from pruning.measure.latency import Skipped, available_cpus, benchmark_torch_gpu, cpu_name  # noqa: E402
from pruning.plan import PruningPlan  # noqa: E402
from pruning.solver import MacBand, solve  # noqa: E402
from pruning.space import PruningSpace, count_macs_params, example_input  # noqa: E402

warnings.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parent
INPUT = (3, 224, 224)

# model -> (target G MACs, overshoot %, undershoot %, paper Table 3 label)
CASES = {
    "resnet50": (2.06, 5.0, 15.0, "ResNet-50-2G"),
    "convnext_base": (8.48, 0.1, 11.56, "ConvNeXt-S-8.2G (from ConvNeXt-B)"),
    "deit_tiny_patch16_224": (0.62, 1.0, 20.0, "DeiT-Tiny"),
}
ALIASES = {"convnext_small": "convnext_base", "deit_tiny": "deit_tiny_patch16_224", "convnext_b": "convnext_base"}

# Paper Table 3 (H200 GPU bs 256, Intel Xeon CPU bs 8): params M, size MB, peak GPU MB, GPU ms, GPU x, CPU ms, CPU x
PAPER = {
    ("resnet50", "original"): (25.56, 97.70, 2937, 82.97, 1.0, 96.89, 1.0),
    ("resnet50", "ours"): (13.29, 50.84, 1926, 64.35, 1.29, 175.19, 0.55),
    ("resnet50", "tp"): (15.31, 58.55, 2344, 71.10, 1.17, 679.97, 0.14),  # Isomorphic Pruning [8]
    ("convnext_base", "original"): (88.59, 337.95, 5038, 525.74, 1.0, 363.11, 1.0),
    ("convnext_base", "ours"): (48.56, 185.23, 3509, 372.60, 1.41, 337.82, 1.07),
    ("convnext_base", "tp"): (47.32, 180.51, 3573, 372.88, 1.41, 332.98, 1.09),
    ("deit_tiny_patch16_224", "original"): (5.91, 22.55, 680, 24.29, 1.0, 16.77, 1.0),
    ("deit_tiny_patch16_224", "ours"): (2.90, 11.07, 828, 21.52, 1.13, 9.19, 1.82),
    ("deit_tiny_patch16_224", "tp"): (3.08, 11.74, 792, 17.80, 1.36, 11.68, 1.44),
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def create(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False).eval()


def ours_at(space: PruningSpace, band: MacBand, round_to: int) -> tuple[torch.nn.Module, float]:
    """The MAC solver's answer for ``band`` with ``round_to``, cut on a copy of the space."""
    plan = PruningPlan(round_to=round_to)
    sol = solve(space, plan, band)
    model = space.pruned_copy(sol.cuts())
    return model, float(sol.predicted_macs)


def plain_tp(model: torch.nn.Module, example: torch.Tensor, target_macs: float, tol_pct: float = 1.0,
             max_probes: int = 25) -> tuple[torch.nn.Module, float, float, int]:
    """Plain Torch-Pruning with its one ``pruning_ratio`` bisected to ``target_macs`` +- ``tol_pct``."""
    best = None
    # min_width: a MAC step wider than the tolerance (DeiT: whole head-dim steps); keep the closest
    for probe, ratio, m, macs, _ in tp_ratio_bisection(model, example, target_macs, max_probes=max_probes,
                                                       min_width=1e-4):
        err = (macs - target_macs) / target_macs * 100
        if best is None or abs(err) < abs(best[2]):
            best = (m, macs, err, ratio)
        if abs(err) <= tol_pct:
            break
    m, macs, err, ratio = best
    return m, float(macs), ratio, probe


def gpu_cells(model: torch.nn.Module) -> dict:
    g = benchmark_torch_gpu(model, INPUT, batch_size=256)
    if isinstance(g, Skipped):
        return {"gpu_peak_mem_mb": "n/a (no CUDA)", "gpu_bs256_ms": "n/a (no CUDA)"}
    return {"gpu_peak_mem_mb": round(g.peak_memory_mb or 0, 1), "gpu_bs256_ms": round(g.median_ms, 2)}


def run_case(name: str, runs: int, warmup: int, threads: int, latency_solver: bool, work: Path) -> list[dict]:
    target_g, over, under, label = CASES[name]
    model = create(name)
    example = example_input(224)
    band = MacBand(target_macs=target_g * 1e9, overshoot_pct=over, undershoot_pct=under)
    t = time.perf_counter()
    space = PruningSpace.build(model, example, PruningPlan())
    log(f"[{name}] space built in {time.perf_counter() - t:.1f}s")
    variants: dict[str, tuple[torch.nn.Module, dict]] = {"original": (model, {})}
    ours, ours_macs = ours_at(space, band, 8)
    variants["ours"] = (ours, {"round_to": 8})
    rt = DEFAULT_ROUND_TO["ort-cpu"]
    if rt != 8:
        m, _ = ours_at(space, band, rt)
        variants[f"ours-rt{rt}"] = (m, {"round_to": rt})
    t = time.perf_counter()
    tpm, tp_macs, tp_ratio, tp_probes = plain_tp(model, example, ours_macs)
    log(f"[{name}] plain TP: ratio {tp_ratio:.4f}, {tp_macs / 1e9:.4g} G MACs "
        f"({(tp_macs - ours_macs) / ours_macs * 100:+.2f}% vs ours) after {tp_probes} probes "
        f"({time.perf_counter() - t:.1f}s)")
    variants["tp"] = (tpm, {"round_to": 8, "tp_pruning_ratio": round(tp_ratio, 5), "tp_probes": tp_probes,
                            "tp_macs_vs_ours_pct": round((tp_macs - ours_macs) / ours_macs * 100, 2)})
    if name == "convnext_base":
        variants["convnext_small (unpruned)"] = (create("convnext_small"), {})
    if latency_solver:
        exp = export_for_timing(model, INPUT, work / f"{name}_ref.onnx")
        ref = OrtTimer(exp.path, 8, threads, warmup).measure(runs)
        budget = ref.median_ms * ours_macs / space.base_macs
        log(f"[{name}] latency solver: budget {budget:.2f} ms (= {ref.median_ms:.2f} ms x MAC ratio)")
        sol = solve_latency(space, PruningPlan(), budget, batch_size=8, threads=threads, runs=max(10, runs // 2),
                            log=lambda s: log(f"[{name}]   {s}"))
        variants["ours-latency"] = (space.pruned_copy(sol.cuts()), {
            "round_to": sol.round_to, "latency_budget_ms": round(budget, 2),
            "solver_ms": round(sol.achieved_ms, 2), "solver_probes": sol.measured_probes})

    timers, rows = {}, {}
    for vname, (m, extra) in variants.items():
        exp = export_for_timing(m, INPUT, work / f"{name}_{vname.split()[0]}.onnx")
        timers[vname] = OrtTimer(exp.path, 8, threads, warmup)
        macs, params = count_macs_params(m, example)
        rows[vname] = {"model": name if "unpruned" not in vname else "convnext_small", "variant": vname,
                       "params_m": round(params / 1e6, 2), "size_mb": round(model_size_mb(m), 2),
                       "macs_g": round(macs / 1e9, 4), **extra}
    t = time.perf_counter()
    stats = time_interleaved(timers, runs)
    log(f"[{name}] timed {len(timers)} variants x {runs} runs interleaved in {time.perf_counter() - t:.1f}s")
    base_ms = stats["original"].median_ms
    base_macs = rows["original"]["macs_g"]
    tp_ms = stats["tp"].median_ms
    out = []
    for vname, row in rows.items():
        st = stats[vname]
        speed = base_ms / st.median_ms
        mac_red = base_macs / row["macs_g"]
        paper = PAPER.get((name, vname))
        row.update({
            "mac_reduction_x": round(mac_red, 3),
            "cpu_bs8_median_ms": round(st.median_ms, 2), "cpu_bs8_p90_ms": round(st.p90_ms, 2),
            "cpu_speedup": round(speed, 3), "speedup_over_mac_reduction": round(speed / mac_red, 3),
            "vs_tp": round(tp_ms / st.median_ms, 3),
            **gpu_cells(variants[vname][0]),
            "gpu_speedup": "n/a (no CUDA)" if not torch.cuda.is_available() else None,
            "paper_label": {"original": name, "ours": label, "tp": "Isomorphic Pruning [8]"}.get(vname, ""),
            "paper_params_m": paper[0] if paper else None, "paper_size_mb": paper[1] if paper else None,
            "paper_gpu_bs256_ms": paper[3] if paper else None, "paper_gpu_speedup": paper[4] if paper else None,
            "paper_cpu_bs8_ms": paper[5] if paper else None, "paper_cpu_speedup": paper[6] if paper else None,
            "cpu_threads": threads, "runs": runs, "cpu": cpu_name(),
        })
        out.append(row)
    if torch.cuda.is_available():
        g0 = out[0]["gpu_bs256_ms"]
        for r in out:
            r["gpu_speedup"] = round(g0 / r["gpu_bs256_ms"], 3)
    for r in out:
        log(f"[{name}] {r['variant']:<26} {r['macs_g']:>7.4f} G  {r['params_m']:>6.2f} M  "
            f"{r['cpu_bs8_median_ms']:>8.2f} ms  x{r['cpu_speedup']:.3f} (MAC x{r['mac_reduction_x']:.3f}, "
            f"vs TP x{r['vs_tp']:.3f})")
    return out


def fmt(v) -> str:
    if v is None or (isinstance(v, float) and pd.isna(v)):
        return "—"
    return str(v)


def markdown(df: pd.DataFrame) -> str:
    cols = [("model", "model"), ("variant", "variant"), ("macs_g", "MACs (G)"), ("mac_reduction_x", "MAC red. ×"),
            ("params_m", "Params (M)"), ("size_mb", "Size (MB)"), ("cpu_bs8_median_ms", "CPU bs8 median (ms)"),
            ("cpu_bs8_p90_ms", "CPU bs8 p90 (ms)"), ("cpu_speedup", "CPU speedup"),
            ("speedup_over_mac_reduction", "speedup / MAC red."), ("vs_tp", "vs plain TP"),
            ("gpu_bs256_ms", "GPU bs256 (ms)"), ("paper_params_m", "paper Params (M)"),
            ("paper_size_mb", "paper Size (MB)"), ("paper_gpu_speedup", "paper GPU speedup"),
            ("paper_cpu_bs8_ms", "paper CPU bs8 (ms)"), ("paper_cpu_speedup", "paper CPU speedup")]
    head = "| " + " | ".join(h for _, h in cols) + " |\n|" + "---|" * len(cols) + "\n"
    body = "\n".join("| " + " | ".join(fmt(r.get(c)) for c, _ in cols) + " |" for _, r in df.iterrows())
    r0 = df.iloc[0]
    foot = (f"\n\nCPU: {r0['cpu']}, onnxruntime CPU, {r0['cpu_threads']} intra-op threads, batch 8, "
            f"{r0['runs']} runs per variant interleaved in one process; GPU: "
            f"{'measured' if torch.cuda.is_available() else 'n/a (no CUDA on this machine)'}. "
            f"Paper: Table 3 (Intel Xeon CPU bs 8; H200 GPU bs 256); its ResNet-50/ConvNeXt/DeiT 'plain' rows are "
            f"Isomorphic Pruning [8].")
    return head + body + foot


# --------------------------------------------------------------------------------------------
# round_to sweep
# --------------------------------------------------------------------------------------------
SWEEP = [("resnet50", 2.06, 5.0, 15.0), ("deit_tiny_patch16_224", 0.62, 1.0, 20.0)]


def round_to_sweep(runs: int, warmup: int, threads: int, work: Path, values=(8, 16, 32), models=None) -> pd.DataFrame:
    rows = []
    for name, target_g, over, under in SWEEP:
        if models and name not in models:
            continue
        model = create(name)
        example = example_input(224)
        space = PruningSpace.build(model, example, PruningPlan())
        band = MacBand(target_macs=target_g * 1e9, overshoot_pct=over, undershoot_pct=under)
        variants = {"original": (model, float(space.base_macs))}
        for rt in values:
            variants[f"round_to={rt}"] = ours_at(space, band, rt)
        timers = {}
        for v, (m, _) in variants.items():
            exp = export_for_timing(m, INPUT, work / f"sweep_{name}_{v.replace('=', '')}.onnx")
            timers[v] = OrtTimer(exp.path, 8, threads, warmup)
        stats = time_interleaved(timers, runs)
        base = stats["original"].median_ms
        ref = stats[f"round_to={values[0]}"].median_ms
        for v, (m, macs) in variants.items():
            st = stats[v]
            rows.append({"model": name, "variant": v, "macs_g": round(macs / 1e9, 4),
                         "params_m": round(sum(p.numel() for p in m.parameters()) / 1e6, 2),
                         "median_ms": round(st.median_ms, 2), "p90_ms": round(st.p90_ms, 2),
                         "speedup": round(base / st.median_ms, 3),
                         f"vs_round_to_{values[0]}": round(ref / st.median_ms, 3),
                         "threads": threads, "runs": runs, "cpu": cpu_name()})
            log(str(rows[-1]))
    return pd.DataFrame(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(CASES), help=f"subset of {list(CASES)} (+ aliases)")
    ap.add_argument("--runs", type=int, default=30, help="timed runs per variant (interleaved)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="ORT intra-op threads (default: all CPUs)")
    ap.add_argument("--latency-solver", nargs="*", default=["resnet50"],
                    help="models that also get the latency-solver variant (default: resnet50)")
    ap.add_argument("--round-to-sweep", action="store_true", help="measure round_to 8/16/32 instead")
    ap.add_argument("--no-readme", action="store_true", help="do not touch benchmarks/README.md")
    args = ap.parse_args()
    threads = args.threads or available_cpus()
    (ROOT / "results").mkdir(exist_ok=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="latbench_") as tmp:
        work = Path(tmp)
        if args.round_to_sweep:
            models = [ALIASES.get(m, m) for m in args.models] if args.models != list(CASES) else None
            df = round_to_sweep(args.runs, args.warmup, threads, work, models=models)
            df.to_csv(ROOT / "results" / "round_to.csv", index=False)
            cols = list(df.columns[:-3])
            table = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n" + "\n".join(
                "| " + " | ".join(str(r[c]) for c in cols) + " |" for _, r in df.iterrows())
            table += (f"\n\nCPU: {df.iloc[0]['cpu']}, onnxruntime, {threads} threads, batch 8, {args.runs} runs "
                      f"per variant interleaved in one process.")
            if not args.no_readme:
                update_readme(table, marker="round_to")
            print(table)
        else:
            rows = []
            for name in dict.fromkeys(ALIASES.get(m, m) for m in args.models):
                if name not in CASES:
                    raise SystemExit(f"unknown model '{name}'; choose from {list(CASES)}")
                rows += run_case(name, args.runs, args.warmup, threads,
                                 name in [ALIASES.get(m, m) for m in args.latency_solver], work)
            df = pd.DataFrame(rows)
            df.to_csv(ROOT / "results" / "latency.csv", index=False)
            if not args.no_readme:
                update_readme(markdown(df), marker="latency")
            print(markdown(df))
    log(f"total {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
