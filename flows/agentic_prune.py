"""The AgenticPruner flow: profile -> (strategy -> safety -> prune -> inline fine-tune -> evaluate)* -> select
-> extended fine-tune -> latency, with every record and checkpoint in the artifact store.

Re-running the same configuration (or ``agentic-pruner resume RUN_ID``) continues from the last
persisted revision: finished revisions are read back from the store, never recomputed.
"""
from __future__ import annotations

import logging
import os

from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from pydantic import BaseModel

from agents.history import RevisionRecord
from agents.master import MasterAgent, MasterConfig
from agents.safety import SafetyValidator
from agents.search import Evaluated, Measured, SearchContext, Slot, run_search
from agents.strategists import HeuristicStrategist, LLMConfig, LLMStrategist
from pruning.artifacts import runs
from pruning.measure.report import mac_plot_png, markdown_table
from pruning.plan import PruningPlan
from tasks import run_tasks, steps
from tasks.agent_tasks import TaskStrategist, TaskValidator
from tasks.config import RunConfig
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


def _artifact_key(run_id: str, what: str) -> str:
    return "-".join(filter(None, "".join(c if c.isalnum() else "-" for c in f"{run_id}-{what}".lower()).split("-")))[:120]


def _row(r: RevisionRecord) -> dict:
    return {"revision": r.revision, "candidate": r.candidate, "strategist": r.strategist_used, "verdict": r.verdict, "status": r.status,
            "MACs (G)": None if r.achieved_macs is None else round(r.achieved_macs / 1e9, 5),
            "error %": None if r.error_pct is None else round(r.error_pct, 3), "in band": r.in_band,
            "acc before": None if r.accuracy_before is None else round(r.accuracy_before, 4),
            "acc after": None if r.accuracy_after is None else round(r.accuracy_after, 4),
            "fallback": r.fallback_reason or ""}


def _strategist(config: RunConfig):
    if config.strategist == "llm":
        llm = LLMConfig(**{k: v for k, v in {"base_url": config.llm_base_url, "model": config.llm_model}.items() if v})
        return LLMStrategist(llm, fallback=config.llm_fallback)
    return HeuristicStrategist()


def _shareable(config: RunConfig) -> RunConfig:
    """A local store as an absolute path, so workers in other processes write to the same directory."""
    if config.store.startswith("s3://"):
        return config
    return config.model_copy(update={"store": os.path.abspath(os.path.expanduser(config.store))})


def flow_run_name() -> str:
    from prefect.runtime import flow_run

    cfg = flow_run.parameters.get("config")
    cfg = cfg if isinstance(cfg, RunConfig) else RunConfig(**(cfg or {}))
    return f"prune-{cfg.model}-{cfg.target_macs}-{cfg.strategist}".replace("%", "pct")


