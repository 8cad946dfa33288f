"""The paper's Table 3: original vs pruned model, parameters, size, MACs, GPU and CPU latency side by side.

:func:`latency_report` exports both models to ONNX, times them with onnxruntime on the CPU (interleaved,
:mod:`pruning.measure.latency`) and with ``torch.compile`` on the GPU when there is one, and returns a
:class:`LatencyReport` (DataFrame, CSV, markdown). :func:`run_latency_benchmark` also writes the files.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import os
import tempfile
import time
from pathlib import Path

import torch
from pydantic import BaseModel, Field

from pruning.measure.export import ExporterChoice, export_onnx, model_size_mb, params_millions
from pruning.measure.latency import (
    CpuComparison,
    LatencyStats,
    Skipped,
    benchmark_torch_gpu,
    compare_cpu_onnx,
    gpu_name,
)
from pruning.space import count_macs_params


class LatencyConfig(BaseModel):
    """Settings for :func:`latency_report` / :func:`run_latency_benchmark`."""

    cpu_batch_sizes: tuple[int, ...] = Field(
        (8, 1), description="Paper Table 3 reports CPU latency at batch 8; batch 1 is the online/edge case.")
    warmup: int = Field(5, ge=0, description="ORT warm-up runs per model and batch (thread pool, allocator, caches).")
    runs: int = Field(30, ge=1, description="Timed ORT runs per model and batch; >= 30 keeps median/p90 stable.")
    threads: int | None = Field(
        None, ge=1, description="ORT intra-op threads; None = all CPUs available to this process.")
    interleave: bool = Field(
        True, description="Alternate original/pruned runs (ABBA) so drift affects both; speedup from one run.")
    opset: int = Field(17, description="ONNX opset for the TorchScript exporter (dynamo exporter emits >= 18).")
    exporter: ExporterChoice = Field(
        "auto", description="'auto' = TorchScript exporter, dynamo exporter as fallback.")
    atol: float = Field(1e-3, description="Max |torch - onnxruntime| accepted at export.")
    rtol: float = Field(1e-4, description="Extra tolerance relative to the output scale (random-weight logits can be large).")
    run_gpu: bool = Field(True, description="Run the GPU benchmark when CUDA is present (skipped otherwise).")
    gpu_device: str = Field("cuda", description="CUDA device of the GPU benchmark ('cuda' = the current one, 'cuda:N').")
    gpu_batch_size: int = Field(256, ge=1, description="Paper Table 3 reports GPU latency at batch 256.")
    gpu_warmup: int = Field(10, ge=0, description="GPU warm-up iterations (compilation happens in the first).")
    gpu_runs: int = Field(50, ge=1, description="Timed GPU iterations (CUDA events).")
    amp: bool = Field(False, description="fp16 autocast on GPU; off = fp32 like the parameter/size columns.")
    compile: bool = Field(True, description="torch.compile for GPU timing (eager kept as reference / fallback).")


class CpuCell(BaseModel):
    """CPU latency of one model at one batch size, with its speedup vs the original."""

    batch_size: int
    median_ms: float
    p90_ms: float
    speedup: float


class LatencyRow(BaseModel):
    """One Table-3 row (original or pruned)."""

    model: str
    params_m: float
    size_mb: float
    macs_g: float
    peak_gpu_mem_mb: float | None = None
    gpu_batch_size: int | None = None
    gpu_latency_ms: float | None = None
    gpu_speedup: float | None = None
    gpu_mode: str | None = Field(None, description="'compile' | 'eager' | 'skipped'")
    cpu: list[CpuCell] = Field(default_factory=list)
    cpu_threads: int
    cpu_device: str
    gpu_device: str | None = None


class LatencyReport(BaseModel):
    """Original vs pruned latency report; see :meth:`to_dataframe` / :meth:`to_markdown`."""

    rows: list[LatencyRow]
    input_size: tuple[int, int, int]
    config: LatencyConfig
    cpu: CpuComparison
    gpu: dict[str, LatencyStats | Skipped] = Field(default_factory=dict)
    exporter: str
    export_seconds: dict[str, float] = Field(default_factory=dict)
    seconds: float = Field(description="total wall time of the report")
    created_at: str = Field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat())

    def to_dataframe(self):
        """Flat pandas DataFrame, one row per model."""
        import pandas as pd

        recs = []
        for r in self.rows:
            d = r.model_dump(exclude={"cpu"})
            for c in r.cpu:
                d[f"cpu_bs{c.batch_size}_median_ms"] = c.median_ms
                d[f"cpu_bs{c.batch_size}_p90_ms"] = c.p90_ms
                d[f"cpu_bs{c.batch_size}_speedup"] = c.speedup
            recs.append(d)
        order = ["model", "params_m", "size_mb", "macs_g", "peak_gpu_mem_mb", "gpu_batch_size",
                 "gpu_latency_ms", "gpu_speedup", "gpu_mode"]
        cpu_cols = [k for k in recs[0] if k.startswith("cpu_bs")] if recs else []
        tail = ["cpu_threads", "cpu_device", "gpu_device"]
        return pd.DataFrame(recs, columns=order + cpu_cols + tail)

    def display_rows(self, digits: int = 3) -> list[dict]:
        """Rows for a UI table: CPU columns first, columns without any value dropped, numbers rounded,
        readable column names (``CPU bs8 median (ms)``)."""
        frame = self.to_dataframe()
        cpu = [c for c in frame.columns if c.startswith("cpu_bs")]
        rest = [c for c in frame.columns if c not in cpu and c not in ("model", "cpu_threads", "cpu_device")]
        frame = frame[["model", *cpu, *rest, "cpu_threads", "cpu_device"]].dropna(axis=1, how="all").round(digits)
        frame = frame.rename(columns=_display_name)
        return frame.astype(object).where(frame.notna(), None).to_dict("records")

    def to_csv(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_dataframe` as CSV; returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.to_dataframe().to_csv(path, index=False)
        return path

    def to_markdown(self, digits: int = 2) -> str:
        """GitHub markdown table in the paper's layout (written by hand; no tabulate)."""
        gpu_ran = any(r.gpu_latency_ms is not None for r in self.rows)  # else the GPU columns are all n/a
        heads = ["Model", "Params (M)", "Size (MB)", "MACs (G)"]
        if gpu_ran:
            heads += ["Peak GPU mem (MB)", f"GPU lat bs{self.config.gpu_batch_size} (ms)", "GPU speedup"]
        for bs in self.config.cpu_batch_sizes:
            heads += [f"CPU bs{bs} median (ms)", f"CPU bs{bs} p90 (ms)", f"CPU bs{bs} speedup"]

        def f(v, suffix=""):
            return "n/a" if v is None else f"{v:.{digits}f}{suffix}"

        lines = ["| " + " | ".join(heads) + " |", "|" + "|".join(["---"] + ["---:"] * (len(heads) - 1)) + "|"]
        for r in self.rows:
            cells = [r.model, f(r.params_m), f(r.size_mb), f"{r.macs_g:.3f}"]
            if gpu_ran:
                cells += [f(r.peak_gpu_mem_mb), f(r.gpu_latency_ms), f(r.gpu_speedup, "x")]
            by_bs = {c.batch_size: c for c in r.cpu}
            for bs in self.config.cpu_batch_sizes:
                c = by_bs.get(bs)
                cells += [f(c and c.median_ms), f(c and c.p90_ms), f(c and c.speedup, "x")]
            lines.append("| " + " | ".join(cells) + " |")
        r0 = self.rows[0]
        gpu = self.gpu.get(r0.model)
        gpu_txt = (f"GPU: {r0.gpu_device} ({r0.gpu_mode})" if r0.gpu_device and not isinstance(gpu, Skipped)
                   else f"GPU: n/a ({gpu.reason})" if isinstance(gpu, Skipped) else "GPU: not run")
        lines += ["", f"CPU: {r0.cpu_device}, onnxruntime {r0.cpu_threads} threads, "
                  f"{self.config.runs} runs{' interleaved' if self.cpu.interleaved else ''}, exporter {self.exporter}. "
                  f"{gpu_txt}. Input {tuple(self.input_size)}."]
        return "\n".join(lines) + "\n"


