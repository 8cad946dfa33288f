"""Agent-guided LLM pruning as a Prefect flow: open run -> prepare (load, profile, replay) ->
(decision -> prune + evaluate [+ exact rollback] -> persist)* -> final evaluation and summary.

Every iteration's record and kept step go to the artifact store before the next one starts, so re-running
the same configuration (or the same ``--run-id``) after a preemption continues from the last persisted
iteration. Prefect artifacts: an iteration table, a progress bar (sparsity / target) and a markdown summary.
"""
from __future__ import annotations

import os
import time

from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_markdown_artifact,
)
from pydantic import BaseModel

from agents.llm_pruning import IterationRecord, PruneAgentLoop
from flows._report import Progress, artifact_key, failure_recorded, publish_table, run_scope
from pruning.artifacts import RunLease, open_store, runs
from pruning.device import describe_device, peak_memory_gib
from pruning.errors import UserError
from pruning.measure.report import markdown_table
from tasks import llm_steps, llm_tasks
from tasks.config import LLMRunConfig
from tasks.retry import quiet_failure

__all__ = ["LLMRunSummary", "llm_prune"]


class LLMRunSummary(BaseModel):
    run_id: str
    store: str
    stop_reason: str
    reached: bool
    iterations: int
    new_iterations: int
    resumed_iterations: int
    rollbacks: int
    fallbacks: int
    target_sparsity: float
    final_sparsity: float
    baseline_val_ppl: float
    final_val_ppl: float
    baseline_test_ppl: float
    final_test_ppl: float
    mcq_before: float | None = None
    mcq_after: float | None = None
    saved_to: str | None = None
    summary_key: str
    seconds: float
    device: str = "cpu"
    device_name: str | None = None
    dtype: str = "float32"
    peak_memory_gib: float | None = None  # CUDA peak allocated memory of this process's part of the run


def _row(r: IterationRecord) -> dict:
    return {"iteration": r.iteration, "strategist": r.strategist, "layers": len(r.applied),
            "sparsity before": round(r.sparsity_before, 4), "sparsity after": round(r.sparsity_after, 4),
            "ppl before": round(r.ppl_before, 4), "ppl after": None if r.ppl_after is None else round(r.ppl_after, 4),
            "verdict": "accepted" if r.accepted else ("rolled back" if r.rolled_back else "no-op"),
            "fallback": r.fallback_reason or ""}


def flow_run_name() -> str:
    from prefect.runtime import flow_run

    cfg = flow_run.parameters.get("config")
    cfg = cfg if isinstance(cfg, LLMRunConfig) else LLMRunConfig(**(cfg or {}))
    return f"llm-prune-s{cfg.target_sparsity:g}-{cfg.strategist}" + (f"-{cfg.nm.replace(':', 'of')}" if cfg.nm else "")


@flow(name="llm-agentic-prune", flow_run_name=flow_run_name, log_prints=True, validate_parameters=True)
def llm_prune(config: LLMRunConfig = LLMRunConfig()) -> LLMRunSummary:
    """Prune a causal LM to ``config.target_sparsity`` with the agent in the loop; resumable."""
    try:
        with RunLease(open_store(config.store), config.resolved_run_id()):  # one process per run at a time
            return _llm_prune_run(config)
    except UserError as exc:
        return quiet_failure(exc)


def _llm_prune_run(config: LLMRunConfig) -> LLMRunSummary:
    """The body of :func:`llm_prune`."""
    log = get_run_logger()
    t0 = time.perf_counter()
    info = llm_tasks.open_run(config)
    run_id = info.run_id
    ctx = llm_steps.get_context(config, run_id)
    log.info("run %s in %s (%s, %d iterations already persisted)", run_id, info.store,
             "resuming" if info.resumed else "new", info.completed_iterations)
    with failure_recorded(ctx.store, run_id):
        model_info = llm_tasks.prepare(config, run_id)
        sess = ctx.session
        log.info("model %s: %d prunable linears, %.3g M prunable weights; dense val ppl %.4f, test ppl %.4f; "
                 "on %s in %s", model_info.model_path, model_info.layers, model_info.prunable_params / 1e6,
                 model_info.baseline_val_ppl, model_info.baseline_test_ppl, describe_device(sess.device).label(),
                 model_info.dtype)
        if ctx.history:
            log.info("replayed %d persisted iterations: sparsity %.4f", len(ctx.history), sess.mm.overall_sparsity())
        pcfg = config.prune_config()
        loop = PruneAgentLoop(sess, llm_steps.make_strategist(config), pcfg, history=ctx.history,
                              baseline_ppl=model_info.baseline_val_ppl)
        scope = run_scope(run_id, info.store)
        progress = Progress(scope, round(sess.mm.overall_sparsity(), 4), pcfg.target_sparsity, "sparsity")
        while not loop.done():
            proposal = llm_tasks.propose(loop)
            record, step = llm_tasks.execute(loop, proposal)
            record = llm_tasks.persist(config, run_id, record, step)
            loop.history[-1] = record  # now carries its step key
            progress.update(round(sess.mm.overall_sparsity(), 4), f"iteration {record.iteration}")
            log.info("iteration %d [%s]: %s; sparsity %.4f -> %.4f, val ppl %.4f%s", record.iteration,
                     record.strategist, record.reason, record.sparsity_before, record.sparsity, loop.current_ppl,
                     f" (fallback: {record.fallback_reason})" if record.fallback_reason else "")
        result = loop.result(time.perf_counter() - t0)
        progress.finish(f"sparsity {result.final_sparsity:.4f} of {pcfg.target_sparsity:g}: {result.stop_reason}")
        publish_table(scope, "iterations", [_row(r) for r in loop.history], f"iterations of {run_id}")
        return _finish(config, ctx, info, model_info, loop, result, t0)