@flow(name="agentic-prune", flow_run_name=flow_run_name, log_prints=True, validate_parameters=True)
def agentic_prune(config: RunConfig = RunConfig()) -> RunSummary:
    """Prune ``config.model`` onto ``config.target_macs`` with an agent in the loop; resumable."""
    log = get_run_logger()
    for name in ("agents", "pruning", "tasks"):  # their INFO lines reach the flow log (PREFECT_LOGGING_EXTRA_LOGGERS)
        if logging.getLogger(name).level == logging.NOTSET:
            logging.getLogger(name).setLevel(logging.INFO)
    config = _shareable(config)
    info = run_tasks.open_run(config)
    run_id = info.run_id
    log.info("run %s in %s (%s, %d revisions already persisted)", run_id, info.store,
             "resuming" if info.resumed else "new", info.completed_revisions)
    ctx = steps.get_context(config, run_id)
    try:
        baseline = run_tasks.prepare_original(config, run_id)
        log.info("original model: %.4g G MACs, %.2f M params, val acc %.4f, test acc %.4f; target %.4g G MACs",
                 baseline.base_macs / 1e9, baseline.base_params / 1e6, baseline.val_accuracy, baseline.test_accuracy,
                 baseline.target_macs / 1e9)
        profile = run_tasks.profile(config, run_id)
        log.info("profiling agent:\n%s", profile.text(ctx.band()))

        validator = SafetyValidator(dataset=config.data)
        master = MasterAgent(MasterConfig(max_revisions=config.max_revisions, extra_revisions=config.extra_revisions))
        resume = run_tasks.load_history(config, run_id)
        rows = [_row(r) for r in resume]
        revisions_done = lambda: len({row["revision"] for row in rows})  # noqa: E731
        progress_id = create_progress_artifact(progress=100.0 * revisions_done() / config.max_revisions,
                                               key=_artifact_key(run_id, "progress"),
                                               description="revisions done / max revisions")

        def prune_and_measure(plan: PruningPlan, slot: Slot):
            return run_tasks.prune(config, run_id, plan, slot.revision, validator, slot.candidate)

        def finetune_batch(items: list[Measured]) -> list[Evaluated]:
            if config.finetune_deployment:
                return finetune_on_deployment(config.finetune_deployment, config, run_id, items)
            if runner is None:
                futures = [run_tasks.finetune.submit(config, run_id, m, m.revision, m.candidate) for m in items]
            else:
                futures = [runner.submit(run_tasks.finetune, parameters=dict(
                    config=config, run_id=run_id, measured=m, revision=m.revision, candidate=m.candidate))
                    for m in items]
            return [f.result() for f in futures]

        def on_record(record: RevisionRecord) -> None:
            run_tasks.persist_record(config, run_id, record)
            rows.append(_row(record))
            create_table_artifact(table=rows, key=_artifact_key(run_id, "revisions"),
                                  description=f"revisions of {run_id}")
            update_progress_artifact(progress_id, progress=min(100.0, 100.0 * revisions_done() / config.max_revisions))
            rationale = (record.strategy or {}).get("rationale") or record.move or ""
            log.info("revision %d.%d: master says %r; %s proposed %s; validator %s%s; %s: %s MACs (error %s%%, in band "
                     "%s), val acc %s -> %s after inline fine-tuning%s", record.revision, record.candidate,
                     record.guidance_action,
                     record.strategist_used, rationale[:200] or "a plan", record.verdict,
                     f" ({'; '.join(record.verdict_reasons)[:300]})" if record.verdict_reasons else "",
                     record.status + (f" ({record.error[:200]})" if record.error else ""), record.achieved_macs,
                     None if record.error_pct is None else round(record.error_pct, 3), record.in_band,
                     None if record.accuracy_before is None else round(record.accuracy_before, 4),
                     None if record.accuracy_after is None else round(record.accuracy_after, 4),
                     f"; fallback: {record.fallback_reason}" if record.fallback_reason else "")

        strategist = _strategist(config)
        context = SearchContext(band=ctx.band(), profile=profile, base_plan=PruningPlan(importance=config.importance,
                                round_to=config.round_to), baseline_accuracy=baseline.val_accuracy, seed=config.seed,
                                candidates_per_revision=config.candidates_per_revision)
        where = config.finetune_deployment and f"deployment {config.finetune_deployment}" or config.task_runner
        log.info("%d candidate(s) per revision, fine-tuned on %s", config.candidates_per_revision, where)
        with candidate_runner("local" if config.finetune_deployment else config.task_runner,
                              workers=config.candidates_per_revision) as runner:
            result = run_search(context, TaskStrategist(strategist), TaskValidator(validator), master,
                                prune_and_measure, on_record=on_record, resume_history=resume,
                                finetune_batch=finetune_batch)
        update_progress_artifact(progress_id, progress=100.0)
        log.info("search stopped: %s; best revision %s candidate %s", result.stop_reason, result.best_revision,
                 result.best_candidate)

        final = None
        latency_md = None
        if result.best is not None and result.best_in_band:
            final = run_tasks.finalize(config, run_id, result.best)
            log.info("final model (revision %d candidate %d): test acc %.4f (inline %.4f, baseline %.4f)",
                     final.revision, result.best.candidate, final.test_accuracy, final.inline_test_accuracy, baseline.test_accuracy)
            if config.latency:
                report = run_tasks.latency(config, run_id, final)
                latency_md = report.to_markdown()
                frame = report.to_dataframe()
                create_table_artifact(table=frame.astype(object).where(frame.notna(), None).to_dict("records"),
                                      key=_artifact_key(run_id, "latency"),
                                      description="original vs pruned (paper Table 3 columns)")
        summary = _write_summary(config, ctx, result, baseline, final, latency_md)
        run_tasks.set_status(config, run_id, state="completed" if final else "finished-without-candidate",
                             best_revision=result.best_revision, best_candidate=result.best_candidate,
                             stop_reason=result.stop_reason,
                             test_accuracy=final.test_accuracy if final else None)
        return summary
    except BaseException as exc:
        try:
            runs.write_status(ctx.store, run_id, state="failed", error=str(exc).splitlines()[0][:300] if str(exc) else
                              type(exc).__name__)
        except Exception:  # noqa: BLE001 - the store may be what failed; status stays 'running', resume works
            pass
        raise


