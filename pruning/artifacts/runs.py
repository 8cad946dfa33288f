"""Where a pruning run keeps its artifacts in the store, and how to read them back.

Layout under ``<run_id>/`` in the store::

    config.json          the validated run configuration (no secrets)
    status.json          state (running / completed / failed), best revision, timestamps
    profile.json         baseline profile of the original model
    original.pt          the original weights the search always prunes from
    history.jsonl        one record per candidate of each revision (plan, strategist, verdict, MACs, accuracy,
                         checkpoint sha256, worker)
    revisions/rNNN[cC].pt              pruned + inline-fine-tuned bundle of every in-band candidate C (C > 0)
    revisions/rNNN[cC].measured.json   the prune step's result (idempotent re-runs)
    revisions/rNNN[cC].evaluated.json  the fine-tuning step's result (idempotent re-runs, deployment results)
    extended/state.pt    extended fine-tuning state, saved every K epochs (resume after preemption)
    final/               model.pt, model.onnx, latency.csv/.md, summary.md, macs.png
"""
from __future__ import annotations

import hashlib
import json
import re
import time
from datetime import datetime, timezone

from pruning.artifacts.base import ArtifactStore
from pruning.artifacts.errors import KeyNotFound
from pruning.artifacts.lease import RunLease


def key(run_id: str, name: str) -> str:
    """Store key of ``name`` inside run ``run_id``."""
    return f"{run_id}/{name}"


def slot_name(revision: int, candidate: int = 0, ext: str = "") -> str:
    """``revisions/rNNN[cC]<ext>``: where a candidate's files live inside a run (candidate 0 has no suffix)."""
    suffix = f"c{candidate}" if candidate else ""
    return f"revisions/r{revision:03d}{suffix}{ext}"


def revision_key(run_id: str, revision: int, candidate: int = 0) -> str:
    """Store key of a candidate's inline-fine-tuned bundle."""
    return key(run_id, slot_name(revision, candidate, ".pt"))


def make_run_id(parts: dict, config_for_hash: dict) -> str:
    """Deterministic id: re-running the same configuration resumes the same run."""
    digest = hashlib.sha256(json.dumps(config_for_hash, sort_keys=True, default=str).encode()).hexdigest()[:8]
    stem = "-".join(str(v) for v in parts.values() if v not in (None, ""))
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).strip("-")[:60]
    return f"{stem}-{digest}"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_status(store: ArtifactStore, run_id: str, **fields) -> dict:
    """Merge ``fields`` into the run's status.json."""
    try:
        status = store.get_json(key(run_id, "status.json"))
    except KeyNotFound:
        status = {"run_id": run_id, "created": now()}
    status.update(fields, updated=now())
    store.put_json(key(run_id, "status.json"), status)
    return status


def read_status(store: ArtifactStore, run_id: str) -> dict | None:
    try:
        return store.get_json(key(run_id, "status.json"))
    except KeyNotFound:
        return None


def read_history(store: ArtifactStore, run_id: str) -> list[dict]:
    """All revision records of a run (empty when none were persisted yet)."""
    k = key(run_id, "history.jsonl")
    return store.read_jsonl(k) if store.exists(k) else []


def list_runs(store: ArtifactStore) -> list[dict]:
    """One status dict per run found in the store, newest first."""
    ids = sorted({k.split("/")[0] for k in store.list() if k.count("/") == 1 and k.endswith("/config.json")})
    rows = []
    now = time.time()
    for run_id in ids:
        status = read_status(store, run_id) or {"run_id": run_id, "state": "unknown"}
        if status.get("state") == "running":  # nobody holds the lease: the process died before it could say so
            lease = RunLease(store, run_id)
            if lease.is_free(lease.holder(), now):
                status["state"] = "interrupted"
        rows.append(status)
    return sorted(rows, key=lambda s: s.get("updated", ""), reverse=True)
