"""The steps of a pruning run, as plain functions over an artifact store (no Prefect here).

Every step reads what it needs from the store and writes what it made back, so steps can run in
different processes or machines and a run can resume after the process dies. The Prefect tasks in
``tasks/`` are thin wrappers around these functions; the CLI and tests can call them directly.

Device (``RunConfig.device``, resolved once per process by :attr:`RunContext.device`): Taylor calibration,
inline and extended fine-tuning and every evaluation run there; the original model, the pruning (tracing,
solving, cutting, MAC counting on CPU example inputs) and everything stored stay on the CPU (see
:mod:`pruning.device`).
"""
from __future__ import annotations

import copy
import hashlib
import logging
import os
import socket
import tempfile
import time
from pathlib import Path

import torch
from pydantic import BaseModel, Field
from torch import nn

from agents.history import RevisionRecord, device_note
from agents.profiling import ProfileSummary, build_profile
from agents.safety import SafetyValidator
from agents.search import Evaluated, Measured
from pruning.artifacts import ArtifactStore, RunLease, open_store, runs
from pruning.checkpoint import bundle_bytes, make_bundle, read_bundle, rebuild
from pruning.device import DeviceInfo, dask_worker_slot, describe_device, resolve_device
from pruning.errors import UserError
from pruning.models import ModelSpec, load_model, load_weights
from pruning.plan import PruningPlan
from pruning.profile import profile_model
from pruning.solver import MacBand, check_below
from pruning.space import count_macs_params
from pruning.train import (
    DIGITS_RECOVERY_LR,
    ExtendedConfig,
    FinetuneConfig,
    calibrate_copy,
    evaluate,
    extended_finetune,
    finetune,
    state_from_bytes,
    state_to_bytes,
)
from pruning.train.data import DataConfig, DataSplits, build_data, check_num_classes, loader_settings
from tasks.config import DEFAULT_MODEL, RunConfig
from tasks.contexts import ContextCache, spaces_for
from tasks.prune_step import prune_candidate

log = logging.getLogger(__name__)


class RunInfo(BaseModel):
    """What a run is and where it lives."""

    run_id: str
    store: str
    resumed: bool
    completed_revisions: int
    state: str


class Baseline(BaseModel):
    """The original model in the store and its accuracy."""

    key: str
    sha256: str
    model_spec: dict
    input_size: int
    num_classes: int
    base_macs: float
    base_params: int
    val_accuracy: float
    test_accuracy: float
    target_macs: float


class RunContext:
    """Process-local view of a run: the store, plus the original model and data loaded once per process."""

    def __init__(self, config: RunConfig, run_id: str):
        self.config = config
        self.run_id = run_id
        self.store: ArtifactStore = open_store(config.store)
        self._data: DataSplits | None = None
        self._original: nn.Module | None = None
        self._baseline: Baseline | None = None
        self._calibrated: nn.Module | None = None  # the original with Taylor calibration gradients
        self._device: torch.device | None = None

    def key(self, name: str) -> str:
        return runs.key(self.run_id, name)

    @property
    def device(self) -> torch.device:
        """Where this process calibrates, fine-tunes and evaluates: ``config.device`` resolved here (a worker
        of a local Dask cluster on a multi-GPU machine takes GPU ``worker index % GPUs``)."""
        if self._device is None:
            self._device = resolve_device(self.config.device, slot=dask_worker_slot())
        return self._device

    def device_info(self) -> DeviceInfo:
        return describe_device(self.device)

    # -- data and models ------------------------------------------------------------------------
    @property
    def is_default_model(self) -> bool:
        return self.config.model == DEFAULT_MODEL

    def data(self, model: nn.Module | None = None) -> DataSplits:
        if self._data is None:
            cfg = DataConfig(spec=self.config.data, input_size=self.config.input_size, seed=self.config.seed,
                             **loader_settings(self.config.data, self.device))
            self._data = build_data(cfg, model=model)
        return self._data

    def baseline(self) -> Baseline:
        if self._baseline is None:
            self._baseline = Baseline(**self.store.get_json(self.key("baseline.json")))
        return self._baseline

    def example(self) -> torch.Tensor:
        b = self.baseline()
        return torch.randn(1, 3, b.input_size, b.input_size, generator=torch.Generator().manual_seed(0))

    def original(self) -> nn.Module:
        """The original model, rebuilt from the store (weights checked against the recorded sha256)."""
        if self._original is None:
            b = self.baseline()
            model = load_model(ModelSpec(**b.model_spec))
            load_weights(model, self.store.get_torch(b.key, sha256=b.sha256), source="stored original model")
            self._original = model.eval()
        return self._original

    def band(self) -> MacBand:
        b = self.baseline()
        return MacBand(target_macs=b.target_macs, overshoot_pct=self.config.overshoot_pct,
                       undershoot_pct=self.config.undershoot_pct)

    def inline_lr(self) -> float | None:
        return self.config.inline_lr or (DIGITS_RECOVERY_LR if self.is_default_model else None)


