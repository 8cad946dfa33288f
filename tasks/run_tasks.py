"""Prefect tasks: thin wrappers over ``tasks.steps`` steps (keys and pydantic models in, out)."""
from __future__ import annotations

from agents.history import RevisionRecord
from agents.profiling import ProfileSummary
from agents.search import Evaluated, Measured
from pruning.artifacts import runs
from pruning.plan import PruningPlan
from tasks import steps
from tasks.config import RunConfig
from tasks.retry import io_task


@io_task(name="open-run")
def open_run(config: RunConfig) -> steps.RunInfo:
    """Check the store, then create the run or find it for resuming."""
    return steps.open_run(config)


@io_task(name="prepare-original-model")
def prepare_original(config: RunConfig, run_id: str) -> steps.Baseline:
    """Load (or train, for the embedded default) the original model, store it, measure baseline accuracy."""
    return steps.prepare_original(steps.get_context(config, run_id))


@io_task(name="profile")
def profile(config: RunConfig, run_id: str) -> ProfileSummary:
    """Profiling Agent: MAC distribution per stage / group kind."""
    return steps.profile_run(steps.get_context(config, run_id))


@io_task(name="prune-and-measure", task_run_name="prune-r{revision}c{candidate}")
def prune(config: RunConfig, run_id: str, plan: PruningPlan, revision: int, validator, candidate: int = 0) -> Measured:
    """Prune the original weights with the plan scaled onto the target; MACs re-counted; bundle stored."""
    return steps.prune_revision(steps.get_context(config, run_id), plan, revision, validator, candidate)


@io_task(name="inline-finetune-evaluate", task_run_name="finetune-r{revision}c{candidate}")
def finetune(config: RunConfig, run_id: str, measured: Measured, revision: int, candidate: int = 0) -> Evaluated:
    """Inline fine-tuning of an in-band candidate and validation accuracy (reads and writes only the store)."""
    return steps.finetune_revision(steps.get_context(config, run_id), measured, revision, candidate)


@io_task(name="persist-revision", task_run_name="persist-r{record.revision}c{record.candidate}")
def persist_record(config: RunConfig, run_id: str, record: RevisionRecord) -> int:
    """Append the record to history.jsonl (idempotent: a (revision, candidate) already stored is not added again)."""
    ctx = steps.get_context(config, run_id)
    done = {(r["revision"], r.get("candidate", 0)) for r in runs.read_history(ctx.store, run_id)}
    if (record.revision, record.candidate) not in done:
        ctx.store.append_jsonl(ctx.key("history.jsonl"), record.model_dump(mode="json"))
    return record.revision


@io_task(name="extended-finetune")
def finalize(config: RunConfig, run_id: str, best: RevisionRecord) -> steps.FinalModel:
    """Extended fine-tuning with KD + EMA of the selected revision (checkpointed to the store)."""
    return steps.finalize(steps.get_context(config, run_id), best)


@io_task(name="latency")
def latency(config: RunConfig, run_id: str, final: steps.FinalModel):
    """ONNX export + onnxruntime CPU and torch.compile GPU benchmark of original vs pruned."""
    return steps.measure_latency(steps.get_context(config, run_id), final)


@io_task(name="load-history")
def load_history(config: RunConfig, run_id: str) -> list[RevisionRecord]:
    """Revisions already persisted for this run (resume after preemption)."""
    ctx = steps.get_context(config, run_id)
    return [RevisionRecord(**r) for r in runs.read_history(ctx.store, run_id)]


@io_task(name="write-status")
def set_status(config: RunConfig, run_id: str, **fields) -> dict:
    """Merge fields into the run's status.json."""
    return runs.write_status(steps.get_context(config, run_id).store, run_id, **fields)


@io_task(name="store-report-file", task_run_name="store-{name}")
def put_bytes(config: RunConfig, run_id: str, name: str, data: bytes) -> str:
    """Store a report file of the run; returns its store URL."""
    ctx = steps.get_context(config, run_id)
    ctx.store.put_bytes(ctx.key(name), data)
    return ctx.store.url_for(ctx.key(name))
