"""``agentic-pruner search``: the whole agent loop on CPU, without Prefect, with a quick accuracy proxy.

The loop is :func:`agents.search.run_search` with the engine callbacks of
:func:`tasks.memory_steps.search_steps`: the Master Agent analyses the history, the strategist
(heuristic, or an OpenAI-compatible LLM) proposes a shape, the safety validator corrects it, the
solver scales it onto the MAC band, the original model is pruned and its MACs are re-counted.

Evaluation is a *proxy*, not accuracy on data: the top-1 agreement between the pruned model's and the
original model's predictions on one fixed batch of random inputs (standard normal, seeded, drawn
once), with no fine-tuning. The original model scores 1.0 by definition. It is fast and needs no
dataset; it ranks candidates by how little pruning changed the model's decisions, nothing more.

Exit codes: 0 when the selected revision is in the band, 1 when no revision landed in the band,
2 for bad input (one ``error: ...`` line on stderr).
"""
from __future__ import annotations

import json
import logging
import time
import warnings
from pathlib import Path
from typing import Callable

from agentic_pruner._args import (
    CliError,
    add_band_args,
    add_device_arg,
    add_model_args,
    band_from_args,
    load_model_from_args,
    log,
    output_file,
)
from pruning.units import fmt_macs

#: Columns of the final history table (``history_dataframe`` names).
TABLE_COLUMNS = ("revision", "strategist_used", "move", "verdict", "status", "achieved_macs", "error_pct", "in_band",
                 "accuracy_before", "collapsed", "seconds", "fallback_reason")


def proxy_inputs(input_size: int, samples: int, seed: int = 0):
    """The fixed evaluation batch: ``samples`` standard-normal images, drawn from a generator seeded with ``seed``."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    return torch.randn(samples, 3, input_size, input_size, generator=gen)


def proxy_search(model, example, band, strategist, *, max_revisions: int = 10, extra_revisions: int = 4,
                 eval_samples: int = 32, seed: int = 0, collapse_drop: float = 0.10,
                 importance: str = "l2", round_to: int = 8, model_name: str | None = None,
                 num_classes: int | None = None, on_record: Callable | None = None,
                 check_strategist: bool = True, on_profile: Callable | None = None, device=None):
    """Run the agent search on ``model`` with the agreement proxy as evaluator (no data, no fine-tuning).

    Returns ``(SearchResult, ProfileSummary, baseline_proxy_accuracy)``. Raises ``InfeasibleTarget`` when
    the target is not below the model's MACs. ``on_profile(profile)`` is called before the first revision.
    ``device``: where the proxy's forward passes run (None = the CPU, where the models are pruned); every
    record names it.
    """
    from agents.master import MasterAgent, MasterConfig
    from agents.safety import SafetyValidator
    from agents.search import SearchContext, run_search
    from pruning.device import describe_device
    from pruning.plan import PruningPlan
    from tasks.memory_steps import agreement_evaluator, search_steps

    info = describe_device(device if device is not None else "cpu")

    def record_device(record) -> None:
        record.device, record.device_name = info.device, info.name
        if on_record is not None:
            on_record(record)

    inputs = proxy_inputs(example.shape[-1], eval_samples, seed)
    validator = SafetyValidator()
    bridge = search_steps(model, example, band, agreement_evaluator(model, inputs, device), validator=validator,
                              seed=seed)
    profile = bridge.profile(model_name=model_name, num_classes=num_classes)
    from pruning.solver import check_below

    check_below(band.target_macs, profile.base_macs)
    if on_profile is not None:
        on_profile(profile)
    master = MasterAgent(MasterConfig(max_revisions=max_revisions, extra_revisions=extra_revisions,
                                      collapse_drop=collapse_drop))
    baseline = bridge.baseline_accuracy()
    context = SearchContext(band=band, profile=profile, base_plan=PruningPlan(importance=importance, round_to=round_to),
                            baseline_accuracy=baseline, seed=seed, check_strategist=check_strategist)
    result = run_search(context, strategist, validator, master, bridge.prune_and_measure,
                        bridge.finetune_and_evaluate, on_record=record_device)
    return result, profile, baseline


def progress_line(record) -> str:
    """One line per revision: revision, strategist used, verdict, MACs, error %, in band, proxy accuracy, fallback."""
    macs = "-" if record.achieved_macs is None else f"{record.achieved_macs / 1e9:.5g} G"
    err = "-" if record.error_pct is None else f"{record.error_pct:+.3f}%"
    acc = "-" if record.accuracy_before is None else f"{record.accuracy_before:.4f}"
    line = (f"revision {record.revision}: strategist {record.strategist_used}, verdict {record.verdict}, "
            f"status {record.status}, MACs {macs}, error {err}, {'in band' if record.in_band else 'OUT OF BAND'}, "
            f"proxy acc {acc}")
    if record.collapsed:
        line += " (collapsed)"
    if record.status != "ok" and record.error:
        line += f"; {record.error}"
    if record.fallback_reason:
        line += f"; fallback: {record.fallback_reason}"
    return line


def _strategist(args):
    from agents.strategists import HeuristicStrategist, LLMConfig, LLMStrategist, LLMUnavailable

    if args.strategist == "heuristic":
        return HeuristicStrategist()
    strategist = LLMStrategist(LLMConfig.for_endpoint(args.llm_base_url, args.llm_model),
                               fallback=not args.no_llm_fallback)
    with warnings.catch_warnings(record=True) as caught:  # fallback: warn once, as one line
        warnings.simplefilter("always")
        try:
            strategist.check()
        except LLMUnavailable as exc:
            raise CliError(f"{exc} (use --strategist heuristic, or drop --no-llm-fallback)") from None
    if logging.getLogger(__name__).hasHandlers():  # else logging's last resort already printed it
        for w in caught:
            log(f"warning: {w.message}")
    return strategist


def _device(args):
    """Where the proxy's forward passes run (``--device``, checked to exist while parsing; default auto)."""
    from pruning.device import describe_device, resolve_device

    return describe_device(resolve_device(args.device))


