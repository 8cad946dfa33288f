"""One candidate's inline fine-tuning as its own flow, for a work pool of GPU machines.

Deploy it (``deployments/prefect.yaml``: ``finetune-candidate/gpu``) and start the search with
``--finetune-deployment finetune-candidate/gpu``: every in-band candidate of a revision becomes a
run of this deployment, so a work pool with N workers fine-tunes N candidates at once. The run
reads the pruned bundle from the artifact store and writes its checkpoint and result back there.
"""
from __future__ import annotations

from prefect import flow

from agents.search import Evaluated, Measured
from tasks import run_tasks
from tasks.config import RunConfig


@flow(name="finetune-candidate", flow_run_name="finetune-r{revision}c{candidate}-{run_id}", log_prints=True,
      validate_parameters=True)
def finetune_candidate(config: RunConfig, run_id: str, measured: Measured, revision: int, candidate: int = 0
                       ) -> Evaluated:
    """Inline fine-tuning + validation accuracy of one pruned candidate (idempotent: a finished one is read back)."""
    return run_tasks.finetune(config, run_id, measured, revision, candidate)
