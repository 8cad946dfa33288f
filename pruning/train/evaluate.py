"""Evaluation: top-1 / top-5 / loss / per-class accuracy, BatchNorm re-calibration, collapse check.

Accuracies are fractions in [0, 1]. ``device`` moves the model there for the pass and back afterwards
(no copy when it is already there); on CUDA the forward passes run under autocast (``amp=None``: bf16
where native, else fp16; never on the CPU) with inputs in the model's memory format.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from torch import nn
from torch.utils.data import DataLoader

from pruning.device import amp_dtype, autocast, on_device
from pruning.train._common import _bar, _resolve_device

__all__ = ["EvalResult", "evaluate", "recalibrate_batchnorm", "accuracy_collapsed"]


def _channels_last(model: nn.Module) -> bool:
    """Whether the model's 4-D weights are stored channels_last (then inputs are sent that way too); the first
    weight whose layout tells the formats apart decides (a 1x1 kernel is contiguous in both)."""
    for p in model.parameters():
        if p.dim() == 4:
            cl, std = p.is_contiguous(memory_format=torch.channels_last), p.is_contiguous()
            if cl != std:
                return cl
    return False


def _to(x: torch.Tensor, dev: torch.device, channels_last: bool) -> torch.Tensor:
    if channels_last and x.dim() == 4:
        return x.to(dev, non_blocking=True, memory_format=torch.channels_last)
    return x.to(dev, non_blocking=True)


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module,
    loader: DataLoader,
    num_batches: int | None = None,
    *,
    device: str | torch.device | None = None,
    amp: bool | None = None,
) -> int:
    """Re-estimate BatchNorm running statistics from ``loader`` (no weight changes).

    Pruning removes channels whose contribution the stored statistics assumed; resetting
    and re-accumulating them (cumulative average) is a cheap partial recovery before
    fine-tuning. Returns the number of batches used; a model without BatchNorm is untouched.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    dev = _resolve_device(model, device)
    saved = [(m, m.momentum) for m in bns]
    was_training = model.training
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over all batches
    used = 0
    with on_device(model, dev):
        model.train()
        cl, dtype = _channels_last(model), amp_dtype(dev, amp)
        try:
            for x, _y in loader:
                if num_batches is not None and used >= num_batches:
                    break
                with autocast(dev, dtype):
                    model(_to(x, dev, cl))
                used += 1
        finally:
            for m, mom in saved:
                m.momentum = mom
            model.train(was_training)
    return used


class EvalResult(BaseModel):
    """Classification metrics of one evaluation pass (accuracies are fractions)."""

    top1: float = Field(description="top-1 accuracy in [0, 1]")
    top5: float = Field(description="top-k accuracy with k = top5_k")
    top5_k: int = Field(description="k actually used: min(5, num_classes)")
    loss: float = Field(description="mean cross-entropy (no label smoothing)")
    per_class: dict[str, float] = Field(description="accuracy per class seen in the data")
    n: int = Field(description="number of samples evaluated")


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    *,
    device: str | torch.device | None = None,
    class_names: list[str] | None = None,
    max_batches: int | None = None,
    progress_bar: bool | None = None,
    amp: bool | None = None,
) -> EvalResult:
    """Top-1/top-5 accuracy, mean CE loss and per-class accuracy of ``model`` on ``loader``.

    The model is evaluated in eval mode and restored to its previous mode afterwards.
    """
    dev = _resolve_device(model, device)
    was_training = model.training
    correct1 = correctk = n = 0
    loss_sum = 0.0
    k_used = 1
    cls_correct: dict[int, int] = {}
    cls_total: dict[int, int] = {}
    with on_device(model, dev):
        model.eval()
        cl, dtype = _channels_last(model), amp_dtype(dev, amp)
        try:
            for i, (x, y) in enumerate(_bar(loader, enabled=progress_bar, desc="eval")):
                if max_batches is not None and i >= max_batches:
                    break
                x, y = _to(x, dev, cl), y.to(dev, non_blocking=True)
                with autocast(dev, dtype):
                    logits = model(x).float()
                k_used = min(5, logits.shape[1])
                loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
                topk = logits.topk(k_used, dim=1).indices
                hit1 = topk[:, 0] == y
                correct1 += int(hit1.sum())
                correctk += int((topk == y[:, None]).any(dim=1).sum())
                n += int(y.shape[0])
                for c, h in zip(y.tolist(), hit1.tolist()):
                    cls_total[c] = cls_total.get(c, 0) + 1
                    cls_correct[c] = cls_correct.get(c, 0) + int(h)
        finally:
            model.train(was_training)

    def _name(c: int) -> str:
        return class_names[c] if class_names is not None and c < len(class_names) else str(c)

    return EvalResult(
        top1=correct1 / max(1, n),
        top5=correctk / max(1, n),
        top5_k=k_used,
        loss=loss_sum / max(1, n),
        per_class={_name(c): cls_correct[c] / cls_total[c] for c in sorted(cls_total)},
        n=n,
    )


def accuracy_collapsed(baseline_acc: float, acc: float, drop: float = 0.10) -> bool:
    """True when accuracy fell by more than ``drop`` *absolute* (fractions: 0.10 = 10 points).

    ``baseline_acc - acc > drop``; e.g. 0.95 -> 0.84 collapsed, 0.95 -> 0.86 not.
    """
    return (baseline_acc - acc) > drop
