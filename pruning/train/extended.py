"""Extended (final) fine-tuning (AgenticPruner Table 8) with resumable checkpoints.

Knowledge distillation from the unpruned teacher (tau 4, alpha 0.3,
``alpha*KL*tau^2 + (1-alpha)*CE``), model EMA (``timm.utils.ModelEmaV3``), step schedule
(CNN) or warmup+cosine (ViT), early stopping on validation accuracy, mixed precision and
``channels_last`` on CUDA only (see :mod:`pruning.train.finetune`), and checkpoint/resume through a
:class:`Checkpointer` (so a flow can keep checkpoints in S3 and survive preemption). The student is
moved to ``config.device`` and stays there; the teacher goes there for the call and back afterwards.
"""

from __future__ import annotations

import io
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Protocol, runtime_checkable

import numpy as np
import torch
from pydantic import BaseModel, Field
from torch import nn

from pruning.device import model_device
from pruning.train._common import ProgressCallback, _resolve_device, _split_progress
from pruning.train.data import DataSplits
from pruning.train.evaluate import evaluate
from pruning.train.finetune import (
    EpochRecord,
    Precision,
    _build_optimizer,
    _epoch_loader,
    _train_epoch,
    _TrainConfigBase,
    precision_for,
    restore_format,
)

__all__ = [
    "Checkpointer",
    "InMemoryCheckpointer",
    "FileCheckpointer",
    "state_to_bytes",
    "state_from_bytes",
    "ExtendedConfig",
    "ExtendedResult",
    "extended_finetune",
]


class ExtendedConfig(_TrainConfigBase):
    """Final extended fine-tuning (paper Table 8)."""

    epochs: int = Field(30, ge=1, description="maximum epochs (early stopping may end sooner)")
    kd_alpha: float = Field(0.3, ge=0, le=1, description="KD weight: alpha*KD*tau^2 + (1-alpha)*CE")
    kd_temperature: float = Field(4.0, gt=0, description="KD temperature tau")
    ema: bool = Field(True, description="keep a timm ModelEmaV3 and select it when better on val")
    ema_decay: float = Field(0.999, gt=0, lt=1, description="EMA decay (with warm-up: useful in short runs)")
    ema_warmup: bool = Field(True, description="EMA decay warm-up so early epochs are not stale")
    schedule: Literal["auto", "step", "cosine", "constant"] = Field(
        "auto", description="auto = step for CNN, warmup+cosine for ViT")
    step_milestones: tuple[float, ...] = Field(
        (0.3, 0.6, 0.9), description="step schedule 30/60/90 (of 100) as fractions of epochs")
    step_gamma: float = Field(0.1, gt=0, le=1, description="LR factor at each milestone")
    warmup_epochs: float = Field(1.0, ge=0, description="linear warm-up length for cosine")
    min_lr_ratio: float = Field(0.01, ge=0, le=1, description="cosine floor as a fraction of lr")
    patience: int | None = Field(5, ge=1, description="early stop after this many epochs without val gain")
    min_delta: float = Field(0.0, ge=0, description="val-accuracy gain that counts as improvement")
    checkpoint_every: int = Field(1, ge=1, description="save a checkpoint every K epochs (and at the end)")


class ExtendedResult(BaseModel):
    """Outcome of :func:`extended_finetune` (the student holds the best weights)."""

    family: str
    optimizer: str
    lr: float
    schedule: str
    kd: bool
    ema: bool
    amp: bool
    device: str = "cpu"
    amp_dtype: str | None = Field(None, description="autocast dtype ('bfloat16' / 'float16'); None = fp32")
    channels_last: bool = False
    history: list[EpochRecord]
    best_epoch: int
    best_val_acc: float
    best_source: Literal["model", "ema"]
    epochs_run: int = Field(description="epochs trained in this call (excludes resumed ones)")
    resumed_from_epoch: int = Field(0, description="last completed epoch found in the checkpoint")
    stopped_early: bool
    seconds: float


