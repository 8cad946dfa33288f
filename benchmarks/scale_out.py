"""Scale-out: wall time of one fixed search with K candidates per revision on 1 vs 2 local Dask workers.

The same search (embedded default model -> 50 % of its MACs, heuristic strategist, ``max_revisions``
revisions, ``extra_revisions`` large enough that the Master never stops early, no extended fine-tuning,
no latency measurement) is run with K = 1, 2, 4 candidates per revision on a Dask ``LocalCluster`` of
1 and of 2 single-threaded worker processes, each worker with ``OMP_NUM_THREADS = cores // workers``
so both settings use every core, and glibc's default allocator settings (Dask's MALLOC_TRIM_THRESHOLD_
made CPU training ~2x slower in a worker; ``--dask-malloc-trim`` keeps it); plus K = 1 on the default
``local`` task runner for reference. The script starts its own Prefect API server (``prefect server
start`` with a private PREFECT_HOME) and its own Dask clusters, and stops them at the end, also on
errors. Every measurement gets a fresh store directory and its own run id, so nothing resumes.

The flow is called in this process (``agentic_prune(RunConfig(...))``), not through the CLI in a
subprocess: the wall time is taken around the flow call itself, so interpreter, torch and Prefect
start-up (~10 s on 2 cores, and noisy) stay out of it; one warm-up run first loads the default model,
the data and Prefect's client, so no measured run pays for them; errors propagate with tracebacks.
The Dask workers are warmed up the same way (imports, data, one Prefect task) before any measurement.
Runs are interleaved by K (K=1 on 1 then 2 workers, then K=2, ...), so the two worker counts compared
at one K run close together in time on a shared machine.

From the measured numbers it projects the wall time on N GPU workers (N = 1, 2, 4, 8):
T(N) = T_serial(K) + sum over revisions of ceil(k_r / N) * (t_candidate + t_dispatch), see the
README section for the assumptions.

Writes benchmarks/results/scale_out.csv (measured), scale_out_projection.csv (projection; the name of
--out with ``_projection``) and the tables between the markers in benchmarks/README.md.
Usage: python benchmarks/scale_out.py [--k 1 2 4] [--workers 1 2] [--revisions 2] [--inline-epochs 12]
       [--max-train-batches N] [--out CSV] [--no-readme] [--smoke] [--dask-malloc-trim] [--keep]
"""
from __future__ import annotations

# Only the standard library at module level: Dask starts its worker processes with ``spawn``, which
# re-imports this file in every worker; torch / Prefect are imported inside the functions.
import argparse
import contextlib
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent
PROJECTION_WORKERS = (1, 2, 4, 8)
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
TRIM = "MALLOC_TRIM_THRESHOLD_"  # Dask's Nanny sets it to 65536 in every worker unless told otherwise

# full run / --smoke defaults (explicit flags override either)
FULL = dict(k=[1, 2, 4], workers=[1, 2], revisions=2, inline_epochs=12, max_train_batches=None)
SMOKE = dict(k=[1, 2], workers=[1, 2], revisions=2, inline_epochs=1, max_train_batches=2)


