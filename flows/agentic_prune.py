"""The AgenticPruner flow: profile -> (strategy -> safety -> prune -> inline fine-tune -> evaluate)* -> select
-> extended fine-tune -> latency, with every record and checkpoint in the artifact store.

Re-running the same configuration (or ``agentic-pruner resume RUN_ID``) continues from the last
persisted revision: finished revisions are read back from the store, never recomputed.
"""
import logging
import os

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel

from agents.history import RevisionRecord, check_history
from agents.master import MasterAgent, MasterConfig
from agents.safety import SafetyValidator
from agents.search import (
    Evaluated,
    Measured,
    SearchContext,
    SearchResult,
    fallback_heuristic,
    finetune_candidates,
    finish_search,
    next_revision,
    prune_candidates,
    record_revision,
)
from agents.strategists import HeuristicStrategist, LLMConfig, LLMStrategist, Strategist
from flows._report import Progress, artifact_key, failure_recorded, publish_png, publish_table, run_scope
from pruning.artifacts import RunLease
from pruning.errors import UserError
from pruning.measure.report import accuracy_plot_png, mac_plot_png, markdown_table
from pruning.plan import PruningPlan
from pruning.units import fmt_macs
from tasks import agent_tasks, run_tasks, steps
from tasks.config import RunConfig
from tasks.retry import quiet_failure
from tasks.runners import candidate_runner, finetune_on_deployment


class RunSummary(BaseModel):
    """What the flow returns (and what the CLI prints)."""

    run_id: str
    store: str
    resumed_revisions: int
    new_revisions: int
    stop_reason: str
    best_revision: int | None
    best_candidate: int | None = None
    base_macs: float
    target_macs: float
    achieved_macs: float | None
    error_pct: float | None
    baseline_test_accuracy: float
    final_test_accuracy: float | None
    latency_markdown: str | None = None
    summary_key: str
    flow_run_id: str | None = None


def _pct(x: float | None, digits: int = 2) -> float | None:
    return None if x is None else round(100 * x, digits)


def _row(r: RevisionRecord, rungs: bool = False) -> dict:
    """One revisions-table row, rounded and with units (accuracies are on the validation split, in %); with
    ``rungs``, each successive-halving rung the candidate reached."""
    return {"revision": r.revision, "candidate": r.candidate, "strategist": r.strategist_used,
            "safety verdict": r.verdict, "status": r.status,
            "MACs (G)": None if r.achieved_macs is None else round(r.achieved_macs / 1e9, 4),
            "MAC error (%)": None if r.error_pct is None else round(r.error_pct, 2), "in band": r.in_band,
            "val acc zero-shot (%)": _pct(r.accuracy_before), "val acc after inline FT (%)": _pct(r.accuracy_after),
            **({"rungs (epochs: val acc %)": ", ".join(f"{g.epochs:g}: {_pct(g.accuracy)}" for g in r.rungs)}
               if rungs else {}),
            "fallback": r.fallback_reason or ""}


def _strategist(config: RunConfig) -> Strategist:
    if config.strategist == "llm":
        llm = LLMConfig.for_endpoint(config.llm_base_url, config.llm_model)
        return LLMStrategist(llm, fallback=config.llm_fallback)
    return HeuristicStrategist()


def flow_run_name() -> str:
    from prefect.runtime import flow_run

    cfg = flow_run.parameters.get("config")
    cfg = cfg if isinstance(cfg, RunConfig) else RunConfig(**(cfg or {}))
    return f"prune-{cfg.model}-{cfg.target_macs}-{cfg.strategist}".replace("%", "pct")