_CONTEXTS: ContextCache[RunConfig, RunContext] = ContextCache(RunContext)


def get_context(config: RunConfig, run_id: str) -> RunContext:
    """The cached context of ``run_id`` in this process (created on first use)."""
    return _CONTEXTS.get(config, run_id)


# ----------------------------------------------------------------------------------------------
# steps
# ----------------------------------------------------------------------------------------------
def run_lease(config: RunConfig, run_id: str) -> RunLease:
    """The run's lease: enter it to hold ``run_id`` (a second process on the same run stops with one line)."""
    return RunLease(open_store(config.store), run_id)


def open_run(config: RunConfig) -> RunInfo:
    """Check the store is reachable and writable, then create the run or find it for resuming."""
    store = open_store(config.store)
    store.check()
    run_id = config.resolved_run_id()
    cfg_key = runs.key(run_id, "config.json")
    safe = config.model_dump(mode="json")
    if store.exists(cfg_key):
        stored = store.get_json(cfg_key)
        differs = {k for k in config.identity() if stored.get(k) != safe.get(k)}
        changed = differs & {"checkpoint_sha256", "data_fingerprint"}
        if changed:
            what = " and ".join(("the checkpoint file" if k == "checkpoint_sha256" else "the data") for k in sorted(changed))
            raise UserError(f"{what} changed since run {run_id} started; its results would be stale: start a new "
                            "run (without --run-id, or with another one)")
        if differs:
            raise UserError(f"run {run_id} exists with a different configuration ({', '.join(sorted(differs))}); "
                             "pass another --run-id")
        resumed = True
    else:
        store.put_json(cfg_key, safe)
        resumed = False
    history = runs.read_history(store, run_id)
    status = runs.write_status(store, run_id, state="running", model=config.model, target=config.target_macs,
                               strategist=config.strategist, store_url=store.describe())
    return RunInfo(run_id=run_id, store=store.describe(), resumed=resumed, completed_revisions=len(history),
                   state=status["state"])


def prepare_original(ctx: RunContext, cache_dir: str | None = None) -> Baseline:
    """Put the original model into the store (once) and measure its baseline accuracy."""
    if ctx.store.exists(ctx.key("baseline.json")):
        return ctx.baseline()
    cfg = ctx.config
    torch.manual_seed(cfg.seed)  # a random-init model is reproducible from the seed
    if ctx.is_default_model:
        from pruning.train.default_model import DEFAULT_ARCH, DEFAULT_INPUT_SIZE, default_cache_dir, load_default_model

        log.info("loading the embedded default model (trained once on the digits train split and cached in %s; "
                 "the first time takes about a minute)", cache_dir or default_cache_dir())
        model, info = load_default_model(cache_dir)
        log.info("default model: test accuracy %s", info.get("test_acc", info.get("test_accuracy")))
        spec = ModelSpec(name=DEFAULT_ARCH, num_classes=int(info.get("num_classes", 10)),
                         input_size=DEFAULT_INPUT_SIZE)
    else:
        spec = ModelSpec(name=cfg.model, num_classes=cfg.num_classes, pretrained=cfg.pretrained,
                         checkpoint=Path(cfg.checkpoint) if cfg.checkpoint else None, input_size=cfg.input_size)
        model = load_model(spec)
    data = ctx.data(model)
    check_num_classes(data, model)
    size = int(data.input_size[-1])
    example = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    base_macs, base_params = count_macs_params(model, example)
    target = cfg.resolve_target(base_macs)
    check_below(target, base_macs)
    val = evaluate(model, data.val, device=ctx.device, progress_bar=False).top1
    test = evaluate(model, data.test, device=ctx.device, progress_bar=False).top1
    key = ctx.key("original.pt")
    sha = ctx.store.put_torch(key, {k: v.detach().cpu() for k, v in model.state_dict().items()})
    baseline = Baseline(key=key, sha256=sha, model_spec=spec.model_copy(update={"checkpoint": None, "pretrained": False,
                                                                              "input_size": size}).model_dump(mode="json"),
                        input_size=size, num_classes=data.num_classes, base_macs=base_macs, base_params=base_params,
                        val_accuracy=val, test_accuracy=test, target_macs=target)
    ctx.store.put_json(ctx.key("baseline.json"), baseline.model_dump(mode="json"))
    ctx._original, ctx._baseline = model.eval(), baseline
    return baseline


