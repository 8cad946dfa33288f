"""Datasets and loaders for pruning, calibration, fine-tuning and evaluation.

Two sources are supported through :class:`DataConfig.spec`:

``"digits"`` (default)
    scikit-learn's bundled ``load_digits`` (1,797 real 8x8 grey images, 10 classes; no
    download needed). Images are scaled to [0, 1], upsampled bilinearly to
    ``input_size`` x ``input_size``, replicated to 3 channels and normalised with
    mean = std = 0.5. A fixed, stratified, seeded split gives disjoint
    train / calib / val / test sets (60 / 10 / 15 / 15 % by default).

``"imagefolder:PATH"``
    torchvision ``ImageFolder`` trees ``PATH/train/<class>/*`` and ``PATH/val/<class>/*``
    (and optionally ``PATH/test/<class>/*``). Transforms come from the model's timm data
    config (``timm.data.resolve_data_config`` + ``timm.data.create_transform``). The
    calibration split is a fixed seeded subset of ``train/`` (evaluation transforms, no
    augmentation). ``val/`` is used for model selection; the report split is ``test/``
    when it exists, otherwise ``val/`` again (``DataSplits.test_is_val`` says which).

Problems with the data are raised as :class:`DataError` with a one-line message.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from pruning.device import available_cpus, loader_workers
from pruning.errors import UserError

__all__ = [
    "DataError",
    "DataConfig",
    "DataSplits",
    "build_data",
    "check_num_classes",
    "model_num_classes",
    "digits_splits",
    "make_loader",
    "loader_settings",
    "DIGITS_MEAN",
    "DIGITS_STD",
]

DIGITS_MEAN = (0.5, 0.5, 0.5)
DIGITS_STD = (0.5, 0.5, 0.5)
IMAGEFOLDER_PREFIX = "imagefolder:"


class DataError(UserError):
    """A problem with the data source or its fit to the model (one-line message)."""


class DataConfig(BaseModel):
    """Where the data comes from and how it is batched.

    Fields:
        spec: ``"digits"`` (embedded scikit-learn digits) or ``"imagefolder:PATH"``;
            one string so the CLI / flow parameter stays simple.
        input_size: square side in pixels. Digits: upsampling target (default 32, small
            enough for CPU training). ImageFolder: ``None`` uses the model's timm data
            config, an int overrides it (useful for models trained at a smaller size).
        batch_size: training batch size (paper Table 7 uses 64).
        eval_batch_size: batch size for calib/val/test loaders; larger is faster and
            does not change results.
        num_workers: DataLoader worker processes; 0 keeps everything in-process (safe in
            tests and Prefect tasks). Inside a daemonic process (a Dask worker) 0 is used whatever
            is asked, since such a process may not start children.
        pin_memory: page-locked batches, so copies to a CUDA device overlap compute
            (:func:`loader_settings` turns it and the workers on for ImageFolder data on CUDA).
        seed: seeds the training-loader shuffle and the ImageFolder calibration subset,
            so runs are repeatable.
        split_seed: seeds the digits train/calib/val/test split. Kept separate from
            ``seed`` so the test set stays fixed when training seeds change.
        train_frac / calib_frac / val_frac: digits split fractions; the test split gets
            the remainder (default 60/10/15/15 %).
        calib_size: number of ``train/`` images in the ImageFolder calibration subset
            (importance estimation needs a few batches, not the whole set).
        augment: use timm's training augmentation for ImageFolder ``train/``; digits are
            never augmented (the images are tiny and centred).
    """

    model_config = ConfigDict(extra="forbid")

    spec: str = Field("digits", description="'digits' or 'imagefolder:PATH'")
    input_size: int | None = Field(None, ge=8, description="square input side; None = 32 for digits, model config for imagefolder")
    batch_size: int = Field(64, ge=1, description="training batch size (paper: 64)")
    eval_batch_size: int = Field(256, ge=1, description="batch size of calib/val/test loaders")
    num_workers: int = Field(0, ge=0, description="DataLoader workers; 0 = in-process")
    pin_memory: bool = Field(False, description="pinned host memory for fast copies to a CUDA device")
    seed: int = Field(0, description="shuffle / calibration-subset seed")
    split_seed: int = Field(0, description="seed of the fixed digits split")
    train_frac: float = Field(0.60, gt=0, lt=1, description="digits train fraction")
    calib_frac: float = Field(0.10, gt=0, lt=1, description="digits calibration fraction")
    val_frac: float = Field(0.15, gt=0, lt=1, description="digits validation fraction")
    calib_size: int = Field(256, ge=1, description="ImageFolder calibration subset size")
    augment: bool = Field(True, description="timm train augmentation for ImageFolder train/")

    @field_validator("spec")
    @classmethod
    def _strip_spec(cls, v: str) -> str:
        return v.strip()

    @model_validator(mode="after")
    def _check_fracs(self) -> "DataConfig":
        if self.train_frac + self.calib_frac + self.val_frac >= 1.0:
            raise ValueError("train_frac + calib_frac + val_frac must leave a test fraction > 0")
        return self

    @property
    def scheme(self) -> str:
        """``"digits"`` or ``"imagefolder"`` (raises :class:`DataError` otherwise)."""
        return _scheme(self.spec)


@dataclass
class DataSplits:
    """Loaders plus the metadata the pruning pipeline needs.

    ``input_size`` is ``(C, H, W)`` as in timm; ``example_input()`` gives a
    ``(1, C, H, W)`` tensor for torch-pruning dependency tracing / MAC counting.
    """

    train: DataLoader
    calib: DataLoader
    val: DataLoader
    test: DataLoader
    num_classes: int
    input_size: tuple[int, int, int]
    class_names: list[str]
    spec: str = "digits"
    mean: tuple[float, ...] = DIGITS_MEAN
    std: tuple[float, ...] = DIGITS_STD
    test_is_val: bool = False
    config: DataConfig | None = None
    sizes: dict[str, int] = field(default_factory=dict)

    def example_input(self, batch: int = 1) -> torch.Tensor:
        """A random input tensor of the right shape (for tracing / counting MACs)."""
        return torch.randn(batch, *self.input_size)


# --------------------------------------------------------------------------- helpers


def _loader_kw(config: DataConfig) -> dict[str, Any]:
    return {"num_workers": config.num_workers, "pin_memory": config.pin_memory}


def _scheme(spec: str) -> str:
    if spec == "digits":
        return "digits"
    if spec.startswith(IMAGEFOLDER_PREFIX):
        return "imagefolder"
    raise DataError(f"unknown data spec {spec!r}: expected 'digits' or 'imagefolder:PATH'")


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    num_workers: int = 0,
    drop_last: bool = False,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader whose shuffle order is fixed by ``seed`` (own ``torch.Generator``); workers only where a
    process may start them (:func:`pruning.device.loader_workers`)."""
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        num_workers=loader_workers(num_workers),
        drop_last=drop_last,
        pin_memory=pin_memory,
        persistent_workers=False,
    )


