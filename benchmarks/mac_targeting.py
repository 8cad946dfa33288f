"""MAC targeting: our one-shot solver vs plain Torch-Pruning bisection, on the paper's seven cases.

For each case (224x224, random weights: MAC counts do not depend on weight values):
- ours: build the pruning space, solve analytically, cut once, count once (what `agentic-pruner solve` does);
- bar: plain Torch-Pruning (MetaPruner, global + isomorphic, round_to 8) with a bisection on its one
  ``pruning_ratio``; every probe deep-copies, prunes and counts. Its mean probe time is "one prune+count".

Writes benchmarks/results/mac_targeting.csv and the table between the markers in benchmarks/README.md.
Usage: python benchmarks/mac_targeting.py [--cases N] [--max-bar-probes 20]
"""
from __future__ import annotations

import argparse
import copy
import time
import warnings
from pathlib import Path
from typing import Iterator

import pandas as pd
import timm
import torch
import torch_pruning as tp

from pruning.engine import prune_to_target
from pruning.models import classifier
from pruning.plan import PruningPlan
from pruning.solver import MacBand
from pruning.space import example_input

warnings.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parent

# (model, target G, overshoot %, undershoot %, paper first-valid revision, paper final MAC error %)
CASES = [
    ("resnet50", 2.06, 5.0, 15.0, "9", "-14.1"),
    ("resnet101", 4.48, 0.1, 20.0, "7", "-5.8"),
    ("convnext_base", 8.48, 0.1, 11.56, "44", "-3.7"),
    ("deit_tiny_patch16_224", 0.62, 1.0, 20.0, "2", "-1.6"),
    ("resnet50", 1.03, 1.0, 15.0, "9", "2.01"),
    ("convnext_base", 1.12, 1.0, 15.0, "failed (30)", "—"),
    ("deit_tiny_patch16_224", 0.32, 1.0, 15.0, "8", "26.49"),
]


def tp_prune_at(model: torch.nn.Module, example: torch.Tensor, ratio: float) -> tuple[torch.nn.Module, float]:
    """Plain Torch-Pruning at one ``pruning_ratio`` on a deep copy: MetaPruner, GroupMagnitudeImportance p=2,
    global + isomorphic, round_to 8, only the classifier ignored; ViT heads as in TP's timm example.
    Returns the pruned copy and its MACs."""
    m = copy.deepcopy(model)
    num_heads = {a.qkv: a.num_heads for a in m.modules() if hasattr(a, "qkv") and hasattr(a, "num_heads")}
    pruner = tp.pruner.MetaPruner(m, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  pruning_ratio=ratio, global_pruning=True, isomorphic=True, round_to=8,
                                  ignored_layers=[classifier(m)], num_heads=num_heads)
    pruner.step()
    for attn in m.modules():  # as in Torch-Pruning's timm ViT example
        if hasattr(attn, "qkv") and hasattr(attn, "num_heads"):
            attn.num_heads = pruner.num_heads[attn.qkv]
            attn.head_dim = attn.qkv.out_features // (3 * attn.num_heads)
            if hasattr(attn, "attn_dim"):  # newer timm reshapes with attn_dim (not in TP's example)
                attn.attn_dim = attn.num_heads * attn.head_dim
    macs, _ = tp.utils.count_ops_and_params(m, example)
    return m, float(macs)


def tp_ratio_bisection(model: torch.nn.Module, example: torch.Tensor, target_macs: float, *, max_probes: int,
                       min_width: float = 0.0) -> Iterator[tuple[int, float, torch.nn.Module, float, float]]:
    """Bisection of plain Torch-Pruning's one ``pruning_ratio`` in [0, 0.95] towards ``target_macs``.

    Yields ``(probe, ratio, pruned_model, macs, seconds)`` per probe (``seconds``: deep copy + prune + count);
    the caller stops it (``break``) when a probe is good enough. It also ends after ``max_probes`` probes or
    once the ratio interval is narrower than ``min_width``.
    """
    lo, hi = 0.0, 0.95
    for probe in range(1, max_probes + 1):
        ratio = (lo + hi) / 2
        t = time.perf_counter()
        m, macs = tp_prune_at(model, example, ratio)
        yield probe, ratio, m, macs, time.perf_counter() - t
        if macs > target_macs:
            lo = ratio
        else:
            hi = ratio
        if hi - lo < min_width:
            break


