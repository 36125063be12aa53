"""A writer process for the team tests and bench: appends to one store once a start file appears.

python -m tests.team_appender URL NAME COUNT START_FILE [CONCURRENCY]
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

from mcp_guard.store import open_store
from mcp_guard.store.base import AuditEvent, EventType


async def append_all(url: str, name: str, count: int, start: Path, concurrency: int) -> None:
    store = open_store(url)
    await store.open()
    try:
        print("ready", flush=True)
        while not start.exists():
            await asyncio.sleep(0.005)
        began = time.perf_counter()
        for first in range(0, count, concurrency):
            await asyncio.gather(
                *(
                    store.append(
                        AuditEvent(EventType.REQUEST, name, name, call_id=f"{name}-{n}", tool="query"),
                        durable=n % 10 == 0,
                    )
                    for n in range(first, min(first + concurrency, count))
                )
            )
        print(f"{count / (time.perf_counter() - began):.1f}", flush=True)
    finally:
        await store.close()


if __name__ == "__main__":
    url, name, count, start = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
    asyncio.run(append_all(url, name, count, start, int(sys.argv[5]) if len(sys.argv) > 5 else 1))
