"""Private helpers shared by the training modules: tqdm bars, device resolution, progress callbacks."""

from __future__ import annotations

import sys
from typing import Any, Callable

import torch
from torch import nn

ProgressCallback = Callable[[int, int, dict], Any]
"""``progress(epoch, total_epochs, metrics)`` called after every epoch (epoch from 1)."""


def _bar_enabled(flag: bool | None) -> bool:
    if flag is not None:
        return bool(flag)
    try:
        return sys.stderr.isatty()
    except Exception:  # pragma: no cover
        return False


def _bar(iterable, *, enabled: bool | None, desc: str, total: int | None = None):
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False, disable=not _bar_enabled(enabled),
                dynamic_ncols=True)


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():  # pragma: no cover - parameter-free model
        return b.device
    return torch.device("cpu")  # pragma: no cover


def _resolve_device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    return torch.device(device) if device is not None else _model_device(model)


def _split_progress(progress: ProgressCallback | bool | None, bar: bool | None) -> tuple[ProgressCallback | None, bool | None]:
    """``progress=False`` disables bars; a callable is the per-epoch callback."""
    if progress is False:
        return None, False
    if progress is True:
        return None, True if bar is None else bar
    return progress, bar
