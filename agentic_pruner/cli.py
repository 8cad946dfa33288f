"""The ``agentic-pruner`` command line.

User mistakes (unknown model, impossible target, malformed numbers, unreachable storage) end with a
one-line ``error: ...`` on stderr and exit code 2, never a traceback; anything else is a bug: one line,
exit code 1, and the traceback in a file (``--debug`` prints it).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

from agentic_pruner import llm_cli, search_cli
from agentic_pruner._args import (
    EXIT_BUG,
    EXIT_USAGE,
    CliError,
    Parser,
    add_band_args,
    add_device_arg,
    add_model_args,
    add_plan_args,
    band_from_args,
    llm_url,
    load_model_from_args,
    log,
    output_dir,
    output_file,
    plan_from_args,
    require_device,
)
from pruning.errors import UserError, first_line
from pruning.units import fmt_macs


# ----------------------------------------------------------------------------------------------
# commands
# ----------------------------------------------------------------------------------------------
def cmd_profile(args) -> int:
    from pruning.plan import PruningPlan
    from pruning.profile import profile_model
    from pruning.space import PruningSpace

    spec, model, size, example = load_model_from_args(args)
    space = PruningSpace.build(model, example, PruningPlan())
    prof = profile_model(model, example, name=spec.name, space=space)
    if args.json:
        print(prof.model_dump_json(indent=2))
    else:
        print(prof.summary(top=args.top))
        print(f"stages available for --stage-mult: {', '.join(space.stages)}")
    if args.csv_dir:
        args.csv_dir.mkdir(parents=True, exist_ok=True)
        for name, frame in prof.frames().items():
            frame.to_csv(args.csv_dir / f"{name}.csv", index=False)
        log(f"tables written to {args.csv_dir}/{{layers,stages,groups}}.csv")
    return 0


def _save_bundle_if_asked(args, out: dict, pruned, spec, plan, space, size: int, metric_keys) -> None:
    """With ``--save``: write the pruned-model bundle and note where in ``out``."""
    if not args.save:
        return
    from pruning.checkpoint import make_bundle, save_bundle

    bundle = make_bundle(pruned, spec, plan, space.pruning_history(), size,
                         metrics={k: out[k] for k in metric_keys}, attention_heads=space.attention_heads())
    save_bundle(bundle, args.save)
    out["saved"] = str(args.save)


def cmd_solve(args) -> int:
    from pruning.engine import prune_to_target

    latency_ms = getattr(args, "target_latency_ms", None)
    if (args.target_macs is None) == (latency_ms is None):
        raise CliError("give exactly one of --target-macs and --target-latency-ms")
    if latency_ms is not None:
        return _solve_latency(args)
    if args.round_to is None:
        args.round_to = 8
    band_from_args(args)  # malformed numbers fail before any work
    plan = plan_from_args(args)
    if plan.importance == "taylor":
        raise CliError("taylor importance needs calibration data; use 'agentic-pruner run --data ...' or pick l1/l2")
    spec, model, size, example = load_model_from_args(args)
    band = band_from_args(args, model, example)
    t0 = time.perf_counter()
    log(f"solving for {fmt_macs(band.target_macs)} MACs (+{band.overshoot_pct}% / -{band.undershoot_pct}%)")
    pruned, result, space = prune_to_target(model, example, plan, band, seed=args.seed)
    seconds = time.perf_counter() - t0
    out = {
        "model": spec.name, "input_size": size, "base_macs": result.base_macs, "target_macs": band.target_macs,
        "predicted_macs": result.predicted_macs, "achieved_macs": result.achieved_macs,
        "error_pct": round(result.error_pct, 4), "in_band": result.in_band,
        "band": [band.lower, band.upper], "base_params": result.base_params, "params": result.params,
        "ratio": round(result.ratio, 6), "probes": result.probes, "real_prunes": result.real_prunes,
        "prediction_exact": result.prediction_exact, "granularity_pct": round(result.granularity_pct, 4),
        "seconds": round(seconds, 3), "timings": {k: round(v, 3) for k, v in result.seconds.items()},
    }
    _save_bundle_if_asked(args, out, pruned, spec, result.plan, space, size, ("achieved_macs", "params", "error_pct"))
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{spec.name}: {fmt_macs(result.base_macs)} -> {fmt_macs(result.achieved_macs)} MACs "
              f"(target {fmt_macs(band.target_macs)}, error {result.error_pct:+.3f}%, "
              f"{'in band' if result.in_band else 'OUT OF BAND'}), params {result.base_params / 1e6:.2f} M -> "
              f"{result.params / 1e6:.2f} M, {result.probes} analytic probes + 1 real prune, {seconds:.2f} s")
        if args.save:
            print(f"pruned model saved to {args.save}")
    return 0 if result.in_band else 1


def _solve_latency(args) -> int:
    """``solve --target-latency-ms``: search the plan scale on measured latency (pruning.latency_search)."""
    from pruning.latency_search import DEFAULT_ROUND_TO, prune_to_latency

    if not args.target_latency_ms > 0:
        raise CliError(f"--target-latency-ms must be positive, got {args.target_latency_ms}")
    if args.batch_size < 1 or args.max_probes < 1 or args.latency_runs < 1:
        raise CliError("--batch-size, --max-probes and --latency-runs must be >= 1")
    if args.device not in (None, "auto", "cpu") and args.latency_backend == "ort-cpu":
        raise CliError(f"--device {args.device}: the ort-cpu latency backend measures onnxruntime on the CPU "
                       "(pruning runs on the CPU too); drop --device or use --device cpu")
    if args.round_to is None:
        args.round_to = DEFAULT_ROUND_TO[args.latency_backend]
    plan = plan_from_args(args)
    if plan.importance == "taylor":
        raise CliError("taylor importance needs calibration data; use 'agentic-pruner run --data ...' or pick l1/l2")
    spec, model, size, example = load_model_from_args(args)
    t0 = time.perf_counter()
    log(f"solving for {args.target_latency_ms:g} ms median latency (+0% / -10%) at batch {args.batch_size} "
         f"on {args.latency_backend}, round_to {plan.round_to}")
    pruned, result, space = prune_to_latency(
        model, example, plan, args.target_latency_ms, seed=args.seed, batch_size=args.batch_size,
        backend=args.latency_backend, threads=args.threads, max_probes=args.max_probes, runs=args.latency_runs,
        round_to=plan.round_to, log=lambda msg: log(f"  {msg}"))
    sol = result.solution
    seconds = time.perf_counter() - t0
    out = {
        "model": spec.name, "input_size": size, "target_latency_ms": sol.target_ms,
        "latency_band_ms": [round(sol.lower_ms, 4), sol.target_ms], "backend": sol.backend,
        "batch_size": sol.batch_size, "threads": sol.threads, "device": sol.device,
        "base_latency_ms": round(sol.base_median_ms, 4), "base_latency_p90_ms": round(sol.base_p90_ms, 4),
        "achieved_latency_ms": round(sol.achieved_ms, 4), "achieved_latency_p90_ms": round(sol.achieved_p90_ms, 4),
        "speedup": round(sol.speedup, 4), "met": sol.met, "in_band": sol.in_band,
        "base_macs": sol.base_macs, "mac_target": sol.mac_target, "achieved_macs": result.achieved_macs,
        "prediction_exact": result.prediction_exact, "base_params": result.base_params, "params": result.params,
        "round_to": sol.round_to, "ratio": round(sol.ratio, 6), "measured_probes": sol.measured_probes,
        "probes": [p.model_dump() for p in sol.probes],
        "real_prunes": len(sol.probes),  # one cut per measured candidate + the final one
        "seconds": round(seconds, 3),
    }
    _save_bundle_if_asked(args, out, pruned, spec, sol.plan, space, size,
                          ("achieved_macs", "params", "achieved_latency_ms", "target_latency_ms", "batch_size"))
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{spec.name}: {sol.base_median_ms:.2f} -> {sol.achieved_ms:.2f} ms median at batch {sol.batch_size} "
              f"(budget {sol.target_ms:g} ms, "
              f"{'in band' if sol.in_band else 'met, below band' if sol.met else 'NOT MET'}"
              f", x{sol.speedup:.2f}), {fmt_macs(sol.base_macs)} -> {fmt_macs(result.achieved_macs)} MACs, "
              f"params {result.base_params / 1e6:.2f} M -> {result.params / 1e6:.2f} M, "
              f"{sol.measured_probes} measured probes, {seconds:.1f} s")
        for p in sol.probes:
            print(f"  probe {p.probe}: {fmt_macs(p.macs)} MACs, median {p.median_ms:.2f} ms, p90 {p.p90_ms:.2f} ms"
                  f" ({p.runs} runs) {p.verdict}")
        if args.save:
            print(f"pruned model saved to {args.save}")
    return 0 if sol.in_band else 1


# ----------------------------------------------------------------------------------------------
# the flow: run / resume / runs / report / demo / serve
# ----------------------------------------------------------------------------------------------
def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default",
                   help="timm name, or 'default' = embedded digits ResNet-18 (trained once, cached)")
    p.add_argument("--checkpoint", help="state dict of your trained model (weights_only=True)")
    p.add_argument("--num-classes", type=int)
    p.add_argument("--pretrained", action="store_true")
    p.add_argument("--data", default="digits", help="'digits' or 'imagefolder:PATH' (with train/ and val/)")
    p.add_argument("--input-size", type=int)
    p.add_argument("--target-macs", default="50%", help="e.g. 2.06G, 500M, or 50%% of the model's MACs")
    p.add_argument("--overshoot", type=float, default=5.0)
    p.add_argument("--undershoot", type=float, default=15.0)
    p.add_argument("--strategist", default="heuristic", choices=["heuristic", "llm"])
    p.add_argument("--llm-base-url", help="OpenAI-compatible endpoint; key from OPENAI_API_KEY")
    p.add_argument("--llm-model")
    p.add_argument("--no-llm-fallback", action="store_true", help="fail instead of falling back to the heuristic")
    p.add_argument("--max-revisions", type=int, default=8)
    p.add_argument("--extra-revisions", type=int, default=2, help="phase-2 revisions after the first in-band one")
    p.add_argument("--candidates-per-revision", type=int, default=1, metavar="K",
                   help="K shapes per revision, fine-tuned in parallel on the task runner (default 1)")
    _add_engine_args(p)
    p.add_argument("--importance", default="taylor", choices=["taylor", "l1", "l2", "random"])
    p.add_argument("--round-to", type=int, default=8)
    p.add_argument("--calibration-batches", type=int, default=4)
    p.add_argument("--inline-epochs", type=int, default=2)
    p.add_argument("--rungs", default="1", metavar="F1,F2,...,1",
                   help="successive-halving rungs of inline fine-tuning, increasing fractions of --inline-epochs "
                        "ending at 1 (e.g. 0.34,0.67,1); default 1 = every candidate gets the full budget")
    p.add_argument("--rung-keep", type=float, default=0.5, help="fraction of the results at a rung that advance")
    p.add_argument("--extended-epochs", type=int, default=4)
    p.add_argument("--max-train-batches", type=int, help="cap batches per epoch (quick runs)")
    p.add_argument("--no-latency", action="store_true", help="skip ONNX export and latency measurement")
    p.add_argument("--latency-runs", type=int, default=10)
    p.add_argument("--store", default=os.environ.get("AGENTIC_PRUNER_STORE", "runs"),
                   help="local directory or s3://bucket/prefix (endpoint from AWS_ENDPOINT_URL)")
    p.add_argument("--run-id", help="default: derived from the configuration, so re-running resumes")
    p.add_argument("--seed", type=int, default=0)


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task-runner", default=None,
                   help="where candidates are fine-tuned: local (default), dask (local cluster), dask://HOST:8786 "
                        "(existing Dask cluster), ray, ray://HOST:PORT")
    p.add_argument("--finetune-deployment", metavar="FLOW/DEPLOYMENT",
                   help="fine-tune each candidate as a run of this deployment (e.g. finetune-candidate/gpu)")
    add_device_arg(p, "Taylor calibration, fine-tuning and evaluation (pruning itself: CPU)")


def _engine_overrides(args) -> dict:
    out = {}
    if getattr(args, "task_runner", None):
        out["task_runner"] = args.task_runner
    if getattr(args, "finetune_deployment", None):
        out["finetune_deployment"] = args.finetune_deployment
    if getattr(args, "device", None):
        out["device"] = args.device
    return out


def _run_config(args):
    from tasks.config import RunConfig

    return RunConfig(
        model=args.model, checkpoint=args.checkpoint, num_classes=args.num_classes, pretrained=args.pretrained,
        data=args.data, input_size=args.input_size, target_macs=args.target_macs, overshoot_pct=args.overshoot,
        undershoot_pct=args.undershoot, strategist=args.strategist, llm_base_url=llm_url(args.llm_base_url),
        llm_model=args.llm_model, llm_fallback=not args.no_llm_fallback, max_revisions=args.max_revisions,
        extra_revisions=args.extra_revisions, importance=args.importance, round_to=args.round_to,
        calibration_batches=args.calibration_batches, inline_epochs=args.inline_epochs, rungs=args.rungs,
        rung_keep=args.rung_keep,
        extended_epochs=args.extended_epochs, max_train_batches=args.max_train_batches, latency=not args.no_latency,
        latency_runs=args.latency_runs, store=args.store, run_id=args.run_id, seed=args.seed,
        candidates_per_revision=args.candidates_per_revision, **_engine_overrides(args),
    )


def _check_before_work(config):
    """What can be known before the flow starts fails here, with one line and nothing written; returns the
    config as the flow will see it (see :func:`tasks.preflight.preflight`)."""
    from tasks.preflight import preflight

    if config.checkpoint and not Path(config.checkpoint).is_file():
        raise CliError(f"checkpoint not found: {config.checkpoint}")
    return preflight(config)


def _execute(config) -> int:
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "agents,pruning,tasks")
    from flows.agentic_prune import agentic_prune
    from pruning.artifacts import open_store

    config = _check_before_work(config)
    summary = agentic_prune(config)
    store = open_store(config.store)
    print()
    print(f"run {summary.run_id}: {summary.new_revisions} new + {summary.resumed_revisions} resumed records "
          f"({config.candidates_per_revision} candidate(s) per revision); stop: {summary.stop_reason}")
    if summary.best_revision is not None and summary.achieved_macs is not None:
        cand = f" candidate {summary.best_candidate}" if summary.best_candidate else ""
        print(f"best revision {summary.best_revision}{cand}: {fmt_macs(summary.achieved_macs)} MACs "
              f"(target {fmt_macs(summary.target_macs)}, error {summary.error_pct:+.3f}%, "
              f"original {fmt_macs(summary.base_macs)}); test accuracy {summary.final_test_accuracy} "
              f"(original {summary.baseline_test_accuracy:.4f})")
    if summary.latency_markdown:
        print(summary.latency_markdown)
    run_dir = store.url_for(summary.summary_key).rsplit("/final/", 1)[0]
    print(f"results:  {store.url_for(summary.summary_key)}  (all artifacts under {run_dir}/)")
    print(f"history:  agentic-pruner report {summary.run_id} --store {config.store}")
    print(f"Prefect UI: {_ui_hint(summary.flow_run_id)}")
    return 0 if summary.best_revision is not None else 1


def _ui_hint(flow_run_id: str | None) -> str:
    """Where to see the run: its page on the Prefect server in use, or how to start one."""
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL

    api = PREFECT_API_URL.value()
    if not api:
        return ("this run used a temporary API; run 'prefect server start' (same PREFECT_HOME) and open "
                "http://127.0.0.1:4200 -> Runs")
    ui = PREFECT_UI_URL.value() or api.rstrip("/").removesuffix("/api")
    return f"{ui}/runs/flow-run/{flow_run_id}" if flow_run_id else f"{ui}/runs"


def cmd_run(args) -> int:
    return _execute(_run_config(args))


def cmd_demo(args) -> int:
    from tasks.config import RunConfig

    log("demo: prune the embedded default (timm resnet18 trained on scikit-learn digits) to 50% of its MACs")
    return _execute(RunConfig(store=args.store, **({"device": args.device} if args.device else {})))


def cmd_resume(args) -> int:
    from pruning.artifacts import KeyNotFound, open_store, runs
    from tasks.config import RunConfig

    store = open_store(args.store)
    store.check()
    try:
        stored = store.get_json(runs.key(args.run_id, "config.json"))
    except KeyNotFound:
        raise CliError(f"no run '{args.run_id}' in {store.describe()} (see 'agentic-pruner runs')") from None
    stored.update(store=args.store, run_id=args.run_id, **_engine_overrides(args))
    config = RunConfig(**stored)
    require_device(config.device, f"run {args.run_id}")  # started on another machine: say so before any work
    return _execute(config)


def cmd_runs(args) -> int:
    from pruning.artifacts import open_store, runs

    store = open_store(args.store)
    store.check()
    rows = runs.list_runs(store)
    if not rows:
        print(f"no runs in {store.describe()}")
        return 0
    print(f"{'run id':<52} {'state':<12} {'best':>4} {'test acc':>8}  updated")
    for r in rows:
        acc = r.get("test_accuracy")
        print(f"{r.get('run_id', '?'):<52} {r.get('state', '?'):<12} {str(r.get('best_revision', '')):>4} "
              f"{'' if acc is None else f'{acc:.4f}':>8}  {r.get('updated', '')}")
    return 0


def cmd_report(args) -> int:
    from agents.history import RevisionRecord, history_dataframe
    from pruning.artifacts import open_store, runs

    store = open_store(args.store)
    store.check()
    records = runs.read_history(store, args.run_id)
    if not records and runs.read_status(store, args.run_id) is None:
        raise CliError(f"no run '{args.run_id}' in {store.describe()} (see 'agentic-pruner runs')")
    frame = history_dataframe([RevisionRecord(**r) for r in records])
    cols = [c for c in ("revision", "candidate", "strategist_used", "verdict", "status", "achieved_macs", "error_pct", "in_band",
                        "accuracy_before", "accuracy_after", "fallback_reason") if c in frame.columns]
    if args.json:
        print(frame.to_json(orient="records"))
    else:
        import pandas as pd

        with pd.option_context("display.width", 200, "display.max_columns", 20):
            print(frame[cols].to_string(index=False))
        status = runs.read_status(store, args.run_id) or {}
        best_c = f" candidate {status['best_candidate']}" if status.get("best_candidate") else ""
        print(f"state: {status.get('state')}, best revision: {status.get('best_revision')}{best_c}, "
              f"stop: {status.get('stop_reason')}")
    return 0


def cmd_serve(args) -> int:
    """Serve the flow as a deployment whose parameters are this command's run options (every run, scheduled
    or started from the UI, prunes what was asked here; a local store is made absolute)."""
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "agents,pruning,tasks")
    from flows.agentic_prune import agentic_prune

    config = _run_config(args).shareable()
    _check_before_work(config)  # the deployment's parameters stay as given: every run fingerprints its inputs
    log(f"serving deployment 'agentic-prune/{args.name}'" + (f" on cron '{args.cron}'" if args.cron else "")
        + f" (store {config.store}); Ctrl-C stops it")
    # limit=1: a run still going when the next one is due makes it wait, never two runs of one id at once
    agentic_prune.serve(name=args.name, cron=args.cron, parameters={"config": config.model_dump(mode="json")},
                        limit=1)
    return 0


def _add_store_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", default=os.environ.get("AGENTIC_PRUNER_STORE", "runs"),
                   help="local directory or s3://bucket/prefix (default: $AGENTIC_PRUNER_STORE or ./runs)")


def _register_flow_commands(sub) -> None:
    p = sub.add_parser("run", help="run the agentic pruning flow (Prefect; ephemeral API when no server is set)")
    _add_run_args(p)
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("demo", help="the main job on the embedded default (digits ResNet-18, 50%% MACs)")
    _add_store_arg(p)
    add_device_arg(p)
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("resume", help="continue a run from its last persisted revision")
    p.add_argument("run_id")
    _add_store_arg(p)
    _add_engine_args(p)
    p.set_defaults(func=cmd_resume)
    p = sub.add_parser("runs", help="list runs in the store")
    _add_store_arg(p)
    p.set_defaults(func=cmd_runs)
    p = sub.add_parser("report", help="print a run's revision history")
    p.add_argument("run_id")
    _add_store_arg(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("serve", help="serve the flow as a Prefect deployment (no work pool needed); takes run's options")
    p.add_argument("--name", default="agentic-prune-serve")
    p.add_argument("--cron", help="e.g. '0 3 * * *'")
    _add_run_args(p)
    p.set_defaults(func=cmd_serve)


# ----------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="agentic-pruner", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="print the full traceback of any error (anywhere on the line)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("profile", help="MACs/params per layer, stage and prunable group")
    add_model_args(p)
    p.add_argument("--top", type=int, default=10, help="layers to list")
    p.add_argument("--json", action="store_true", help="print the full profile as JSON")
    p.add_argument("--csv-dir", type=output_dir, help="also write layers/stages/groups CSV tables here")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("solve", help="prune a model onto a MAC budget in one shot (or a measured latency budget)")
    add_model_args(p)
    add_band_args(p, required=False)
    add_plan_args(p)
    p.set_defaults(round_to=None)  # 8 for MAC targets; the backend's default for latency targets
    lat = p.add_argument_group("latency target (instead of --target-macs)")
    lat.add_argument("--target-latency-ms", type=float,
                     help="measured median latency budget in ms at --batch-size (lands within +0%%/-10%%)")
    lat.add_argument("--latency-backend", default="ort-cpu", choices=["ort-cpu"],
                     help="where latency is measured: onnxruntime CPU on the exported ONNX model")
    lat.add_argument("--batch-size", type=int, default=8, help="batch size the latency is measured at (default 8)")
    lat.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: all CPUs)")
    lat.add_argument("--max-probes", type=int, default=8, help="timed measurements of candidates at most, re-measurements included (default 8)")
    lat.add_argument("--latency-runs", type=int, default=20, help="timed runs per measurement (default 20)")
    add_device_arg(lat, "the latency of a torch backend is measured (ort-cpu: always the CPU)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--save", type=output_file, help="write the pruned-model bundle here")
    p.set_defaults(func=cmd_solve)

    _register_flow_commands(sub)
    search_cli.register(sub)
    llm_cli.register(sub)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """What counts as a user mistake (exit 2): the ``UserError`` family, invalid config values, and paths the
    user gave that cannot be read or written."""
    from pydantic import ValidationError

    return (UserError, ValidationError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def _one_line(exc: BaseException) -> str:
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        err = exc.errors()[0]
        loc = ".".join(str(x) for x in err.get("loc", ()))
        msg = str(err.get("msg", "")).removeprefix("Value error, ")  # our validators' own sentence, as written
        return f"invalid {loc or 'value'}: {msg}"
    return first_line(exc, limit=None)


def _write_traceback(exc: BaseException) -> Path | None:
    """Write the traceback of an unexpected error to a file the user can attach to a bug report."""
    try:
        fd, name = tempfile.mkstemp(prefix="agentic-pruner-traceback-", suffix=".txt")
        with os.fdopen(fd, "w") as f:
            traceback.print_exception(exc, file=f)
        return Path(name)
    except OSError:
        return None


def main(argv: list[str] | None = None) -> int:
    """Run one sub-command: exit 0 on success, 2 on a user mistake (one line), 1 on a bug (one line plus
    where the traceback was written; ``--debug`` or ``AGENTIC_PRUNER_DEBUG=1`` prints it instead)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # the ephemeral API server needs more than Prefect's default 20 s on a busy 2-core machine
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or bool(os.environ.get("AGENTIC_PRUNER_DEBUG"))
    args = build_parser().parse_args([a for a in argv if a != "--debug"])  # --debug goes anywhere
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    except Exception as exc:
        if debug:
            raise
        if isinstance(exc, _user_errors()):
            log(f"error: {_one_line(exc)}")
            return EXIT_USAGE
        where = _write_traceback(exc)
        log(f"error: internal error ({type(exc).__name__}: {_one_line(exc)[:300]}); this is a bug, not your input. "
            + (f"Traceback written to {where}" if where else "Rerun with --debug for the traceback"))
        return EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())
