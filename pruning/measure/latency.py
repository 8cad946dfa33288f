"""Latency benchmarks for original vs pruned models (paper Table 3 style).

* CPU: onnxruntime ``CPUExecutionProvider`` on exported ONNX files (paper: batch 8; we add 1).
  Original and pruned sessions are timed in the same process with interleaved runs, so the
  speedup is a ratio from one run and slow drift (thermal, noisy neighbours) hits both alike.
* GPU: PyTorch with ``torch.compile`` (eager kept as reference), CUDA-event timing and peak
  memory, batch 256.  Without CUDA a :class:`Skipped` record is returned, never an exception.

Plain Python: no Prefect imports (tasks/flows wrap these functions).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
from pydantic import BaseModel, Field

from pruning.device import available_cpus, cpu_name  # noqa: F401  (re-exported for callers)
from pruning.measure.export import (
    ExporterChoice,
    ExportResult,
    export_onnx,
)

# --------------------------------------------------------------------------- records


class Skipped(BaseModel):
    """A benchmark that was not run, and why."""

    skipped: Literal[True] = True
    reason: str


class LatencyStats(BaseModel):
    """Timing summary of one (model, backend, batch size) benchmark; times in milliseconds."""

    backend: str = Field(description="'onnxruntime-cpu' or 'torch-cuda' / 'torch-cpu'")
    mode: str = Field(description="'ort' | 'compile' | 'eager' (eager also when compile failed)")
    batch_size: int
    threads: int | None = Field(None, description="ORT intra-op threads (CPU) / torch threads")
    warmup: int
    runs: int
    median_ms: float
    p90_ms: float
    mean_ms: float
    std_ms: float
    min_ms: float
    max_ms: float
    throughput_ips: float = Field(description="images/s at the median latency")
    device: str = Field(description="CPU model or GPU name")
    peak_memory_mb: float | None = Field(None, description="torch.cuda.max_memory_allocated / 2**20 (GPU only)")
    note: str | None = Field(None, description="e.g. why torch.compile was not used")
    reference: LatencyStats | None = Field(None, description="eager numbers when mode == 'compile'")


def latency_stats(times_ms: Sequence[float], **kw: Any) -> LatencyStats:
    a = np.asarray(times_ms, dtype=np.float64)
    med = float(np.median(a))
    return LatencyStats(
        runs=len(a),
        median_ms=med,
        p90_ms=float(np.percentile(a, 90)),
        mean_ms=float(a.mean()),
        std_ms=float(a.std(ddof=1)) if len(a) > 1 else 0.0,
        min_ms=float(a.min()),
        max_ms=float(a.max()),
        throughput_ips=kw["batch_size"] / med * 1e3 if med > 0 else float("inf"),
        **kw,
    )


# --------------------------------------------------------------------------- device info


def gpu_name(device: str | int | torch.device = 0) -> str | None:
    """Name of a CUDA device (device 0 by default; ``'cuda'`` = the current one), or ``None`` without CUDA."""
    if not torch.cuda.is_available():
        return None
    try:
        if str(device) == "cuda":
            device = torch.cuda.current_device()
        return torch.cuda.get_device_name(device)
    except Exception:  # noqa: BLE001
        return None


# --------------------------------------------------------------------------- ORT CPU


def make_ort_session(onnx_path: str | os.PathLike, threads: int | None = None):
    """onnxruntime CPU session with all graph optimisations and ``threads`` intra-op threads."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = int(threads or available_cpus())
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    return ort.InferenceSession(str(onnx_path), sess_options=so, providers=["CPUExecutionProvider"])