def _finish(config: LLMRunConfig, ctx, info, model_info, loop: PruneAgentLoop, result, t0: float) -> LLMRunSummary:
    """Final test perplexity (and multiple-choice accuracy), the saved model, the summary and the status."""
    sess, run_id, pcfg = ctx.session, ctx.run_id, config.prune_config()
    final_test = sess.test_ppl()
    mcq_after = None
    if config.mcq_file:
        from pruning.llm.mcq import evaluate_mcq, load_mcq

        mcq_after = evaluate_mcq(sess.model, sess.tokenizer, load_mcq(config.mcq_file, config.mcq_limit)).accuracy
    saved = llm_steps.save_pruned(ctx, config.save_dir) if config.save_dir else None
    summary_key = ctx.key("final/summary.md")
    ctx.store.put_json(ctx.key("final/layers.json"), result.layer_sparsities)
    summary = LLMRunSummary(
        run_id=run_id, store=info.store, stop_reason=result.stop_reason, reached=result.reached,
        iterations=result.iterations, new_iterations=result.new_iterations,
        resumed_iterations=result.resumed_iterations, rollbacks=result.rollbacks, fallbacks=result.fallbacks,
        target_sparsity=pcfg.target_sparsity, final_sparsity=result.final_sparsity,
        baseline_val_ppl=model_info.baseline_val_ppl, final_val_ppl=result.final_ppl,
        baseline_test_ppl=model_info.baseline_test_ppl, final_test_ppl=final_test,
        mcq_before=model_info.mcq_accuracy, mcq_after=mcq_after, saved_to=saved, summary_key=summary_key,
        seconds=time.perf_counter() - t0, device=str(sess.device), device_name=describe_device(sess.device).name,
        dtype=model_info.dtype, peak_memory_gib=peak_memory_gib(sess.device))
    text = _summary_markdown(summary, loop, sess)
    ctx.store.put_bytes(summary_key, text.encode())
    create_markdown_artifact(markdown=text, key=artifact_key(run_scope(run_id, info.store), "summary"),
                             description="LLM pruning run")
    runs.write_status(ctx.store, run_id, state="completed" if result.reached else "finished-below-target",
                      stop_reason=result.stop_reason, sparsity=result.final_sparsity, val_ppl=result.final_ppl,
                      test_ppl=final_test)
    return summary


def _summary_markdown(s: LLMRunSummary, loop: PruneAgentLoop, sess) -> str:
    prof = loop.profile.by_name()
    layer_rows = [{"layer": n, "params": prof[n].params, "z_comb": round(prof[n].z_combined, 3),
                   "sparsity": round(v, 4)} for n, v in loop.mm.sparsities().items()]
    lines = [
        f"# {s.run_id}",
        "",
        f"- target sparsity {s.target_sparsity:.4f}, reached {s.final_sparsity:.4f} ({s.stop_reason})",
        f"- iterations {s.iterations} ({s.resumed_iterations} resumed), rollbacks {s.rollbacks}, "
        f"LLM fallbacks {s.fallbacks}",
        f"- validation perplexity {s.baseline_val_ppl:.4f} -> {s.final_val_ppl:.4f}; "
        f"test perplexity {s.baseline_test_ppl:.4f} -> {s.final_test_ppl:.4f}",
        f"- device {s.device} ({s.device_name}), weights in {s.dtype}"
        + (f", peak GPU memory {s.peak_memory_gib:.3f} GiB" if s.peak_memory_gib is not None else ""),
    ]
    if s.mcq_before is not None or s.mcq_after is not None:
        lines.append(f"- multiple-choice accuracy {s.mcq_before} -> {s.mcq_after}")
    lines += ["", "## Iterations", "", markdown_table([_row(r) for r in loop.history]),
              "", "## Per-layer sparsity", "", markdown_table(layer_rows)]
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    print(llm_prune(LLMRunConfig()))
