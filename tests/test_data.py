"""Tests for pruning.train.data: digits splits, ImageFolder loading, and DataError messages."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pruning.train.data import (
    DataConfig,
    DataError,
    build_data,
    check_num_classes,
    digits_splits,
    model_num_classes,
)

# --------------------------------------------------------------------------- digits


def test_digits_splits_disjoint_deterministic_stratified():
    from sklearn.datasets import load_digits

    y = load_digits().target
    s1 = digits_splits()
    s2 = digits_splits()
    assert set(s1) == {"train", "calib", "val", "test"}
    for k in s1:
        assert np.array_equal(s1[k], s2[k]), f"split {k} not deterministic"
    sizes = {k: len(v) for k, v in s1.items()}
    assert sum(sizes.values()) == 1797
    allidx = np.concatenate(list(s1.values()))
    assert len(np.unique(allidx)) == 1797  # disjoint and covering
    # ~60/10/15/15 %
    assert abs(sizes["train"] / 1797 - 0.60) < 0.01
    assert abs(sizes["calib"] / 1797 - 0.10) < 0.01
    assert abs(sizes["val"] / 1797 - 0.15) < 0.01
    assert abs(sizes["test"] / 1797 - 0.15) < 0.01
    overall = np.bincount(y, minlength=10) / len(y)
    for k, idx in s1.items():
        frac = np.bincount(y[idx], minlength=10) / len(idx)
        assert np.abs(frac - overall).max() < 0.02, f"split {k} not stratified"
    # another split seed gives another (still valid) split
    s3 = digits_splits(DataConfig(split_seed=1))
    assert not np.array_equal(s1["test"], s3["test"])


def test_build_digits_bundle():
    b = build_data(DataConfig(input_size=16, batch_size=32))
    assert b.num_classes == 10 and b.class_names == [str(i) for i in range(10)]
    assert b.input_size == (3, 16, 16)
    assert b.sizes == {k: len(v) for k, v in digits_splits().items()}
    assert len(b.train.dataset) == b.sizes["train"]
    assert len(b.test.dataset) == b.sizes["test"]
    assert not b.test_is_val
    x, y = next(iter(b.train))
    assert x.shape == (32, 3, 16, 16) and x.dtype == torch.float32
    assert -1.0 - 1e-6 <= float(x.min()) and float(x.max()) <= 1.0 + 1e-6
    assert y.dtype == torch.int64
    # shuffle order is fixed by the seed
    x2, y2 = next(iter(build_data(DataConfig(input_size=16, batch_size=32)).train))
    assert torch.equal(y, y2) and torch.equal(x, x2)
    assert b.example_input().shape == (1, 3, 16, 16)
    # a spec string is accepted too
    assert build_data("digits").input_size == (3, 32, 32)


def test_unknown_scheme():
    with pytest.raises(DataError, match="unknown data spec"):
        build_data(DataConfig(spec="cifar10"))
    with pytest.raises(DataError, match="unknown data spec"):
        build_data("s3://bucket/data")
    assert issubclass(DataError, ValueError)


# --------------------------------------------------------------------------- imagefolder


def _write_images(folder: Path, n: int, color: tuple[int, int, int]) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(folder)))
    for i in range(n):
        arr = np.clip(rng.normal(color, 20, size=(20, 24, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"img{i}.png")


@pytest.fixture
def image_root(tmp_path: Path) -> Path:
    root = tmp_path / "imgs"
    for split in ("train", "val"):
        _write_images(root / split / "cat", 3, (200, 50, 50))
        _write_images(root / split / "dog", 3, (50, 50, 200))
    return root


def test_imagefolder_loading(image_root: Path):
    b = build_data(DataConfig(spec=f"imagefolder:{image_root}", input_size=32, batch_size=4, calib_size=4))
    assert b.num_classes == 2
    assert b.class_names == ["cat", "dog"]
    assert b.input_size == (3, 32, 32)
    assert b.test_is_val
    assert b.sizes == {"train": 6, "calib": 4, "val": 6, "test": 6}
    x, y = next(iter(b.train))
    assert x.shape == (4, 3, 32, 32)
    xv, yv = next(iter(b.val))
    assert xv.shape == (6, 3, 32, 32) and sorted(yv.tolist()) == [0, 0, 0, 1, 1, 1]
    # calibration subset is fixed by the seed
    b2 = build_data(DataConfig(spec=f"imagefolder:{image_root}", input_size=32, calib_size=4))
    assert b.calib.dataset.indices == b2.calib.dataset.indices


def test_imagefolder_transforms_from_model_and_test_split(image_root: Path):
    import timm

    _write_images(image_root / "test" / "cat", 2, (200, 50, 50))
    _write_images(image_root / "test" / "dog", 2, (50, 50, 200))
    model = timm.create_model("resnet18", num_classes=2, pretrained=False)
    b = build_data(DataConfig(spec=f"imagefolder:{image_root}", batch_size=2), model=model)
    assert b.input_size == (3, 224, 224)  # from the model's timm data config
    assert b.mean == (0.485, 0.456, 0.406)
    assert not b.test_is_val and b.sizes["test"] == 4
    check_num_classes(b, model)  # no error
    x, _ = next(iter(b.test))
    assert x.shape == (4, 3, 224, 224)  # eval loaders use eval_batch_size (256)


def test_imagefolder_errors(image_root: Path, tmp_path: Path):
    with pytest.raises(DataError, match="does not exist"):
        build_data(f"imagefolder:{tmp_path / 'nope'}")
    with pytest.raises(DataError, match="needs a path"):
        build_data("imagefolder:")

    no_val = tmp_path / "noval"
    _write_images(no_val / "train" / "a", 1, (0, 0, 0))
    with pytest.raises(DataError, match="no val/ folder"):
        build_data(f"imagefolder:{no_val}")

    no_train = tmp_path / "notrain"
    _write_images(no_train / "val" / "a", 1, (0, 0, 0))
    with pytest.raises(DataError, match="no train/ folder"):
        build_data(f"imagefolder:{no_train}")

    (image_root / "train" / "empty_class").mkdir()
    with pytest.raises(DataError, match=r"empty_class contains no images"):
        build_data(f"imagefolder:{image_root}")
    (image_root / "train" / "empty_class").rmdir()

    _write_images(image_root / "val" / "bird", 1, (0, 200, 0))
    with pytest.raises(DataError, match="differ from train/ classes"):
        build_data(f"imagefolder:{image_root}")


def test_class_count_mismatch(image_root: Path):
    import timm

    b = build_data(DataConfig(spec=f"imagefolder:{image_root}", input_size=32))
    model = timm.create_model("resnet18", num_classes=10, pretrained=False)
    assert model_num_classes(model) == 10
    with pytest.raises(DataError, match="has 2 classes but the model head outputs 10"):
        check_num_classes(b, model)
    # plain modules: fall back to .num_classes, or skip the check when unknown
    plain = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 2))
    check_num_classes(b, plain)
    plain.num_classes = 5
    with pytest.raises(DataError):
        check_num_classes(b, plain)
