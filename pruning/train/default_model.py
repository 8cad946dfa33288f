"""The demo's default model: a timm ResNet-18 trained from scratch on the digits data.

Why ResNet-18: it is a real timm architecture with residual couplings (the interesting
case for structured pruning: torch-pruning must keep the skip-connected channels
consistent), it needs no download (``pretrained=False``), and at 32x32 input it trains on
the 1,078-image digits train split in ~20 s on 2 idle CPU cores (8 epochs, SGD + one-cycle) to
~99 % test accuracy. Its MACs at 32x32 are ~37 M, so pruning experiments are quick too.
Other timm CNNs (e.g. ``resnet50`` with bottleneck blocks) can be picked with ``arch=``; they train slower.

The trained ``state_dict`` is cached (``torch.save``; always re-loaded with
``torch.load(..., weights_only=True)``) next to a small JSON with metrics, under a key
made of arch, seed, input size and epochs, in ``$AGENTIC_PRUNER_CACHE`` or
``~/.cache/agentic-pruner``. :func:`load_default_model` trains once, then reuses it.
"""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from pruning.train._common import _bar
from pruning.train.data import DataConfig, build_data
from pruning.train.evaluate import evaluate

__all__ = [
    "DEFAULT_ARCH",
    "DEFAULT_INPUT_SIZE",
    "DEFAULT_SEED",
    "DEFAULT_EPOCHS",
    "DEFAULT_LR",
    "default_cache_dir",
    "cache_key",
    "create_default_model",
    "train_default_model",
    "load_default_model",
]

DEFAULT_ARCH = "resnet18"
DEFAULT_INPUT_SIZE = 32
DEFAULT_SEED = 0
DEFAULT_EPOCHS = 8
DEFAULT_LR = 0.05
NUM_CLASSES = 10
CACHE_ENV = "AGENTIC_PRUNER_CACHE"


