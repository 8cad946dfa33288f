"""Agent search: how many revisions the heuristic agent loop needs to land in the MAC band, on the paper's seven cases.

For each case of ``mac_targeting.CASES`` (224x224, random weights) the full search loop runs on CPU
(``agents.search.run_search`` with ``tasks.memory_steps.search_steps``, as ``agentic-pruner search``
does): Master Agent, heuristic strategist, safety validator, MAC solver, prune of the original model,
MAC re-count. Evaluation is the proxy of ``agentic-pruner search``: top-1 agreement between the pruned
and the original model on a fixed batch of seeded random inputs, no fine-tuning.

Writes benchmarks/results/agent_search.csv and the table between the markers in benchmarks/README.md.
Usage: python benchmarks/agent_search.py [--cases N] [--max-revisions 10] [--extra-revisions 3] [--eval-samples 16]
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import pandas as pd
import timm
import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from mac_targeting import CASES, update_readme  # noqa: E402

from agentic_pruner.search_cli import progress_line, proxy_search  # noqa: E402
from agents.strategists import HeuristicStrategist  # noqa: E402
from pruning.solver import MacBand  # noqa: E402
from pruning.space import example_input  # noqa: E402

warnings.filterwarnings("ignore")


def short_stop(reason: str) -> str:
    if reason.startswith("two-phase search complete"):
        return "two-phase complete"
    if reason.startswith("maximum revisions"):
        return reason.replace("maximum revisions reached", "max revisions")
    if reason.startswith("MAC convergence"):
        return "MAC convergence"
    if "no new" in reason:
        return "strategies exhausted"
    return reason[:40]


def run_case(name, target_g, over, under, paper_first, paper_err, *, max_revisions, extra_revisions,
             eval_samples) -> dict:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    example = example_input(224)
    band = MacBand(target_macs=target_g * 1e9, overshoot_pct=over, undershoot_pct=under)
    print(f"== {name} -> {target_g} G (+{over}/-{under} %)", flush=True)
    marks: dict[str, float] = {}

    def on_profile(_profile) -> None:
        marks["search_start"] = time.perf_counter()

    t0 = time.perf_counter()
    result, profile, baseline = proxy_search(
        model, example, band, HeuristicStrategist(), max_revisions=max_revisions, extra_revisions=extra_revisions,
        eval_samples=eval_samples, seed=0, model_name=name,
        on_record=lambda r: print("  " + progress_line(r), flush=True), on_profile=on_profile)
    total = time.perf_counter() - t0
    search_s = time.perf_counter() - marks.get("search_start", t0)
    h = result.history
    first = next((r.revision for r in h if r.is_candidate), None)
    best = result.best

    def mean_timing(key: str) -> float | None:
        vals = [r.timings[key] for r in h if key in r.timings]
        return round(sum(vals) / len(vals), 2) if vals else None
    return {
        "model": name, "target_G": target_g, "band": f"+{over}/-{under}", "base_G": round(profile.base_macs / 1e9, 3),
        "first_in_band_index": first if first is not None else "none",
        "revisions_to_first_in_band": first + 1 if first is not None else "none",
        "first_move": h[first].move if first is not None else "",
        "revisions": len(h), "stop": short_stop(result.stop_reason), "stop_reason": result.stop_reason,
        "in_band_count": sum(r.is_candidate for r in h),
        "statuses": ",".join(f"{s}:{sum(r.status == s for r in h)}" for s in ("ok", "infeasible", "error", "rejected")
                             if any(r.status == s for r in h)),
        "best_revision": result.best_revision, "best_in_band": result.best_in_band,
        "best_error_pct": None if best is None or best.error_pct is None else round(best.error_pct, 3),
        "best_proxy_acc": None if best is None else best.accuracy_before,
        "collapsed_count": sum(r.collapsed for r in h),
        "total_s": round(total, 1), "search_s": round(search_s, 1),
        "s_per_revision": round(search_s / max(1, len(h)), 1),
        **{f"{k}_s_per_revision": mean_timing(f"prune.{k}") for k in ("build", "solve", "apply", "eval")},
        "paper_first_valid_revision": paper_first, "paper_final_error_pct": paper_err,
    }


MARKDOWN_COLUMNS = ["model", "target_G", "band", "first_in_band_index", "revisions_to_first_in_band", "revisions",
                    "stop", "in_band_count", "best_revision", "best_error_pct", "best_proxy_acc", "total_s",
                    "s_per_revision", "build_s_per_revision", "paper_first_valid_revision"]


def markdown(df: pd.DataFrame) -> str:
    cols = MARKDOWN_COLUMNS
    head = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
    return head + "\n".join("| " + " | ".join(str(r[c]) for c in cols) + " |" for _, r in df.iterrows())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=len(CASES))
    ap.add_argument("--max-revisions", type=int, default=10)
    ap.add_argument("--extra-revisions", type=int, default=3)
    ap.add_argument("--eval-samples", type=int, default=16)
    ap.add_argument("--no-readme", action="store_true", help="only write the CSV")
    args = ap.parse_args()
    rows = []
    (ROOT / "results").mkdir(exist_ok=True)
    for case in CASES[: args.cases]:
        row = run_case(*case, max_revisions=args.max_revisions, extra_revisions=args.extra_revisions,
                       eval_samples=args.eval_samples)
        print(row, flush=True)
        rows.append(row)
        pd.DataFrame(rows).to_csv(ROOT / "results" / "agent_search.csv", index=False)  # partial results survive
    df = pd.DataFrame(rows)
    if not args.no_readme:
        update_readme(markdown(df), marker="agent_search")
    print(markdown(df))


if __name__ == "__main__":
    main()
