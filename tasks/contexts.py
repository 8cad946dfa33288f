"""Process-local caches: run contexts (store handle, original model, data) and analysed pruning spaces.

Steps of one run that land in the same process (the flow, a Dask worker, a work-pool job) share the
loaded model and data; a different config for the same run id builds a fresh context. Every revision
and candidate of a run prunes a fork of one analysed :class:`~pruning.space.PruningSpace` per
criterion (:class:`SpaceCache`) instead of tracing and scoring the model again.
"""
from __future__ import annotations

import weakref
from typing import Callable, Generic, TypeVar

import torch
from torch import nn

from pruning.plan import PruningPlan
from pruning.space import PruningSpace

C = TypeVar("C")
Ctx = TypeVar("Ctx")


class ContextCache(Generic[C, Ctx]):
    """``get(config, run_id)`` returns the cached context, creating it with ``factory(config, run_id)``."""

    def __init__(self, factory: Callable[[C, str], Ctx]):
        self._factory = factory
        self._items: dict[str, tuple[C, Ctx]] = {}

    def get(self, config: C, run_id: str) -> Ctx:
        item = self._items.get(run_id)
        if item is None or item[0] != config:
            item = self._items[run_id] = (config, self._factory(config, run_id))
        return item[1]

    def drop(self, run_id: str) -> None:
        self._items.pop(run_id, None)


class SpaceCache:
    """Analysed pruning spaces of ONE original model, one per (criterion, ignored layers, seed, input shape).

    The analysis (trace, importance, trial cut, MAC model) depends on nothing else of a plan, so every
    plan shape, ratio, round_to and candidate reuses it; callers cut forks (``prune_to_target(...,
    fork=True)``), never the cached space. ``hits`` / ``builds`` count reuse.
    """

    def __init__(self, max_items: int = 4):
        self.max_items = max_items
        self._items: dict[tuple, PruningSpace] = {}
        self.hits = 0
        self.builds = 0

    @staticmethod
    def key(example: torch.Tensor, plan: PruningPlan, seed: int) -> tuple:
        return (plan.importance, tuple(sorted(plan.ignored_layers)), int(seed), tuple(example.shape))

    def get(self, model: nn.Module, example: torch.Tensor, plan: PruningPlan, seed: int = 0,
            in_place: bool = False) -> PruningSpace:
        """The cached space for ``plan``'s criterion; on a miss analyse ``model`` (itself if ``in_place``,
        e.g. a calibrated copy made for this call, else a copy of it)."""
        key = self.key(example, plan, seed)
        space = self._items.get(key)
        if space is not None:
            self.hits += 1
            return space
        space = PruningSpace(model, example, plan, seed=seed) if in_place else PruningSpace.build(model, example, plan, seed)
        self.builds += 1
        if len(self._items) >= self.max_items:
            self._items.pop(next(iter(self._items)))
        self._items[key] = space
        return space


_SPACES: "weakref.WeakKeyDictionary[object, SpaceCache]" = weakref.WeakKeyDictionary()


def spaces_for(owner: object) -> SpaceCache:
    """The space cache that lives as long as ``owner`` (a run context: one original model per context)."""
    cache = _SPACES.get(owner)
    if cache is None:
        cache = _SPACES[owner] = SpaceCache()
    return cache
