"""The garbage collector's share of a large result, kept small.

A 10,000-row read allocates some 100,000 lists and tuples, none of them in a reference cycle. With
CPython's defaults the collector runs every 700 allocations, and now and then a full collection walks
every object alive: some 140,000 of them are what the server loaded at start (the `mcp` SDK, pydantic
models, sqlglot's tables), which are never garbage. Measured on a guarded 10,000-row read: 37 ms of
collections per unmasked read and 69 ms per masked one (of ~160 and ~320 ms) before; ~6 and ~10 ms
after `settle()`.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 10_000
"""Allocations between collections of the youngest generation (CPython's default: 700)."""


def settle() -> None:
    """Once start-up is done: what it allocated leaves the collector's sight (`gc.freeze`), and the
    youngest generation is collected after 10,000 allocations, not 700. Cycles are still collected;
    a result's rows, which hold none, are freed by reference counting as before."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)
