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


def fmt_macs(value: float) -> str:
    return f"{value / 1e9:.4g} G"
