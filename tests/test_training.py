"""Tests for pruning.train (calibration, fine-tuning, evaluation) and pruning.train.default_model."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import Subset, TensorDataset

from pruning.models import model_family
from pruning.train import (
    ExtendedConfig,
    FileCheckpointer,
    FinetuneConfig,
    InMemoryCheckpointer,
    accuracy_collapsed,
    calibrate_copy,
    calibrated,
    calibration_gradients,
    evaluate,
    extended_finetune,
    finetune,
    kd_loss,
    recalibrate_batchnorm,
    zero_grads,
)
from pruning.train.data import DataConfig, DataSplits, build_data, make_loader


def tiny_cnn(width: int = 8, num_classes: int = 10, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(width, width * 2, 3, padding=1), nn.BatchNorm2d(width * 2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width * 2, num_classes),
    )


@pytest.fixture(scope="module")
def small_bundle() -> DataSplits:
    """Digits at 16x16 with a 256-image train subset: every epoch takes well under a second."""
    b = build_data(DataConfig(input_size=16, batch_size=32))
    train_small = Subset(b.train.dataset, list(range(256)))
    return replace(b, train=make_loader(train_small, 32, shuffle=True, seed=0))


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------- calibration


def test_calibrate_copy_leaves_original_untouched(small_bundle: DataSplits):
    model = tiny_cnn()
    before = _state(model)
    clone = calibrate_copy(model, small_bundle.calib, num_batches=2)
    after = _state(model)
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), f"{k} changed"  # incl. BN running stats
    assert all(p.grad is None for p in model.parameters())
    grads = [p.grad for p in clone.parameters()]
    assert all(g is not None for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    for k, v in clone.state_dict().items():  # the copy's weights are the original's
        assert torch.equal(v, before[k])
    zero_grads(clone)
    assert all(p.grad is None for p in clone.parameters())


def test_calibration_gradients_and_context(small_bundle: DataSplits):
    model = tiny_cnn()
    stats = calibration_gradients(model, small_bundle.calib, num_batches=1)
    assert stats["batches"] == 1 and stats["samples"] == len(small_bundle.calib.dataset) and stats["loss"] > 0
    g1 = model[0].weight.grad.clone()
    # zero_first=True: repeating gives the same gradient, not a doubled one
    calibration_gradients(model, small_bundle.calib, num_batches=1)
    assert torch.allclose(model[0].weight.grad, g1)
    assert model.training  # mode restored
    with calibrated(model, small_bundle.calib, 1) as s:
        assert s["batches"] == 1 and model[0].weight.grad is not None
    assert all(p.grad is None for p in model.parameters())


def test_recalibrate_batchnorm(small_bundle: DataSplits):
    model = tiny_cnn()
    before = _state(model)
    used = recalibrate_batchnorm(model, small_bundle.train, num_batches=2)
    assert used == 2
    after = model.state_dict()
    assert not torch.equal(before["1.running_mean"], after["1.running_mean"])
    assert int(after["1.num_batches_tracked"]) == 2
    for k in before:
        if "running" not in k and "num_batches" not in k:
            assert torch.equal(before[k], after[k]), k  # weights untouched
    assert model[1].momentum == 0.1 and model.training
    assert recalibrate_batchnorm(nn.Linear(2, 2), small_bundle.calib) == 0


# --------------------------------------------------------------------------- evaluation


def test_evaluate_sane(small_bundle: DataSplits):
    model = tiny_cnn()
    r = evaluate(model, small_bundle.val, class_names=small_bundle.class_names)
    assert r.n == len(small_bundle.val.dataset)
    assert 0.0 <= r.top1 <= r.top5 <= 1.0 and r.top5_k == 5
    assert r.loss > 0
    assert set(r.per_class) == set(small_bundle.class_names)
    assert all(0.0 <= v <= 1.0 for v in r.per_class.values())

    # 3 classes: top-k uses k = 3, so it is always 1.0; a perfect model scores 1.0 top-1
    x = torch.eye(3).repeat(4, 1)
    y = torch.arange(3).repeat(4)
    loader = make_loader(TensorDataset(x, y), 5)
    oracle = nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        oracle.weight.copy_(torch.eye(3) * 10)
    r3 = evaluate(oracle, loader)
    assert r3.top5_k == 3 and r3.top5 == 1.0 and r3.top1 == 1.0 and r3.n == 12
    assert r3.per_class == {"0": 1.0, "1": 1.0, "2": 1.0}


def test_accuracy_collapsed():
    assert accuracy_collapsed(0.95, 0.84)
    assert not accuracy_collapsed(0.95, 0.86)
    assert not accuracy_collapsed(0.95, 0.99)
    assert accuracy_collapsed(0.95, 0.90, drop=0.02)


# --------------------------------------------------------------------------- fine-tuning


def test_finetune_config_paper_defaults():
    import timm

    cnn = tiny_cnn()
    assert model_family(cnn) == "cnn"
    hp = FinetuneConfig().resolve_hparams(cnn)
    assert hp == {"family": "cnn", "optimizer": "sgd", "lr": 0.01, "weight_decay": 5e-4}
    assert FinetuneConfig(mac_reduction=0.3).resolve_hparams(cnn)["lr"] == 0.0005
    assert FinetuneConfig(mac_reduction=0.3, heavy_threshold=0.5).resolve_hparams(cnn)["lr"] == 0.01
    assert FinetuneConfig(lr=0.05, mac_reduction=0.5).resolve_hparams(cnn)["lr"] == 0.05
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=10, pretrained=False, img_size=32, depth=1)
    assert model_family(vit) == "vit"
    hp = FinetuneConfig().resolve_hparams(vit)
    assert hp == {"family": "vit", "optimizer": "adamw", "lr": 1e-4, "weight_decay": 0.01}
    assert FinetuneConfig(mac_reduction=0.2).resolve_hparams(vit)["lr"] == 5e-5
    assert FinetuneConfig().epochs == 5 and FinetuneConfig().batch_size == 64
    assert ExtendedConfig().kd_alpha == 0.3 and ExtendedConfig().kd_temperature == 4.0


def test_model_family_one_detector():
    """One detector for pruning and training: timm CNNs are 'cnn'; ViT/DeiT and other attention models 'vit'."""
    import timm

    assert model_family(timm.create_model("resnet18", num_classes=10, pretrained=False)) == "cnn"
    for name in ("deit_tiny_patch16_224", "vit_tiny_patch16_224"):
        vit = timm.create_model(name, num_classes=10, pretrained=False, img_size=32, depth=1)
        assert model_family(vit) == "vit"
        assert FinetuneConfig().resolve_hparams(vit)["optimizer"] == "adamw"

    class _Mha(nn.Module):  # torch attention without patch_embed / qkv (former training-only rule)
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2)

    class _PatchOnly(nn.Module):  # patch embedding, no attention yet (former training-only rule)
        def __init__(self) -> None:
            super().__init__()
            self.patch_embed = nn.Conv2d(3, 8, 4, stride=4)

    assert model_family(_Mha()) == "vit" and model_family(_PatchOnly()) == "vit"


def _train_loss(model: nn.Module, bundle: DataSplits) -> float:
    return evaluate(model, make_loader(bundle.train.dataset, 256)).loss


def test_finetune_one_epoch_decreases_loss(small_bundle: DataSplits):
    model = tiny_cnn()
    loss0 = _train_loss(model, small_bundle)
    calls = []
    res = finetune(model, small_bundle, FinetuneConfig(epochs=1, lr=0.05, seed=1),
                   progress=lambda e, n, m: calls.append((e, n, m)))
    loss1 = _train_loss(model, small_bundle)
    assert loss1 < loss0
    assert len(res.epochs) == 1 and res.lr == 0.05 and res.optimizer == "sgd"
    assert res.final_val_acc == res.epochs[0].val_acc and res.seconds > 0
    assert [c[:2] for c in calls] == [(1, 1)] and {"train_loss", "val_acc", "seconds"} <= set(calls[0][2])
    # BN recalibration option runs before training
    res_bn = finetune(tiny_cnn(), small_bundle, FinetuneConfig(epochs=1, lr=0.05, bn_recalibration=True),
                      progress=False)
    assert len(res_bn.epochs) == 1
    # deterministic given the seed
    model2 = tiny_cnn()
    finetune(model2, small_bundle, FinetuneConfig(epochs=1, lr=0.05, seed=1), progress=False)
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), k


def test_kd_loss():
    a = torch.randn(4, 10)
    assert float(kd_loss(a, a, 4.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(kd_loss(a, torch.randn(4, 10), 4.0)) > 0


def test_extended_finetune_checkpoint_resume(small_bundle: DataSplits, tmp_path: Path):
    teacher = tiny_cnn(width=12, seed=5)
    finetune(teacher, small_bundle, FinetuneConfig(epochs=1, lr=0.05), progress=False)
    cfg = ExtendedConfig(epochs=2, lr=0.05, patience=None, max_train_batches=4, checkpoint_every=1,
                         ema_decay=0.99)
    student0 = tiny_cnn(seed=1)

    # uninterrupted reference run
    ref_student = copy.deepcopy(student0)
    ref_ckpt = InMemoryCheckpointer()
    ref = extended_finetune(ref_student, teacher, small_bundle, cfg, checkpointer=ref_ckpt, progress=False)
    assert ref.kd and ref.ema and not ref.amp and ref.schedule == "step"
    assert [h.epoch for h in ref.history] == [1, 2] and ref.epochs_run == 2
    assert ref_ckpt.saved_epochs == [1, 2]
    assert all(h.ema_val_acc is not None for h in ref.history)
    state = ref_ckpt.load_checkpoint()
    assert {"model", "ema", "optimizer", "scheduler", "epoch", "best_acc", "rng"} <= set(state)
    assert state["epoch"] == 2

    # preempted after epoch 1 (the checkpoint is written before the callback runs)
    class Preempted(RuntimeError):
        pass

    def preempt(epoch, total, metrics):
        if epoch == 1:
            raise Preempted

    ckpt = FileCheckpointer(tmp_path / "ckpt" / "last.pt")
    with pytest.raises(Preempted):
        extended_finetune(copy.deepcopy(student0), teacher, small_bundle, cfg, checkpointer=ckpt, progress=preempt)
    assert ckpt.load_checkpoint()["epoch"] == 1

    # a fresh process: same architecture, resume from the checkpoint
    seen = []
    resumed_student = copy.deepcopy(student0)
    res = extended_finetune(resumed_student, teacher, small_bundle, cfg, checkpointer=ckpt,
                            progress=lambda e, n, m: seen.append(e))
    assert res.resumed_from_epoch == 1 and res.epochs_run == 1
    assert seen == [2]
    assert [h.epoch for h in res.history] == [1, 2]
    assert ckpt.load_checkpoint()["epoch"] == 2
    # resuming reproduces the uninterrupted run
    assert res.best_epoch == ref.best_epoch and res.best_source == ref.best_source
    assert res.best_val_acc == pytest.approx(ref.best_val_acc)
    for (k, a), b in zip(ref_student.state_dict().items(), resumed_student.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), k

    # a finished checkpoint: nothing more to train
    again = extended_finetune(copy.deepcopy(student0), teacher, small_bundle, cfg, checkpointer=ckpt, progress=False)
    assert again.epochs_run == 0 and again.resumed_from_epoch == 2


def test_extended_early_stopping_and_cosine(small_bundle: DataSplits):
    student = tiny_cnn(seed=2)
    cfg = ExtendedConfig(epochs=6, lr=1e-9, family="vit", patience=1, max_train_batches=1, ema=False,
                         warmup_epochs=1)
    res = extended_finetune(student, None, small_bundle, cfg, progress=False)
    assert res.schedule == "cosine" and res.optimizer == "adamw" and not res.kd and not res.ema
    assert res.stopped_early and res.epochs_run < 6  # an LR of 1e-9 cannot improve val accuracy


# --------------------------------------------------------------------------- default model


def test_default_model_trainer(tmp_path: Path, monkeypatch):
    from pruning.train import default_model as dm

    monkeypatch.setenv("AGENTIC_PRUNER_CACHE", str(tmp_path / "cache"))
    assert dm.default_cache_dir() == tmp_path / "cache"
    pt = dm.train_default_model(epochs=2, input_size=16, progress_bar=False)
    assert pt.exists() and pt.parent == tmp_path / "cache"
    info_path = pt.with_suffix(".json")
    info = json.loads(info_path.read_text())
    assert info["arch"] == "resnet18" and info["epochs"] == 2 and info["input_size"] == [3, 16, 16]
    assert 0.0 <= info["test_acc"] <= 1.0 and info["train_seconds"] > 0
    mtime = pt.stat().st_mtime_ns

    model, info2 = dm.load_default_model(epochs=2, input_size=16)
    assert pt.stat().st_mtime_ns == mtime  # cached: not retrained
    assert not model.training and info2["path"] == str(pt)
    # the reloaded weights reproduce the recorded test accuracy
    bundle = build_data(DataConfig(input_size=16))
    assert evaluate(model, bundle.test).top1 == pytest.approx(info["test_acc"])
    assert info["test_acc"] > 0.3  # 2 short epochs already learn something

    with pytest.raises(FileNotFoundError):
        dm.load_default_model(epochs=3, input_size=16, train_if_missing=False)
