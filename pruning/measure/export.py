"""ONNX export with parity check, plus model size helpers.

Exporter choice (measured with torch 2.14.1 / onnx 1.23 / onnxruntime 1.32 on timm
resnet18/50, convnext_atto and deit_tiny): both the legacy TorchScript exporter
(``dynamo=False``) and the dynamo exporter (``dynamo=True``, onnxscript) export these
models correctly.  The TorchScript exporter is tried first under ``exporter="auto"``
because it honours the requested opset exactly (the dynamo exporter has no opset-17
implementations: it exports opset 18 and its down-conversion fails for ResNets) and
it is ~5-10x faster; the dynamo exporter is the fallback.  The exporter actually used
is recorded in :class:`ExportResult`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import time
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, Field

ExporterName = Literal["torchscript", "dynamo"]
ExporterChoice = Literal["auto", "torchscript", "dynamo"]

INPUT_NAME = "input"
OUTPUT_NAME = "output"


class ExportError(RuntimeError):
    """A model could not be exported to ONNX, or the export is not faithful (one-line message)."""


class ExportAttempt(BaseModel):
    """One exporter attempt and, when it failed, why."""

    exporter: ExporterName
    ok: bool
    seconds: float
    error: str | None = None


class ExportResult(BaseModel):
    """Outcome of :func:`export_onnx`."""

    path: str
    exporter: ExporterName = Field(description="exporter that produced the file")
    opset: int = Field(description="default-domain opset actually in the file")
    requested_opset: int
    dynamic_batch: bool
    max_abs_diff: float = Field(description="max |torch - onnxruntime| over the parity batches")
    parity_batch_sizes: list[int]
    file_size_bytes: int = Field(description="ONNX file plus any external-data file")
    seconds: float = Field(description="wall time of the successful export call")
    check_seconds: float = Field(description="wall time of checker + onnxruntime parity")
    attempts: list[ExportAttempt] = Field(default_factory=list)


# --------------------------------------------------------------------------- helpers


def params_millions(model: torch.nn.Module) -> float:
    """Number of parameters, in millions."""
    return sum(p.numel() for p in model.parameters()) / 1e6


def model_size_mb(model: torch.nn.Module) -> float:
    """Size of the state dict stored as fp32 (floating tensors at 4 bytes/elem), in MiB."""
    total = 0
    for t in model.state_dict().values():
        if not isinstance(t, torch.Tensor):
            continue
        total += t.numel() * (4 if t.is_floating_point() else t.element_size())
    return total / 2**20


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_OP_PATTERNS = (
    re.compile(r"operator '([\w:.]+)'"),  # TorchScript: "Exporting the operator 'aten::x' ..."
    re.compile(r"OpOverload\(op='([\w:.]+)'"),  # dynamo: "No ONNX function found for <OpOverload(op='aten.x'"
    re.compile(r"target=torch\.ops\.([\w.]+?)(?:\.default)?\b"),  # dynamo: node translation error
    re.compile(r"\b(aten::\w+)"),
)


def _exception_chain(exc: BaseException) -> list[BaseException]:
    chain, seen = [], set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    return chain


def _first_line(text: str, limit: int = 200) -> str:
    for line in _ANSI.sub("", text).splitlines():
        line = line.strip()
        if line:
            return line if len(line) <= limit else line[: limit - 3] + "..."
    return ""


def describe_export_failure(exc: BaseException) -> str:
    """One-line reason for an export failure: the unsupported op if one can be found."""
    chain = _exception_chain(exc)
    texts = [_ANSI.sub("", str(e)) for e in chain]
    for pat in _OP_PATTERNS:
        for text in texts:
            m = pat.search(text)
            if m:
                return f"unsupported op '{m.group(1)}' ({type(chain[0]).__name__})"
    # No op name: take the innermost exception with a message (usually the real cause).
    for e in reversed(chain):
        line = _first_line(str(e))
        if line:
            return f"{type(e).__name__}: {line}"
    return type(exc).__name__


def _external_data_size(path: Path) -> int:
    """Bytes of external-data files referenced by the model at ``path`` (0 if none)."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    model = onnx.load(str(path), load_external_data=False)
    files = set()
    for init in model.graph.initializer:
        if uses_external_data(init):
            files.add(ExternalDataInfo(init).location)
    return sum((path.parent / f).stat().st_size for f in files if (path.parent / f).exists())