def ort_feed(sess, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    inp = sess.get_inputs()[0]
    dims = list(inp.shape)
    rest = dims[1:]
    if not all(isinstance(d, int) and d > 0 for d in rest):
        raise ValueError(f"{inp.name}: non-batch dims must be static, got {dims}")
    if isinstance(dims[0], int) and dims[0] != batch_size:
        raise ValueError(f"{inp.name} has a fixed batch of {dims[0]}; cannot run batch {batch_size}")
    x = np.random.default_rng(seed).standard_normal((batch_size, *rest)).astype(np.float32)
    return {inp.name: x}


def _time_ort(sess, feed) -> float:
    t0 = time.perf_counter()
    sess.run(None, feed)
    return (time.perf_counter() - t0) * 1e3


def benchmark_ort_cpu(
    onnx_path: str | os.PathLike,
    batch_size: int,
    warmup: int = 5,
    runs: int = 30,
    threads: int | None = None,
) -> LatencyStats:
    """Latency of one ONNX model on onnxruntime CPU at ``batch_size`` (wall clock per ``run``)."""
    threads = int(threads or available_cpus())
    sess = make_ort_session(onnx_path, threads)
    feed = ort_feed(sess, batch_size)
    for _ in range(warmup):
        sess.run(None, feed)
    times = [_time_ort(sess, feed) for _ in range(runs)]
    return latency_stats(times, backend="onnxruntime-cpu", mode="ort", batch_size=batch_size, threads=threads,
                  warmup=warmup, device=cpu_name())


class CpuSpeedup(BaseModel):
    """Original vs pruned ORT CPU latency at one batch size, measured side by side."""

    batch_size: int
    original: LatencyStats
    pruned: LatencyStats
    speedup: float = Field(description="original.median_ms / pruned.median_ms")
    speedup_p90: float = Field(description="original.p90_ms / pruned.p90_ms")


class CpuComparison(BaseModel):
    """Result of :func:`compare_cpu` / :func:`compare_cpu_onnx`."""

    threads: int
    device: str
    interleaved: bool
    results: list[CpuSpeedup]
    exports: dict[str, ExportResult] = Field(default_factory=dict)
    seconds: float = Field(0.0, description="wall time of the timing (plus export, for compare_cpu)")

    def by_batch(self, batch_size: int) -> CpuSpeedup:
        """The comparison at ``batch_size``."""
        for r in self.results:
            if r.batch_size == batch_size:
                return r
        raise KeyError(batch_size)


def compare_cpu_onnx(
    original_onnx: str | os.PathLike,
    pruned_onnx: str | os.PathLike,
    batch_sizes: Sequence[int] = (8, 1),
    warmup: int = 5,
    runs: int = 30,
    threads: int | None = None,
    interleave: bool = True,
) -> CpuComparison:
    """Time two ONNX files in one process; with ``interleave`` runs alternate A,B,B,A,..."""
    t_start = time.perf_counter()
    threads = int(threads or available_cpus())
    device = cpu_name()
    sa = make_ort_session(original_onnx, threads)
    sb = make_ort_session(pruned_onnx, threads)
    results = []
    for bs in batch_sizes:
        fa, fb = ort_feed(sa, bs), ort_feed(sb, bs)
        for _ in range(warmup):
            sa.run(None, fa)
            sb.run(None, fb)
        ta: list[float] = []
        tb: list[float] = []
        if interleave:
            for i in range(runs):
                if i % 2 == 0:
                    ta.append(_time_ort(sa, fa))
                    tb.append(_time_ort(sb, fb))
                else:
                    tb.append(_time_ort(sb, fb))
                    ta.append(_time_ort(sa, fa))
        else:
            ta = [_time_ort(sa, fa) for _ in range(runs)]
            tb = [_time_ort(sb, fb) for _ in range(runs)]
        kw = dict(backend="onnxruntime-cpu", mode="ort", batch_size=bs, threads=threads, warmup=warmup, device=device)
        a, b = latency_stats(ta, **kw), latency_stats(tb, **kw)
        results.append(CpuSpeedup(batch_size=bs, original=a, pruned=b, speedup=a.median_ms / b.median_ms,
                                  speedup_p90=a.p90_ms / b.p90_ms))
    return CpuComparison(threads=threads, device=device, interleaved=interleave, results=results,
                         seconds=time.perf_counter() - t_start)


def compare_cpu(
    original_model: torch.nn.Module,
    pruned_model: torch.nn.Module,
    input_size: tuple[int, int, int],
    batch_sizes: Sequence[int] = (8, 1),
    warmup: int = 5,
    runs: int = 30,
    threads: int | None = None,
    opset: int = 17,
    exporter: ExporterChoice = "auto",
    work_dir: str | os.PathLike | None = None,
    interleave: bool = True,
) -> CpuComparison:
    """Export both models to ONNX (into ``work_dir`` or a temp dir) and run :func:`compare_cpu_onnx`."""
    t_start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if work_dir is None:
            work_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="latency_"))
        work = Path(work_dir)
        ea = export_onnx(original_model, input_size, work / "original.onnx", opset=opset, exporter=exporter)
        eb = export_onnx(pruned_model, input_size, work / "pruned.onnx", opset=opset, exporter=exporter)
        cmp = compare_cpu_onnx(ea.path, eb.path, batch_sizes, warmup, runs, threads, interleave)
    cmp.exports = {"original": ea, "pruned": eb}
    cmp.seconds = time.perf_counter() - t_start
    return cmp


