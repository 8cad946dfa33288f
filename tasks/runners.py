"""Where the candidates of a revision run: the flow's own threads, a Dask cluster, or a Ray cluster.

``candidate_runner(spec)`` turns the ``--task-runner`` string of a :class:`~tasks.config.RunConfig`
into a started Prefect task runner (used as a context manager inside the flow), so one flow and
one deployment serve every engine::

    local                 threads in the flow process (Prefect's ThreadPoolTaskRunner)
    dask                  a Dask LocalCluster started for this run (one single-threaded worker per candidate)
    dask://HOST:8786      an existing Dask cluster (``dask scheduler`` + ``dask worker`` on other machines)
    ray / ray://HOST:PORT a local or existing Ray cluster (needs ``pip install agentic-pruner[ray]``)

Workers receive only the run config, the run id and store keys: they read the original model and
the pruned bundle from the artifact store and write their checkpoints back to it, so they can run
on other machines as long as they reach the same store (S3) and the Prefect API.

One GPU per worker: each worker resolves the run's ``--device`` itself (``tasks.steps.RunContext.device``).
A worker of the local Dask cluster (named 0..N-1) takes GPU ``name % GPUs`` of its machine; workers
started by hand get theirs from ``CUDA_VISIBLE_DEVICES`` (one worker per GPU, see deployments/README.md);
on Ray every candidate's task asks for ``num_gpus=1`` when the cluster has GPUs, so Ray runs as many at
once as there are GPUs and gives each its own (``CUDA_VISIBLE_DEVICES`` set by Ray).
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator

from prefect.task_runners import TaskRunner

from pruning.errors import UserError, first_line

log = logging.getLogger(__name__)


class RunnerUnavailable(UserError):
    """The requested task runner cannot be used (not installed, or its cluster cannot be reached)."""


@contextlib.contextmanager
def _dask_worker_defaults() -> Iterator[None]:
    """Workers spawned here keep glibc's own malloc trimming.

    Dask's Nanny sets ``MALLOC_TRIM_THRESHOLD_=65536`` in every worker it spawns; measured here, that
    makes a CPU training step of the default model ~1.9x slower than in a plain process
    (benchmarks/scale_out.py). Only affects clusters this process starts (``--task-runner dask``).
    """
    try:
        import dask
    except ImportError:
        yield
        return
    with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
        yield


def _dask_address(spec: str) -> str | None:
    if spec == "dask":
        return None
    host = spec.split("://", 1)[1]
    return f"tcp://{host}"


def _api_env() -> dict[str, str]:
    """``PREFECT_API_URL`` of this process's API (the ephemeral server's too), for workers it starts."""
    try:
        from prefect.client.orchestration import get_client

        url = str(get_client().api_url)
    except Exception:  # noqa: BLE001 - outside a Prefect context: workers fall back to their own settings
        return {}
    return {"PREFECT_API_URL": url} if url.startswith("http") else {}


def _make_runner(spec: str, workers: int) -> TaskRunner | None:
    if spec == "local":
        return None
    if spec == "dask" or spec.startswith(("dask://", "tcp://")):
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError as exc:
            raise RunnerUnavailable(f"task runner '{spec}' needs prefect-dask: pip install prefect-dask ({exc})") from None
        address = _dask_address(spec)
        if address:
            return DaskTaskRunner(address=address, client_kwargs={"timeout": "15s"})
        threads = max(1, (os.cpu_count() or 1) // max(1, workers))
        # workers report their task runs to the flow's API
        env = {"OMP_NUM_THREADS": str(threads), "DASK_LOGGING__DISTRIBUTED": "warning", **_api_env()}
        logging.getLogger("distributed").setLevel(logging.WARNING)
        return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True,
                                              "dashboard_address": None, "env": env})
    if spec == "ray" or spec.startswith("ray://"):
        try:
            from prefect_ray import RayTaskRunner
        except ImportError as exc:
            raise RunnerUnavailable(f"task runner '{spec}' needs prefect-ray: pip install 'agentic-pruner[ray]' "
                                    f"({exc})") from None
        return RayTaskRunner(address=spec if spec != "ray" else None,
                             init_kwargs={"runtime_env": {"env_vars": {"RAY_DEDUP_LOGS": "0", **_api_env()}}})
    raise RunnerUnavailable(f"unknown task runner '{spec}'")


def check_reachable(spec: str, timeout: float = 5.0) -> None:
    """Fail fast (before any pruning work) when a remote cluster's address does not accept connections."""
    if "://" not in spec:
        return
    import socket

    hostport = spec.split("://", 1)[1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise RunnerUnavailable(f"task runner '{spec}' needs HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise RunnerUnavailable(f"cannot reach the cluster of task runner '{spec}': {exc}") from None


class OneGpuPerTask:
    """A started Ray task runner whose every submitted task run asks Ray for one GPU (``num_gpus=1``)."""

    def __init__(self, runner: TaskRunner):
        self.runner = runner

    def submit(self, *args, **kwargs):
        from prefect_ray.context import remote_options

        with remote_options(num_gpus=1):
            return self.runner.submit(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.runner, name)


def _cluster_gpus() -> float:
    """GPUs of the Ray cluster this process is connected to (0 when unknown)."""
    try:
        import ray

        return float(ray.cluster_resources().get("GPU", 0))
    except Exception:  # noqa: BLE001 - no Ray, not connected: no GPUs to ask for
        return 0.0


def _gpu_wrapped(spec: str, runner: TaskRunner, gpus: bool | None):
    """On Ray with GPUs (and ``gpus`` not False): :class:`OneGpuPerTask` around ``runner``; else ``runner``."""
    if gpus is False or not (spec == "ray" or spec.startswith("ray://")):
        return runner
    n = _cluster_gpus()
    if n < 1:
        if gpus:
            log.warning("task runner %s: the Ray cluster has no GPUs; candidates run without one", spec)
        return runner
    log.info("task runner %s: one GPU per candidate (%g GPUs in the cluster)", spec, n)
    return OneGpuPerTask(runner)


@contextlib.contextmanager
def candidate_runner(spec: str, workers: int = 2, gpus: bool | None = None) -> Iterator[TaskRunner | None]:
    """The started task runner for ``spec`` (None = submit to the flow's own runner); connects eagerly.

    An unreachable cluster fails here, before any candidate is pruned, with a one-line error. ``gpus``
    (Ray): None = one GPU per candidate task when the cluster has GPUs, False = never ask for one
    (e.g. a ``--device cpu`` run).
    """
    runner = _make_runner(spec, workers)
    if runner is None:
        yield None
        return
    saved_env = dict(os.environ)  # Dask writes its workers' pre-spawn variables into this process's environment
    try:
        with _dask_worker_defaults():
            runner.__enter__()
            if hasattr(runner, "client"):
                client = runner.client  # connect now: a wrong address must fail before the search starts
                wanted = getattr(runner, "address", None)
                got = getattr(getattr(client, "scheduler", None), "address", None)
                if spec.startswith(("dask://", "tcp://")) and wanted and got and got != wanted:
                    raise RunnerUnavailable(f"this process already has a Dask client for {got}; refusing to send "
                                            f"candidates there instead of {wanted}")
    except RunnerUnavailable:
        with contextlib.suppress(Exception):
            runner.__exit__(None, None, None)
        raise
    except Exception as exc:  # noqa: BLE001 - classified into one clear message
        with contextlib.suppress(Exception):
            runner.__exit__(None, None, None)
        raise RunnerUnavailable(f"cannot start task runner '{spec}': {first_line(exc)}") from None
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
    log.info("candidates run on %s", spec)
    try:
        yield _gpu_wrapped(spec, runner, gpus)
    finally:
        runner.__exit__(None, None, None)


def finetune_on_deployment(deployment: str, config, run_id: str, items: list, poll_seconds: float = 2.0,
                           crash_retries: int = 1) -> list:
    """Fine-tune each measured candidate as a run of the ``finetune-candidate`` deployment; wait for all.

    Runs are started together (``run_deployment(timeout=0)``, linked to the calling flow as subflows),
    so a work pool with N workers fine-tunes N candidates at once. Results are read back from the
    artifact store, where the candidate flow wrote them. A run that crashed (its worker or machine
    died) is started again up to ``crash_retries`` times; finished candidates are never re-trained.
    """
    import time

    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    from tasks import steps

    ctx = steps.get_context(config, run_id)
    worker_config = config.model_copy(update={"finetune_deployment": None, "task_runner": "local"})

    def start(m):
        params = {"config": worker_config.model_dump(mode="json"), "run_id": run_id,
                  "measured": m.model_dump(mode="json"), "revision": m.revision, "candidate": m.candidate}
        try:
            return run_deployment(name=deployment, parameters=params, timeout=0, as_subflow=True)
        except ObjectNotFound:
            raise RunnerUnavailable(f"deployment '{deployment}' not found on the Prefect API: deploy the "
                                    "finetune-candidate flow first (see deployments/README.md)") from None

    runs = {i: start(m) for i, m in enumerate(items)}
    retries = {i: crash_retries for i in runs}
    done: dict[int, object] = {}
    with get_client(sync_client=True) as client:
        while len(done) < len(items):
            time.sleep(poll_seconds)
            for i, fr in runs.items():
                if i in done:
                    continue
                state = client.read_flow_run(fr.id).state
                if state is None or not state.is_final():
                    continue
                m = items[i]
                if state.is_completed():
                    evaluated = steps.read_evaluated(ctx, m.revision, m.candidate, m.checkpoint_sha256, m.rung)
                    if evaluated is None:
                        raise RuntimeError(f"deployment run {fr.name} completed but candidate r{m.revision}c"
                                           f"{m.candidate} left no result in {ctx.store.describe()}")
                    evaluated.notes.append(f"fine-tuned by deployment run {fr.name} ({deployment})")
                    done[i] = evaluated
                elif state.is_crashed() and retries[i] > 0:
                    retries[i] -= 1
                    log.warning("deployment run %s crashed (%s); starting candidate r%dc%d again", fr.name,
                                state.message, m.revision, m.candidate)
                    runs[i] = start(m)
                else:
                    raise RuntimeError(f"candidate r{m.revision}c{m.candidate}: deployment run {fr.name} ended "
                                       f"{state.name}: {(state.message or '')[:300]}")
    return [done[i] for i in range(len(items))]