def state_to_bytes(state: dict) -> bytes:
    """Serialise a checkpoint dict with ``torch.save`` (for object stores such as S3)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def state_from_bytes(data: bytes) -> dict:
    """Inverse of :func:`state_to_bytes` (``weights_only=True``, tensors on CPU)."""
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


@runtime_checkable
class Checkpointer(Protocol):
    """Where :func:`extended_finetune` keeps its resumable state.

    ``save_checkpoint`` receives a dict whose tensors alias the live model/optimizer, so
    it must serialise (e.g. :func:`state_to_bytes`) before returning.
    ``load_checkpoint`` returns the last saved dict or ``None``.
    """

    def save_checkpoint(self, epoch: int, state: dict) -> None: ...

    def load_checkpoint(self) -> dict | None: ...


class InMemoryCheckpointer:
    """Keeps the last checkpoint as bytes in memory (tests, single-process runs)."""

    def __init__(self) -> None:
        self.data: bytes | None = None
        self.saved_epochs: list[int] = []

    def save_checkpoint(self, epoch: int, state: dict) -> None:
        self.data = state_to_bytes(state)
        self.saved_epochs.append(epoch)

    def load_checkpoint(self) -> dict | None:
        return state_from_bytes(self.data) if self.data is not None else None


class FileCheckpointer:
    """Keeps the last checkpoint in one file, replaced atomically."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def save_checkpoint(self, epoch: int, state: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_bytes(state_to_bytes(state))
        tmp.replace(self.path)

    def load_checkpoint(self) -> dict | None:
        if not self.path.exists():
            return None
        return state_from_bytes(self.path.read_bytes())


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _lr_lambda(cfg: ExtendedConfig, schedule: str, steps_per_epoch: int) -> Callable[[int], float]:
    total = cfg.epochs * steps_per_epoch
    if schedule == "constant":
        return lambda step: 1.0
    if schedule == "step":
        milestones = sorted(max(1, round(m * cfg.epochs)) * steps_per_epoch for m in cfg.step_milestones)

        def step_fn(step: int) -> float:
            return cfg.step_gamma ** sum(step >= m for m in milestones)

        return step_fn
    warm = int(round(min(cfg.warmup_epochs, max(0, cfg.epochs - 1)) * steps_per_epoch))

    def cosine_fn(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return cosine_fn


def _clone_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@dataclass
class _Run:
    """The live training objects of one :func:`extended_finetune` call."""

    cfg: ExtendedConfig
    dev: torch.device
    hp: dict[str, Any]
    schedule: str
    kd_teacher: nn.Module | None
    prec: Precision
    optimizer: torch.optim.Optimizer
    scheduler: Any
    ema: Any

    @property
    def amp(self) -> bool:
        return self.prec.amp

    @property
    def scaler(self) -> Any:
        return self.prec.scaler


@dataclass
class _Tracker:
    """History, best-so-far selection and early-stopping state (all of it is checkpointed)."""

    history: list[EpochRecord] = field(default_factory=list)
    best_acc: float = -1.0
    best_epoch: int = 0
    best_source: str = "model"
    best_state: dict[str, torch.Tensor] | None = None
    bad_epochs: int = 0
    stopped: bool = False
    global_step: int = 0
    resumed_from: int = 0


def _setup(student: nn.Module, teacher: nn.Module | None, splits: DataSplits, cfg: ExtendedConfig) -> _Run:
    """Move the models, seed torch, and build optimizer, LR schedule, EMA and AMP scaler."""
    from timm.utils import ModelEmaV3

    dev = _resolve_device(student, cfg.device)
    student.to(dev)
    prec = precision_for(student, cfg, dev)
    use_kd = teacher is not None and cfg.kd_alpha > 0
    if use_kd:
        teacher.to(dev).eval()
        if prec.channels_last:
            teacher.to(memory_format=torch.channels_last)

    hp = cfg.resolve_hparams(student)
    schedule = cfg.schedule if cfg.schedule != "auto" else ("step" if hp["family"] == "cnn" else "cosine")
    torch.manual_seed(cfg.seed)
    optimizer = _build_optimizer(student, hp, cfg)
    probe = _epoch_loader(splits, cfg.batch_size, cfg.seed, 1)
    steps_per_epoch = len(probe) if cfg.max_train_batches is None else min(len(probe), cfg.max_train_batches)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg, schedule, steps_per_epoch))
    ema = ModelEmaV3(student, decay=cfg.ema_decay, use_warmup=cfg.ema_warmup) if cfg.ema else None
    return _Run(cfg=cfg, dev=dev, hp=hp, schedule=schedule, kd_teacher=teacher if use_kd else None, prec=prec,
                optimizer=optimizer, scheduler=scheduler, ema=ema)