@flow(name="agentic-prune", flow_run_name=flow_run_name, log_prints=True, validate_parameters=True)
def agentic_prune(config: RunConfig | None = None) -> RunSummary:
    """Algorithm 1: prune ``config.model`` onto ``config.target_macs`` with the agents in the loop; resumable.

    original model + baseline accuracy -> Profiling Agent -> revisions (Master -> strategy -> safety ->
    prune -> inline fine-tune -> record) until the Master stops -> extended fine-tuning of the best
    candidate -> latency. Every step reads and writes the artifact store, so a re-run continues where
    the last one stopped. A user mistake found on the way fails the run with one line (no traceback).
    """
    try:
        config = (config or RunConfig()).shareable().with_fingerprints()
        with steps.run_lease(config, config.resolved_run_id()) as lease:  # one process per run at a time
            return _prune_run(config, lease)
    except UserError as exc:
        return quiet_failure(exc)


def _prune_run(config: RunConfig, lease: RunLease) -> RunSummary:
    """The body of :func:`agentic_prune`."""
    log = get_run_logger()
    for name in ("agents", "pruning", "tasks"):  # their INFO lines reach the flow log (PREFECT_LOGGING_EXTRA_LOGGERS)
        if logging.getLogger(name).level == logging.NOTSET:
            logging.getLogger(name).setLevel(logging.INFO)
    info = run_tasks.open_run(config)
    run_id = info.run_id
    log.info("run %s in %s (%s, %d revisions already persisted)", run_id, info.store,
             "resuming" if info.resumed else "new", info.completed_revisions)
    ctx = steps.get_context(config, run_id)
    scope = run_scope(run_id, info.store)
    with failure_recorded(ctx.store, run_id):
        baseline = run_tasks.prepare_original(config, run_id)
        log.info("original model: %.4g G MACs, %.2f M params, val acc %.4f, test acc %.4f; target %.4g G MACs",
                 baseline.base_macs / 1e9, baseline.base_params / 1e6, baseline.val_accuracy, baseline.test_accuracy,
                 baseline.target_macs / 1e9)
        profile = run_tasks.profile(config, run_id)
        log.info("profiling agent:\n%s", profile.text(ctx.band()))
        history = check_history(run_tasks.load_history(config, run_id))
        result = _search(config, run_id, scope, SearchContext(
            band=ctx.band(), profile=profile, base_plan=PruningPlan(importance=config.importance,
                                                                    round_to=config.round_to),
            baseline_accuracy=baseline.val_accuracy, seed=config.seed,
            candidates_per_revision=config.candidates_per_revision, rungs=config.rung_schedule()), history, lease)
        log.info("search stopped: %s; best revision %s candidate %s", result.stop_reason, result.best_revision,
                 result.best_candidate)
        final = latency_md = None
        if result.best is not None and result.best_in_band:
            lease.check()
            final = run_tasks.finalize(config, run_id, result.best)
            log.info("final model (revision %d candidate %d): test acc %.4f (inline %.4f, baseline %.4f)",
                     final.revision, result.best.candidate, final.test_accuracy, final.inline_test_accuracy,
                     baseline.test_accuracy)
            latency_md = _latency(config, run_id, scope, final) if config.latency else None
        summary = _write_summary(config, ctx, scope, result, baseline, final, latency_md)
        run_tasks.set_status(config, run_id, state="completed" if final else "finished-without-candidate",
                             best_revision=result.best_revision, best_candidate=result.best_candidate,
                             stop_reason=result.stop_reason, test_accuracy=final.test_accuracy if final else None)
        return summary


