"""What both flows share: Prefect artifact keys, a live table + progress bar, and the failed-status record."""
from __future__ import annotations

import contextlib
import logging
from typing import Iterator

from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact

from pruning.artifacts import ArtifactStore, runs

log = logging.getLogger(__name__)


def artifact_key(run_id: str, what: str) -> str:
    """A Prefect artifact key (lowercase letters, digits and dashes) for ``what`` of ``run_id``."""
    text = "".join(c if c.isalnum() else "-" for c in f"{run_id}-{what}".lower())
    return "-".join(filter(None, text.split("-")))[:120]


class LiveTable:
    """A table artifact re-published with every new row, and a progress bar next to it."""

    def __init__(self, run_id: str, name: str, rows: list[dict], description: str, progress: float,
                 progress_description: str):
        self.run_id, self.name, self.rows, self.description = run_id, name, rows, description
        self.progress_id = create_progress_artifact(progress=min(100.0, progress),
                                                    key=artifact_key(run_id, "progress"),
                                                    description=progress_description)

    def add(self, row: dict, progress: float) -> None:
        self.rows.append(row)
        create_table_artifact(table=self.rows, key=artifact_key(self.run_id, self.name), description=self.description)
        self.progress(progress)

    def progress(self, value: float) -> None:
        update_progress_artifact(self.progress_id, progress=min(100.0, value))


@contextlib.contextmanager
def failure_recorded(store: ArtifactStore, run_id: str) -> Iterator[None]:
    """Re-raise whatever ends the run, after writing ``state: failed`` with its first line to status.json."""
    try:
        yield
    except BaseException as exc:
        reason = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        try:
            runs.write_status(store, run_id, state="failed", error=reason)
        except Exception:  # noqa: BLE001 - the store may be what failed; status stays 'running', resume works
            log.warning("could not record the failure of run %s in its status", run_id)
        raise