def profile_run(ctx: RunContext) -> ProfileSummary:
    """Profiling Agent input: engine profile (stored as profile.json) and the agents' summary."""
    key = ctx.key("profile_summary.json")
    if ctx.store.exists(key):
        return ProfileSummary(**ctx.store.get_json(key))
    model, example = ctx.original(), ctx.example()
    space = spaces_for(ctx).get(model, example, PruningPlan())
    prof = profile_model(model, example, name=ctx.baseline().model_spec["name"], space=space)
    ctx.store.put_json(ctx.key("profile.json"), prof.model_dump(mode="json"))
    calibrated = _calibrated_copy(ctx, PruningPlan(importance="taylor")) if ctx.config.importance == "taylor" else None
    summary = build_profile(space, model_name=prof.model, dataset=ctx.config.data,
                            num_classes=ctx.baseline().num_classes, input_size=ctx.baseline().input_size,
                            taylor_available=True, calibrated=calibrated)
    ctx.store.put_json(key, summary.model_dump(mode="json"))
    return summary


def _calibrated_copy(ctx: RunContext, plan: PruningPlan) -> nn.Module:
    """A fresh copy of the original to prune; for Taylor importance with calibration gradients.

    The calibration (seeded, so the same every time) runs once per process and run; each prune then
    deep-copies the calibrated model, gradients included, instead of recomputing them (the K
    candidates of a revision are pruned one after another in the flow).
    """
    model = ctx.original()
    if plan.importance == "taylor":
        if ctx._calibrated is None:
            torch.manual_seed(ctx.config.seed)
            ctx._calibrated = calibrate_copy(model, ctx.data().calib, ctx.config.calibration_batches,
                                             device=ctx.device)
        clone = copy.deepcopy(ctx._calibrated)  # deepcopy drops .grad: carry the gradients over
        for src, dst in zip(ctx._calibrated.parameters(), clone.parameters()):
            dst.grad = None if src.grad is None else src.grad.detach().clone()
        return clone
    return copy.deepcopy(model)


def _plan_digest(plan: PruningPlan) -> str:
    return hashlib.sha256(plan.model_dump_json().encode()).hexdigest()[:16]


def prune_revision(ctx: RunContext, plan: PruningPlan, revision: int, validator: SafetyValidator | None = None,
                   candidate: int = 0) -> Measured:
    """Prune the ORIGINAL model with ``plan`` scaled onto the target; count MACs; store the pruned bundle.

    Idempotent per (revision, candidate, plan): a result stored by an earlier attempt (e.g. before a
    preemption) is returned instead of pruning again.
    """
    result_key = ctx.key(runs.slot_name(revision, candidate, ".measured.json"))
    digest = _plan_digest(plan)
    if ctx.store.exists(result_key):
        stored = ctx.store.get_json(result_key)
        done = Measured(**stored["measured"])
        if stored.get("plan_digest") == digest and (done.checkpoint_key is None
                                                   or ctx.store.exists(done.checkpoint_key)
                                                   or _finetuned(ctx, revision, candidate)):
            return done
    measured = _prune(ctx, plan, revision, validator, candidate)
    measured.revision, measured.candidate = revision, candidate
    ctx.store.put_json(result_key, {"plan_digest": digest, "measured": measured.model_dump(mode="json")})
    return measured