def _search(config: RunConfig, run_id: str, scope: str, context: SearchContext,
            history: list[RevisionRecord], lease: RunLease) -> SearchResult:
    """The revision loop of Algorithm 1 (lines 4-20), each step a task; persisted records are not redone."""
    log = get_run_logger()
    strategist, validator = _strategist(config), SafetyValidator(dataset=config.data)
    master = MasterAgent(MasterConfig(max_revisions=config.max_revisions, extra_revisions=config.extra_revisions))
    strategist.check()
    heuristic = fallback_heuristic(strategist, validator)
    k = config.candidates_per_revision
    done = lambda: len({r.revision for r in history})  # noqa: E731
    progress = Progress(scope, done(), config.max_revisions, "revision")
    resumed, guidance, stop = len(history), None, None
    where = config.finetune_deployment and f"deployment {config.finetune_deployment}" or config.task_runner
    log.info("%d candidate(s) per revision, fine-tuned on %s%s", k, where,
             f"; successive-halving rungs at {context.rungs.epochs} epoch(s), keep {context.rungs.keep:g}"
             if context.rungs else "")
    gpus = False if config.device == "cpu" else None  # a CPU run never reserves a cluster's GPUs
    with candidate_runner("local" if config.finetune_deployment else config.task_runner, workers=k,
                          gpus=gpus) as runner:
        for r in range(next_revision(history, k), config.max_revisions):
            step = agent_tasks.propose(r, history, context, strategist, validator, master, heuristic)
            guidance = step.guidance
            if step.stop_reason is not None:
                stop = step.stop_reason
                break
            if not step.candidates:  # an interrupted revision whose remaining candidates cannot be proposed any more
                continue
            to_finetune = prune_candidates(step, history, context, validator, lambda plan, slot: run_tasks.prune(
                config, run_id, plan, slot.revision, validator, slot.candidate))
            evaluated, seconds = finetune_candidates(to_finetune, lambda items: _finetune(config, run_id, runner, items),
                                                     rungs=context.rungs, history=history)
            for record in record_revision(step, evaluated, seconds, master, context):
                lease.check()  # a process that stalled past its lease must not write over the new holder
                run_tasks.persist_record(config, run_id, record)
                history.append(record)
                _log_record(log, record)
            progress.update(done(), f"{sum(h.in_band for h in history)} in-band candidate(s) so far")
    result = finish_search(history, master, context, resumed=resumed, guidance=guidance, stop_reason=stop)
    progress.finish(f"search done after {done()} revision(s): {result.stop_reason}")
    publish_table(scope, "revisions", [_row(r, context.rungs is not None) for r in result.history],
                  f"revisions of {run_id} (accuracies on the validation split)")
    return result


def _finetune(config: RunConfig, run_id: str, runner, items: list[Measured]) -> list[Evaluated]:
    """Inline fine-tuning of a revision's in-band candidates, in parallel on the task runner or work pool."""
    if config.finetune_deployment:
        return finetune_on_deployment(config.finetune_deployment, config, run_id, items)
    if runner is None:
        futures = [run_tasks.finetune.submit(config, run_id, m, m.revision, m.candidate) for m in items]
    else:
        futures = [runner.submit(run_tasks.finetune, parameters=dict(
            config=config, run_id=run_id, measured=m, revision=m.revision, candidate=m.candidate)) for m in items]
    return [f.result() for f in futures]


def _log_record(log, record: RevisionRecord) -> None:
    rationale = (record.strategy or {}).get("rationale") or record.move or ""
    log.info("revision %d.%d: master says %r; %s proposed %s; validator %s%s; %s: %s MACs (error %s%%, in band "
             "%s), val acc %s -> %s after inline fine-tuning%s", record.revision, record.candidate,
             record.guidance_action, record.strategist_used, rationale[:200] or "a plan", record.verdict,
             f" ({'; '.join(record.verdict_reasons)[:300]})" if record.verdict_reasons else "",
             record.status + (f" ({record.error[:200]})" if record.error else ""), record.achieved_macs,
             None if record.error_pct is None else round(record.error_pct, 3), record.in_band,
             None if record.accuracy_before is None else round(record.accuracy_before, 4),
             None if record.accuracy_after is None else round(record.accuracy_after, 4),
             f"; fallback: {record.fallback_reason}" if record.fallback_reason else "")


def _latency(config: RunConfig, run_id: str, scope: str, final) -> str:
    """ONNX + onnxruntime (and torch.compile GPU) of original vs final model; the table as an artifact."""
    report = run_tasks.latency(config, run_id, final)
    publish_table(scope, "latency", report.display_rows(),
                  "original vs pruned, paper Table 3 columns (latency in ms; CPU = onnxruntime)")
    return report.to_markdown()


