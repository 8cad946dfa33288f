"""Channel importance criteria, pluggable through a small registry (timm style).

Each criterion is a callable ``group -> Tensor[channels]`` from Torch-Pruning; Taylor needs the
gradients of a calibration loss to be present on the model copy that is being pruned.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch_pruning as tp

from pruning.errors import UserError

_REGISTRY: dict[str, Callable[[int], tp.importance.Importance]] = {}


def register_importance(name: str):
    """Decorator: register a factory ``seed -> importance callable`` under ``name``."""

    def wrap(factory):
        _REGISTRY[name] = factory
        return factory

    return wrap


@register_importance("l1")
def _l1(seed: int):
    return tp.importance.GroupMagnitudeImportance(p=1)


@register_importance("l2")
def _l2(seed: int):
    return tp.importance.GroupMagnitudeImportance(p=2)


@register_importance("taylor")
def _taylor(seed: int):
    return tp.importance.GroupTaylorImportance()


class SeededRandomImportance(tp.importance.Importance):
    """Uniform random scores from a private generator, so runs are reproducible."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def __call__(self, group):
        _, idxs = group[0]
        return torch.rand(len(idxs), generator=self.generator)


@register_importance("random")
def _random(seed: int):
    return SeededRandomImportance(seed)


def list_importances() -> list[str]:
    return sorted(_REGISTRY)


class MemberTolerant(tp.importance.Importance):
    """A criterion that scores a group without the members it cannot score.

    Torch-Pruning's criteria index every member's weight by the group's channels; a few layers break
    that (e.g. a conv with ``groups == in_channels`` but a channel multiplier, whose input importance has
    one entry: FastViT's downsampling). Rather than freezing the whole group, the group is scored from
    the members that can be scored (the root must score, else it raises).
    """

    def __init__(self, inner: tp.importance.Importance):
        self.inner = inner

    def __call__(self, group):
        try:
            return self.inner(group)
        except (IndexError, RuntimeError):
            pass
        kept = tp.dependency.Group()
        kept._DG = getattr(group, "_DG", None)
        for i, item in enumerate(group):
            single = tp.dependency.Group()
            single._DG = kept._DG
            single.items.append(item)  # the item itself: it carries the root indices the criteria reduce by
            try:
                self.inner(single)
            except (IndexError, RuntimeError):
                if i == 0:
                    raise
                continue
            kept.items.append(item)
        return self.inner(kept)


def create_importance(name: str, seed: int = 0) -> tp.importance.Importance:
    """Instantiate the criterion registered as ``name`` (members it cannot score are left out of the score)."""
    if name not in _REGISTRY:
        raise UserError(f"unknown importance criterion '{name}'; choose from {list_importances()}")
    return MemberTolerant(_REGISTRY[name](seed))


def needs_gradients(name: str) -> bool:
    return name == "taylor"


def has_gradients(model: torch.nn.Module) -> bool:
    return any(p.grad is not None for p in model.parameters())
