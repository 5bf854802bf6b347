"""Human sizes and durations on the command line: 500M, 10G, 1.5GiB, 1048576; 60s, 2m."""

from __future__ import annotations

import re

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?)(?:I?B)?\s*", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes from a size with an optional binary unit; ValueError with a clear message."""
    m = _SIZE.fullmatch(text)
    if not m:
        raise ValueError(f"{text!r} is not a size (examples: 500M, 10G, 1048576)")
    value = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if value <= 0:
        raise ValueError(f"size {text!r} must be positive")
    return value


_SECONDS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([smh]?)\s*", re.IGNORECASE)


def parse_duration(text: str) -> float:
    """Seconds from a duration (plain seconds, or with s, m or h); ValueError if not one."""
    m = _DURATION.fullmatch(text)
    if not m:
        raise ValueError(f"{text!r} is not a duration (examples: 60s, 2m, 90)")
    value = float(m.group(1)) * _SECONDS[m.group(2).lower()]
    if value <= 0:
        raise ValueError(f"duration {text!r} must be positive")
    return value
