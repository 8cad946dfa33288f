"""Retry only where a retry can help (storage and network I/O, never invalid configuration), and let a user
mistake fail its task and flow run with one line instead of a traceback."""
from __future__ import annotations

import functools
from typing import Any, Callable

from prefect import Task, get_run_logger
from prefect.cache_policies import NONE
from prefect.states import Failed, State

from pruning.artifacts import is_transient_store_error
from pruning.errors import UserError, first_line

#: Backoff between attempts (seconds) for I/O-bound tasks.
IO_RETRY_DELAYS = [1, 4, 10]


def _is_transient(exc: BaseException) -> bool:
    if is_transient_store_error(exc):
        return True
    name = type(exc).__name__
    # openai / httpx transport failures and timeouts
    return name in {"APIConnectionError", "APITimeoutError", "InternalServerError", "RateLimitError",
                    "ConnectError", "ReadTimeout", "ConnectTimeout", "RemoteProtocolError"} or isinstance(
        exc, (ConnectionError, TimeoutError))


def retry_on_transient(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry when the failure was a transient I/O error."""
    try:
        state.result()
    except BaseException as exc:  # noqa: BLE001 - we only classify
        return _is_transient(exc)
    return False


#: ``@task(**IO_TASK)``: retried on transient I/O errors only; never cached (steps are idempotent via the store).
IO_TASK = dict(retries=3, retry_delay_seconds=IO_RETRY_DELAYS, retry_condition_fn=retry_on_transient,
               cache_policy=NONE)


def quiet_failure(exc: BaseException) -> State:
    """A Failed state carrying ``exc`` (callers still get the exception) after logging one line, no traceback."""
    line = first_line(exc, limit=500)
    get_run_logger().error("error: %s", line)
    return Failed(message=f"error: {line}", data=exc)


def _last_attempt() -> bool:
    from prefect.runtime import task_run

    return int(task_run.run_count or 1) > IO_TASK["retries"]


def _user_errors_fail_quietly(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            if _is_transient(exc) and not _last_attempt():  # unreachable storage etc.: Prefect retries (one line)
                raise
            return quiet_failure(exc)  # a mistake, or an outage that outlasted the retries: one line

    return wrapper


class _QuietTask(Task):
    """A task whose body turned a user mistake into a quiet Failed state: calling it raises that mistake again
    in the caller (the flow), as a plain task call would."""

    def __call__(self, *args: Any, **kwargs: Any):
        out = super().__call__(*args, **kwargs)
        if isinstance(out, State) and out.is_failed() and not kwargs.get("return_state"):
            return out.result()  # raises the UserError the state carries
        return out


def io_task(**options: Any) -> Callable[[Callable], Any]:
    """``@task`` for I/O steps: retried on transient errors only, never cached, a user mistake fails the task
    run with one line (the exception still reaches the caller)."""
    def decorate(fn: Callable):
        return _QuietTask(fn=_user_errors_fail_quietly(fn), **IO_TASK, **options)

    return decorate