def loader_settings(spec: str, device: torch.device | str) -> dict[str, Any]:
    """``num_workers`` / ``pin_memory`` for a data spec on ``device``: decoding and augmenting ImageFolder
    images feeds a GPU only with worker processes (up to 8, one CPU left for the main process) and pinned
    memory; the embedded digits are in-memory tensors (0 workers, the CPU path unchanged)."""
    if torch.device(device).type != "cuda" or _scheme(spec) != "imagefolder":
        return {}
    return {"num_workers": max(1, min(8, available_cpus() - 1)), "pin_memory": True}


def model_num_classes(model: nn.Module) -> int | None:
    """Number of outputs of the model's classifier head (``None`` if unknown)."""
    head = None
    if hasattr(model, "get_classifier"):
        try:
            head = model.get_classifier()
        except Exception:  # pragma: no cover - exotic heads
            head = None
    if isinstance(head, nn.Linear):
        return int(head.out_features)
    if isinstance(head, nn.Conv2d):
        return int(head.out_channels)
    n = getattr(model, "num_classes", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def check_num_classes(splits: DataSplits, model: nn.Module) -> None:
    """Raise :class:`DataError` if the model head's class count differs from the data's."""
    n_model = model_num_classes(model)
    if n_model is None:
        return
    if n_model != splits.num_classes:
        raise DataError(
            f"data {splits.spec!r} has {splits.num_classes} classes but the model head outputs "
            f"{n_model}; create the model with num_classes={splits.num_classes} or use matching data"
        )


# --------------------------------------------------------------------------- digits


def digits_splits(config: DataConfig | None = None) -> dict[str, np.ndarray]:
    """Indices into ``load_digits()`` for the fixed stratified train/calib/val/test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    config = config or DataConfig()
    y = load_digits().target
    idx = np.arange(len(y))
    rest_frac = 1.0 - config.train_frac
    train_idx, rest_idx = train_test_split(
        idx, test_size=rest_frac, stratify=y, random_state=config.split_seed
    )
    calib_share = config.calib_frac / rest_frac
    calib_idx, rest2_idx = train_test_split(
        rest_idx, train_size=calib_share, stratify=y[rest_idx], random_state=config.split_seed + 1
    )
    val_share = config.val_frac / (1.0 - config.train_frac - config.calib_frac)
    val_idx, test_idx = train_test_split(
        rest2_idx, train_size=val_share, stratify=y[rest2_idx], random_state=config.split_seed + 2
    )
    return {
        "train": np.sort(train_idx),
        "calib": np.sort(calib_idx),
        "val": np.sort(val_idx),
        "test": np.sort(test_idx),
    }


_DIGITS_CACHE: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def _digits_tensors(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    if size not in _DIGITS_CACHE:
        from sklearn.datasets import load_digits

        d = load_digits()
        x = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)  # N,1,8,8 in [0,1]
        if size != 8:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        x = x.clamp_(0.0, 1.0).repeat(1, 3, 1, 1)
        x = (x - 0.5) / 0.5
        y = torch.from_numpy(d.target.astype(np.int64))
        _DIGITS_CACHE[size] = (x.contiguous(), y)
    return _DIGITS_CACHE[size]


def _build_digits(config: DataConfig) -> DataSplits:
    size = config.input_size or 32
    x, y = _digits_tensors(size)
    splits = digits_splits(config)
    sets = {name: TensorDataset(x[ix], y[ix]) for name, ix in splits.items()}
    return DataSplits(
        train=make_loader(sets["train"], config.batch_size, shuffle=True, seed=config.seed,
                          **_loader_kw(config)),
        calib=make_loader(sets["calib"], config.eval_batch_size, **_loader_kw(config)),
        val=make_loader(sets["val"], config.eval_batch_size, **_loader_kw(config)),
        test=make_loader(sets["test"], config.eval_batch_size, **_loader_kw(config)),
        num_classes=10,
        input_size=(3, size, size),
        class_names=[str(i) for i in range(10)],
        spec="digits",
        mean=DIGITS_MEAN,
        std=DIGITS_STD,
        test_is_val=False,
        config=config,
        sizes={k: len(v) for k, v in splits.items()},
    )


# --------------------------------------------------------------------------- imagefolder


def _image_extensions() -> tuple[str, ...]:
    from torchvision.datasets.folder import IMG_EXTENSIONS

    return tuple(e.lower() for e in IMG_EXTENSIONS)


def _check_split_dir(split_dir: Path, root: Path) -> list[str]:
    """Validate one ``train/``-like folder; return its sorted class names."""
    if not split_dir.is_dir():
        raise DataError(f"ImageFolder {root} has no {split_dir.name}/ folder (expected {split_dir})")
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir())
    if not classes:
        raise DataError(f"ImageFolder split {split_dir} has no class sub-folders")
    exts = _image_extensions()
    for c in classes:
        has_image = False
        for dirpath, _dirs, files in os.walk(split_dir / c, followlinks=True):
            if any(f.lower().endswith(exts) for f in files):
                has_image = True
                break
        if not has_image:
            raise DataError(f"class folder {split_dir / c} contains no images ({', '.join(exts[:4])}, ...)")
    return classes


def _imagefolder_root(spec: str) -> Path:
    raw = spec[len(IMAGEFOLDER_PREFIX):].strip()
    if not raw:
        raise DataError("imagefolder spec needs a path: 'imagefolder:PATH'")
    root = Path(raw).expanduser()
    if not root.exists():
        raise DataError(f"ImageFolder path does not exist: {root}")
    if not root.is_dir():
        raise DataError(f"ImageFolder path is not a directory: {root}")
    return root


def _imagefolder_layout(spec: str) -> tuple[Path, list[str], bool]:
    """Check an ImageFolder's layout (train/ and val/ with the same non-empty class folders, optional test/);
    return its root, class names and whether it has a test/ split. Reads no image."""
    root = _imagefolder_root(spec)
    train_classes = _check_split_dir(root / "train", root)
    val_classes = _check_split_dir(root / "val", root)
    if val_classes != train_classes:
        raise DataError(
            f"ImageFolder {root}: val/ classes {val_classes[:5]}... differ from train/ classes {train_classes[:5]}..."
        )
    has_test = (root / "test").is_dir()
    if has_test and _check_split_dir(root / "test", root) != train_classes:
        raise DataError(f"ImageFolder {root}: test/ classes differ from train/ classes")
    return root, train_classes, has_test


def data_num_classes(spec: str) -> int:
    """The class count of a data spec, from its layout alone (the pre-flight check of a run)."""
    if _scheme(spec) == "digits":
        return 10
    return len(_imagefolder_layout(spec)[1])


def data_fingerprint(spec: str) -> str | None:
    """Digest of an ImageFolder's relative file names and sizes (None for the embedded digits).

    Modification times are left out on purpose: a copy of the same data on another machine (a resumed
    spot instance) has the same fingerprint; a renamed, added, removed or resized file changes it.
    """
    import hashlib

    if _scheme(spec) == "digits":
        return None
    root = _imagefolder_root(spec)
    h = hashlib.sha256()
    for dirpath, dirnames, files in os.walk(root, followlinks=True):
        dirnames.sort()
        rel = Path(dirpath).relative_to(root).as_posix()
        for name in sorted(files):
            try:
                size = os.stat(os.path.join(dirpath, name)).st_size
            except OSError:
                continue
            h.update(f"{rel}/{name}\0{size}\n".encode())
    return h.hexdigest()[:16]


def _timm_data_config(model: nn.Module | None, input_size: int | None) -> dict[str, Any]:
    from timm.data import resolve_data_config

    args: dict[str, Any] = {}
    if input_size is not None:
        args["input_size"] = (3, input_size, input_size)
    cfg = resolve_data_config(args, model=model) if model is not None else resolve_data_config(args)
    if input_size is not None:
        cfg["input_size"] = (3, input_size, input_size)
    return cfg


def _build_imagefolder(config: DataConfig, model: nn.Module | None) -> DataSplits:
    from timm.data import create_transform
    from torchvision.datasets import ImageFolder

    root, train_classes, has_test = _imagefolder_layout(config.spec)
    cfg = _timm_data_config(model, config.input_size)
    train_tf = create_transform(**cfg, is_training=config.augment)
    eval_tf = create_transform(**cfg, is_training=False)

    try:
        train_set = ImageFolder(str(root / "train"), transform=train_tf)
        calib_base = ImageFolder(str(root / "train"), transform=eval_tf)
        val_set = ImageFolder(str(root / "val"), transform=eval_tf)
        test_set = ImageFolder(str(root / "test"), transform=eval_tf) if has_test else val_set
    except (FileNotFoundError, RuntimeError) as exc:  # torchvision's own checks
        raise DataError(f"cannot read ImageFolder {root}: {str(exc).splitlines()[0]}") from exc

    g = torch.Generator().manual_seed(config.seed)
    n_calib = min(config.calib_size, len(calib_base))
    calib_idx = torch.randperm(len(calib_base), generator=g)[:n_calib].sort().values.tolist()
    calib_set = Subset(calib_base, calib_idx)

    c, h, w = cfg["input_size"]
    return DataSplits(
        train=make_loader(train_set, config.batch_size, shuffle=True, seed=config.seed,
                          **_loader_kw(config)),
        calib=make_loader(calib_set, config.eval_batch_size, **_loader_kw(config)),
        val=make_loader(val_set, config.eval_batch_size, **_loader_kw(config)),
        test=make_loader(test_set, config.eval_batch_size, **_loader_kw(config)),
        num_classes=len(train_classes),
        input_size=(int(c), int(h), int(w)),
        class_names=list(train_classes),
        spec=config.spec,
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        test_is_val=not has_test,
        config=config,
        sizes={"train": len(train_set), "calib": len(calib_set), "val": len(val_set),
               "test": len(test_set)},
    )


# --------------------------------------------------------------------------- entry point


def build_data(config: DataConfig | str | None = None, model: nn.Module | None = None) -> DataSplits:
    """Build train/calib/val/test loaders for ``config`` (a :class:`DataConfig` or a spec string).

    ``model`` supplies the timm data config (input size, mean/std, interpolation) for
    ImageFolder data; it is ignored for digits. Raises :class:`DataError` on bad data.
    """
    if config is None:
        config = DataConfig()
    elif isinstance(config, str):
        config = DataConfig(spec=config)
    scheme = config.scheme
    if scheme == "digits":
        return _build_digits(config)
    return _build_imagefolder(config, model)