def cmd_search(args) -> int:
    import torch

    from agents.history import append_jsonl

    if args.max_revisions < 1:
        raise CliError("--max-revisions must be at least 1")
    if args.extra_revisions < 0:
        raise CliError("--extra-revisions must not be negative")
    if args.eval_samples < 1:
        raise CliError("--eval-samples must be at least 1")
    band_from_args(args)  # malformed numbers fail before any work
    strategist = _strategist(args)  # an unusable LLM endpoint fails before any work
    out: Path | None = args.out
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("")  # a fresh history; unwritable paths fail before any work
    device = _device(args)
    torch.manual_seed(args.seed)
    spec, model, size, example = load_model_from_args(args)
    band = band_from_args(args, model, example)
    t0 = time.perf_counter()

    def on_profile(profile) -> None:
        log(f"{spec.name}: {fmt_macs(profile.base_macs)} MACs -> target {fmt_macs(band.target_macs)} "
             f"(band {fmt_macs(band.lower)} .. {fmt_macs(band.upper)}); strategist {args.strategist}; "
             f"proxy: top-1 agreement with the original on {args.eval_samples} random inputs (seed {args.seed}, {device.label()})")

    def on_record(record) -> None:
        log(progress_line(record))
        if out is not None:
            append_jsonl(record, out)

    result, profile, baseline = proxy_search(
        model, example, band, strategist, max_revisions=args.max_revisions, extra_revisions=args.extra_revisions,
        eval_samples=args.eval_samples, seed=args.seed, collapse_drop=args.collapse_drop,
        importance=args.importance, round_to=args.round_to, model_name=spec.name, num_classes=args.num_classes,
        on_record=on_record, check_strategist=False, on_profile=on_profile, device=device.device)
    seconds = time.perf_counter() - t0
    first = next((r.revision for r in result.history if r.is_candidate), None)
    best = result.best
    if args.json:
        print(json.dumps({
            "model": spec.name, "input_size": size, "device": device.model_dump(), "base_macs": profile.base_macs,
            "target_macs": band.target_macs,
            "band": [band.lower, band.upper], "strategist": args.strategist,
            "baseline_proxy_accuracy": baseline, "revisions": len(result.history),
            "first_in_band_revision": first, "in_band_count": sum(r.is_candidate for r in result.history),
            "best_revision": result.best_revision, "best_in_band": result.best_in_band,
            "best": None if best is None else {
                "achieved_macs": best.achieved_macs, "error_pct": best.error_pct, "params": best.params,
                "proxy_accuracy": best.accuracy_before, "plan": best.plan.model_dump(mode="json")},
            "stop_reason": result.stop_reason, "seconds": round(seconds, 3), "history_file": str(out) if out else None,
            "history": [r.model_dump(mode="json") for r in result.history],
        }))
    else:
        import pandas as pd

        frame = result.dataframe()
        if len(frame):
            # wall seconds of each revision: the top-level steps (the "prune.*" keys are parts of "prune")
            frame["seconds"] = [round(sum(v for k, v in r.timings.items() if "." not in k), 3) for r in result.history]
            frame = frame[[c for c in TABLE_COLUMNS if c in frame.columns]].copy()
            frame["achieved_macs"] = frame["achieved_macs"].map(lambda v: None if pd.isna(v) else round(v / 1e9, 5))
            frame["error_pct"] = frame["error_pct"].map(lambda v: None if pd.isna(v) else round(v, 3))
            frame = frame.rename(columns={"achieved_macs": "MACs (G)", "accuracy_before": "proxy_acc"})
            with pd.option_context("display.width", 220, "display.max_columns", 20, "display.max_colwidth", 60):
                print(frame.to_string(index=False))
        print(f"stop: {result.stop_reason}")
        if best is not None and best.achieved_macs is not None:
            print(f"selected revision {best.revision}: {fmt_macs(best.achieved_macs)} MACs (target "
                  f"{fmt_macs(band.target_macs)}, error {best.error_pct:+.3f}%, "
                  f"{'in band' if result.best_in_band else 'OUT OF BAND'}), params {best.params / 1e6:.3f} M, "
                  f"proxy acc {best.accuracy_before} (original {baseline}); first in-band revision: {first}; "
                  f"{len(result.history)} revisions in {seconds:.1f} s")
        else:
            print("no revision could be pruned")
        if out is not None:
            print(f"history: {out}")
    return 0 if result.best_in_band else 1


