"""Where calibration, fine-tuning, evaluation and LLM statistics run: ``--device auto|cpu|cuda|cuda:N``.

``auto`` is CUDA when this process sees a CUDA device, else the CPU; ``cuda`` / ``cuda:N`` on a machine
without one is a :class:`DeviceError` (a :class:`~pruning.errors.UserError`: one line, exit 2).

Where the model lives (vision path): its home is the CPU. Loading, Torch-Pruning's dependency tracing
(run with a CPU example input), the MAC solver, the cut, MAC re-counting, ONNX export and the stored
bundles all work on CPU tensors, so pruning never depends on the device and a run stores the same
bundles wherever it ran. A model moves to the device for Taylor calibration (the clone with its
gradients comes back to the CPU before the cut), for inline and extended fine-tuning (it stays there
until its weights are stored; they are copied to the CPU) and for evaluation (:func:`on_device` moves it
back afterwards). On CUDA the passes use mixed precision (:func:`amp_dtype`: bf16 where the GPU supports
it natively, else fp16 with a gradient scaler) and ``channels_last`` for CNNs; on the CPU nothing changes
(fp32, no autocast, the same tensors as before).

Plain PyTorch, no Prefect; importing this module imports only torch.
"""
from __future__ import annotations

import contextlib
import os
import platform
import re
from typing import Iterator

import torch
from pydantic import BaseModel, Field
from torch import nn

from pruning.errors import UserError

__all__ = ["DeviceError", "DeviceInfo", "DEVICE_HELP", "check_device_spec", "resolve_device", "cuda_device_count",
           "device_name", "describe_device", "amp_dtype", "autocast", "grad_scaler", "model_device", "on_device",
           "reset_peak_memory", "peak_memory_gib", "dask_worker_slot", "loader_workers", "available_cpus",
           "cpu_name"]

DEVICE_HELP = "auto (CUDA when available, else CPU), cpu, cuda or cuda:N"
_SPEC = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


class DeviceError(UserError):
    """The requested device does not exist on this machine (or is not a device name at all)."""


class DeviceInfo(BaseModel):
    """The device a step ran on, as recorded in history records and summaries."""

    device: str = Field(description="torch device string: 'cpu', 'cuda:0'")
    name: str = Field(description="GPU name (torch.cuda.get_device_name) or the CPU model")
    amp: str | None = Field(None, description="autocast dtype used on this device ('bfloat16' / 'float16'); None on CPU")
    memory_gib: float | None = Field(None, description="total GPU memory")
    capability: str | None = Field(None, description="CUDA compute capability, e.g. '9.0'")

    def label(self) -> str:
        """``cuda:0 (NVIDIA H200)``."""
        return f"{self.device} ({self.name})"


def check_device_spec(spec: str | torch.device | None) -> str:
    """The normalised spelling of a device option (``'CUDA:1 '`` -> ``'cuda:1'``); DeviceError when malformed.

    Only the form is checked here (a config may be made on one machine and run on another);
    :func:`resolve_device` checks that the device exists."""
    if spec is None:
        return "auto"
    text = str(spec).strip().lower()
    if text == "cuda:":
        text = "cuda"
    if not _SPEC.match(text):
        raise DeviceError(f"unknown device '{spec}': use {DEVICE_HELP}")
    return text


def cuda_device_count() -> int:
    """CUDA devices this process can use (0 without a CUDA build, driver or visible device)."""
    try:
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - a broken driver counts as no CUDA
        return 0


def _why_no_cuda() -> str:
    if torch.version.cuda is None:
        return f"this torch build ({torch.__version__}) has no CUDA support"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return "no CUDA device is visible" + (f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else
                                          " (no GPU or no driver)")


def resolve_device(spec: str | torch.device | None = "auto", *, slot: int | None = None) -> torch.device:
    """The torch device for a ``--device`` value on this machine.

    ``auto``: ``cuda:K`` when CUDA is available, else ``cpu``. ``cuda``: ``cuda:K``, an error without CUDA.
    ``cuda:N``: that device, an error when it does not exist. ``K`` is ``slot % device_count`` (the
    worker's index on a multi-GPU machine, so local workers spread over the GPUs; see
    :func:`dask_worker_slot`), else 0.
    """
    if isinstance(spec, torch.device):
        spec = str(spec)
    text = check_device_spec(spec)
    if text == "cpu":
        return torch.device("cpu")
    n = cuda_device_count()
    if n == 0:
        if text == "auto":
            return torch.device("cpu")
        raise DeviceError(f"--device {text}: CUDA is not available on this machine: {_why_no_cuda()}; "
                          "use --device cpu (or auto)")
    if ":" in text:
        index = int(text.split(":", 1)[1])
        if index >= n:
            raise DeviceError(f"--device {text}: this machine has {n} CUDA device(s) (cuda:0"
                              + (f" .. cuda:{n - 1})" if n > 1 else ")"))
        return torch.device("cuda", index)
    return torch.device("cuda", (slot % n) if slot is not None else 0)


