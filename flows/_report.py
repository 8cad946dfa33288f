"""What both flows share: Prefect artifact keys that cannot collide between runs, a progress bar that
says where the run is, tables and images shown in the UI itself, and the failed-status record."""
from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
from typing import Iterator

from prefect.artifacts import (
    create_image_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from pruning.artifacts import ArtifactStore, runs
from pruning.errors import first_line

log = logging.getLogger(__name__)


def run_scope(run_id: str, store_url: str) -> str:
    """The run id plus a short hash of its store: two stores may hold runs of the same id (same config)."""
    return f"{run_id}-{hashlib.sha256(store_url.encode()).hexdigest()[:6]}"


def artifact_key(scope: str, what: str) -> str:
    """A Prefect artifact key (lowercase letters, digits and dashes) for ``what`` of a run scope."""
    text = "".join(c if c.isalnum() else "-" for c in f"{scope}-{what}".lower())
    return "-".join(filter(None, text.split("-")))[:120]


class Progress:
    """A progress artifact whose description says where the run is ("revision 3 of 8: ...")."""

    def __init__(self, scope: str, done: float, total: float, what: str):
        self.total, self.what = total, what
        self.id = create_progress_artifact(progress=self._pct(done), key=artifact_key(scope, "progress"),
                                           description=f"{what} {done:g} of {total:g}")

    def _pct(self, done: float) -> float:
        return min(100.0, 100.0 * done / self.total) if self.total else 100.0

    def update(self, done: float, note: str = "") -> None:
        update_progress_artifact(self.id, progress=self._pct(done),
                                 description=f"{self.what} {done:g} of {self.total:g}" + (f": {note}" if note else ""))

    def finish(self, note: str) -> None:
        update_progress_artifact(self.id, progress=100.0, description=note)


def publish_table(scope: str, name: str, rows: list[dict], description: str) -> None:
    create_table_artifact(table=rows, key=artifact_key(scope, name), description=description)


def publish_png(scope: str, name: str, png: bytes, description: str) -> None:
    """An image artifact holding the PNG itself (a data URL), so the UI shows it whatever the store is."""
    create_image_artifact(image_url="data:image/png;base64," + base64.b64encode(png).decode(),
                          key=artifact_key(scope, name), description=description)


@contextlib.contextmanager
def failure_recorded(store: ArtifactStore, run_id: str) -> Iterator[None]:
    """Re-raise whatever ends the run, after writing ``state: failed`` with its first line to status.json."""
    try:
        yield
    except BaseException as exc:
        try:
            runs.write_status(store, run_id, state="failed", error=first_line(exc))
        except Exception:  # noqa: BLE001 - the store may be what failed; status stays 'running', resume works
            log.warning("could not record the failure of run %s in its status", run_id)
        raise
