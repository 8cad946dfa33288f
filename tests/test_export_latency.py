"""Tests for pruning.measure: export (ONNX + parity), latency (benchmarks) and latency_table (report).

Few runs everywhere; no speed assertions (shared 2-core CPU).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import timm
import torch

from pruning.measure import export as export_mod
from pruning.measure.export import ExportError, describe_export_failure, export_onnx, model_size_mb, params_millions
from pruning.measure.latency import (
    LatencyStats,
    Skipped,
    _benchmark_torch,
    benchmark_ort_cpu,
    benchmark_torch_gpu,
    compare_cpu_onnx,
)
from pruning.measure.latency_table import LatencyConfig, latency_report, run_latency_benchmark

SIZE = (3, 32, 32)


class _SvdNet(torch.nn.Module):
    """Uses torch.linalg.svdvals: unsupported by both the TorchScript and the dynamo exporter."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return torch.linalg.svdvals(self.conv(x)[:, 0])


class _Tiny(torch.nn.Module):
    def __init__(self, width: int = 8):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, width, 3, padding=1)
        self.fc = torch.nn.Linear(width, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


@pytest.fixture(scope="module")
def resnet18_onnx(tmp_path_factory):
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    path = tmp_path_factory.mktemp("onnx") / "resnet18.onnx"
    return model, export_onnx(model, SIZE, path)


def _ort_run(path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def test_export_resnet18_parity_and_dynamic_batch(resnet18_onnx):
    model, res = resnet18_onnx
    assert res.exporter in ("torchscript", "dynamo")
    assert res.max_abs_diff < 1e-4
    assert res.file_size_bytes > 1e6 and res.seconds > 0
    assert 3 in res.parity_batch_sizes
    assert model.training  # export restores the training flag
    x = np.random.default_rng(1).standard_normal((3, *SIZE)).astype(np.float32)
    out = _ort_run(res.path, x)
    assert out.shape == (3, 10)
    model.eval()
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    model.train()
    assert np.abs(out - ref).max() < 1e-4


def test_export_tiny_vit(tmp_path):
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, patch_size=8)
    res = export_onnx(model, SIZE, tmp_path / "deit.onnx")
    assert res.max_abs_diff < 1e-3
    assert _ort_run(res.path, np.zeros((3, *SIZE), np.float32)).shape == (3, 10)


def test_fallback_to_dynamo_is_recorded(tmp_path, monkeypatch):
    real = export_mod._export_once

    def fake(model, example, path, exporter, opset, dynamic_batch):
        if exporter == "torchscript":
            raise RuntimeError("Exporting the operator 'aten::fake_op' to ONNX opset version 17 is not supported")
        return real(model, example, path, exporter, opset, dynamic_batch)

    monkeypatch.setattr(export_mod, "_export_once", fake)
    res = export_onnx(_Tiny(), SIZE, tmp_path / "tiny.onnx")
    assert res.exporter == "dynamo"
    assert [a.exporter for a in res.attempts] == ["torchscript", "dynamo"]
    assert "aten::fake_op" in res.attempts[0].error
    assert res.max_abs_diff < 1e-4
    assert _ort_run(res.path, np.zeros((3, *SIZE), np.float32)).shape == (3, 10)


def test_unexportable_op_raises_one_line_error(tmp_path):
    with pytest.raises(ExportError) as ei:
        export_onnx(_SvdNet(), (3, 8, 8), tmp_path / "bad.onnx")
    msg = str(ei.value)
    assert "\n" not in msg
    assert "linalg_svd" in msg and "_SvdNet" in msg
    assert "torchscript" in msg and "dynamo" in msg


def test_describe_failure_without_op_name():
    try:
        try:
            raise ValueError("inner reason\nmore detail")
        except ValueError as inner:
            raise RuntimeError("\x1b[96mouter\x1b[0m") from inner
    except RuntimeError as exc:
        assert describe_export_failure(exc) == "ValueError: inner reason"


def test_parity_failure_raises(tmp_path, monkeypatch):
    monkeypatch.setattr(export_mod, "_parity", lambda *a, **k: (0.5, 1.0))
    with pytest.raises(ExportError, match="max_abs_diff"):
        export_onnx(_Tiny(), SIZE, tmp_path / "tiny.onnx")


def test_size_helpers():
    lin = torch.nn.Linear(10, 10)
    assert params_millions(lin) == pytest.approx(110 / 1e6)
    assert model_size_mb(lin) == pytest.approx(110 * 4 / 2**20)
    assert model_size_mb(lin.half()) == pytest.approx(110 * 4 / 2**20)  # counted as fp32


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the no-CUDA path")
def test_gpu_benchmark_skipped_without_cuda():
    res = benchmark_torch_gpu(_Tiny(), SIZE, batch_size=4, warmup=1, runs=2)
    assert isinstance(res, Skipped)
    assert res.reason.startswith("CUDA not available")


def test_compile_failure_falls_back_to_eager(monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("backend exploded\nstack...")

    monkeypatch.setattr(torch, "compile", boom)
    st = _benchmark_torch(_Tiny(), SIZE, 2, compile=True, amp=False, warmup=1, runs=3, device="cpu")
    assert isinstance(st, LatencyStats)
    assert st.mode == "eager" and "torch.compile failed" in st.note and "backend exploded" in st.note
    assert st.median_ms > 0 and st.runs == 3


def test_cpu_benchmark_stats(resnet18_onnx):
    _, res = resnet18_onnx
    for bs in (8, 1):
        st = benchmark_ort_cpu(res.path, bs, warmup=1, runs=3, threads=1)
        assert st.batch_size == bs and st.threads == 1 and st.runs == 3
        assert st.median_ms > 0 and st.p90_ms >= st.median_ms and st.std_ms >= 0


def test_compare_cpu_onnx_side_by_side(resnet18_onnx):
    _, res = resnet18_onnx
    cmp = compare_cpu_onnx(res.path, res.path, batch_sizes=(2,), warmup=1, runs=3, threads=1)
    r = cmp.by_batch(2)
    assert r.original.runs == r.pruned.runs == 3
    assert r.speedup == pytest.approx(r.original.median_ms / r.pruned.median_ms)


def test_report_and_files(tmp_path):
    torch.manual_seed(0)
    original, pruned = _Tiny(16), _Tiny(8)
    cfg = LatencyConfig(warmup=1, runs=3, threads=1, gpu_warmup=1, gpu_runs=2, gpu_batch_size=4)
    rep = run_latency_benchmark(original, pruned, SIZE, tmp_path, cfg)
    df = rep.to_dataframe()
    assert list(df["model"]) == ["original", "pruned"]
    expected = {"model", "params_m", "size_mb", "macs_g", "peak_gpu_mem_mb", "gpu_latency_ms", "gpu_speedup",
                "cpu_bs8_median_ms", "cpu_bs8_p90_ms", "cpu_bs8_speedup", "cpu_bs1_median_ms", "cpu_bs1_p90_ms",
                "cpu_bs1_speedup", "cpu_threads", "cpu_device", "gpu_device"}
    assert expected <= set(df.columns)
    assert df.loc[0, "cpu_bs8_speedup"] == 1.0
    assert df.loc[1, "params_m"] < df.loc[0, "params_m"] and df.loc[1, "macs_g"] < df.loc[0, "macs_g"]
    md = rep.to_markdown()
    header = md.splitlines()[0]
    assert header.startswith("| Model |") and "CPU bs8 median (ms)" in header
    assert md.splitlines()[1].startswith("|---")
    for name in ("original.onnx", "pruned.onnx", "latency.csv", "latency.md", "latency.json"):
        assert (tmp_path / name).exists()
    if not torch.cuda.is_available():
        assert df.loc[0, "gpu_mode"] == "skipped" and "n/a" in md
    rows = rep.display_rows()  # the UI table: CPU first, readable names, no all-empty columns
    assert [r["model"] for r in rows] == ["original", "pruned"]
    assert list(rows[0])[:2] == ["model", "CPU bs8 median (ms)"] and rows[0]["CPU bs8 speedup"] == 1.0
    if not torch.cuda.is_available():
        assert "GPU latency (ms)" not in rows[0]


def test_report_with_torch_pruning(tmp_path):
    """Real pruned timm model (torch-pruning) through latency_report."""
    tp = pytest.importorskip("torch_pruning")
    original = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    import copy

    pruned = copy.deepcopy(original)
    ex = torch.randn(1, *SIZE)
    tp.pruner.MetaPruner(pruned, ex, importance=tp.importance.MagnitudeImportance(), pruning_ratio=0.3,
                         global_pruning=True, round_to=8, ignored_layers=[pruned.fc]).step()
    rep = latency_report(original, pruned, SIZE, LatencyConfig(cpu_batch_sizes=(8,), warmup=1, runs=3, run_gpu=False),
                         work_dir=tmp_path)
    df = rep.to_dataframe()
    assert len(df) == 2 and df.loc[1, "macs_g"] < df.loc[0, "macs_g"]
    assert rep.cpu.exports["pruned"].max_abs_diff < 1e-3
