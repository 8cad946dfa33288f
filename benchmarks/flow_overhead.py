"""Prefect + storage overhead per revision: the same search run three ways.

1. plain: ``tasks.steps`` steps called directly from ``run_search`` (local store), no Prefect;
2. prefect-local: the ``agentic_prune`` flow (Prefect ephemeral API) with a local store;
3. prefect-s3: the flow with an S3 store served by SeaweedFS on loopback.

Overhead per revision = (flow search time - plain search time) / revisions, where "search time" is the
sum of revision wall times (first prune to last persisted record). Writes
benchmarks/results/flow_overhead.csv and the table between the markers in benchmarks/README.md.
Usage: python benchmarks/flow_overhead.py [--revisions 4]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "tests"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="bench-prefect-"))

from mac_targeting import update_readme  # noqa: E402

from agents.master import MasterAgent, MasterConfig  # noqa: E402
from agents.safety import SafetyValidator  # noqa: E402
from agents.search import SearchContext, run_search  # noqa: E402
from agents.strategists import HeuristicStrategist  # noqa: E402
from pruning.artifacts import open_store, runs  # noqa: E402
from pruning.plan import PruningPlan  # noqa: E402
from tasks import steps  # noqa: E402
from tasks.config import RunConfig  # noqa: E402


def config(store: str, revisions: int) -> RunConfig:
    return RunConfig(model="default", store=store, target_macs="50%", max_revisions=revisions,
                     extra_revisions=revisions, inline_epochs=1, extended_epochs=0, latency=False, seed=0)


def plain(cfg: RunConfig) -> tuple[float, int]:
    info = steps.open_run(cfg)
    ctx = steps.get_context(cfg, info.run_id)
    baseline = steps.prepare_original(ctx)
    profile = steps.profile_run(ctx)
    validator = SafetyValidator(dataset=cfg.data)
    master = MasterAgent(MasterConfig(max_revisions=cfg.max_revisions, extra_revisions=cfg.extra_revisions))
    n = [0]

    def on_record(r):
        ctx.store.append_jsonl(ctx.key("history.jsonl"), r.model_dump(mode="json"))
        n[0] += 1

    context = SearchContext(band=ctx.band(), profile=profile, base_plan=PruningPlan(importance=cfg.importance),
                            baseline_accuracy=baseline.val_accuracy, seed=cfg.seed)
    t = time.perf_counter()
    run_search(context, HeuristicStrategist(), validator, master,
               lambda plan, slot: steps.prune_revision(ctx, plan, slot.revision, validator, slot.candidate),
               lambda m: steps.finetune_revision(ctx, m, m.revision, m.candidate), on_record)
    return time.perf_counter() - t, n[0]


WITHIN_RUN: dict[str, dict] = {}


def step_wall_and_work(records: list[dict]) -> tuple[float, float]:
    """Summed wall time of the prune/finetune task calls and of the work measured inside them."""
    outer = inner = 0.0
    for r in records:
        t = r["timings"]
        for step in ("prune", "finetune"):
            if step in t:
                outer += t[step]
                inner += sum(v for k, v in t.items() if k.startswith(step + "."))
    return outer, inner


def flow_search_seconds(cfg: RunConfig) -> tuple[float, int]:
    """Run the flow end to end; return its wall time and the number of revisions it persisted.

    Also records, from the persisted per-revision timings, how much of each step's wall time (task call,
    measured by the search loop) was spent outside the step's own work (measured inside the step):
    that difference is Prefect's task overhead, measured within one run, so machine load cancels out.
    """
    from flows.agentic_prune import agentic_prune

    t0 = time.perf_counter()
    summary = agentic_prune(cfg)
    total = time.perf_counter() - t0
    history = runs.read_history(open_store(cfg.store), summary.run_id)
    outer, inner = step_wall_and_work(history)
    WITHIN_RUN[cfg.store] = {"step_wall_s": outer, "step_work_s": inner, "revisions": len(history)}
    return total, len(history)


def within_run_table(paths: list[str]) -> str:
    """Prefect task overhead per revision from persisted flow histories (history.jsonl files)."""
    import json

    rows = []
    for path in paths:
        records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        outer, inner = step_wall_and_work(records)
        n = max(1, len(records))
        rows.append({"history": Path(path).stem if Path(path).stem != "history" else Path(path).parent.name, "revisions": len(records),
                     "revision_s": round(outer / n, 2), "task_overhead_s": round((outer - inner) / n, 3),
                     "task_overhead_pct": round(100 * (outer - inner) / max(outer, 1e-9), 2)})
    cols = list(rows[0])
    return "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n" + "\n".join(
        "| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--revisions", type=int, default=4)
    ap.add_argument("--from-history", nargs="+", help="only compute the within-run task overhead of these history.jsonl files")
    args = ap.parse_args()
    if args.from_history:
        table = within_run_table(args.from_history)
        update_readme(table, marker="flow_overhead")
        print(table)
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        # warm the default model cache and the data so every variant starts equal
        steps.prepare_original(steps.get_context(config(f"{tmp}/warm", 1), "warm"))
        secs, n = plain(config(f"{tmp}/plain", args.revisions))
        rows.append({"variant": "plain (no Prefect), local store", "revisions": n, "search_s": round(secs, 2)})
        print(rows[-1], flush=True)
        # flow total includes flow start-up, baseline evaluation and profiling: measure those once with 1 revision
        one, _ = flow_search_seconds(config(f"{tmp}/prefect1", 1))
        total, n2 = flow_search_seconds(config(f"{tmp}/prefect", args.revisions))
        rows.append({"variant": "Prefect flow, local store", "revisions": n2, "flow_total_s": round(total, 2),
                     "flow_1rev_total_s": round(one, 2)})
        print(rows[-1], flush=True)
        try:
            from s3_server import seaweed_s3

            with seaweed_s3() as s3:
                os.environ.update(s3.env())
                s3.create_bucket("bench")
                one_s3, _ = flow_search_seconds(config("s3://bench/one", 1))
                total_s3, n3 = flow_search_seconds(config("s3://bench/full", args.revisions))
                rows.append({"variant": "Prefect flow, S3 store (SeaweedFS)", "revisions": n3,
                             "flow_total_s": round(total_s3, 2), "flow_1rev_total_s": round(one_s3, 2)})
                print(rows[-1], flush=True)
        except Exception as exc:  # noqa: BLE001 - report, don't hide
            print(f"S3 variant skipped: {exc}", flush=True)
    for r, store in zip(rows[1:], [k for k in WITHIN_RUN if not k.endswith(("prefect1", "one"))]):
        w = WITHIN_RUN[store]
        r["task_overhead_per_revision_s"] = round((w["step_wall_s"] - w["step_work_s"]) / max(1, w["revisions"]), 3)
        r["task_overhead_pct"] = round(100 * (w["step_wall_s"] - w["step_work_s"]) / max(1e-9, w["step_wall_s"]), 2)
    plain_per_rev = rows[0]["search_s"] / rows[0]["revisions"]
    for r in rows[1:]:
        # per-revision cost of the flow = (total with N revisions - total with 1) / (N - 1)
        per_rev = (r["flow_total_s"] - r["flow_1rev_total_s"]) / max(1, r["revisions"] - 1)
        r["per_revision_s"] = round(per_rev, 2)
        r["overhead_per_revision_s"] = round(per_rev - plain_per_rev, 2)
        r["overhead_pct"] = round(100 * (per_rev - plain_per_rev) / plain_per_rev, 1)
    rows[0]["per_revision_s"] = round(plain_per_rev, 2)
    df = pd.DataFrame(rows)
    (ROOT / "results").mkdir(exist_ok=True)
    df.to_csv(ROOT / "results" / "flow_overhead.csv", index=False)
    cols = [c for c in ("variant", "revisions", "per_revision_s", "task_overhead_per_revision_s", "task_overhead_pct",
                        "overhead_per_revision_s", "overhead_pct",
                        "flow_total_s", "flow_1rev_total_s", "search_s") if c in df.columns]
    table = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n" + "\n".join(
        "| " + " | ".join("" if pd.isna(r[c]) else str(r[c]) for c in cols) + " |" for _, r in df.iterrows())
    update_readme(table, marker="flow_overhead")
    print(table)


if __name__ == "__main__":
    main()
