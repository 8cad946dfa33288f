"""Taylor calibration: accumulate ``.grad`` over a few calibration batches for gradient-based importance.

:func:`calibration_gradients` / :func:`calibrated` work on a model the caller owns;
:func:`calibrate_copy` deep-copies first so the saved model is untouched.

``device``: the forward/backward passes run there (the model moves there for the call and back
afterwards, gradients included: ``nn.Module.to`` moves ``.grad`` with the parameters), so Torch-Pruning
can trace and cut the calibrated CPU copy. On CUDA with native bf16 the passes run under bf16 autocast
(parameters and their gradients stay fp32); fp16 is not used here, since unscaled fp16 gradients could
underflow to zero and change the Taylor ranking.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader

from pruning.device import amp_dtype, autocast, on_device
from pruning.train._common import _resolve_device

__all__ = ["zero_grads", "calibration_gradients", "calibrated", "calibrate_copy"]


def zero_grads(model: nn.Module) -> None:
    """Drop all parameter gradients (``p.grad = None``)."""
    for p in model.parameters():
        p.grad = None


def calibration_gradients(
    model: nn.Module,
    loader: DataLoader,
    num_batches: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    *,
    zero_first: bool = True,
    device: str | torch.device | None = None,
) -> dict:
    """Run forward+backward on ``num_batches`` calibration batches, accumulating ``.grad``.

    Modifies ``model``'s gradients (pass a copy, see :func:`calibrate_copy`). The model is
    run in eval mode so BatchNorm statistics are not changed; the mean loss over batches
    is back-propagated, so ``.grad`` is the average gradient. Returns
    ``{"batches", "samples", "loss"}``.
    """
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    dev = _resolve_device(model, device)
    dtype = amp_dtype(dev)
    dtype = dtype if dtype == torch.bfloat16 else None
    was_training = model.training
    if zero_first:
        zero_grads(model)
    batches = samples = 0
    total = 0.0
    with on_device(model, dev):
        model.eval()
        try:
            with torch.enable_grad():
                for x, y in loader:
                    if batches >= num_batches:
                        break
                    x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
                    with autocast(dev, dtype):
                        logits = model(x)
                    loss = loss_fn(logits.float(), y)
                    (loss / max(1, num_batches)).backward()
                    total += float(loss.detach())
                    batches += 1
                    samples += int(y.shape[0])
        finally:
            model.train(was_training)
    if batches and batches < num_batches:  # loader shorter than requested: rescale to a mean
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(num_batches / batches)
    return {"batches": batches, "samples": samples, "loss": total / max(1, batches)}


@contextmanager
def calibrated(
    model: nn.Module,
    loader: DataLoader,
    num_batches: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    *,
    device: str | torch.device | None = None,
) -> Iterator[dict]:
    """Context manager: gradients accumulated on entry, cleared (:func:`zero_grads`) on exit."""
    stats = calibration_gradients(model, loader, num_batches, loss_fn, device=device)
    try:
        yield stats
    finally:
        zero_grads(model)


def calibrate_copy(
    model: nn.Module,
    loader: DataLoader,
    num_batches: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    *,
    device: str | torch.device | None = None,
) -> nn.Module:
    """Deep-copy ``model`` and accumulate calibration gradients on the copy only (computed on ``device``;
    the copy and its gradients end where ``model`` is).

    The original's weights, buffers and ``.grad`` are left exactly as they were.
    """
    clone = copy.deepcopy(model)
    zero_grads(clone)
    calibration_gradients(clone, loader, num_batches, loss_fn, device=device)
    return clone
