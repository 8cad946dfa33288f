"""The steps of an LLM pruning run over an artifact store (plain Python, no Prefect).

Store layout under the run's prefix (``pruning.artifacts.runs.key(run_id, ...)``)::

    config.json          LLMRunConfig (no secrets)
    status.json          state, iteration, sparsity, perplexity, stop reason
    model.json           model path, weights fingerprint, dense val/test perplexity (+ MCQ accuracy)
    profile.json         the sensitivity profile (Wanda / gradient z-scores per layer)
    history.jsonl        one IterationRecord per iteration (accepted and rolled back)
    steps/iNNN.pt        removed flat indices + original values of every *accepted* step
    final/summary.md     the run summary; final/layers.json: per-layer sparsity

Resume: the original model is loaded again (its fingerprint must match ``model.json``), the accepted
steps are replayed in order (their stored values are checked against the weights), and the loop
continues at the next iteration. A step file is written before its history record, so a crash between
the two leaves an orphan file that the re-run simply overwrites.

Device: ``LLMRunConfig.device`` is resolved in the process that holds the model; the model is read in the
run's dtype (fixed when the run starts: bf16 on a GPU with native bf16, else fp32; stored in
``model.json``), so a run started on a GPU resumes anywhere with the same weights and exact replay.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from pydantic import BaseModel

from agents.llm_pruning import (
    IterationRecord,
    LLMPruneStrategist,
    PruneStrategist,
    create_prune_strategist,
)
from agents.strategists import LLMConfig
from pruning.artifacts import ArtifactStore, KeyNotFound, open_store, runs
from pruning.device import describe_device, peak_memory_gib, reset_peak_memory, resolve_device
from pruning.errors import UserError
from pruning.llm.masks import PruneStep
from pruning.llm.session import PruneSession, dtype_name, llm_dtype, parse_dtype
from tasks.config import LLMRunConfig
from tasks.contexts import ContextCache

log = logging.getLogger(__name__)

__all__ = ["LLMRunConfig", "LLMRunInfo", "ModelInfo", "LLMRunContext", "get_context", "open_run", "prepare",
           "persist_iteration", "make_strategist", "step_key", "drop_context"]


class LLMRunInfo(BaseModel):
    run_id: str
    store: str
    resumed: bool
    completed_iterations: int
    state: str


class ModelInfo(BaseModel):
    model_path: str
    fingerprint: str
    total_params: int
    prunable_params: int
    layers: int
    baseline_val_ppl: float
    baseline_test_ppl: float
    mcq_accuracy: float | None = None
    tiny_training: dict | None = None
    dtype: str = "float32"  # the run's compute dtype, fixed when it starts (runs before devices: float32)
    device: str | None = None  # where the run started
    device_name: str | None = None
    peak_memory_gib: float | None = None  # CUDA peak while loading, profiling and measuring the baseline


class LLMRunContext:
    """Process-local: the store and the loaded session (model + masks) of one run."""

    def __init__(self, config: LLMRunConfig, run_id: str):
        self.config, self.run_id = config, run_id
        self.store: ArtifactStore = open_store(config.store)
        self.session: PruneSession | None = None
        self.model_info: ModelInfo | None = None
        self.history: list[IterationRecord] = []
        self.device = resolve_device(config.device)

    def key(self, name: str) -> str:
        return runs.key(self.run_id, name)


_CONTEXTS: ContextCache[LLMRunConfig, LLMRunContext] = ContextCache(LLMRunContext)


def get_context(config: LLMRunConfig, run_id: str) -> LLMRunContext:
    """The cached context of ``run_id`` in this process (created on first use)."""
    return _CONTEXTS.get(config, run_id)


def drop_context(run_id: str) -> None:
    _CONTEXTS.drop(run_id)


def step_key(run_id: str, iteration: int) -> str:
    return runs.key(run_id, f"steps/i{iteration:04d}.pt")


def open_run(config: LLMRunConfig) -> LLMRunInfo:
    """Check the store; create the run or find it for resuming (config.json must then match)."""
    run_id = config.resolved_run_id()
    store = open_store(config.store)
    store.check()
    drop_context(run_id)  # a fresh process view: the model is (re)loaded and the steps replayed
    status = runs.read_status(store, run_id)
    done = len(runs.read_history(store, run_id))
    if status is None:
        store.put_json(runs.key(run_id, "config.json"), config.model_dump(mode="json"))
        status = runs.write_status(store, run_id, kind="llm", state="running", iteration=0)
    else:
        stored = store.get_json(runs.key(run_id, "config.json"))
        old = LLMRunConfig(**{**stored, "store": config.store, "run_id": config.run_id})
        if old.identity() != config.identity():
            diff = sorted(k for k, v in config.identity().items() if old.identity().get(k) != v)
            raise UserError(f"run '{run_id}' exists with a different configuration ({', '.join(diff)}); "
                             f"use another --run-id")
        store.put_json(runs.key(run_id, "config.json"), config.model_dump(mode="json"))
        status = runs.write_status(store, run_id, state="running")
    return LLMRunInfo(run_id=run_id, store=store.describe(), resumed=done > 0, completed_iterations=done,
                      state=status.get("state", "running"))


def _load_session(config: LLMRunConfig, device, dtype) -> PruneSession:
    if config.model_path:
        return PruneSession.from_model_path(config.model_path, config.data_config(), device=device, dtype=dtype)
    return PruneSession.embedded(config.tiny_config(), config.data_config(), device=device, dtype=dtype)


def _stored_info(ctx: LLMRunContext) -> ModelInfo | None:
    try:
        return ModelInfo(**ctx.store.get_json(ctx.key("model.json")))
    except KeyNotFound:
        return None


def prepare(config: LLMRunConfig, run_id: str) -> ModelInfo:
    """Load the model (in the run's dtype, on this process's device), compute the profile on the dense
    weights, measure (or read) the baseline, and replay the accepted steps already persisted. Idempotent
    within a process."""
    ctx = get_context(config, run_id)
    if ctx.session is not None and ctx.model_info is not None:
        return ctx.model_info
    info = _stored_info(ctx)
    dtype = parse_dtype(info.dtype) if info is not None else llm_dtype(ctx.device)
    reset_peak_memory(ctx.device)
    sess = _load_session(config, ctx.device, dtype)
    profile = sess.compute_stats()  # dense model: Wanda norms + gradient scores
    if info is not None:
        if info.fingerprint != sess.fingerprint:
            raise UserError(f"model weights changed since run '{run_id}' started (fingerprint {sess.fingerprint} "
                             f"!= stored {info.fingerprint}); start a new run")
    else:
        mcq = None
        if config.mcq_file:
            from pruning.llm.mcq import evaluate_mcq, load_mcq

            mcq = evaluate_mcq(sess.model, sess.tokenizer, load_mcq(config.mcq_file, config.mcq_limit)).accuracy
        info = ModelInfo(model_path=sess.model_path or "", fingerprint=sess.fingerprint,
                         total_params=sum(p.numel() for p in sess.model.parameters()),
                         prunable_params=sess.mm.total_params, layers=len(sess.layers),
                         baseline_val_ppl=sess.val_ppl(), baseline_test_ppl=sess.test_ppl(), mcq_accuracy=mcq,
                         tiny_training={k: sess.info.get(k) for k in ("key", "random_init_ppl", "trained_ppl",
                                                                      "train_seconds", "params")} if sess.info else None,
                         dtype=dtype_name(dtype), device=str(sess.device), device_name=describe_device(sess.device).name,
                         peak_memory_gib=peak_memory_gib(sess.device))
        ctx.store.put_json(ctx.key("model.json"), info.model_dump(mode="json"))
    if not ctx.store.exists(ctx.key("profile.json")):
        ctx.store.put_json(ctx.key("profile.json"), profile.model_dump(mode="json"))
    history = [IterationRecord(**r) for r in runs.read_history(ctx.store, run_id)]
    for rec in history:
        if not rec.accepted:
            continue
        if not rec.step_key:
            raise ValueError(f"iteration {rec.iteration} was accepted but has no persisted step")
        step = PruneStep.from_state(ctx.store.get_torch(rec.step_key))
        sess.mm.replay(step)
    if history and abs(sess.mm.overall_sparsity() - history[-1].sparsity) > 1e-9:
        raise ValueError(f"replayed sparsity {sess.mm.overall_sparsity():.6f} != recorded {history[-1].sparsity:.6f}")
    ctx.session, ctx.model_info, ctx.history = sess, info, history
    return info


def persist_iteration(config: LLMRunConfig, run_id: str, record: IterationRecord, step: PruneStep | None) -> IterationRecord:
    """Write the kept step (if any), then append the record (idempotent per iteration) and update status."""
    ctx = get_context(config, run_id)
    if step is not None:
        key = step_key(run_id, record.iteration)
        ctx.store.put_torch(key, step.to_state())
        record = record.model_copy(update={"step_key": key})
    done = {r["iteration"] for r in runs.read_history(ctx.store, run_id)}
    if record.iteration not in done:
        ctx.store.append_jsonl(ctx.key("history.jsonl"), record.model_dump(mode="json"))
    runs.write_status(ctx.store, run_id, iteration=record.iteration + 1, sparsity=record.sparsity,
                      val_ppl=record.ppl_after if record.accepted else record.ppl_before)
    return record


def make_strategist(config: LLMRunConfig) -> PruneStrategist:
    if config.strategist == "llm":
        llm = LLMConfig.for_endpoint(config.llm_base_url, config.llm_model)
        strat = create_prune_strategist("llm", llm_config=llm, fallback=config.llm_fallback)
        assert isinstance(strat, LLMPruneStrategist)
        strat.check()
        return strat
    return create_prune_strategist("heuristic")


def save_pruned(ctx: LLMRunContext, directory: str | os.PathLike[str]) -> str:
    """``save_pretrained`` the pruned model (zeros in place) plus its tokenizer when it is a byte tokenizer."""
    sess = ctx.session
    assert sess is not None
    path = Path(directory).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    from pruning.llm.tiny_model import _quiet_progress

    with _quiet_progress():
        sess.model.save_pretrained(str(path))
    if hasattr(sess.tokenizer, "save"):
        sess.tokenizer.save(path)
    elif hasattr(sess.tokenizer, "tok"):
        sess.tokenizer.tok.save_pretrained(str(path))
    return str(path)