def _resume(run: _Run, student: nn.Module, checkpointer: Checkpointer | None) -> _Tracker:
    """Restore model, optimizer, schedule, EMA, scaler, tracker and RNG from the last checkpoint, if any."""
    state = checkpointer.load_checkpoint() if checkpointer is not None else None
    if state is None:
        return _Tracker()
    student.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    if run.ema is not None and state.get("ema") is not None:
        run.ema.load_state_dict(state["ema"])
    if run.scaler is not None and state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    track = _Tracker(
        history=[EpochRecord(**h) for h in state["history"]],
        best_acc=state["best_acc"], best_epoch=state["best_epoch"], best_source=state["best_source"],
        best_state=state["best_state"],
        bad_epochs=state["bad_epochs"], stopped=state["stopped"], global_step=state["global_step"],
        resumed_from=int(state["epoch"]),
    )
    _set_rng_state(state["rng"])
    return track


def _run_epoch(run: _Run, student: nn.Module, splits: DataSplits, epoch: int, track: _Tracker,
               bar: bool | None) -> EpochRecord:
    """Train one epoch, evaluate model and EMA on val, update best/early-stopping state; return the record."""
    cfg, dev, ema = run.cfg, run.dev, run.ema
    t0 = time.perf_counter()
    loader = _epoch_loader(splits, cfg.batch_size, cfg.seed, epoch)
    lr_now = run.optimizer.param_groups[0]["lr"]
    train_loss, track.global_step = _train_epoch(
        student, loader, run.optimizer, cfg, dev, desc=f"extended {epoch}/{cfg.epochs}",
        teacher=run.kd_teacher, kd_alpha=cfg.kd_alpha,
        kd_temperature=cfg.kd_temperature, scheduler=run.scheduler, ema=ema,
        ema_step=track.global_step, prec=run.prec, bar=bar)
    ev = evaluate(student, splits.val, device=dev, progress_bar=False, amp=run.amp)
    ema_acc = (evaluate(ema.module, splits.val, device=dev, progress_bar=False, amp=run.amp).top1
               if ema is not None else None)

    cand_acc, cand_src = ev.top1, "model"
    if ema_acc is not None and ema_acc > cand_acc:
        cand_acc, cand_src = ema_acc, "ema"
    if cand_acc > track.best_acc + cfg.min_delta or track.best_state is None:
        track.best_acc, track.best_epoch, track.best_source = cand_acc, epoch, cand_src
        track.best_state = _clone_state(ema.module if cand_src == "ema" else student)
        track.bad_epochs = 0
    else:
        track.bad_epochs += 1
    track.stopped = cfg.patience is not None and track.bad_epochs >= cfg.patience

    rec = EpochRecord(epoch=epoch, train_loss=train_loss, val_acc=ev.top1, val_loss=ev.loss,
                      lr=lr_now, seconds=time.perf_counter() - t0, ema_val_acc=ema_acc)
    track.history.append(rec)
    return rec