def _write_summary(config, ctx, result, baseline, final, latency_md) -> RunSummary:
    best = result.best
    band = ctx.band()
    history = result.history
    png = mac_plot_png([r.revision for r in history], [r.achieved_macs for r in history],
                       [r.in_band for r in history], band.target_macs, band.lower, band.upper,
                       title=f"{ctx.run_id}: MACs per revision")
    plot_url = run_tasks.put_bytes(config, ctx.run_id, "final/macs.png", png)
    lines = [
        f"# {ctx.run_id}",
        "",
        f"- original: {baseline.base_macs / 1e9:.4g} G MACs, {baseline.base_params / 1e6:.3g} M params, "
        f"test accuracy {baseline.test_accuracy:.4f}",
        f"- target: {band.target_macs / 1e9:.4g} G MACs (band {band.lower / 1e9:.4g}-{band.upper / 1e9:.4g} G)",
        f"- revisions: {len(history)} ({result.resumed_revisions} resumed); stop: {result.stop_reason}",
    ]
    if best is not None and final is not None:
        lines += [
            f"- **best revision {best.revision}{f' candidate {best.candidate}' if best.candidate else ''}**: {best.achieved_macs / 1e9:.4g} G MACs "
            f"(error {best.error_pct:+.3f}%), {best.params / 1e6:.3g} M params, val acc after inline FT "
            f"{best.accuracy_after}, test acc after extended FT {final.test_accuracy:.4f}",
        ]
    lines += ["", "## Revisions", "", markdown_table([_row(r) for r in history])]
    if latency_md:
        lines += ["", "## Latency (original vs pruned)", "", latency_md]
    lines += ["", f"MAC plot: {plot_url}"]
    text = "\n".join(lines)
    summary_key = ctx.key("final/summary.md")
    run_tasks.put_bytes(config, ctx.run_id, "final/summary.md", text.encode())
    create_markdown_artifact(markdown=text, key=_artifact_key(ctx.run_id, "summary"), description="run summary")
    create_link_artifact(link=plot_url, link_text="MAC-vs-revision plot",
                         key=_artifact_key(ctx.run_id, "mac-plot"))
    return RunSummary(
        run_id=ctx.run_id, store=ctx.store.describe(), resumed_revisions=result.resumed_revisions,
        new_revisions=result.new_revisions, stop_reason=result.stop_reason, best_revision=result.best_revision,
        best_candidate=result.best_candidate,
        base_macs=baseline.base_macs, target_macs=band.target_macs,
        achieved_macs=best.achieved_macs if best else None, error_pct=best.error_pct if best else None,
        baseline_test_accuracy=baseline.test_accuracy, final_test_accuracy=final.test_accuracy if final else None,
        latency_markdown=latency_md, summary_key=summary_key,
    )


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    print(agentic_prune(RunConfig()))
