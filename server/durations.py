"""Durations as Ollama reads them (Go's ``time.ParseDuration``, or a bare number of
seconds), for every duration kiln reads: ``keep_alive`` in a request or the settings,
``OLLAMA_LOAD_TIMEOUT``, the shutdown grace. A module of its own so that the settings
and the scheduler can both import it."""

from __future__ import annotations

import math
from typing import Any

FOREVER = float("inf")
MAX_KEEP_ALIVE = (2**63 - 1) / 1e9  # seconds in Go's time.Duration; longer counts as forever

_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
# Longest first, so "ms" is not read as "m" followed by "s".
_ORDER = sorted(_UNITS, key=len, reverse=True)


def go_duration(value: Any) -> float:
    """Signed seconds from a number (seconds) or a Go duration string ("10m", "1h30m",
    "1.5s", "-1"); a bare number in a string is seconds, as Ollama's envconfig reads it."""
    if isinstance(value, bool):
        raise ValueError("a duration must be a number of seconds or a string like \"5m\"")
    if isinstance(value, int | float):
        if math.isnan(value):
            raise ValueError("a duration must be a number")
        return float(value)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"invalid duration {value!r}")
    s = value.strip()
    try:
        n = float(s)
    except ValueError:
        pass
    else:
        if math.isnan(n):
            raise ValueError(f"invalid duration {value!r}")
        return n
    sign = -1.0 if s.startswith("-") else 1.0
    s = s[1:] if s[:1] in "+-" else s
    total, num, i = 0.0, "", 0
    while i < len(s):
        c = s[i]
        if c.isdigit() or c == ".":
            num += c
            i += 1
            continue
        unit = next((u for u in _ORDER if s.startswith(u, i)), None)
        if unit is None or not num or num == ".":
            raise ValueError(f"invalid duration {value!r} (use a number of seconds or units ns, us, ms, s, m, h)")
        total += float(num) * _UNITS[unit]
        num = ""
        i += len(unit)
    if num:
        raise ValueError(f"invalid duration {value!r} (missing unit)")
    return sign * total


def parse_duration(value: Any) -> float:
    """keep_alive: seconds; negative, or ``MAX_KEEP_ALIVE`` and beyond, is ``FOREVER``
    (a larger value made /api/ps's expiry date overflow)."""
    seconds = go_duration(value)
    if not math.isfinite(seconds):
        raise ValueError(f"invalid duration {value!r} (must be finite)")
    return FOREVER if seconds < 0 or seconds >= MAX_KEEP_ALIVE else seconds