# --------------------------------------------------------------------------- export


@contextlib.contextmanager
def _quiet_fd_stdout():
    """Silence C++-level stdout: the TorchScript exporter dumps the whole IR graph on failure.

    (torch 2.14 ``setup_onnx_logging`` tests the function object ``_jit_is_onnx_log_enabled``
    instead of calling it, so ONNX logging is always on; its output goes to fd 1.)
    """
    import sys
    import tempfile

    fd = 1  # C++ std::cout writes to fd 1 whatever sys.stdout is
    for stream in (sys.stdout, sys.__stdout__):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass
    saved = os.dup(fd)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), fd)
        try:
            yield
        finally:
            os.dup2(saved, fd)
            os.close(saved)


def _export_once(
    model: torch.nn.Module,
    example: torch.Tensor,
    path: Path,
    exporter: ExporterName,
    opset: int,
    dynamic_batch: bool,
) -> None:
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            with _quiet_fd_stdout():
                torch.onnx.export(
                    model,
                    (example,),
                    str(path),
                    dynamo=False,
                    opset_version=opset,
                    input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME],
                    dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None,
                    do_constant_folding=True,
                )
        else:
            # The dynamo exporter implements opset >= 18 only; lower requests get auto-converted
            # (which fails for many graphs), so ask for 18 directly and record what we got.
            dyn = ({0: torch.export.Dim.DYNAMIC},) if dynamic_batch else None
            # Silence the exporter's own logging noise; real failures still raise.
            onnx_logger = logging.getLogger("torch.onnx")
            old_level = onnx_logger.level
            onnx_logger.setLevel(logging.ERROR)
            try:
                program = torch.onnx.export(
                    model,
                    (example,),
                    dynamo=True,
                    opset_version=max(opset, 18),
                    input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME],
                    dynamic_shapes=dyn,
                    verbose=False,
                    optimize=True,
                )
                program.save(str(path))
            finally:
                onnx_logger.setLevel(old_level)