def _evaluated_key(ctx: RunContext, revision: int, candidate: int, rung: int | None = None) -> str:
    """Where a candidate's fine-tuning result is stored: the last rung (or the only one) at ``.evaluated.json``,
    an earlier successive-halving rung k at ``.rung{k}.evaluated.json``."""
    return ctx.key(runs.slot_name(revision, candidate, _rung_suffix(ctx, rung) + ".evaluated.json"))


def _rung_suffix(ctx: RunContext, rung: int | None) -> str:
    schedule = ctx.config.rung_schedule()
    if rung is None or schedule is None or rung >= schedule.n - 1:
        return ""
    return f".rung{rung}"


def _finetuned(ctx: RunContext, revision: int, candidate: int) -> bool:
    """Whether any rung of the candidate's fine-tuning finished (its pruned bundle may be gone)."""
    return ctx.store.exists(_evaluated_key(ctx, revision, candidate)) or (
        ctx.config.rung_schedule() is not None and ctx.store.exists(_evaluated_key(ctx, revision, candidate, 0)))


def _prune(ctx: RunContext, plan: PruningPlan, revision: int, validator: SafetyValidator | None,
           candidate: int) -> Measured:
    """One prune of the original weights (through the one prune path); in-band results are stored."""
    t = time.perf_counter()
    model = _calibrated_copy(ctx, plan)
    calibrate_s = time.perf_counter() - t
    measured, pruned, space = prune_candidate(model, ctx.example(), plan, ctx.band(), seed=ctx.config.seed,
                                              validator=validator, in_place=True, spaces=spaces_for(ctx))
    measured.timings = {"calibrate": calibrate_s, **measured.timings}
    if pruned is None or not measured.in_band:
        return measured
    t = time.perf_counter()
    measured.accuracy_before = evaluate(pruned, ctx.data().val, device=ctx.device, progress_bar=False).top1
    spec = ModelSpec(**ctx.baseline().model_spec)
    bundle = make_bundle(pruned, spec, measured.plan, space.pruning_history(), ctx.baseline().input_size,
                         metrics={"achieved_macs": measured.achieved_macs, "params": measured.params,
                                  "revision": revision, "candidate": candidate},
                         attention_heads=space.attention_heads())
    key = ctx.key(runs.slot_name(revision, candidate, ".pruned.pt"))
    sha = ctx.store.put_bytes(key, bundle_bytes(bundle))
    measured.checkpoint_key, measured.checkpoint_sha256 = key, sha
    measured.timings["zero_shot_eval_save"] = time.perf_counter() - t
    return measured


def load_bundle(ctx: RunContext, key: str, sha256: str | None) -> tuple[nn.Module, dict]:
    """Rebuild a stored pruned model; a checksum mismatch is an error, never silently used."""
    bundle = read_bundle(ctx.store.get_bytes(key, sha256=sha256))
    return rebuild(bundle), bundle


def worker_identity() -> str:
    """host:pid (parent pid) of the process doing the work, recorded with every fine-tuned candidate."""
    return f"{socket.gethostname()}:{os.getpid()} (parent {os.getppid()})"


def read_evaluated(ctx: RunContext, revision: int, candidate: int = 0, source_sha256: str | None = None,
                   rung: int | None = None) -> Evaluated | None:
    """The stored fine-tuning result of a candidate (None when absent or made from another source bundle)."""
    key = _evaluated_key(ctx, revision, candidate, rung)
    if not ctx.store.exists(key):
        return None
    stored = ctx.store.get_json(key)
    if source_sha256 is not None and stored.get("source_sha256") != source_sha256:
        return None
    done = Evaluated(**stored["evaluated"])
    return done if done.checkpoint_key and ctx.store.exists(done.checkpoint_key) else None