def available_cpus() -> int:
    """CPUs this process may run on (affinity-aware; falls back to ``os.cpu_count()``)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cpu_name() -> str:
    """CPU model string from /proc/cpuinfo, else from :mod:`platform`."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(dev: torch.device | str) -> str:
    """The GPU's name for a CUDA device, the CPU model for the CPU."""
    dev = torch.device(dev)
    if dev.type == "cuda":
        try:
            return torch.cuda.get_device_name(dev)
        except Exception:  # noqa: BLE001
            return "unknown CUDA device"
    return cpu_name()


def _bf16_native(dev: torch.device) -> bool:
    """bf16 tensor cores: compute capability 8.0 (Ampere) or newer; older GPUs only emulate bf16 (slowly)."""
    try:
        return torch.cuda.get_device_capability(dev)[0] >= 8
    except Exception:  # noqa: BLE001
        return False


def amp_dtype(dev: torch.device | str, enabled: bool | None = None) -> torch.dtype | None:
    """The autocast dtype on ``dev``: None on the CPU (never mixed precision there) or when disabled;
    on CUDA bf16 when the GPU supports it natively (compute capability 8.0+), else fp16."""
    dev = torch.device(dev)
    if dev.type != "cuda" or enabled is False:
        return None
    return torch.bfloat16 if _bf16_native(dev) else torch.float16


def autocast(dev: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` on ``dev`` with ``dtype``; a no-op context when ``dtype`` is None."""
    return torch.autocast(device_type=dev.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def grad_scaler(dtype: torch.dtype | None):
    """A CUDA ``GradScaler`` for fp16 autocast (bf16 and fp32 need none); else None."""
    return torch.amp.GradScaler("cuda") if dtype == torch.float16 else None


def describe_device(dev: torch.device | str, amp: bool | None = None) -> DeviceInfo:
    """:class:`DeviceInfo` of ``dev`` (``amp`` as in :func:`amp_dtype`)."""
    dev = torch.device(dev)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    dtype = amp_dtype(dev, amp)
    info = DeviceInfo(device=str(dev), name=device_name(dev), amp=str(dtype).replace("torch.", "") if dtype else None)
    if dev.type == "cuda":
        try:
            props = torch.cuda.get_device_properties(dev)
            info.memory_gib = round(props.total_memory / 2**30, 2)
            info.capability = f"{props.major}.{props.minor}"
        except Exception:  # noqa: BLE001
            pass
    return info


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); the CPU for an empty model."""
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


@contextlib.contextmanager
def on_device(model: nn.Module, dev: torch.device | str | None) -> Iterator[torch.device]:
    """Run a block with ``model`` on ``dev`` (None = where it is) and move it back afterwards.

    ``nn.Module.to`` moves parameters, buffers and gradients; nothing is copied when the model is
    already there (the CPU path does no work)."""
    home = model_device(model)
    target = torch.device(dev) if dev is not None else home
    moved = target != home
    if moved:
        model.to(target)
    try:
        yield target
    finally:
        if moved:
            model.to(home)


def reset_peak_memory(dev: torch.device | str) -> None:
    """Start a new peak-memory window on a CUDA device (no-op on the CPU)."""
    dev = torch.device(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)


def peak_memory_gib(dev: torch.device | str) -> float | None:
    """Peak allocated CUDA memory since the last :func:`reset_peak_memory`, in GiB (None on the CPU)."""
    dev = torch.device(dev)
    if dev.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(dev) / 2**30, 3)


def dask_worker_slot() -> int | None:
    """The integer name of the Dask worker running this code (a local cluster names them 0..N-1), else None.

    With :func:`resolve_device`'s ``slot`` it gives each worker of a local cluster on a multi-GPU machine
    its own GPU; workers started by hand (one per GPU with ``CUDA_VISIBLE_DEVICES``) see one device."""
    try:
        from distributed import get_worker
    except ImportError:
        return None
    try:
        name = get_worker().name
    except ValueError:  # not inside a worker
        return None
    try:
        return int(name)
    except (TypeError, ValueError):
        return None


def loader_workers(requested: int) -> int:
    """DataLoader worker processes that can really be started here: 0 inside a daemonic process (a Dask or
    multiprocessing worker may not have children), else ``requested``."""
    import multiprocessing

    if requested > 0 and multiprocessing.current_process().daemon:
        return 0
    return requested