def plain_tp_bisection(model, example, band: MacBand, max_probes: int) -> dict:
    """The bar: bisection on MetaPruner's single pruning_ratio, re-pruning and counting every probe."""
    first_in_band, best, times = None, None, []
    for probe, _ratio, _m, macs, seconds in tp_ratio_bisection(model, example, band.target_macs,
                                                               max_probes=max_probes):
        times.append(seconds)
        err = band.error_pct(macs)
        if band.contains(macs):
            first_in_band = first_in_band or probe
            if best is None or abs(err) < abs(best):
                best = err
            if abs(err) <= 0.5:
                break
    return {"bar_first_in_band": first_in_band, "bar_probes": probe, "bar_best_error_pct": best,
            "prune_count_s": sum(times) / len(times), "bar_total_s": sum(times)}


def run_case(name, target_g, over, under, paper_first, paper_err, max_bar_probes) -> dict:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    example = example_input(224)
    band = MacBand(target_macs=target_g * 1e9, overshoot_pct=over, undershoot_pct=under)
    t = time.perf_counter()
    pruned, result, _ = prune_to_target(model, example, PruningPlan(), band)
    ours_total = time.perf_counter() - t
    bar = plain_tp_bisection(model, example, band, max_bar_probes)
    row = {
        "model": name, "target_G": target_g, "band": f"+{over}/-{under}",
        "in_band": "y" if result.in_band else "n", "error_pct": round(result.error_pct, 3),
        "achieved_G": round(result.achieved_macs / 1e9, 4), "prediction_exact": result.prediction_exact,
        "probes": result.probes, "real_prunes": 1,
        "s_per_probe": round(result.seconds["solve"] / max(1, result.probes), 4),
        "solve_s": round(result.seconds["solve"], 3), "total_s": round(ours_total, 2),
        "granularity_pct": round(result.granularity_pct, 4),
        **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in bar.items()},
        "paper_first_valid_revision": paper_first, "paper_final_error_pct": paper_err,
    }
    row["total_over_prune_count"] = round(ours_total / bar["prune_count_s"], 2)
    return row


def markdown(df: pd.DataFrame) -> str:
    cols = ["model", "target_G", "band", "in_band", "error_pct", "prediction_exact", "probes", "s_per_probe",
            "total_s", "prune_count_s", "total_over_prune_count", "bar_first_in_band", "bar_probes",
            "bar_best_error_pct", "bar_total_s", "paper_first_valid_revision", "paper_final_error_pct"]
    head = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
    return head + "\n".join("| " + " | ".join(str(r[c]) for c in cols) + " |" for _, r in df.iterrows())


def update_readme(table: str, marker: str = "mac_targeting") -> None:
    readme = ROOT / "README.md"
    text = readme.read_text() if readme.exists() else "# Benchmarks\n"
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    block = f"{start}\n{table}\n{end}"
    if start in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text += f"\n{block}\n"
    readme.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=len(CASES))
    ap.add_argument("--max-bar-probes", type=int, default=20)
    args = ap.parse_args()
    rows = []
    for case in CASES[: args.cases]:
        row = run_case(*case, max_bar_probes=args.max_bar_probes)
        print(row, flush=True)
        rows.append(row)
    df = pd.DataFrame(rows)
    (ROOT / "results").mkdir(exist_ok=True)
    df.to_csv(ROOT / "results" / "mac_targeting.csv", index=False)
    update_readme(markdown(df))
    print(markdown(df))


if __name__ == "__main__":
    main()
