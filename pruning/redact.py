"""Credentials never leave the process: URLs with ``user:password@`` are shown and stored redacted."""
from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

REDACTED = "***"


def has_credentials(url: str | None) -> bool:
    """True when ``url`` carries a user name or password."""
    if not url:
        return False
    try:
        parts = urlsplit(url)
    except ValueError:
        return "@" in url
    return parts.username is not None or parts.password is not None


def redact_url(url: str | None) -> str | None:
    """``url`` with any ``user:password@`` replaced by ``***@`` (unchanged when it has none)."""
    if not has_credentials(url):
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, f"{REDACTED}@{host}", parts.path, parts.query, parts.fragment))


def is_redacted(url: str | None) -> bool:
    """True for a URL :func:`redact_url` changed (its credentials must come from the environment)."""
    return bool(url) and f"//{REDACTED}@" in url
