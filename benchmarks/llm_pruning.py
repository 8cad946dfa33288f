"""LLM pruning: magnitude, uniform Wanda, OWL and the agent (heuristic strategist) on the embedded tiny Qwen3.

For each target sparsity (default 30 %, 45 %, 60 % of the prunable linears' weights) every method prunes the
same dense model (exactly restored between methods) with the same calibration statistics (32 x 128-token
windows from the train split): magnitude (layer-wise), uniform Wanda (per output row), OWL (M = 5,
lambda = 0.08, per-block allocation averaging to the target), and the agent loop (rollback threshold 10 %
validation-perplexity rise per step). Perplexity is measured on held-out *test* documents (16 384 tokens),
which no method sees; the agent's rollbacks use the separate *validation* documents.

Writes benchmarks/results/llm_pruning.csv and the table between the llm markers in benchmarks/README.md.
Usage: python benchmarks/llm_pruning.py [--targets 0.3 0.45 0.6] [--no-readme]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from agents.llm_pruning import HeuristicPruneStrategist, LLMPruneConfig, run_prune_agent  # noqa: E402
from pruning.llm import baselines  # noqa: E402
from pruning.llm.session import DataConfig, PruneSession  # noqa: E402
from pruning.llm.tiny_model import TinyLMConfig  # noqa: E402

EXPLANATION = """\
## LLM pruning (`benchmarks/llm_pruning.py`)

Post-training unstructured pruning (no retraining) of the embedded tiny Qwen3 (hidden 128, 4 layers,
GQA 4/2 heads, byte-level, trained on Python standard-library docstrings; 28 prunable linears).
Sparsity = zeroed fraction of the decoder blocks' linear weights. All methods use the same calibration
statistics (dense model, 32 windows of 128 tokens) and prune Wanda-style per output row, except magnitude
(layer-wise). OWL: per-block outlier-weighted allocation (M = 5, λ = 0.08) averaging to the target. Agent:
the iterative loop with the deterministic heuristic strategist (profile = Wanda and gradient z-scores;
self-reflection from its own history), rolling a step back when validation perplexity rises > 10 %.
`test_ppl` is on held-out test documents no method sees; `val_ppl` (separate held-out documents) is what
the agent's rollbacks use. `seconds` = wall time of the pruning (the agent's includes every perplexity
evaluation). Caveats: the heuristic's defaults (z-scores of log scores, gradient weight 0.75, spread 0.1)
were picked among about ten variants by *validation* perplexity at 45 % / 60 %; with the profile's plain
`z_combined` (Wanda : gradient = 1 : 1) it landed at OWL's level (val 6.085 / 6.620 vs OWL 6.081 / 6.618).
On this tiny model no step raised perplexity by 10 %, so no rollback happened (rollback is exercised in
the tests). Differences of ~0.5 % are within what 16k test tokens resolve.
"""


def run(targets: list[float], tiny: TinyLMConfig, data: DataConfig) -> tuple[pd.DataFrame, dict]:
    sess = PruneSession.embedded(tiny, data)
    t = time.perf_counter()
    sess.compute_stats()
    stats_s = time.perf_counter() - t
    dense = {"val": sess.val_ppl(), "test": sess.test_ppl()}
    print(f"dense: val {dense['val']:.4f}, test {dense['test']:.4f}; statistics {stats_s:.2f}s", flush=True)
    rows = []
    methods = {
        "magnitude": lambda T: baselines.magnitude_prune(sess.mm, T),
        "wanda": lambda T: baselines.wanda_prune(sess.mm, sess.norms, T),
        "owl": lambda T: baselines.owl_prune(sess.mm, sess.norms, T),
    }
    for target in targets:
        for name, fn in methods.items():
            t = time.perf_counter()
            fn(target)
            secs = time.perf_counter() - t
            rows.append(dict(target=target, method=name, sparsity=sess.mm.overall_sparsity(), val_ppl=sess.val_ppl(),
                             test_ppl=sess.test_ppl(), iterations=None, rollbacks=None, seconds=secs))
            print(rows[-1], flush=True)
            sess.reset()
        t = time.perf_counter()
        res = run_prune_agent(sess, HeuristicPruneStrategist(), LLMPruneConfig(target_sparsity=target))
        secs = time.perf_counter() - t
        rows.append(dict(target=target, method="agent (heuristic)", sparsity=res.final_sparsity, val_ppl=res.final_ppl,
                         test_ppl=sess.test_ppl(), iterations=res.iterations, rollbacks=res.rollbacks, seconds=secs))
        print(rows[-1], flush=True)
        sess.reset()
    info = {"dense": dense, "random_init_test": sess.info.get("random_init_ppl", {}).get("test"),
            "prunable": sess.mm.total_params, "stats_seconds": stats_s}
    return pd.DataFrame(rows), info


def markdown(df: pd.DataFrame) -> str:
    cols = ["target", "method", "sparsity", "val_ppl", "test_ppl", "iterations", "rollbacks", "seconds"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        cells = [f"{r.target:.2f}", r.method, f"{r.sparsity:.4f}", f"{r.val_ppl:.4f}", f"{r.test_ppl:.4f}",
                 "" if pd.isna(r.iterations) else str(int(r.iterations)),
                 "" if pd.isna(r.rollbacks) else str(int(r.rollbacks)), f"{r.seconds:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(df: pd.DataFrame) -> str:
    out = []
    for target in sorted(df.target.unique()):
        d = df[df.target == target].set_index("method")
        a, o = d.loc["agent (heuristic)", "test_ppl"], d.loc["owl", "test_ppl"]
        best = d.test_ppl.idxmin()
        out.append(f"- {target:.0%}: agent {a:.4f} vs OWL {o:.4f} test perplexity "
                   f"({'agent ≤ OWL' if a <= o else 'agent > OWL'}, {100 * (a - o) / o:+.2f} %); best: {best}")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", type=float, nargs="+", default=[0.3, 0.45, 0.6])
    ap.add_argument("--no-readme", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    tiny = TinyLMConfig()
    data = DataConfig(seq_len=tiny.seq_len, calib_sequences=32, grad_sequences=16, eval_tokens=16384)
    t0 = time.perf_counter()
    df, info = run(args.targets, tiny, data)
    (ROOT / "results").mkdir(exist_ok=True)
    df.to_csv(ROOT / "results" / "llm_pruning.csv", index=False)
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores visible, torch {torch.__version__}, " \
              f"{torch.get_num_threads()} threads, shared with other jobs"
    head = (f"{info['prunable']:,} prunable weights; dense perplexity val {info['dense']['val']:.4f}, "
            f"test {info['dense']['test']:.4f} (random-init model: test {info['random_init_test']:.1f}). "
            f"Machine: {machine}.")
    table = (head + "\n\n" + markdown(df) + "\n\n" + verdict(df)
             + f"\n\nTotal benchmark time {time.perf_counter() - t0:.0f} s.")
    print(table)
    print(json.dumps(info))
    if not args.no_readme:
        from benchmarks.mac_targeting import update_readme

        readme = ROOT / "README.md"
        text = readme.read_text() if readme.exists() else "# Benchmarks\n"
        if "<!-- llm:start -->" not in text:  # first run: heading + explanation above the markers
            readme.write_text(text.rstrip("\n") + "\n\n" + EXPLANATION + "\n<!-- llm:start -->\n<!-- llm:end -->\n")
        update_readme(table, marker="llm")


if __name__ == "__main__":
    main()
