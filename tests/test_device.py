"""``--device``: resolution, the one-line errors before any work, the CPU path unchanged, and the CUDA code paths
as far as a machine without a GPU can run them (CUDA presence and capability monkeypatched; the mixed-precision
and channels_last code runs with CPU tensors). Nothing here claims the GPU path was verified on a GPU:
``benchmarks/gpu_check.sh`` does that on a GPU machine."""
from __future__ import annotations

import multiprocessing
from dataclasses import replace

import pytest
import torch
from torch import nn
from torch.utils.data import Subset

from agentic_pruner.cli import main
from agents.history import RevisionRecord, device_note, from_jsonl, to_jsonl
from pruning import device as devmod
from pruning.device import (
    DeviceError,
    amp_dtype,
    check_device_spec,
    dask_worker_slot,
    describe_device,
    loader_workers,
    on_device,
    resolve_device,
)
from pruning.plan import PruningPlan
from pruning.train import FinetuneConfig, calibrate_copy, evaluate, finetune
from pruning.train.data import DataConfig, build_data, loader_settings, make_loader
from pruning.train.finetune import precision_for, restore_format
from tasks.config import LLMRunConfig, RunConfig


def tiny_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 10))


@pytest.fixture(scope="module")
def bundle():
    b = build_data(DataConfig(input_size=16, batch_size=32))
    return replace(b, train=make_loader(Subset(b.train.dataset, list(range(128))), 32, shuffle=True, seed=0))


