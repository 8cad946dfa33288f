"""Model loading: any timm architecture, optionally with the user's own checkpoint.

Weights are only ever read with ``torch.load(..., weights_only=True)``; pretrained hub weights
are fetched only when the user asks for them (``pretrained=True``).
"""
from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Literal

import timm
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from pruning.errors import UserError, load_failure

Family = Literal["cnn", "vit"]


class ModelLoadError(UserError):
    """A model could not be created or its weights could not be loaded (one-line message)."""


class ModelSpec(BaseModel):
    """What to load. Every field maps onto a CLI flag."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="timm architecture name, e.g. resnet50, convnext_small, deit_tiny_patch16_224")
    num_classes: int | None = Field(None, gt=0, description="classifier width; None keeps the architecture default (1000)")
    checkpoint: Path | None = Field(None, description="state dict saved with torch.save; loaded with weights_only=True")
    pretrained: bool = Field(False, description="download hub weights; off by default because runs must work offline")
    input_size: int | None = Field(None, gt=0, description="square input resolution; None uses the model's pretrained config")


def _check_name(name: str) -> None:
    if name in timm.list_models():
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.7)
    hint = f" (did you mean {', '.join(close)}?)" if close else " (see timm.list_models())"
    raise ModelLoadError(f"unknown model '{name}'{hint}")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict (or a checkpoint dict holding one) with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupted, truncated or pickled-code files all land here
        raise ModelLoadError(f"cannot read checkpoint {path}: {load_failure(exc)}") from None
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict", "state_dict_ema"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelLoadError(f"checkpoint {path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Strictly load ``state`` into ``model``; a mismatch is one readable error, not a torch traceback."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or shape:
        parts = []
        if shape:
            k = shape[0]
            parts.append(f"{len(shape)} shape mismatches (e.g. {k}: {tuple(state[k].shape)} vs model {tuple(own[k].shape)})")
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        raise ModelLoadError(f"{source} does not fit the model: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


def load_model(spec: ModelSpec) -> nn.Module:
    """Create ``spec.name`` with timm and load the checkpoint if one is given; returns the model in eval mode."""
    _check_name(spec.name)
    kwargs: dict = {}
    if spec.num_classes is not None:
        kwargs["num_classes"] = spec.num_classes
    if spec.input_size is not None:
        kwargs["img_size"] = spec.input_size  # dropped below for architectures that do not take it
    try:
        model = create_with_accepted_kwargs(spec.name, spec.pretrained, kwargs)
    except Exception as exc:
        what = "download pretrained weights for" if spec.pretrained else "create"
        raise ModelLoadError(f"cannot {what} '{spec.name}': {str(exc).splitlines()[0][:200]}") from None
    if spec.checkpoint is not None:
        load_weights(model, read_state_dict(spec.checkpoint), source=f"checkpoint {spec.checkpoint}")
    return model.eval()


_UNEXPECTED_KWARG = re.compile(r"unexpected keyword argument(?:\(s\))?:? \[?'(\w+)'")


def create_with_accepted_kwargs(name: str, pretrained: bool, kwargs: dict) -> nn.Module:
    """``timm.create_model`` with only the keywords the architecture accepts.

    Optional keywords (``img_size``) are passed when the model's constructor takes them (ViTs, LeViT,
    EfficientFormer, ... size their position tables or attention biases by it) and dropped when it
    raises ``unexpected keyword argument`` (ResNet, FastViT, ConvNeXt, ...); the constructor fails
    on the keyword before building anything, so a retry costs nothing.
    """
    kwargs = dict(kwargs)
    while True:
        try:
            return timm.create_model(name, pretrained=pretrained, **kwargs)
        except TypeError as exc:
            bad = _UNEXPECTED_KWARG.search(str(exc))
            if bad is None or bad.group(1) not in kwargs or bad.group(1) == "num_classes":
                raise
            kwargs.pop(bad.group(1))


def is_vit_name(name: str) -> bool:
    return any(t in name for t in ("vit", "deit", "eva", "beit"))


_ATTENTION_CLASS_NAMES = frozenset({"Attention", "WindowAttention", "MultiScaleAttention", "AttentionPool2d"})


def model_family(model: nn.Module) -> Family:
    """``"vit"`` for transformer-style models, else ``"cnn"``; the one family detector.

    A model is ``"vit"`` when it has a patch embedding (``patch_embed``), a
    ``nn.MultiheadAttention``, or an attention block with a fused ``qkv`` projection
    (timm-style ``qkv`` + ``num_heads``, or a known attention class name with ``qkv``).
    Picks the pruning space rules and the fine-tuning optimizer/LR.
    """
    if hasattr(model, "patch_embed"):
        return "vit"
    for m in model.modules():
        if isinstance(m, nn.MultiheadAttention):
            return "vit"
        if hasattr(m, "qkv") and (hasattr(m, "num_heads") or type(m).__name__ in _ATTENTION_CLASS_NAMES):
            return "vit"
    return "cnn"


def default_input_size(model: nn.Module) -> int:
    """The square resolution the model was configured for (timm pretrained config), 224 if unknown."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = cfg.get("input_size", (3, 224, 224))
    patch = getattr(model, "patch_embed", None)
    if patch is not None and getattr(patch, "img_size", None):
        return int(patch.img_size[0])
    return int(size[-1])


def classifier(model: nn.Module) -> nn.Module | None:
    """The classifier layer (never pruned on its output side)."""
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    return head if isinstance(head, nn.Module) and not isinstance(head, nn.Identity) else None