# --------------------------------------------------------------------------- torch GPU


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_torch(fn, x, warmup: int, runs: int, device: torch.device) -> tuple[list[float], float | None]:
    """Per-iteration latencies (ms) and peak CUDA memory (MiB) of ``fn(x)`` under no_grad."""
    with torch.no_grad():
        for _ in range(warmup):
            fn(x)
        _sync(device)
        peak = None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            starts = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
            ends = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
            for s, e in zip(starts, ends):
                s.record()
                fn(x)
                e.record()
            torch.cuda.synchronize(device)
            times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
            peak = torch.cuda.max_memory_allocated(device) / 2**20
        else:
            times = []
            for _ in range(runs):
                t0 = time.perf_counter()
                fn(x)
                times.append((time.perf_counter() - t0) * 1e3)
    return times, peak


def _one_line(exc: BaseException, limit: int = 300) -> str:
    line = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
    text = f"{type(exc).__name__}: {line}" if line else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _benchmark_torch(
    model: torch.nn.Module,
    input_size: tuple[int, int, int],
    batch_size: int,
    compile: bool,
    amp: bool,
    warmup: int,
    runs: int,
    device: str | torch.device,
) -> LatencyStats:
    """Eager and (optionally) compiled timing on ``device``; compile failure falls back to eager."""
    device = torch.device(device)
    is_cuda = device.type == "cuda"
    name = (torch.cuda.get_device_name(device) if is_cuda else cpu_name())
    m = copy.deepcopy(model).eval().to(device)
    x = torch.randn(batch_size, *input_size, device=device)
    amp_dtype = torch.float16 if is_cuda else torch.bfloat16
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp else contextlib.nullcontext

    def eager(inp):
        with autocast():
            return m(inp)

    kw = dict(backend=f"torch-{device.type}", batch_size=batch_size, warmup=warmup, device=name,
              threads=None if is_cuda else torch.get_num_threads())
    compiled = None
    try:
        t_eager, peak_eager = _time_torch(eager, x, warmup, runs, device)
        eager_stats = latency_stats(t_eager, mode="eager", peak_memory_mb=peak_eager,
                             note="amp fp16" if amp and is_cuda else ("amp bf16" if amp else None), **kw)
        if not compile:
            return eager_stats
        try:
            compiled = torch.compile(m)

            def comp(inp):
                with autocast():
                    return compiled(inp)

            # compilation is lazy: the first warm-up call compiles (and may fail)
            t_comp, peak_comp = _time_torch(comp, x, max(warmup, 1), runs, device)
        except Exception as exc:  # noqa: BLE001 - any compile/runtime failure -> eager numbers
            reason = _one_line(exc)
            return eager_stats.model_copy(update={"note": f"torch.compile failed ({reason}); eager numbers"})
        return latency_stats(t_comp, mode="compile", peak_memory_mb=peak_comp, reference=eager_stats,
                      note=eager_stats.note, **kw)
    finally:
        m = x = compiled = None  # release the model copies before emptying the cache
        gc.collect()
        if is_cuda:
            torch.cuda.empty_cache()
        with contextlib.suppress(Exception):
            torch._dynamo.reset()


def benchmark_torch_gpu(
    model: torch.nn.Module,
    input_size: tuple[int, int, int],
    batch_size: int = 256,
    compile: bool = True,
    amp: bool = False,
    warmup: int = 10,
    runs: int = 50,
    device: str = "cuda",
) -> LatencyStats | Skipped:
    """GPU latency (CUDA events) and peak memory at ``batch_size``; never raises.

    Returns compiled numbers (``mode='compile'``, eager in ``reference``) or eager numbers
    with a ``note`` when ``torch.compile`` fails; :class:`Skipped` without CUDA or on error
    (e.g. out of memory).
    """
    if not torch.cuda.is_available():
        return Skipped(
            reason=f"CUDA not available: torch {torch.__version__} (CUDA build {torch.version.cuda}), "
            f"device count {torch.cuda.device_count()}"
        )
    try:
        return _benchmark_torch(model, input_size, batch_size, compile, amp, warmup, runs, device)
    except Exception as exc:  # noqa: BLE001
        return Skipped(reason=f"GPU benchmark failed: {_one_line(exc)}")