def register(sub) -> None:
    """Add the ``search`` sub-command (called by ``agentic_pruner.cli.build_parser``)."""
    p = sub.add_parser("search", help="run the agent search loop on CPU without Prefect (proxy evaluation)",
                       description="Run the agent search loop (Master, strategist, safety validator, MAC solver) on CPU "
                                   "without Prefect. Evaluation is a proxy: top-1 agreement between the pruned and "
                                   "the original model on a fixed batch of seeded random inputs; no data, no "
                                   "fine-tuning.")
    add_model_args(p)
    add_band_args(p)
    p.add_argument("--strategist", default="heuristic", choices=["heuristic", "llm"])
    p.add_argument("--llm-base-url", help="OpenAI-compatible endpoint (default: AGENTIC_PRUNER_LLM_BASE_URL); "
                                          "key from OPENAI_API_KEY")
    p.add_argument("--llm-model", help="model name at that endpoint (default: AGENTIC_PRUNER_LLM_MODEL)")
    p.add_argument("--no-llm-fallback", action="store_true",
                   help="fail if the LLM endpoint is unusable instead of falling back to the heuristic")
    p.add_argument("--max-revisions", type=int, default=10, help="R_max (default 10)")
    p.add_argument("--extra-revisions", type=int, default=4, help="phase-2 revisions after the first in-band one")
    p.add_argument("--importance", default="l2", choices=["l1", "l2", "random"],
                   help="channel importance (taylor needs data: use 'agentic-pruner run')")
    p.add_argument("--round-to", type=int, default=8, help="kept channels are multiples of this")
    p.add_argument("--eval-samples", type=int, default=32, help="random inputs of the agreement proxy (default 32)")
    p.add_argument("--collapse-drop", type=float, default=0.10,
                   help="proxy-accuracy drop below the original (1.0) that counts as a collapse (default 0.10)")
    p.add_argument("--seed", type=int, default=0, help="seeds model init, proxy inputs and the strategist")
    add_device_arg(p, "the proxy's forward passes (pruning itself: CPU)")
    p.add_argument("--out", type=output_file, help="write the history here as JSON lines (one record per revision)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.set_defaults(func=cmd_search)
