"""Parsing and formatting of MAC counts ("2.06G", "500M", "1.5e9")."""
from __future__ import annotations

import re

from pruning.errors import UserError

_SUFFIX = {"": 1.0, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}


def parse_macs(text: str) -> float:
    """Parse a MAC count such as ``2.06G``; raises ``ValueError`` with a one-line message."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMgGtT]?)(?:MACs?|macs?)?\s*", str(text))
    if not m:
        raise UserError(f"malformed MAC count '{text}' (expected e.g. 2.06G, 500M or 2060000000)")
    value = float(m.group(1)) * _SUFFIX[m.group(2).upper()]
    if value <= 0:
        raise UserError(f"MAC target must be positive, got '{text}'")
    return value


def parse_target(text: str) -> tuple[float | None, float | None]:
    """A MAC budget: ``'2.06G'`` -> ``(2.06e9, None)``, ``'50%'`` (of the model) -> ``(None, 0.5)``."""
    text = str(text).strip()
    if not text.endswith("%"):
        return parse_macs(text), None
    try:
        pct = float(text[:-1])
    except ValueError:
        raise UserError(f"malformed relative target '{text}' (expected e.g. 50%)") from None
    if not 0 < pct < 100:
        raise UserError(f"relative target must lie strictly between 0% and 100%, got '{text}'")
    return None, pct / 100


def resolve_target(text: str, base_macs: float) -> float:
    """The absolute MAC target of ``text`` (``'50%'`` means half of ``base_macs``)."""
    absolute, fraction = parse_target(text)
    return absolute if absolute is not None else base_macs * fraction


def fmt_macs(value: float) -> str:
    return f"{value / 1e9:.4g} G"