def finetune_revision(ctx: RunContext, measured: Measured, revision: int, candidate: int = 0) -> Evaluated:
    """Inline fine-tuning (paper Table 7) of an in-band candidate; evaluate on the validation split.

    With successive-halving rungs (``RunConfig.rungs``) this is one rung, ``measured.rung``: rung 0 starts
    from the pruned bundle, rung k > 0 continues from rung k-1's bundle (``measured.checkpoint_key``) for the
    epochs between the two rungs. Idempotent: when this rung's fine-tuned bundle and result are already in
    the store (a finished candidate of a preempted run, or a retried task whose worker died after
    finishing), the stored result is returned without training again. Workers on other machines call this
    with only the store URL and keys: the source bundle is read from, the result written to, the store.
    """
    rung = measured.rung
    done = read_evaluated(ctx, revision, candidate, measured.checkpoint_sha256, rung)
    if done is not None:
        return done
    t = time.perf_counter()
    model, bundle = load_bundle(ctx, measured.checkpoint_key, measured.checkpoint_sha256)
    cfg = ctx.config
    schedule = cfg.rung_schedule()
    epochs = cfg.inline_epochs if schedule is None else int(schedule.epochs[rung] - schedule.start(rung))
    result = None
    if epochs > 0:
        ft = FinetuneConfig(epochs=epochs, lr=ctx.inline_lr(),
                            seed=cfg.seed + revision + 1000 * candidate + 100_000 * rung,
                            mac_reduction=1 - (measured.achieved_macs or 0) / ctx.baseline().base_macs,
                            max_train_batches=cfg.max_train_batches, bn_recalibration=ctx.is_default_model and rung == 0,
                            progress_bar=False, device=str(ctx.device))
        result = finetune(model, ctx.data(), ft, progress=False)
    acc = evaluate(model, ctx.data().val, device=ctx.device, progress_bar=False).top1
    bundle["state_dict"] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    total = cfg.inline_epochs if schedule is None else schedule.epochs[rung]
    bundle["metrics"].update(val_accuracy=acc, inline_epochs=total, inline_lr=result.lr if result else None,
                             **({"rung": rung} if schedule is not None else {}))
    suffix = _rung_suffix(ctx, rung)
    key = (runs.revision_key(ctx.run_id, revision, candidate) if not suffix
           else ctx.key(runs.slot_name(revision, candidate, suffix + ".pt")))
    sha = ctx.store.put_bytes(key, bundle_bytes(bundle))
    info = ctx.device_info()
    evaluated = Evaluated(accuracy_after=acc, checkpoint_key=key, checkpoint_sha256=sha,
                          timings={"finetune_eval_save": time.perf_counter() - t},
                          notes=[f"fine-tuned on {worker_identity()}", device_note(info.device, info.name)],
                          rung=rung, epochs=float(total))
    ctx.store.put_json(_evaluated_key(ctx, revision, candidate, rung),
                       {"source_sha256": measured.checkpoint_sha256, "evaluated": evaluated.model_dump(mode="json"),
                        "device": info.model_dump(mode="json")})
    if rung == 0:  # the pre-fine-tuning bundle is not needed any more (earlier rungs' bundles stay: a resumed
        ctx.store.delete(measured.checkpoint_key)  # revision reads their results back, checkpoint checked)
    return evaluated


class StoreCheckpointer:
    """Extended fine-tuning checkpoints in the artifact store (resume after preemption)."""

    def __init__(self, store: ArtifactStore, key: str):
        self.store, self.key = store, key

    def save_checkpoint(self, epoch: int, state: dict) -> None:
        self.store.put_bytes(self.key, state_to_bytes(state))

    def load_checkpoint(self) -> dict | None:
        if not self.store.exists(self.key):
            return None
        return state_from_bytes(self.store.get_bytes(self.key))


class FinalModel(BaseModel):
    key: str
    sha256: str
    revision: int
    achieved_macs: float
    params: int
    val_accuracy: float
    test_accuracy: float
    inline_test_accuracy: float
    extended_epochs: int
    extended_best_epoch: int | None = None
    kept_inline_weights: bool = False
    seconds: float
    device: str = Field("cpu", description="where extended fine-tuning and the final evaluation ran")
    device_name: str | None = None
    amp_dtype: str | None = Field(None, description="autocast dtype of extended fine-tuning; None = fp32")