def _checkpoint_state(run: _Run, student: nn.Module, track: _Tracker, epoch: int) -> dict:
    """Everything :func:`_resume` needs to continue after ``epoch`` (tensors alias the live objects)."""
    return {
        "epoch": epoch,
        "model": student.state_dict(),
        "ema": run.ema.state_dict() if run.ema is not None else None,
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict() if run.scaler is not None else None,
        "history": [h.model_dump() for h in track.history],
        "best_acc": track.best_acc,
        "best_epoch": track.best_epoch,
        "best_source": track.best_source,
        "best_state": track.best_state,
        "bad_epochs": track.bad_epochs,
        "stopped": track.stopped,
        "global_step": track.global_step,
        "rng": _rng_state(),
    }


def extended_finetune(
    student: nn.Module,
    teacher: nn.Module | None,
    splits: DataSplits,
    config: ExtendedConfig | None = None,
    checkpointer: Checkpointer | None = None,
    progress: ProgressCallback | bool | None = None,
) -> ExtendedResult:
    """Extended fine-tuning with KD, EMA, LR schedule, early stopping and resumable checkpoints.

    ``teacher`` (the unpruned model, or ``None`` for no KD) is only run in eval mode under
    ``no_grad``. If ``checkpointer.load_checkpoint()`` returns a state, training resumes
    after its epoch (``student`` must have the same, pruned, architecture). A checkpoint is
    saved every ``checkpoint_every`` epochs and at the end, *before* the progress callback.
    On return ``student`` holds the best weights by val accuracy (its own or the EMA's).
    """
    cfg = config or ExtendedConfig()
    callback, bar = _split_progress(progress, cfg.progress_bar)
    teacher_home = model_device(teacher) if teacher is not None else None
    run = _setup(student, teacher, splits, cfg)
    try:
        return _extended_loop(run, student, splits, checkpointer, callback, bar)
    finally:
        restore_format(student, run.prec)
        if run.kd_teacher is not None:  # the caller's teacher goes back where it was, in the default layout
            restore_format(run.kd_teacher, run.prec)
            run.kd_teacher.to(teacher_home)


def _extended_loop(run: _Run, student: nn.Module, splits: DataSplits, checkpointer: Checkpointer | None,
                   callback: ProgressCallback | None, bar: bool | None) -> ExtendedResult:
    """The epochs of :func:`extended_finetune` after setup: resume, train, checkpoint, select the best."""
    cfg = run.cfg
    track = _resume(run, student, checkpointer)

    t_all = time.perf_counter()
    epochs_run = 0
    for epoch in range(track.resumed_from + 1, cfg.epochs + 1):
        if track.stopped:
            break
        rec = _run_epoch(run, student, splits, epoch, track, bar)
        epochs_run += 1
        if checkpointer is not None and (epoch % cfg.checkpoint_every == 0 or epoch == cfg.epochs or track.stopped):
            checkpointer.save_checkpoint(epoch, _checkpoint_state(run, student, track, epoch))
        if callback is not None:
            callback(epoch, cfg.epochs, {**rec.model_dump(), "best_val_acc": track.best_acc,
                                         "best_epoch": track.best_epoch})

    if track.best_state is not None:
        student.load_state_dict(track.best_state)
    student.eval()
    hp = run.hp
    return ExtendedResult(
        family=hp["family"], optimizer=hp["optimizer"], lr=hp["lr"], schedule=run.schedule,
        kd=run.kd_teacher is not None, ema=run.ema is not None, amp=run.amp, device=str(run.dev),
        amp_dtype=str(run.prec.dtype).replace("torch.", "") if run.prec.dtype else None,
        channels_last=run.prec.channels_last, history=track.history,
        best_epoch=track.best_epoch, best_val_acc=max(track.best_acc, 0.0), best_source=track.best_source,
        epochs_run=epochs_run, resumed_from_epoch=track.resumed_from, stopped_early=track.stopped,
        seconds=time.perf_counter() - t_all,
    )
