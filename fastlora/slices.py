"""Stable slices for checks that run by rotation (README "Developing"): slice I of N of a set of
names, by a hash of each name, so N runs with I = 0..N-1 cover the set whatever its order.
Used by the compile record's recheck, `fastlora compile-report --slice` and tests/conftest.py's
`--slice`."""

from __future__ import annotations

import hashlib


def parse_slice(text: str) -> tuple[int, int]:
    """'I/N' -> (I, N) with 0 <= I < N; ValueError otherwise."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise ValueError(f"a slice is I/N, two integers, got {text!r}") from None
    if not 0 <= i < n:
        raise ValueError(f"slice {text}: need 0 <= I < N")
    return i, n


def in_slice(name: str, part: tuple[int, int]) -> bool:
    """Whether `name` falls in slice part = (i, n)."""
    i, n = part
    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) % n == i
