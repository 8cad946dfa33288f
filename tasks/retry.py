"""Retry only where a retry can help: storage and network I/O, never invalid configuration."""
from __future__ import annotations

from prefect.cache_policies import NONE

from pruning.artifacts import is_transient_store_error

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