def _parity(
    model: torch.nn.Module, path: Path, input_size: tuple[int, int, int], batch_sizes: list[int], device
) -> tuple[float, float]:
    """Max |torch - onnxruntime| and max |torch| over random batches of ``batch_sizes``."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    in_name = sess.get_inputs()[0].name
    worst, scale = 0.0, 0.0
    gen = torch.Generator().manual_seed(0)
    for bs in batch_sizes:
        x = torch.randn(bs, *input_size, generator=gen)
        with torch.no_grad():
            ref = model(x.to(device))
        if isinstance(ref, (tuple, list)):
            ref = ref[0]
        got = sess.run(None, {in_name: x.numpy()})[0]
        ref_np = ref.detach().float().cpu().numpy()
        if got.shape != ref_np.shape:
            raise ExportError(f"onnxruntime output shape {got.shape} != torch {ref_np.shape} at batch {bs}")
        worst = max(worst, float(np.max(np.abs(got.astype(np.float64) - ref_np))))
        scale = max(scale, float(np.max(np.abs(ref_np))))
    return worst, scale


def _export_first_that_works(model: torch.nn.Module, example: torch.Tensor, path: Path, order: list,
                             opset: int, dynamic_batch: bool) -> tuple[ExporterName, float, list[ExportAttempt]]:
    """Try the exporters in ``order``; the first that succeeds wins, every failure is recorded."""
    attempts: list[ExportAttempt] = []
    for name in order:
        t0 = time.perf_counter()
        try:
            _export_once(model, example, path, name, opset, dynamic_batch)
        except Exception as exc:  # noqa: BLE001 - any exporter failure is reported, then fallback
            attempts.append(ExportAttempt(exporter=name, ok=False, seconds=time.perf_counter() - t0,
                                          error=describe_export_failure(exc)))
            continue
        seconds = time.perf_counter() - t0
        attempts.append(ExportAttempt(exporter=name, ok=True, seconds=seconds))
        return name, seconds, attempts
    reasons = "; ".join(f"{a.exporter}: {a.error}" for a in attempts)
    raise ExportError(f"ONNX export of {type(model).__name__} failed - {reasons}")


def _checked_opset(path: Path, used: str) -> int:
    """``onnx.checker`` on the file; returns the opset the file declares."""
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"onnx.checker rejected {path.name} ({used}): {_first_line(str(exc))}") from exc
    proto = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), -1)


def _checked_parity(model: torch.nn.Module, path: Path, input_size: tuple[int, int, int], batches: list[int],
                    device: torch.device, used: str, atol: float, rtol: float) -> float:
    """onnxruntime vs PyTorch on random batches; returns the max abs difference, raises above tolerance."""
    try:
        diff, ref_scale = _parity(model, path, input_size, batches, device)
    except ExportError:
        raise
    except Exception as exc:  # noqa: BLE001 - e.g. onnxruntime cannot load/run the graph
        raise ExportError(f"onnxruntime could not run {path.name} ({used}): {describe_export_failure(exc)}") from exc
    tol = atol + rtol * ref_scale
    if not np.isfinite(diff) or diff > tol:
        raise ExportError(
            f"ONNX parity failed for {type(model).__name__} ({used}): max_abs_diff={diff:.3g} > tol={tol:.3g}")
    return diff


def export_onnx(
    model: torch.nn.Module,
    input_size: tuple[int, int, int],
    path: str | os.PathLike,
    opset: int = 17,
    dynamic_batch: bool = True,
    atol: float = 1e-3,
    rtol: float = 0.0,
    exporter: ExporterChoice = "auto",
    example_batch: int = 2,
) -> ExportResult:
    """Export ``model`` (C, H, W input) to ONNX, check it, and verify onnxruntime parity.

    ``exporter="auto"`` tries TorchScript then dynamo.  Parity runs onnxruntime (CPU) against
    PyTorch on random batches (``example_batch`` and, with ``dynamic_batch``, also 3) and
    raises :class:`ExportError` when ``max_abs_diff > atol + rtol * max|torch output|``.
    Any failure is re-raised as a one-line :class:`ExportError` naming the op/reason.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    input_size = tuple(int(s) for s in input_size)
    if len(input_size) != 3:
        raise ValueError(f"input_size must be (C, H, W), got {input_size}")
    order: list[ExporterName] = ["torchscript", "dynamo"] if exporter == "auto" else [exporter]

    was_training = model.training
    model.eval()
    try:
        device = next(iter(model.parameters()), torch.empty(0)).device
        # Batch > 1 so that the dynamo exporter does not specialise the batch dim to 1.
        example = torch.randn(max(example_batch, 2) if dynamic_batch else example_batch, *input_size, device=device)
        used, export_seconds, attempts = _export_first_that_works(model, example, path, order, opset, dynamic_batch)
        t0 = time.perf_counter()
        file_opset = _checked_opset(path, used)
        batches = [example.shape[0]] + ([3] if dynamic_batch and example.shape[0] != 3 else [])
        diff = _checked_parity(model, path, input_size, batches, device, used, atol, rtol)
        check_seconds = time.perf_counter() - t0
    finally:
        model.train(was_training)

    return ExportResult(
        path=str(path),
        exporter=used,
        opset=file_opset,
        requested_opset=opset,
        dynamic_batch=dynamic_batch,
        max_abs_diff=diff,
        parity_batch_sizes=batches,
        file_size_bytes=path.stat().st_size + _external_data_size(path),
        seconds=export_seconds,
        check_seconds=check_seconds,
        attempts=attempts,
    )