def _display_name(col: str) -> str:
    """``cpu_bs8_median_ms`` -> ``CPU bs8 median (ms)``; ``params_m`` -> ``params (M)``."""
    names = {"params_m": "params (M)", "size_mb": "size (MB)", "macs_g": "MACs (G)", "cpu_threads": "CPU threads",
             "cpu_device": "CPU", "gpu_device": "GPU", "peak_gpu_mem_mb": "peak GPU memory (MB)",
             "gpu_batch_size": "GPU batch", "gpu_latency_ms": "GPU latency (ms)", "gpu_speedup": "GPU speedup",
             "gpu_mode": "GPU mode"}
    if col.startswith("cpu_bs"):
        bs, what = col[len("cpu_bs"):].split("_", 1)
        return f"CPU bs{bs} " + {"median_ms": "median (ms)", "p90_ms": "p90 (ms)", "speedup": "speedup"}[what]
    return names.get(col, col)


def _macs_g(model: torch.nn.Module, input_size: tuple[int, int, int]) -> float:
    """MACs (G) at batch 1, counted like everywhere else (:func:`pruning.space.count_macs_params`)."""
    dev = next(iter(model.parameters()), torch.empty(0)).device
    return count_macs_params(model, torch.randn(1, *input_size, device=dev))[0] / 1e9