@pytest.fixture
def no_cuda(monkeypatch):
    """This machine as it is (no CUDA), also when the suite runs on a GPU machine."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def two_gpus(monkeypatch):
    """Pretend two CUDA devices exist (resolution only: nothing is allocated on them)."""
    monkeypatch.setattr(devmod, "cuda_device_count", lambda: 2)


def _capability(monkeypatch, major: int) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda dev=None: (major, 0))


# --------------------------------------------------------------------------- resolution
@pytest.mark.parametrize("spec, want", [(None, "auto"), ("auto", "auto"), (" CPU ", "cpu"), ("cuda", "cuda"),
                                        ("cuda:", "cuda"), ("CUDA:3", "cuda:3")])
def test_device_spec_normalised(spec, want):
    assert check_device_spec(spec) == want


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "cuda:-1", "mps", "", "cpu:0"])
def test_device_spec_rejected(spec):
    with pytest.raises(DeviceError, match="unknown device"):
        check_device_spec(spec)


def test_resolution_without_cuda(no_cuda):
    assert resolve_device("auto") == torch.device("cpu") == resolve_device("cpu") == resolve_device(None)
    for spec in ("cuda", "cuda:0", "cuda:1"):
        with pytest.raises(DeviceError, match=rf"^--device {spec}: CUDA is not available on this machine"):
            resolve_device(spec)
    assert isinstance(DeviceError("x"), ValueError)  # a UserError: the CLI prints one line, exit 2


def test_resolution_with_two_gpus(two_gpus):
    assert resolve_device("auto") == torch.device("cuda", 0) == resolve_device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(DeviceError, match=r"has 2 CUDA device\(s\) \(cuda:0 \.\. cuda:1\)"):
        resolve_device("cuda:2")
    # workers of a local Dask cluster (named 0..N-1) spread over the GPUs; cuda:N pins one
    assert [resolve_device("auto", slot=i).index for i in range(5)] == [0, 1, 0, 1, 0]
    assert resolve_device("cuda", slot=3) == torch.device("cuda", 1)
    assert resolve_device("cuda:0", slot=3) == torch.device("cuda", 0)
    assert resolve_device("cpu", slot=1) == torch.device("cpu")


def test_mixed_precision_choice(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert amp_dtype(cpu) is None and amp_dtype(cpu, True) is None  # never on the CPU
    _capability(monkeypatch, 9)  # Hopper / Ampere: native bf16
    assert amp_dtype(gpu) == torch.bfloat16 and amp_dtype(gpu, False) is None
    assert devmod.grad_scaler(torch.bfloat16) is None and devmod.grad_scaler(None) is None
    _capability(monkeypatch, 7)  # Volta / Turing: fp16 with a gradient scaler
    assert amp_dtype(gpu) == torch.float16
    with pytest.warns(UserWarning):  # GradScaler("cuda") without CUDA disables itself (and says so)
        assert isinstance(devmod.grad_scaler(torch.float16), torch.amp.GradScaler)
    from pruning.llm.session import llm_dtype

    assert llm_dtype(gpu) == torch.float32 and llm_dtype(cpu) == torch.float32  # no fp16 LLMs
    _capability(monkeypatch, 8)
    assert llm_dtype(gpu) == torch.bfloat16


def test_describe_cpu_and_helpers():
    info = describe_device("cpu")
    assert info.device == "cpu" and info.amp is None and info.name and info.label().startswith("cpu (")
    assert dask_worker_slot() is None  # not inside a Dask worker
    assert loader_workers(4) == 4 and loader_workers(0) == 0


def _workers_in_daemon(q):
    q.put(loader_workers(4))


def test_no_loader_workers_inside_a_daemonic_process():
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_workers_in_daemon, args=(q,), daemon=True)
    p.start()
    assert q.get(timeout=30) == 0  # a Dask worker process may not start DataLoader workers
    p.join(timeout=30)


def test_loader_settings():
    assert loader_settings("digits", "cpu") == {} == loader_settings("digits", torch.device("cuda", 0))
    assert loader_settings("imagefolder:/data/x", "cpu") == {}  # the CPU path unchanged
    gpu = loader_settings("imagefolder:/data/x", torch.device("cuda", 0))
    assert gpu["pin_memory"] is True and 1 <= gpu["num_workers"] <= 8


# --------------------------------------------------------------------------- configs
def test_config_device_field_not_in_run_identity():
    assert RunConfig().device == "auto" and RunConfig(device="CUDA:1").device == "cuda:1"
    assert RunConfig(device="cuda").resolved_run_id() == RunConfig(device="cpu").resolved_run_id() == \
        RunConfig().resolved_run_id()
    assert "device" not in RunConfig(device="cuda").identity()
    assert LLMRunConfig(device="cuda").resolved_run_id() == LLMRunConfig().resolved_run_id()
    from pydantic import ValidationError

    for cls in (RunConfig, LLMRunConfig):
        with pytest.raises(ValidationError, match="unknown device 'gpu'"):
            cls(device="gpu")


def test_run_context_resolves_in_its_process(no_cuda, tmp_path):
    from tasks.steps import RunContext

    assert RunContext(RunConfig(store=str(tmp_path)), "r").device == torch.device("cpu")
    with pytest.raises(DeviceError, match="CUDA is not available"):
        RunContext(RunConfig(store=str(tmp_path), device="cuda"), "r").device


# --------------------------------------------------------------------------- CLI: one line, exit 2, no work
@pytest.mark.parametrize("argv", [
    ["run", "--device", "cuda"], ["demo", "--device", "cuda:0"], ["serve", "--device", "cuda"],
    ["llm", "--target-sparsity", "0.3", "--device", "cuda"],
    ["search", "--model", "resnet18", "--target-macs", "50%", "--device", "cuda"],
    ["solve", "--model", "resnet18", "--target-latency-ms", "5", "--device", "cuda"],
    ["resume", "some-run", "--device", "cuda"],
])
def test_cli_device_cuda_without_cuda_fails_before_any_work(argv, no_cuda, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    store = tmp_path / "store"
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--store", str(store)] if argv[0] in ("run", "demo", "serve", "llm", "resume") else argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "CUDA is not available on this machine" in err[0]
    assert not store.exists() and not any(tmp_path.iterdir())  # nothing loaded, trained or written


def test_cli_unknown_device_is_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run", "--device", "gpu"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown device 'gpu'" in err[0]


def test_cli_solve_latency_on_ort_cpu_refuses_a_gpu(two_gpus, capsys):
    rc = main(["solve", "--model", "resnet18", "--target-latency-ms", "5", "--device", "cuda"])
    assert rc == 2 and "ort-cpu latency backend measures onnxruntime on the CPU" in capsys.readouterr().err


def test_cli_resume_of_a_cuda_run_on_a_cpu_machine(no_cuda, tmp_path, capsys):
    from pruning.artifacts import open_store, runs

    store = tmp_path / "store"
    open_store(str(store)).put_json(runs.key("gpu-run", "config.json"),
                                    RunConfig(store=str(store), device="cuda").model_dump(mode="json"))
    assert main(["resume", "gpu-run", "--store", str(store)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "run gpu-run asks for --device cuda" in err[0] and "--device cpu" in err[0]
    assert not list(store.rglob("status.json"))


# --------------------------------------------------------------------------- the CPU path is unchanged
def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_cpu_device_is_the_old_path(bundle):
    a, b = tiny_cnn(), tiny_cnn()
    cfg = dict(epochs=1, lr=0.05, progress_bar=False)
    ra = finetune(a, bundle, FinetuneConfig(**cfg), progress=False)
    rb = finetune(b, bundle, FinetuneConfig(device="cpu", **cfg), progress=False)
    assert (ra.device, ra.amp_dtype, ra.channels_last) == ("cpu", None, False) == \
        (rb.device, rb.amp_dtype, rb.channels_last)
    sa, sb = _state(a), _state(b)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # bit-identical: no autocast, no layout change on CPU
    e1, e2 = evaluate(a, bundle.val), evaluate(a, bundle.val, device="cpu")
    assert e1 == e2


def test_calibrated_copy_comes_back_with_its_gradients(bundle):
    model = tiny_cnn()
    before = _state(model)
    clone = calibrate_copy(model, bundle.calib, 2, device="cpu")
    assert all(p.grad is not None and p.grad.device.type == "cpu" for p in clone.parameters())
    assert all(p.grad is None for p in model.parameters()) and all(torch.equal(v, before[k]) for k, v in _state(model).items())


def test_on_device_restores_and_moves_gradients():
    model = tiny_cnn()
    with on_device(model, "cpu") as dev:
        assert dev == torch.device("cpu")
    with on_device(model, None) as dev:
        assert dev == torch.device("cpu")
    # what the CUDA path relies on: nn.Module.to converts .grad along with the parameter (dtype shows it here)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    model.to(torch.float64)
    assert all(p.grad.dtype == torch.float64 for p in model.parameters())


# --------------------------------------------------------------------------- the CUDA code paths, run with CPU tensors
def test_precision_for_cuda_cnn(monkeypatch):
    _capability(monkeypatch, 9)
    model = tiny_cnn()
    prec = precision_for(model, FinetuneConfig(), torch.device("cuda", 0))
    assert prec.dtype == torch.bfloat16 and prec.scaler is None and prec.channels_last
    w = model[0].weight
    assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    restore_format(model, prec)
    assert model[0].weight.is_contiguous()
    vit_like = nn.Sequential(nn.Linear(4, 4))
    assert not precision_for(vit_like, FinetuneConfig(family="vit"), torch.device("cuda", 0)).channels_last
    assert not precision_for(tiny_cnn(), FinetuneConfig(amp=False, channels_last=False),
                             torch.device("cuda", 0)).amp


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_precision_training_loop_runs(dtype, bundle, monkeypatch):
    """The autocast (+ grad scaler for fp16) and channels_last branches of the loop, on CPU tensors."""
    import importlib

    ev = importlib.import_module("pruning.train.evaluate")  # the package exports functions of the same names
    ft = importlib.import_module("pruning.train.finetune")
    monkeypatch.setattr(ft, "amp_dtype", lambda dev, enabled=None: dtype)
    monkeypatch.setattr(ev, "amp_dtype", lambda dev, enabled=None: dtype)
    monkeypatch.setattr(ft, "grad_scaler", lambda d: torch.amp.GradScaler("cpu") if d == torch.float16 else None)
    model = tiny_cnn()
    res = finetune(model, bundle, FinetuneConfig(epochs=1, lr=0.05, channels_last=True, bn_recalibration=True,
                                                 progress_bar=False), progress=False)
    assert res.amp_dtype == str(dtype).removeprefix("torch.") and res.channels_last
    assert res.epochs[0].train_loss == res.epochs[0].train_loss and 0 <= res.final_val_acc <= 1  # finite
    assert model[0].weight.is_contiguous()  # back in the default layout for storing


def test_history_records_carry_the_device(tmp_path):
    rec = RevisionRecord(revision=0, strategist="heuristic", strategist_used="heuristic", plan=PruningPlan(),
                         proposal_notes=["fine-tuned on host:1", device_note("cuda:0", "NVIDIA H200")])
    assert (rec.device, rec.device_name) == ("cuda:0", "NVIDIA H200")
    back = from_jsonl(to_jsonl([rec]))[0]
    assert (back.device, back.device_name) == ("cuda:0", "NVIDIA H200")
    assert RevisionRecord(revision=0, strategist="h", strategist_used="h", plan=PruningPlan()).device is None


def test_ray_runner_asks_one_gpu_per_candidate(monkeypatch):
    from prefect_ray.context import RemoteOptionsContext

    from tasks import runners

    class FakeRunner:
        def submit(self, task, parameters):
            return RemoteOptionsContext.get().current_remote_options

    monkeypatch.setattr(runners, "_cluster_gpus", lambda: 4.0)
    wrapped = runners._gpu_wrapped("ray", FakeRunner(), None)
    assert wrapped.submit(None, parameters={}) == {"num_gpus": 1}
    assert isinstance(runners._gpu_wrapped("ray", FakeRunner(), False), FakeRunner)  # --device cpu
    assert isinstance(runners._gpu_wrapped("dask", FakeRunner(), None), FakeRunner)
    monkeypatch.setattr(runners, "_cluster_gpus", lambda: 0.0)
    assert isinstance(runners._gpu_wrapped("ray", FakeRunner(), None), FakeRunner)  # no GPUs: nothing to ask
