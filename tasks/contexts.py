"""A process-local cache of run contexts (store handle, original model, data), one per run id.

Steps of one run that land in the same process (the flow, a Dask worker, a work-pool job) share the
loaded model and data; a different config for the same run id builds a fresh context.
"""
from __future__ import annotations

from typing import Callable, Generic, TypeVar

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