def default_cache_dir() -> Path:
    """``$AGENTIC_PRUNER_CACHE`` if set, else ``~/.cache/agentic-pruner``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "agentic-pruner"


def cache_key(arch: str = DEFAULT_ARCH, seed: int = DEFAULT_SEED,
              input_size: int = DEFAULT_INPUT_SIZE, epochs: int = DEFAULT_EPOCHS) -> str:
    """File stem of the cached weights/metrics, e.g. ``digits-resnet18-32px-s0-e8``."""
    return f"digits-{arch}-{input_size}px-s{seed}-e{epochs}"


def create_default_model(arch: str = DEFAULT_ARCH, num_classes: int = NUM_CLASSES) -> nn.Module:
    """An untrained timm model (never downloads weights)."""
    import timm

    return timm.create_model(arch, num_classes=num_classes, pretrained=False)


def _paths(cache_dir: Path, key: str) -> tuple[Path, Path]:
    return cache_dir / f"{key}.pt", cache_dir / f"{key}.json"


def train_default_model(
    cache_dir: str | Path | None = None,
    *,
    arch: str = DEFAULT_ARCH,
    input_size: int = DEFAULT_INPUT_SIZE,
    seed: int = DEFAULT_SEED,
    epochs: int = DEFAULT_EPOCHS,
    lr: float = DEFAULT_LR,
    force: bool = False,
    progress: Callable[[int, int, dict], Any] | None = None,
    progress_bar: bool | None = None,
) -> Path:
    """Train the default model on the digits train split and cache it; return the ``.pt`` path.

    Does nothing if the cache entry exists (unless ``force``). Recipe: SGD (nesterov,
    momentum 0.9, wd 5e-4) with a one-cycle LR peaking at ``lr``, batch 64, label
    smoothing 0.05, deterministic for a given ``seed``. Metrics (val/test accuracy,
    seconds) go to the JSON next to the weights.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    key = cache_key(arch, seed, input_size, epochs)
    pt_path, json_path = _paths(cache, key)
    if pt_path.exists() and json_path.exists() and not force:
        return pt_path
    cache.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(seed)
    splits = build_data(DataConfig(input_size=input_size, seed=seed))
    model = create_default_model(arch, splits.num_classes)
    t0, c0 = time.perf_counter(), time.process_time()
    history = _train(model, splits, arch, epochs, lr, progress, progress_bar)
    train_seconds, train_cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    model.eval()
    val = evaluate(model, splits.val, progress_bar=False)
    test = evaluate(model, splits.test, progress_bar=False)
    info = {
        "key": key,
        "arch": arch,
        "num_classes": splits.num_classes,
        "input_size": list(splits.input_size),
        "mean": list(splits.mean),
        "std": list(splits.std),
        "data_spec": "digits",
        "split_sizes": splits.sizes,
        "seed": seed,
        "epochs": epochs,
        "lr": lr,
        "train_seconds": round(train_seconds, 2),
        "train_cpu_seconds": round(train_cpu_seconds, 2),  # robust to other processes' load
        "torch_threads": torch.get_num_threads(),
        "val_acc": val.top1,
        "test_acc": test.top1,
        "test_top5": test.top5,
        "test_loss": test.loss,
        "history": history,
        "weights": pt_path.name,
        "torch_version": torch.__version__,
        "timm_version": __import__("timm").__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    _write_atomically(model, info, pt_path, json_path)
    return pt_path


def _train(model: nn.Module, splits, arch: str, epochs: int, lr: float, progress, progress_bar) -> list[dict]:
    """The recipe: SGD nesterov + one-cycle LR, label smoothing 0.05; returns the per-epoch metrics."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, epochs * len(splits.train)),
                                                pct_start=0.25)
    t0 = time.perf_counter()
    history = []
    for epoch in range(1, epochs + 1):
        model.train()
        total, count = 0.0, 0
        for x, y in _bar(splits.train, enabled=progress_bar, desc=f"train {arch} {epoch}/{epochs}"):
            loss = F.cross_entropy(model(x), y, label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach())
            count += 1
        val = evaluate(model, splits.val, progress_bar=False)
        metrics = {"epoch": epoch, "train_loss": total / max(1, count), "val_acc": val.top1,
                   "seconds": time.perf_counter() - t0}
        history.append(metrics)
        if progress is not None:
            progress(epoch, epochs, metrics)
    return history


def _write_atomically(model: nn.Module, info: dict, pt_path: Path, json_path: Path) -> None:
    """Weights and metrics via temp files and rename: concurrent demo runs never see half a file."""
    tmp_pt = pt_path.with_suffix(f".pt.{os.getpid()}.tmp")
    buf = io.BytesIO()  # saving via a buffer keeps the archive byte-identical across runs
    torch.save(model.state_dict(), buf)
    tmp_pt.write_bytes(buf.getvalue())
    tmp_pt.replace(pt_path)
    tmp_js = json_path.with_suffix(f".json.{os.getpid()}.tmp")
    tmp_js.write_text(json.dumps(info, indent=2))
    tmp_js.replace(json_path)


def load_default_model(
    cache_dir: str | Path | None = None,
    *,
    arch: str = DEFAULT_ARCH,
    input_size: int = DEFAULT_INPUT_SIZE,
    seed: int = DEFAULT_SEED,
    epochs: int = DEFAULT_EPOCHS,
    train_if_missing: bool = True,
    **train_kwargs: Any,
) -> tuple[nn.Module, dict]:
    """Return ``(model in eval mode, info dict)``, training and caching it first if missing.

    ``info`` is the cached JSON (arch, input_size, val/test accuracy, train seconds, ...)
    plus ``"path"`` to the weights.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    pt_path, json_path = _paths(cache, cache_key(arch, seed, input_size, epochs))
    if not (pt_path.exists() and json_path.exists()):
        if not train_if_missing:
            raise FileNotFoundError(f"default model not cached at {pt_path}")
        train_default_model(cache, arch=arch, input_size=input_size, seed=seed, epochs=epochs, **train_kwargs)
    info = json.loads(json_path.read_text())
    model = create_default_model(arch, int(info.get("num_classes", NUM_CLASSES)))
    state = torch.load(pt_path, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    model.eval()
    info["path"] = str(pt_path)
    return model, info
