"""Append rate of the team's PostgreSQL audit store with 1, 2 and 4 writer processes, against a baseline.

    python bench/bench_team.py [--url postgresql://postgres@127.0.0.1:5432/test] [--appends 1500]
                               [--concurrency 1] [--durable 0.0]

A fresh database is created (and dropped) on the server of --url. Each writer process is a gateway's
store: it appends --appends entries, --concurrency at a time (1: one call at a time; more: group
commit), a --durable fraction of them synced. The baseline, measured in the same run with the same
processes and bodies, is a plain INSERT of the same row into an un-chained table: one statement (one
round trip) per entry, synchronous_commit as for the chained appends: what any audit table would
cost. The ratio chained/baseline is printed per number of writers; the chain serializes appends at
the database (an advisory lock), so its rate stops growing with writers while the baseline's may still grow.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import sys
import time
import uuid
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mcp_guard.store import chain  # noqa: E402
from mcp_guard.store.base import AuditEvent, EventType  # noqa: E402
from mcp_guard.store.postgres import PostgresStore  # noqa: E402

PLAIN = """CREATE TABLE plain (
    id bigserial PRIMARY KEY, ts text, type text, session_id text, call_id text, identity text, tool text,
    connection text, decision text, body bytea
)"""


# One statement, one round trip, like a chained append: synchronous_commit set for its transaction.
_PLAIN_INSERT = """WITH sync AS (SELECT set_config('synchronous_commit', $10, true))
INSERT INTO plain (ts, type, session_id, call_id, identity, tool, connection, decision, body)
SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9 FROM sync"""


def sample_event(name: str, n: int) -> AuditEvent:
    """A request entry of typical size (about 440 bytes)."""
    sql = "SELECT id, name, email FROM customers WHERE created_at > $1 ORDER BY id LIMIT 50"
    return AuditEvent(
        EventType.REQUEST,
        session_id=f"session-{name}",
        identity="oidc:alice@example.com",
        call_id=f"{name}-{n:08d}-{uuid.uuid4().hex}",
        tool="query",
        detail={"arguments": {"sql": sql, "params": ["2026-01-01"], "reason": "weekly signups report"}},
    )


async def _chained(url: str, name: str, appends: int, concurrency: int, durable: float) -> None:
    store = PostgresStore(url)
    await store.open()
    every = int(1 / durable) if durable else 0
    try:
        for first in range(0, appends, concurrency):
            batch = range(first, min(first + concurrency, appends))
            await asyncio.gather(
                *(store.append(sample_event(name, n), durable=bool(every) and n % every == 0) for n in batch)
            )
    finally:
        await store.close()


async def _plain(url: str, name: str, appends: int, concurrency: int, durable: float) -> None:
    every = int(1 / durable) if durable else 0
    pool = await asyncpg.create_pool(url, min_size=concurrency, max_size=concurrency)

    async def insert(n: int) -> None:
        event = sample_event(name, n)
        fields = event.as_dict()
        synced = "on" if every and n % every == 0 else "off"
        await pool.execute(
            _PLAIN_INSERT, *(fields[key] for key in chain.INDEXED), chain.canonical(event), synced
        )

    try:
        for first in range(0, appends, concurrency):
            await asyncio.gather(*(insert(n) for n in range(first, min(first + concurrency, appends))))
    finally:
        await pool.close()


def _writer(
    kind: str, url: str, name: str, appends: int, concurrency: int, durable: float, go: object
) -> None:
    go.wait()  # type: ignore[attr-defined]
    work = _chained if kind == "chained" else _plain
    asyncio.run(work(url, name, appends, concurrency, durable))


def run(kind: str, url: str, writers: int, appends: int, concurrency: int, durable: float) -> float:
    """Entries per second, all writers together, from the moment they start at once."""
    context = multiprocessing.get_context("spawn")
    go = context.Event()
    processes = [
        context.Process(target=_writer, args=(kind, url, f"w{i}", appends, concurrency, durable, go))
        for i in range(writers)
    ]
    for process in processes:
        process.start()
    time.sleep(1.0)  # let them import and connect
    began = time.perf_counter()
    go.set()
    for process in processes:
        process.join()
        if process.exitcode != 0:
            raise SystemExit(f"a {kind} writer failed (exit {process.exitcode})")
    return writers * appends / (time.perf_counter() - began)


async def _setup(url: str) -> tuple[str, str]:
    name = f"bench_team_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    target = url.rsplit("/", 1)[0] + f"/{name}"
    await PostgresStore(target).migrate()
    conn = await asyncpg.connect(target)
    try:
        await conn.execute(PLAIN)
    finally:
        await conn.close()
    return name, target


async def _verify(url: str, expected: int) -> str:
    store = PostgresStore(url)
    await store.open()
    try:
        started = time.perf_counter()
        report = await store.verify()
        seconds = time.perf_counter() - started
    finally:
        await store.close()
    if not report.ok or report.entries != expected:
        raise SystemExit(f"the chain does not verify: {report}")
    return f"{report.entries} entries, {report.entries / seconds:,.0f} entries/s"


async def _drop(url: str, name: str) -> None:
    admin = await asyncpg.connect(url)
    try:
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = $1 AND pid <> pg_backend_pid()",
            name,
        )
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
    finally:
        await admin.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--appends", type=int, default=1500, help="entries per writer process")
    parser.add_argument("--concurrency", type=int, default=1, help="appends in flight per writer")
    parser.add_argument("--durable", type=float, default=0.0, help="fraction of entries synced (0..1)")
    args = parser.parse_args()
    name, url = asyncio.run(_setup(args.url))
    try:
        print(
            f"{args.appends} appends per writer, {args.concurrency} in flight each, "
            f"{args.durable:.0%} durable; entries/s of all writers together"
        )
        print(f"{'writers':>7} {'chained':>10} {'plain INSERT':>13} {'ratio':>7}")
        total = 0
        for writers in (1, 2, 4):
            plain = run("plain", url, writers, args.appends, args.concurrency, args.durable)
            chained = run("chained", url, writers, args.appends, args.concurrency, args.durable)
            total += writers * args.appends
            print(f"{writers:>7} {chained:>10,.0f} {plain:>13,.0f} {chained / plain:>7.2f}")
        print(f"the chain after every run verifies: {asyncio.run(_verify(url, total))}")
    finally:
        asyncio.run(_drop(args.url, name))


if __name__ == "__main__":
    main()
