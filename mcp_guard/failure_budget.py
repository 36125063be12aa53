"""How many authentication failures from one source are recorded one by one.

A caller without a valid token costs nothing to send and, unbounded, one chained audit entry per
request: a flood that fills the disk and slows every honest call's append. Each source (a client
address, or the stdio caller) may fail `burst` times in a row; after that one failure per
`interval` is recorded, carrying how many were refused without an entry of their own since the
last one. Every refusal is still refused; only the record of a flood is condensed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

BURST = 60
INTERVAL_S = 1.0
MAX_SOURCES = 10_000


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float
    unrecorded: int = 0


class FailureBudget:
    """A token bucket per source; `admit` says whether to record this failure, and what it stands for."""

    def __init__(
        self,
        burst: int = BURST,
        interval: float = INTERVAL_S,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_sources: int = MAX_SOURCES,
    ) -> None:
        self.burst = burst
        self.interval = interval
        self._clock = clock
        self._max_sources = max_sources
        self._buckets: dict[str, _Bucket] = {}

    def admit(self, source: str) -> int | None:
        """None: do not record this failure (it is counted). Otherwise record it, noting the number
        returned: the failures from `source` refused without an entry since its last recorded one."""
        now = self._clock()
        bucket = self._buckets.get(source)
        if bucket is None:
            self._make_room(now)
            bucket = self._buckets[source] = _Bucket(float(self.burst), now)
        bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.at) / self.interval)
        bucket.at = now
        if bucket.tokens < 1:
            bucket.unrecorded += 1
            return None
        bucket.tokens -= 1
        unrecorded, bucket.unrecorded = bucket.unrecorded, 0
        return unrecorded

    def _make_room(self, now: float) -> None:
        """Forget sources whose bucket has refilled (nothing owed), then the oldest, past the cap."""
        if len(self._buckets) < self._max_sources:
            return
        for source, bucket in list(self._buckets.items()):
            if bucket.unrecorded == 0 and bucket.tokens + (now - bucket.at) / self.interval >= self.burst:
                del self._buckets[source]
        while len(self._buckets) >= self._max_sources:
            del self._buckets[next(iter(self._buckets))]