def log(msg: str) -> None:
    print(f"[scale_out {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------
# the processes this benchmark owns: a Prefect API server and Dask clusters
# ----------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def prefect_server(prefect_home: Path, timeout: float = 300.0):
    """``prefect server start`` on a free loopback port with a private PREFECT_HOME; yields the API URL.

    The server runs in its own session (process group), which is terminated - and killed if it does
    not stop within 20 s - when the block ends, however it ends.
    """
    port = free_port()
    prefect_home.mkdir(parents=True, exist_ok=True)
    exe = Path(sys.executable).with_name("prefect")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "prefect"]
    cmd += ["server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui", "--analytics-off"]
    env = {**os.environ, "PREFECT_HOME": str(prefect_home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    log_path = prefect_home / "server.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    try:
        t0 = time.perf_counter()
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"prefect server exited with code {proc.returncode}: "
                                   f"{log_path.read_text(errors='replace')[-2000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.perf_counter() - t0 > timeout:
                raise RuntimeError(f"prefect server not healthy after {timeout:.0f} s; log: {log_path}")
            time.sleep(0.5)
        log(f"Prefect API {url} up after {time.perf_counter() - t0:.1f} s (pid {proc.pid}, log {log_path})")
        yield url
    finally:
        _stop_group(proc, "prefect server")


def _stop_group(proc: subprocess.Popen, what: str) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # its own session: only the processes started here
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    with contextlib.suppress(ProcessLookupError, PermissionError):  # children left in its group
        os.killpg(proc.pid, signal.SIGKILL)
    log(f"{what} stopped (exit code {proc.returncode})")


def _warm_worker() -> dict:
    """Runs on a Dask worker: import the project and run one Prefect task, so no measurement pays for it."""
    import torch
    from prefect import task

    import tasks.run_tasks  # noqa: F401 - what the fine-tuning tasks import
    from pruning.train.data import DataConfig, build_data

    build_data(DataConfig(spec="digits", seed=0))  # first build in a process imports and loads the data set

    @task(name="scale-out-warm-up")
    def ping() -> int:
        return os.getpid()

    return {"pid": ping(), "torch_threads": torch.get_num_threads(), "omp": os.environ.get("OMP_NUM_THREADS"),
            "api": os.environ.get("PREFECT_API_URL"), "trim": os.environ.get(TRIM)}


@contextlib.contextmanager
def dask_cluster(n_workers: int, worker_env: dict, malloc_trim: bool = False):
    """A LocalCluster of ``n_workers`` single-threaded worker processes; yields (address without tcp://,
    torch threads per worker, worker pids).

    Dask's Nanny writes its pre-spawn environment (OMP_NUM_THREADS=1, MALLOC_TRIM_THRESHOLD_=65536, ...
    unless set) into *this* process's os.environ before spawning the workers; the variables are
    therefore set here for the spawn and restored right after (torch and glibc in this process are
    already initialised and keep their settings). Unless ``malloc_trim``, the workers run with glibc's
    default allocator settings: Dask's MALLOC_TRIM_THRESHOLD_ (which also turns off glibc's dynamic mmap
    threshold) made a CPU training step of the default model about 2x slower in a worker here.
    """
    import dask
    from distributed import Client, LocalCluster

    threads = max(1, (os.cpu_count() or 2) // n_workers)
    saved = {v: os.environ.get(v) for v in (*THREAD_VARS, TRIM)}
    os.environ.update({v: str(threads) for v in THREAD_VARS})
    if not malloc_trim:
        os.environ.pop(TRIM, None)  # a Nanny started earlier may have put it here
    cfg = {} if malloc_trim else {f"distributed.nanny.pre-spawn-environ.{TRIM}": None}
    cluster = client = None
    try:
        with dask.config.set(cfg):
            cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                                   dashboard_address=None, env={**worker_env, **{v: str(threads) for v in THREAD_VARS}})
    finally:
        for v, old in saved.items():
            if old is None:
                os.environ.pop(v, None)
            else:
                os.environ[v] = old
    try:
        # not the process's default client: prefect-dask's DaskTaskRunner would connect to a default
        # client's cluster instead of the address it is given (see measure())
        client = Client(cluster, set_as_default=False)
        client.wait_for_workers(n_workers, timeout=300)
        workers = list(client.scheduler_info()["workers"])
        info = [client.submit(_warm_worker, pure=False, workers=[w], allow_other_workers=False).result(timeout=600)
                for w in workers]
        client.close()
        got = sorted({i["torch_threads"] for i in info})
        if (got != [threads] or any(i["api"] != worker_env.get("PREFECT_API_URL") for i in info)
                or any((i["trim"] is not None) != malloc_trim for i in info)):
            raise RuntimeError(f"workers not set up as asked (torch threads {got}, expected {threads}): {info}")
        address = cluster.scheduler_address.removeprefix("tcp://")
        log(f"Dask cluster {address}: {n_workers} worker(s) x 1 thread, torch threads {threads} per worker, "
            f"{TRIM}={info[0]['trim']}")
        yield address, threads, {i["pid"] for i in info}
    finally:
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()
        if cluster is not None:
            with contextlib.suppress(Exception):
                cluster.close(timeout=60)
            log(f"Dask cluster of {n_workers} worker(s) stopped")


# ----------------------------------------------------------------------------------------------
# one measurement
# ----------------------------------------------------------------------------------------------
def run_config(store: Path, run_id: str, k: int, task_runner: str, args, revisions: int | None = None,
               inline_epochs: int | None = None):
    from tasks.config import RunConfig

    revisions = revisions or args.revisions
    # extra_revisions >= max_revisions: the two-phase stop cannot fire within max_revisions revisions
    return RunConfig(model="default", target_macs="50%", max_revisions=revisions,
                     extra_revisions=min(100, max(2, revisions)), candidates_per_revision=k,
                     inline_epochs=args.inline_epochs if inline_epochs is None else inline_epochs,
                     max_train_batches=args.max_train_batches, extended_epochs=0, latency=False,
                     task_runner=task_runner, store=str(store), run_id=run_id, seed=0)


def history_stats(history: list[dict]) -> dict:
    """Fine-tuning batch wall, per-candidate work and prune seconds from a run's history records."""
    revs = sorted({r["revision"] for r in history})
    t = lambda r, name: r.get("timings", {}).get(name)  # noqa: E731
    ft_wall = sum(max((t(r, "finetune") or 0.0) for r in history if r["revision"] == rev) for rev in revs)
    work = [t(r, "finetune.finetune_eval_save") for r in history if t(r, "finetune.finetune_eval_save") is not None]
    prune = [t(r, "prune") for r in history if t(r, "prune") is not None]
    per_rev = [sum(1 for r in history if r["revision"] == rev and t(r, "finetune.finetune_eval_save") is not None)
               for rev in revs]
    accs = [r["accuracy_after"] for r in history if r.get("accuracy_after") is not None]
    # "fine-tuned on HOST:PID (parent PPID)" notes (recorded by tasks.steps.finetune_revision)
    pids = {int(n.split("fine-tuned on ", 1)[1].split(" ", 1)[0].rsplit(":", 1)[1])
            for r in history for n in r.get("proposal_notes") or [] if n.startswith("fine-tuned on ")}
    return {"pids": pids, "revisions": len(revs), "records": len(history), "candidates": len(work),
            "per_revision": per_rev, "ft_wall_s": ft_wall, "ft_work_sum_s": sum(work),
            "ft_work_mean_s": statistics.fmean(work) if work else None,
            "prune_mean_s": statistics.fmean(prune) if prune else None, "best_val_acc": max(accs) if accs else None}


def no_default_dask_client() -> None:
    """prefect-dask's DaskTaskRunner uses the process's default Dask client, when there is one, instead of
    the address it is given: make sure there is none, so each run goes to the cluster it names."""
    import distributed

    try:
        client = distributed.default_client()
    except ValueError:
        return
    raise RuntimeError(f"a default Dask client exists in this process ({client}); the task runner would use it")


def measure(engine: str, k: int, workers: int | None, task_runner: str, threads: int, args, work: Path,
            stamp: str, pids: set[int], malloc_trim: bool = False) -> dict:
    """One flow run; ``pids``: the processes allowed to fine-tune (checked against the records' notes)."""
    from flows.agentic_prune import agentic_prune
    from pruning.artifacts import open_store, runs

    no_default_dask_client()
    label = f"{engine}-k{k}" + (f"-w{workers}" if workers else "")
    store = work / f"store-{label}"
    cfg = run_config(store, f"scale-out-{label}-{stamp}", k, task_runner, args)
    log(f"run {label}: K={k}, task runner {task_runner}, store {store}")
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    summary = agentic_prune(cfg)
    wall = time.perf_counter() - t0
    st = history_stats(runs.read_history(open_store(str(store)), summary.run_id))
    n = st["candidates"]
    if st["pids"] and not st["pids"] <= pids:
        raise RuntimeError(f"{label}: candidates were fine-tuned by processes {sorted(st['pids'])}, expected "
                           f"{sorted(pids)}: the run did not use the cluster it was given")
    row = {
        "engine": engine, "K": k, "workers": workers, "torch_threads": threads,
        "workers_used": len(st["pids"]) or None, "malloc_trim": malloc_trim if engine == "dask" else None,
        "revisions": st["revisions"], "candidates": n,
        "candidates_per_revision": "/".join(map(str, st["per_revision"])),
        "wall_s": round(wall, 2), "ft_wall_s": round(st["ft_wall_s"], 2), "serial_s": round(wall - st["ft_wall_s"], 2),
        "ft_work_mean_s": None if st["ft_work_mean_s"] is None else round(st["ft_work_mean_s"], 2),
        "ft_work_sum_s": round(st["ft_work_sum_s"], 2),
        # beyond the summed work when candidates run one at a time: Prefect/Dask dispatch per candidate
        "dispatch_s": round((st["ft_wall_s"] - st["ft_work_sum_s"]) / n, 3) if n and (workers or 1) == 1 else None,
        "prune_mean_s": None if st["prune_mean_s"] is None else round(st["prune_mean_s"], 2),
        "cand_per_min": round(60 * n / wall, 3) if wall else None,
        "ft_cand_per_min": round(60 * n / st["ft_wall_s"], 3) if st["ft_wall_s"] else None,
        "best_val_acc": None if st["best_val_acc"] is None else round(st["best_val_acc"], 4),
        "stop": summary.stop_reason, "load1_before": round(load, 2), "load1_after": round(os.getloadavg()[0], 2),
        "run_id": summary.run_id,
    }
    if st["revisions"] != args.revisions:
        log(f"WARNING: {label} ran {st['revisions']} revision(s), not {args.revisions} ({summary.stop_reason}); "
            "its numbers are not comparable")
    log(f"done {label}: wall {row['wall_s']} s, fine-tuning batches {row['ft_wall_s']} s, {n} candidates, "
        f"{row['ft_work_mean_s']} s work each, load {row['load1_before']} -> {row['load1_after']}")
    return row


def add_speedups(rows: list[dict]) -> None:
    base = {r["K"]: r for r in rows if r["engine"] == "dask" and r["workers"] == 1}
    for r in rows:
        b = base.get(r["K"])
        ok = r["engine"] == "dask" and b is not None
        r["speedup_vs_1w"] = round(b["wall_s"] / r["wall_s"], 3) if ok else None
        r["ft_speedup_vs_1w"] = round(b["ft_wall_s"] / r["ft_wall_s"], 3) if ok and r["ft_wall_s"] else None


# ----------------------------------------------------------------------------------------------
# projection to N GPU workers
# ----------------------------------------------------------------------------------------------
def projection(rows: list[dict], revisions: int) -> tuple[list[dict], dict]:
    """T(N) = T_serial(K) + sum_r ceil(k_r / N) * (t_candidate + t_dispatch) from the 1-worker Dask runs.

    T_serial(K) = (flow wall - fine-tuning batch wall) at K = 1, plus (K - 1) extra prune steps per
    revision (the flow prunes a revision's candidates one after another); t_candidate = mean
    per-candidate fine-tuning work, t_dispatch = batch wall beyond the summed work per candidate, both
    over the 1-worker runs (candidates one at a time, the whole machine each); k_r = candidates
    fine-tuned in revision r of the measured 1-worker run at that K (= K when all are in band).
    """
    one = [r for r in rows if r["engine"] == "dask" and r["workers"] == 1 and r["candidates"]]
    if not one:
        return [], {}
    k1 = next((r for r in one if r["K"] == 1), None) or next((r for r in rows if r["engine"] == "local"), None)
    if k1 is None:
        return [], {}
    params = {
        "serial_k1_s": k1["serial_s"], "serial_from": f"{k1['engine']} K=1",
        "t_candidate_s": sum(r["ft_work_sum_s"] for r in one) / sum(r["candidates"] for r in one),
        "t_dispatch_s": max(0.0, statistics.fmean(r["dispatch_s"] for r in one if r["dispatch_s"] is not None)),
        "t_prune_s": statistics.fmean(r["prune_mean_s"] for r in one if r["prune_mean_s"] is not None),
    }
    measured = {(r["K"], r["workers"]): r["wall_s"] for r in rows if r["engine"] == "dask"}
    out = []
    for r in sorted(one, key=lambda r: r["K"]):
        k, per_rev = r["K"], [int(x) for x in r["candidates_per_revision"].split("/")]
        serial = params["serial_k1_s"] + revisions * (k - 1) * params["t_prune_s"]
        times = {n: serial + sum(math.ceil(c / n) for c in per_rev) * (params["t_candidate_s"] + params["t_dispatch_s"])
                 for n in PROJECTION_WORKERS}
        for n, t in times.items():
            out.append({"K": k, "gpu_workers": n, "projected_s": round(t, 1), "serial_s": round(serial, 1),
                        "projected_speedup_vs_1": round(times[1] / t, 2),
                        "projected_cand_per_min": round(60 * sum(per_rev) / t, 2),
                        "measured_cpu_s": measured.get((k, n))})
    return out, {k: (round(v, 3) if isinstance(v, float) else v) for k, v in params.items()}


# ----------------------------------------------------------------------------------------------
# output
# ----------------------------------------------------------------------------------------------
def table(rows: list[dict], cols: list[str]) -> str:
    fmt = lambda v: "—" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)  # noqa: E731
    return ("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
            + "\n".join("| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows))


MEASURED_COLS = ["engine", "K", "workers", "torch_threads", "workers_used", "candidates", "wall_s", "ft_wall_s",
                 "serial_s", "prune_mean_s", "ft_work_mean_s", "dispatch_s", "cand_per_min", "ft_cand_per_min",
                 "speedup_vs_1w", "ft_speedup_vs_1w", "best_val_acc", "load1_before"]
PROJECTION_COLS = ["K", "gpu_workers", "projected_s", "projected_speedup_vs_1", "projected_cand_per_min",
                   "measured_cpu_s"]


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def readme_block(rows, proj, params, args, total_s, warm_s) -> str:
    import torch

    ft = f"{args.inline_epochs} inline epoch(s)" + (f", at most {args.max_train_batches} batches per epoch"
                                                     if args.max_train_batches else ", full epochs")
    head = (f"Search: embedded default -> 50 % MACs, {args.revisions} revisions, {ft}, no extended fine-tuning, "
            f"no latency. Machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}; load average "
            f"{rows[0]['load1_before']} at the first run, {rows[-1]['load1_after']} at the last (other jobs "
            f"included). Measured {datetime.now(timezone.utc):%Y-%m-%d}; whole benchmark {total_s / 60:.1f} min "
            f"(warm-up run {warm_s:.0f} s, not in the table).")
    parts = [head, "", table(rows, MEASURED_COLS)]
    if proj:
        parts += ["", f"Projection to N GPU workers (from the 1-worker Dask runs): T_serial(K=1) = "
                      f"{params['serial_k1_s']} s ({params['serial_from']}), t_prune = {params['t_prune_s']} s per "
                      f"extra candidate, t_candidate = {params['t_candidate_s']} s, t_dispatch = "
                      f"{params['t_dispatch_s']} s per candidate.", "", table(proj, PROJECTION_COLS)]
    return "\n".join(parts)


def write_csvs(rows, proj, out: Path) -> None:
    import pandas as pd

    out.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(out, index=False)
    if proj:
        pd.DataFrame(proj).to_csv(out.with_name(out.stem + "_projection" + out.suffix), index=False)


# ----------------------------------------------------------------------------------------------
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, nargs="+", help=f"candidates per revision (default {FULL['k']})")
    ap.add_argument("--workers", type=int, nargs="+", help=f"Dask worker counts (default {FULL['workers']})")
    ap.add_argument("--revisions", type=int, help=f"max_revisions of the fixed search (default {FULL['revisions']})")
    ap.add_argument("--inline-epochs", type=int, help=f"inline fine-tuning epochs (default {FULL['inline_epochs']})")
    ap.add_argument("--max-train-batches", type=int, help="cap batches per epoch (default: full epochs)")
    ap.add_argument("--out", type=Path, help="measured CSV (default benchmarks/results/scale_out.csv; "
                    "--smoke: scale_out_smoke.csv); the projection goes next to it (*_projection.csv)")
    ap.add_argument("--no-readme", action="store_true", help="do not touch benchmarks/README.md")
    ap.add_argument("--smoke", action="store_true", help=f"tiny settings for a quick check {SMOKE}; never "
                    "writes the README")
    ap.add_argument("--dask-malloc-trim", action="store_true", help="keep Dask's default MALLOC_TRIM_THRESHOLD_=65536 "
                    "in the workers (default: glibc's own settings; Dask's made CPU fine-tuning ~2x slower here)")
    ap.add_argument("--keep", action="store_true", help="keep the working directory (stores, Prefect home)")
    args = ap.parse_args(argv)
    preset = SMOKE if args.smoke else FULL
    for name, default in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.out is None:
        args.out = ROOT / "results" / ("scale_out_smoke.csv" if args.smoke else "scale_out.csv")
    if args.smoke:
        args.no_readme = True
    if min(args.k) < 1 or min(args.workers) < 1 or args.revisions < 1:
        ap.error("--k, --workers and --revisions must be >= 1")
    args.k, args.workers = sorted(set(args.k)), sorted(set(args.workers))
    if args.revisions > 2:
        log("note: with more than 2 revisions the Master's MAC-convergence stop (3 in-band revisions with "
            "accuracy spread <= 1 point) can end a search early; such rows are flagged")
    return args


def _terminate(signum, _frame):
    raise SystemExit(128 + signum)  # unwind: every context manager below stops what it started


def main(argv=None) -> None:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    work = Path(tempfile.mkdtemp(prefix="scale-out-"))
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    home = work / "prefect-home"
    t_start = time.perf_counter()
    rows: list[dict] = []
    try:
        with contextlib.ExitStack() as stack:
            api = stack.enter_context(prefect_server(home))
            # the flow runs in this process: point it at the server before Prefect is imported
            os.environ.update(PREFECT_HOME=str(home), PREFECT_API_URL=api, PREFECT_SERVER_ANALYTICS_ENABLED="false")
            import logging

            import torch

            from flows.agentic_prune import agentic_prune

            logging.getLogger("distributed").setLevel(logging.WARNING)  # no INFO chatter from scheduler/nannies

            flow_threads = torch.get_num_threads()
            # warm-up: default model cache, data, imports and the first Prefect flow run of this process
            t = time.perf_counter()
            agentic_prune(run_config(work / "store-warm", f"scale-out-warm-{stamp}", 1, "local", args, revisions=1,
                                     inline_epochs=0))
            warm_s = time.perf_counter() - t
            log(f"warm-up flow run {warm_s:.1f} s")
            worker_env = {"PREFECT_API_URL": api, "PREFECT_HOME": str(home),
                          "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DASK_LOGGING__DISTRIBUTED": "warning",
                          "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore"}  # the warm-up task has no flow
            clusters = {n: stack.enter_context(dask_cluster(n, worker_env, args.dask_malloc_trim))
                        for n in args.workers}

            def record(row):
                rows.append(row)
                add_speedups(rows)
                write_csvs(rows, [], args.out)  # partial results survive an interrupted benchmark

            record(measure("local", 1, None, "local", flow_threads, args, work, stamp, {os.getpid()}))
            # interleaved by K, so the worker counts compared at one K run close together in time
            for k in args.k:
                for n in args.workers:
                    address, threads, pids = clusters[n]
                    record(measure("dask", k, n, f"dask://{address}", threads, args, work, stamp, pids,
                                   args.dask_malloc_trim))
    finally:
        if args.keep:
            log(f"working directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    total = time.perf_counter() - t_start
    proj, params = projection(rows, args.revisions)
    write_csvs(rows, proj, args.out)
    log(f"wrote {args.out}" + (f" and {args.out.with_name(args.out.stem + '_projection' + args.out.suffix)}"
                               if proj else ""))
    block = readme_block(rows, proj, params, args, total, warm_s)
    if not args.no_readme:
        sys.path.insert(0, str(ROOT))
        from mac_targeting import update_readme

        update_readme(block, marker="scale_out")
        log("README table updated")
    print(block)


if __name__ == "__main__":
    main()