def latency_report(
    original: torch.nn.Module,
    pruned: torch.nn.Module,
    input_size: tuple[int, int, int],
    config: LatencyConfig | None = None,
    work_dir: str | os.PathLike | None = None,
    names: tuple[str, str] = ("original", "pruned"),
) -> LatencyReport:
    """Measure params/size/MACs, ORT CPU latency (side by side) and GPU latency for both models."""
    cfg = config or LatencyConfig()
    input_size = tuple(int(s) for s in input_size)
    t_start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if work_dir is None:
            work_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="latency_"))
        work = Path(work_dir)
        work.mkdir(parents=True, exist_ok=True)
        exp = {
            nm: export_onnx(m, input_size, work / f"{nm}.onnx", opset=cfg.opset, atol=cfg.atol, rtol=cfg.rtol,
                            exporter=cfg.exporter)
            for nm, m in zip(names, (original, pruned))
        }
        cpu = compare_cpu_onnx(exp[names[0]].path, exp[names[1]].path, cfg.cpu_batch_sizes, cfg.warmup,
                               cfg.runs, cfg.threads, cfg.interleave)
        cpu.exports = exp

    gpu: dict[str, LatencyStats | Skipped] = {}
    for nm, m in zip(names, (original, pruned)):
        if not cfg.run_gpu:
            gpu[nm] = Skipped(reason="GPU benchmark disabled (config.run_gpu=False)")
        else:
            gpu[nm] = benchmark_torch_gpu(m, input_size, cfg.gpu_batch_size, cfg.compile, cfg.amp,
                                          cfg.gpu_warmup, cfg.gpu_runs, device=cfg.gpu_device)
    g0 = gpu[names[0]]
    rows = []
    for i, (nm, m) in enumerate(zip(names, (original, pruned))):
        g = gpu[nm]
        if isinstance(g, LatencyStats) and isinstance(g0, LatencyStats):
            g_lat, g_mem, g_mode = g.median_ms, g.peak_memory_mb, g.mode
            g_speed = g0.median_ms / g.median_ms
        else:
            g_lat = g_mem = g_speed = None
            g_mode = "skipped"
        cells = []
        for c in cpu.results:
            st = c.original if i == 0 else c.pruned
            cells.append(CpuCell(batch_size=c.batch_size, median_ms=st.median_ms, p90_ms=st.p90_ms,
                                 speedup=1.0 if i == 0 else c.speedup))
        rows.append(LatencyRow(
            model=nm, params_m=params_millions(m), size_mb=model_size_mb(m), macs_g=_macs_g(m, input_size),
            peak_gpu_mem_mb=g_mem, gpu_batch_size=cfg.gpu_batch_size, gpu_latency_ms=g_lat, gpu_speedup=g_speed,
            gpu_mode=g_mode, cpu=cells, cpu_threads=cpu.threads, cpu_device=cpu.device, gpu_device=gpu_name(cfg.gpu_device),
        ))
    return LatencyReport(
        rows=rows, input_size=input_size, config=cfg, cpu=cpu, gpu=gpu,
        exporter="/".join(sorted({e.exporter for e in exp.values()})),
        export_seconds={nm: e.seconds for nm, e in exp.items()},
        seconds=time.perf_counter() - t_start,
    )


def run_latency_benchmark(
    original: torch.nn.Module,
    pruned: torch.nn.Module,
    input_size: tuple[int, int, int],
    out_dir: str | os.PathLike,
    config: LatencyConfig | None = None,
) -> LatencyReport:
    """:func:`latency_report` writing ``original.onnx``, ``pruned.onnx``, ``latency.csv``,
    ``latency.md`` and ``latency.json`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = latency_report(original, pruned, input_size, config, work_dir=out)
    report.to_csv(out / "latency.csv")
    (out / "latency.md").write_text(report.to_markdown(), encoding="utf-8")
    (out / "latency.json").write_text(report.model_dump_json(indent=2), encoding="utf-8")
    return report