def _flow_run_id() -> str | None:
    from prefect.runtime import flow_run

    return str(flow_run.id) if flow_run.id else None


def _write_summary(config, ctx, scope, result, baseline, final, latency_md) -> RunSummary:
    best = result.best
    band = ctx.band()
    history = result.history
    png = mac_plot_png([r.revision for r in history], [r.achieved_macs for r in history],
                       [r.in_band for r in history], band.target_macs, band.lower, band.upper,
                       title=f"{ctx.run_id}: MACs per revision")
    plot_url = run_tasks.put_bytes(config, ctx.run_id, "final/macs.png", png)
    publish_png(scope, "mac-plot", png, f"MACs per revision against the target and band ({plot_url})")
    tuned = [r for r in history if r.accuracy_after is not None]
    acc_png = accuracy_plot_png([r.achieved_macs for r in tuned], [r.accuracy_after for r in tuned],
                                [f"r{r.revision}c{r.candidate}" for r in tuned], band.target_macs, band.lower,
                                band.upper, baseline.val_accuracy, title=f"{ctx.run_id}: accuracy vs MACs")
    acc_url = run_tasks.put_bytes(config, ctx.run_id, "final/accuracy_vs_macs.png", acc_png)
    publish_png(scope, "accuracy-plot", acc_png, f"validation accuracy after inline fine-tuning vs MACs ({acc_url})")
    lines = [
        f"# {ctx.run_id}",
        "",
        f"- original: {fmt_macs(baseline.base_macs)} MACs, {baseline.base_params / 1e6:.3g} M params, "
        f"test accuracy {100 * baseline.test_accuracy:.2f} %",
        f"- target: {fmt_macs(band.target_macs)} MACs (band {band.lower / 1e9:.4g}-{fmt_macs(band.upper)})",
        f"- revisions: {len(history)} ({result.resumed_revisions} resumed); stop: {result.stop_reason}",
    ]
    if best is not None and final is not None:
        lines += [
            f"- **best revision {best.revision}{f' candidate {best.candidate}' if best.candidate else ''}**: "
            f"{fmt_macs(best.achieved_macs)} MACs (error {best.error_pct:+.3f} %), {best.params / 1e6:.3g} M params, "
            f"val accuracy after inline FT {_pct(best.accuracy_after)} %, test accuracy after extended FT "
            f"{100 * final.test_accuracy:.2f} %",
            f"- fine-tuned on {final.device_name or final.device}"
            + (f" ({final.amp_dtype} autocast)" if final.amp_dtype else ""),
        ]
    rows = [_row(r, config.rung_schedule() is not None) for r in history]
    lines += ["", "## Revisions (accuracies on the validation split)", "", markdown_table(rows)]
    if latency_md:
        lines += ["", "## Latency (original vs pruned)", "", latency_md]
    lines += ["", f"Plots (also shown as image artifacts of this run): {plot_url}, {acc_url}"]
    text = "\n".join(lines)
    summary_key = ctx.key("final/summary.md")
    run_tasks.put_bytes(config, ctx.run_id, "final/summary.md", text.encode())
    create_markdown_artifact(markdown=text, key=artifact_key(scope, "summary"), description="run summary")
    return RunSummary(
        run_id=ctx.run_id, store=ctx.store.describe(), resumed_revisions=result.resumed_revisions,
        new_revisions=result.new_revisions, stop_reason=result.stop_reason, best_revision=result.best_revision,
        best_candidate=result.best_candidate,
        base_macs=baseline.base_macs, target_macs=band.target_macs,
        achieved_macs=best.achieved_macs if best else None, error_pct=best.error_pct if best else None,
        baseline_test_accuracy=baseline.test_accuracy, final_test_accuracy=final.test_accuracy if final else None,
        latency_markdown=latency_md, summary_key=summary_key, flow_run_id=_flow_run_id(),
    )


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    print(agentic_prune(RunConfig()))
