"""Coverage: does `solve` land in the MAC band on any timm architecture? Ours vs plain Torch-Pruning.

For each architecture (random weights: MACs do not depend on weight values) and each budget (50 % and
25 % of the model's MACs, band +1 % / -5 %, as in ``agentic-pruner solve --overshoot 1 --undershoot 5``):

- ours: ``prune_to_target`` with the default plan (l2, global, round_to 8) from scratch (trace, trial cut,
  solve, cut, count): in band, |error|, forward OK (output shape unchanged), MAC source (``analytic`` =
  exact prediction, ``measured`` = the MAC model missed and cut copies were counted), frozen groups,
  seconds, and the one-line error when it fails;
- plain Torch-Pruning on the same model in the same process: MetaPruner, global + isomorphic, L2 group
  magnitude, round_to 8, only the classifier ignored, attention heads registered, its one
  ``pruning_ratio`` bisected (at most ``--tp-probes`` prune+count probes per budget, stopping at
  |error| <= 0.5 %); in band, best error, and the failure when TP raises. Its mean probe time is
  "one plain prune+count" (``ours_over_prune_count`` = our seconds / that).

Input: 128x128 where the model runs at that size (ViT-style models are created with ``img_size=128``
through the loader, which drops the keyword for models that do not take it); otherwise the model's
default size. Every model runs in its own subprocess with a time limit.

Writes benchmarks/results/coverage.csv and the table between the coverage markers in benchmarks/README.md.
Usage: python benchmarks/coverage.py [--models a,b] [--timeout 420] [--tp-probes 8]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent
BUDGETS = (0.5, 0.25)
OVERSHOOT, UNDERSHOOT = 1.0, 5.0
SMALL_INPUT = 128

# (timm name, category)
MODELS = [
    ("resnet18", "classic CNN"), ("resnet50", "classic CNN"), ("seresnext26d_32x4d", "classic CNN"),
    ("vgg11_bn", "classic CNN"), ("densenet121", "classic CNN"), ("inception_v3", "classic CNN"),
    ("dla34", "classic CNN"), ("dpn68", "classic CNN"), ("res2net50_26w_4s", "classic CNN"),
    ("resnest14d", "classic CNN"), ("cspresnet50", "classic CNN"), ("cspdarknet53", "classic CNN"),
    ("regnetx_002", "classic CNN"), ("regnety_004", "classic CNN"), ("skresnet18", "classic CNN"),
    ("nf_resnet50", "classic CNN"), ("repvgg_a0", "classic CNN"), ("hrnet_w18_small", "classic CNN"),
    ("xception41", "classic CNN"), ("selecsls42b", "classic CNN"), ("ese_vovnet19b_dw", "classic CNN"),
    ("gernet_s", "classic CNN"), ("resnetv2_50", "classic CNN"), ("darknet53", "classic CNN"),
    ("tresnet_m", "classic CNN"), ("convnext_atto", "classic CNN"), ("convnextv2_atto", "recent (2023-25)"),
    ("mobilenetv2_100", "mobile / NAS"), ("mobilenetv3_large_100", "mobile / NAS"),
    ("efficientnet_b0", "mobile / NAS"), ("ghostnet_100", "mobile / NAS"), ("rexnet_100", "mobile / NAS"),
    ("tf_mixnet_s", "mobile / NAS"), ("mnasnet_100", "mobile / NAS"), ("fbnetc_100", "mobile / NAS"),
    ("lcnet_050", "mobile / NAS"), ("tinynet_a", "mobile / NAS"), ("hardcorenas_a", "mobile / NAS"),
    ("mobileone_s0", "mobile / NAS"), ("mobilenetv4_conv_small", "recent (2023-25)"),
    ("ghostnetv2_100", "mobile / NAS"), ("repghostnet_050", "mobile / NAS"),
    ("efficientvit_b0", "hybrid"), ("efficientvit_m0", "hybrid"), ("fastvit_t8", "hybrid"),
    ("mobilevit_s", "hybrid"), ("mobilevitv2_050", "hybrid"), ("edgenext_small", "hybrid"),
    ("levit_128", "hybrid"), ("efficientformer_l1", "hybrid"), ("efficientformerv2_s0", "hybrid"),
    ("tiny_vit_5m_224", "hybrid"), ("repvit_m0_9", "recent (2023-25)"), ("coat_lite_tiny", "hybrid"),
    ("deit_tiny_patch16_224", "plain ViT"), ("vit_small_patch16_224", "plain ViT"),
    ("eva02_tiny_patch14_224", "plain ViT"), ("cait_xxs24_224", "plain ViT"),
    ("swin_tiny_patch4_window7_224", "hierarchical ViT"), ("pvt_v2_b0", "hierarchical ViT"),
    ("twins_svt_small", "hierarchical ViT"), ("davit_tiny", "hierarchical ViT"),
    ("focalnet_tiny_srf", "hierarchical ViT"), ("hiera_tiny_224", "recent (2023-25)"),
    ("poolformer_s12", "MetaFormer"), ("convformer_s18", "MetaFormer"), ("caformer_s18", "MetaFormer"),
    ("mixer_s16_224", "MLP-mixer"), ("resmlp_12_224", "MLP-mixer"), ("gmlp_ti16_224", "MLP-mixer"),
    ("starnet_s1", "recent (2023-25)"), ("mambaout_femto", "recent (2023-25)"),
    ("hgnetv2_b0", "recent (2023-25)"), ("shvit_s1", "recent (2023-25)"), ("fasternet_t0", "recent (2023-25)"),
    ("efficientvim_m1", "recent (2023-25)"), ("iformer_t", "recent (2023-25)"),
    ("inception_next_tiny", "recent (2023-25)"),
]


# ----------------------------------------------------------------------------------------------
# worker: one model, in its own process
# ----------------------------------------------------------------------------------------------
def _line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160]}" if text else type(exc).__name__


def _load(name: str):
    """The model at 128 px if it runs there, else at its default size: ``(model, example, size)``."""
    import torch

    from pruning.models import ModelSpec, default_input_size, load_model
    from pruning.space import example_input

    torch.manual_seed(0)
    try:
        model = load_model(ModelSpec(name=name, input_size=SMALL_INPUT))
        example = example_input(SMALL_INPUT)
        with torch.no_grad():
            model(example)
        return model, example, SMALL_INPUT
    except Exception:  # noqa: BLE001 - this architecture needs its own resolution
        torch.manual_seed(0)
        model = load_model(ModelSpec(name=name))
        size = default_input_size(model)
        return model, example_input(size), size


def ours(model, example, band) -> dict:
    import torch

    from pruning.engine import prune_to_target
    from pruning.plan import PruningPlan

    t = time.perf_counter()
    try:
        pruned, res, _ = prune_to_target(model, example, PruningPlan(), band, strict=False)
    except Exception as exc:  # noqa: BLE001 - recorded
        return {"ours_in_band": False, "ours_error": _line(exc), "ours_s": round(time.perf_counter() - t, 2)}
    seconds = time.perf_counter() - t
    try:
        with torch.no_grad():
            forward_ok = tuple(pruned(example).shape) == tuple(model(example).shape)
    except Exception:  # noqa: BLE001
        forward_ok = False
    return {"ours_in_band": bool(res.in_band and forward_ok), "ours_error_pct": round(res.error_pct, 3),
            "ours_forward_ok": forward_ok, "ours_mac_source": res.mac_source,
            "ours_prediction_exact": res.prediction_exact, "ours_measured_probes": res.measured_probes,
            "ours_frozen": len(res.frozen_groups), "ours_s": round(seconds, 2),
            "ours_error": "" if res.in_band else "out of band"}


def plain_tp(model, example, band, max_probes: int) -> dict:
    """Plain Torch-Pruning with its one ratio bisected (see benchmarks/mac_targeting.py ``tp_prune_at``)."""
    from mac_targeting import tp_prune_at

    lo, hi = 0.0, 0.95
    best, times, error = None, [], ""
    for _ in range(max_probes):
        ratio = (lo + hi) / 2
        t = time.perf_counter()
        try:
            _, macs = tp_prune_at(model, example, ratio)
        except Exception as exc:  # noqa: BLE001 - TP raises on this model
            error = _line(exc)
            break
        times.append(time.perf_counter() - t)
        err = band.error_pct(macs)
        if band.contains(macs) and (best is None or abs(err) < abs(best)):
            best = err
        if best is not None and abs(best) <= 0.5:
            break
        lo, hi = (ratio, hi) if macs > band.target_macs else (lo, ratio)
    return {"tp_in_band": best is not None, "tp_error_pct": None if best is None else round(best, 3),
            "tp_probes": len(times), "tp_prune_count_s": round(sum(times) / len(times), 2) if times else None,
            "tp_s": round(sum(times), 2), "tp_error": error}


class _TimeUp(Exception):
    pass


def _alarm(signum, frame):
    raise _TimeUp()


def worker(name: str, max_probes: int, tp_limit: int, ours_only: bool = False) -> list[dict]:
    """Ours at both budgets first, then plain TP at both, each TP budget stopped after ``tp_limit`` s
    (plain TP can run for many minutes on some graphs: ReXNet)."""
    import signal

    import torch

    from pruning.solver import MacBand
    from pruning.space import count_macs_params

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    model, example, size = _load(name)
    base = count_macs_params(model, example)[0]
    rows = []
    for fraction in BUDGETS:
        band = MacBand(target_macs=base * fraction, overshoot_pct=OVERSHOOT, undershoot_pct=UNDERSHOOT)
        row = {"model": name, "family": type(model).__module__.rsplit(".", 1)[-1], "input": size,
               "budget": f"{fraction:.0%}", "base_G": round(base / 1e9, 4)}
        row.update(ours(model, example, band))
        rows.append((row, band))
    signal.signal(signal.SIGALRM, _alarm)
    for row, band in [] if ours_only else rows:
        signal.alarm(tp_limit)
        try:
            row.update(plain_tp(model, example, band, max_probes))
        except _TimeUp:
            row.update({"tp_in_band": False, "tp_error": f"timed out after {tp_limit} s"})
        finally:
            signal.alarm(0)
        if row.get("tp_prune_count_s"):
            row["ours_over_prune_count"] = round(row["ours_s"] / row["tp_prune_count_s"], 2)
    return [row for row, _ in rows]


# ----------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------
def run_model(name: str, category: str, timeout: int, max_probes: int, ours_only: bool = False) -> list[dict]:
    cmd = [sys.executable, __file__, "--worker", name, "--tp-probes", str(max_probes),
           "--tp-limit", str(max(30, (timeout - 60) // 3))] + (["--ours-only"] if ours_only else [])
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT.parent)
        lines = [x for x in out.stdout.splitlines() if x.startswith("{")]
        rows = [json.loads(x) for x in lines]
        if not rows:
            err = (out.stderr.strip().splitlines() or ["no output"])[-1][:160]
            rows = [{"model": name, "budget": f"{f:.0%}", "ours_in_band": False, "tp_in_band": False,
                     "ours_error": f"worker failed: {err}"} for f in BUDGETS]
    except subprocess.TimeoutExpired:
        rows = [{"model": name, "budget": f"{f:.0%}", "ours_in_band": False, "tp_in_band": False,
                 "ours_error": f"timed out after {timeout} s"} for f in BUDGETS]
    for r in rows:
        r["category"] = category
    return rows


COLUMNS = ["model", "category", "family", "input", "budget", "base_G", "ours_in_band", "ours_error_pct",
           "ours_forward_ok", "ours_mac_source", "ours_prediction_exact", "ours_frozen", "ours_s",
           "ours_over_prune_count", "tp_in_band", "tp_error_pct", "tp_prune_count_s", "ours_error", "tp_error"]


def markdown(df) -> str:
    cols = [c for c in COLUMNS if c in df.columns]
    head = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
    def cell(v) -> str:
        if v is None or v != v:  # None or NaN
            return ""
        return str(v).replace("|", "/")
    return head + "\n".join("| " + " | ".join(cell(r[c]) for c in cols) + " |" for _, r in df.iterrows())


def summary(df) -> str:
    lines = []
    n_models = df["model"].nunique()
    lines.append(f"{n_models} architectures, {df['family'].nunique()} timm families (model modules), "
                 f"{df['category'].nunique()} categories.")
    for budget in (f"{b:.0%}" for b in BUDGETS):
        d = df[df["budget"] == budget]
        ours_n, tp_n = int(d["ours_in_band"].sum()), int(d["tp_in_band"].sum())
        both = d[d["tp_in_band"] == True]  # noqa: E712 - pandas
        lines.append(f"- {budget}: ours in band on {ours_n}/{len(d)} ({ours_n / len(d):.0%}), plain Torch-Pruning on "
                     f"{tp_n}/{len(d)}; of the {len(both)} TP lands, ours lands {int(both['ours_in_band'].sum())}.")
        ok = d[d["ours_in_band"] == True]  # noqa: E712
        if len(ok):
            lines.append(f"  ours in band: |error| <= 0.5 % on {int((ok['ours_error_pct'].abs() <= 0.5).sum())}/{len(ok)}, "
                         f"analytic (exact) on {int((ok['ours_mac_source'] == 'analytic').sum())}, measured fallback on "
                         f"{int((ok['ours_mac_source'] == 'measured').sum())}, median {ok['ours_s'].median():.1f} s.")
    exact = df[(df["ours_mac_source"] == "analytic") & df["ours_over_prune_count"].notna()]
    if len(exact):
        r = exact["ours_over_prune_count"]
        lines.append(f"- Solve time where the analytic path applies ({len(exact)} rows: trace, trial cut, solve, cut and "
                     f"count, over one plain TP prune+count): median {r.median():.2f}x, 90th percentile "
                     f"{r.quantile(0.9):.2f}x, <= 2x on {int((r <= 2).sum())}/{len(exact)}.")
    failing = df[df["ours_in_band"] != True]  # noqa: E712
    if len(failing):
        lines.append("\nStill failing (ours), one line each:\n")
        for _, r in failing.iterrows():
            tp_note = "plain TP lands it" if r.get("tp_in_band") == True else "plain TP fails too"  # noqa: E712
            lines.append(f"- `{r['model']}` {r['budget']}: {str(r.get('ours_error', ''))[:230]} ({tp_note})")
    return "\n".join(lines)


def _write(pd, rows: list[dict], args):
    """Write the CSV (with ``--merge``: the other models' rows of the existing CSV kept, in list order)."""
    df = pd.DataFrame(rows)
    out = Path(args.out)
    if args.merge and out.exists():
        old = pd.read_csv(out)
        if args.ours_only:  # plain TP does not depend on this project's code: keep its measured columns
            tp_cols = ["model", "budget"] + [c for c in old.columns if c.startswith("tp_")]
            df = df.drop(columns=[c for c in tp_cols[2:] if c in df.columns]).merge(
                old[tp_cols], on=["model", "budget"], how="left")
            df["ours_over_prune_count"] = (df["ours_s"] / df["tp_prune_count_s"]).round(2)
        df = pd.concat([old[~old["model"].isin(df["model"])], df], ignore_index=True)
        order = {name: i for i, (name, _) in enumerate(MODELS)}
        df = df.sort_values("model", key=lambda c: c.map(order), kind="stable").reset_index(drop=True)
    out.parent.mkdir(exist_ok=True)
    df[[c for c in COLUMNS if c in df.columns]].to_csv(out, index=False)
    return df


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="", help="comma-separated subset (default: all)")
    ap.add_argument("--timeout", type=int, default=420, help="seconds per model (both budgets, ours and TP)")
    ap.add_argument("--tp-probes", type=int, default=8)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--tp-limit", type=int, default=120, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "results" / "coverage.csv"))
    ap.add_argument("--merge", action="store_true", help="replace only these models' rows in --out")
    ap.add_argument("--ours-only", action="store_true",
                    help="with --merge: re-measure only ours, keep plain TP's columns from --out")
    ap.add_argument("--no-readme", action="store_true")
    args = ap.parse_args()
    if args.worker:
        for row in worker(args.worker, args.tp_probes, args.tp_limit, args.ours_only):
            print(json.dumps(row), flush=True)
        return
    import pandas as pd
    from mac_targeting import update_readme

    if args.ours_only and not args.merge:
        ap.error("--ours-only needs --merge (plain TP's columns come from the existing CSV)")
    wanted = set(filter(None, args.models.split(",")))
    rows = []
    for name, category in MODELS:
        if wanted and name not in wanted:
            continue
        t = time.perf_counter()
        got = run_model(name, category, args.timeout, args.tp_probes, args.ours_only)
        rows += got
        print(f"{name}: " + "; ".join(f"{r['budget']} ours={r.get('ours_in_band')} ({r.get('ours_error_pct')}) "
                                      f"tp={r.get('tp_in_band')}" for r in got) + f" [{time.perf_counter() - t:.0f} s]",
              flush=True)
        _write(pd, rows, args)
    df = _write(pd, rows, args)
    text = summary(df) + "\n\n" + markdown(df)
    if not args.no_readme:
        update_readme(text, marker="coverage")
    print(text)


if __name__ == "__main__":
    main()
