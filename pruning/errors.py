"""The one exception family for user mistakes.

Anything the user can fix (an unknown model, an impossible target, a malformed number, unreachable
storage, wrong credentials, a corrupted checkpoint, a bad path) raises a :class:`UserError` subclass
with a one-line message; the CLI prints it as ``error: ...`` and exits 2. Every other exception is a
bug: the CLI exits 1 and says where the traceback was written.

``UserError`` subclasses ``ValueError`` so that pydantic validators can raise it and code that
validates input with ``except ValueError`` keeps working.
"""
from __future__ import annotations


class UserError(ValueError):
    """Something the user asked for cannot be done as asked (one-line message)."""


class PruningError(UserError):
    """The model or plan cannot be pruned as asked (one-line message)."""


def first_line(exc: BaseException, limit: int | None = 300) -> str:
    """The first line of ``exc``'s message (its type name when empty), cut at ``limit`` characters."""
    line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return line if limit is None else line[:limit]


def load_failure(exc: BaseException) -> str:
    """Why ``torch.load(..., weights_only=True)`` refused a file, in one complete sentence."""
    text = str(exc)
    if "Weights only load failed" in text or "weights_only" in text:
        import re

        m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        what = f" ({m.group(1)})" if m else ""
        return (f"it holds Python objects other than tensors{what}, which are never unpickled here; "
                "save a plain state dict with torch.save(model.state_dict(), path)")
    return first_line(exc, 200)