def finalize(ctx: RunContext, best: RevisionRecord, progress=None) -> FinalModel:
    """Extended fine-tuning (KD from the original + EMA, resumable) of the selected revision; test accuracy."""
    final_key = ctx.key("final/model.pt")
    if ctx.store.exists(ctx.key("final/model.json")):
        return FinalModel(**ctx.store.get_json(ctx.key("final/model.json")))
    t = time.perf_counter()
    model, bundle = load_bundle(ctx, best.checkpoint_key, best.checkpoint_sha256)
    data, dev = ctx.data(), ctx.device
    inline_test = evaluate(model, data.test, device=dev, progress_bar=False).top1
    cfg = ctx.config
    best_epoch = amp = None
    kept_inline = False
    val_before = evaluate(model, data.val, device=dev, progress_bar=False).top1
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if cfg.extended_epochs > 0:
        ext = ExtendedConfig(epochs=cfg.extended_epochs, seed=cfg.seed,
                             lr=cfg.extended_lr or (DIGITS_RECOVERY_LR if ctx.is_default_model else None),
                             max_train_batches=cfg.max_train_batches, progress_bar=False, device=str(dev),
                             mac_reduction=1 - (best.achieved_macs or 0) / ctx.baseline().base_macs)
        result = extended_finetune(model, ctx.original(), data, ext,
                                   checkpointer=StoreCheckpointer(ctx.store, ctx.key("extended/state.pt")),
                                   progress=progress if progress is not None else False)
        best_epoch, amp = result.best_epoch, result.amp_dtype
        if result.best_val_acc < val_before:  # selection is on validation: never end worse than we started
            model.load_state_dict(before)
            kept_inline = True
            log.info("extended fine-tuning did not beat the inline-fine-tuned weights on validation (%.4f < %.4f); "
                     "keeping them", result.best_val_acc, val_before)
    val = evaluate(model, data.val, device=dev, progress_bar=False).top1
    test = evaluate(model, data.test, device=dev, progress_bar=False).top1
    bundle["state_dict"] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    bundle["metrics"].update(val_accuracy=val, test_accuracy=test, extended_epochs=cfg.extended_epochs,
                             kept_inline_weights=kept_inline)
    sha = ctx.store.put_bytes(final_key, bundle_bytes(bundle))
    final = FinalModel(key=final_key, sha256=sha, revision=best.revision, achieved_macs=best.achieved_macs or 0.0,
                       params=best.params or 0, val_accuracy=val, test_accuracy=test, inline_test_accuracy=inline_test,
                       extended_epochs=cfg.extended_epochs, extended_best_epoch=best_epoch,
                       kept_inline_weights=kept_inline, device=str(dev), device_name=ctx.device_info().name, amp_dtype=amp,
                       seconds=time.perf_counter() - t)
    ctx.store.put_json(ctx.key("final/model.json"), final.model_dump(mode="json"))
    return final


def measure_latency(ctx: RunContext, final: FinalModel):
    """ONNX export + onnxruntime CPU (and torch.compile GPU when available) of original vs final model."""
    from pruning.measure.latency_table import LatencyConfig, run_latency_benchmark

    model, _ = load_bundle(ctx, final.key, final.sha256)
    size = ctx.baseline().input_size
    gpu = ctx.device.type == "cuda"  # --device cpu keeps the GPU out of the run, its benchmark included
    cfg = LatencyConfig(runs=ctx.config.latency_runs, warmup=max(2, ctx.config.latency_runs // 5),
                        run_gpu=ctx.config.gpu_benchmark and ctx.config.device != "cpu",
                        gpu_device=str(ctx.device) if gpu else "cuda")
    with tempfile.TemporaryDirectory(prefix="agentic-pruner-latency-") as tmp:
        report = run_latency_benchmark(ctx.original(), model, (3, size, size), tmp, cfg)
        for path in Path(tmp).iterdir():
            if path.is_file():
                ctx.store.put_file(ctx.key(f"final/{path.name}"), path)
    return report
