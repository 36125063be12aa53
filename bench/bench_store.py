"""The cost of the hash-chained SQLite audit store, as ratios against baselines measured in the same run.

    python bench/bench_store.py [--appends 2000] [--rounds 3] [--entries 1000000]

Prints, for synchronous=FULL and NORMAL: the append rate and p50/p99 latency of single appends one
at a time and of 20 concurrent appenders (group commit), each against a plain un-chained sqlite3
INSERT+COMMIT of the same bytes (and against aiosqlite INSERT+COMMIT, to show the thread hops);
then the verification rate over --entries entries against a bare read of the same rows.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import aiosqlite

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mcp_guard.store import chain  # noqa: E402
from mcp_guard.store.base import AuditEvent, EventType  # noqa: E402
from mcp_guard.store.sqlite import SqliteStore  # noqa: E402

Sync = Literal["FULL", "NORMAL"]
WRITERS = 20


def sample_event(n: int) -> AuditEvent:
    """A request entry of typical size (about 440 bytes)."""
    return AuditEvent(
        type=EventType.REQUEST,
        session_id="0b9a4c1e-5d6f-4e0a-9a43-0c1d2e3f4a5b",
        identity="alice",
        call_id=f"call-{n}",
        tool="query",
        connection="shop",
        decision="allow",
        detail={
            "arguments": {"sql": f"SELECT id, name, email FROM customers WHERE id = {n} ORDER BY id"},
            "client": {"name": "claude-code", "version": "2.1.0"},
            "classification": [{"kind": "read", "tables": ["customers"], "flags": []}],
            "rule": "reads-allowed",
        },
    )


@dataclass(frozen=True)
class Run:
    """One timed run: how many entries, the wall time, and each entry's latency."""

    count: int
    seconds: float
    samples: list[float]

    @property
    def rate(self) -> float:
        return self.count / self.seconds

    def line(self, label: str, baseline: Run | None = None) -> str:
        ordered = sorted(self.samples)
        p50, p99 = statistics.median(ordered) * 1e6, ordered[int(len(ordered) * 0.99)] * 1e6
        text = f"  {label:<36}{self.rate:>10,.0f}/s   p50 {p50:>6,.0f} µs   p99 {p99:>7,.0f} µs"
        return text + (f"   {self.rate / baseline.rate:5.2f}x baseline" if baseline else "")


def median_run(runs: list[Run]) -> Run:
    """The run with the median rate: this machine is shared, single runs wander."""
    return sorted(runs, key=lambda run: run.rate)[len(runs) // 2]


async def timed_each(count: int, fn: Callable[[int], Awaitable[object]]) -> Run:
    samples = []
    start = time.perf_counter()
    for n in range(count):
        begin = time.perf_counter()
        await fn(n)
        samples.append(time.perf_counter() - begin)
    return Run(count, time.perf_counter() - start, samples)


def plain_sqlite(path: Path, sync: Sync, bodies: list[bytes]) -> Run:
    """The baseline: one un-chained INSERT+COMMIT per entry with the stdlib driver, no thread hop."""
    with closing(sqlite3.connect(path, isolation_level=None)) as db:
        db.execute("PRAGMA journal_mode = WAL")
        db.execute(f"PRAGMA synchronous = {sync}")
        db.execute("CREATE TABLE plain (id INTEGER PRIMARY KEY, body BLOB NOT NULL)")
        samples = []
        start = time.perf_counter()
        for body in bodies:
            begin = time.perf_counter()
            db.execute("BEGIN")
            db.execute("INSERT INTO plain (body) VALUES (?)", (body,))
            db.execute("COMMIT")
            samples.append(time.perf_counter() - begin)
        return Run(len(bodies), time.perf_counter() - start, samples)


async def plain_aiosqlite(path: Path, sync: Sync, bodies: list[bytes]) -> Run:
    """INSERT+COMMIT through aiosqlite: two thread hops per entry, no chain."""
    async with aiosqlite.connect(path) as db:
        await db.execute("PRAGMA journal_mode = WAL")
        await db.execute(f"PRAGMA synchronous = {sync}")
        await db.execute("CREATE TABLE plain (id INTEGER PRIMARY KEY, body BLOB NOT NULL)")

        async def insert(n: int) -> None:
            await db.execute("INSERT INTO plain (body) VALUES (?)", (bodies[n],))
            await db.commit()

        return await timed_each(len(bodies), insert)


async def concurrent_appends(store: SqliteStore, events: list[AuditEvent]) -> Run:
    """WRITERS tasks appending at once: the writer task commits whatever is queued together."""
    per_writer = len(events) // WRITERS
    samples: list[float] = []

    async def writer(w: int) -> None:
        for event in events[w * per_writer : (w + 1) * per_writer]:
            begin = time.perf_counter()
            await store.append(event)
            samples.append(time.perf_counter() - begin)

    start = time.perf_counter()
    await asyncio.gather(*(writer(w) for w in range(WRITERS)))
    return Run(len(samples), time.perf_counter() - start, samples)


async def bench_appends(work: Path, sync: Sync, count: int, rounds: int) -> None:
    events = [sample_event(n) for n in range(count)]
    bodies = [chain.canonical(event) for event in events]
    runs: dict[str, list[Run]] = {"base": [], "hops": [], "sequential": [], "concurrent": []}
    store = SqliteStore(work / f"audit-{sync}.db", durability="full" if sync == "FULL" else "normal")
    await store.open()
    try:
        for event in events[:50]:  # warm up: statement cache, WAL file
            await store.append(event)
        for r in range(rounds):
            runs["base"].append(plain_sqlite(work / f"plain-{sync}-{r}.db", sync, bodies))
            runs["hops"].append(await plain_aiosqlite(work / f"aio-{sync}-{r}.db", sync, bodies))
            runs["sequential"].append(await timed_each(count, lambda n: store.append(events[n])))
            runs["concurrent"].append(await concurrent_appends(store, events))
    finally:
        await store.close()
    base, hops, sequential, concurrent = (median_run(runs[key]) for key in runs)
    print(f"\nappends, synchronous={sync} ({count:,} entries of {len(bodies[0])} bytes, median of {rounds})")
    print(base.line("sqlite3 INSERT+COMMIT (baseline)"))
    print(hops.line("aiosqlite INSERT+COMMIT (2 hops)", base))
    print(sequential.line("chained append, one at a time", base))
    print(concurrent.line(f"chained append, {WRITERS} concurrent", base))


def build_chain(path: Path, entries: int) -> None:
    """Write `entries` linked entries straight into a new store file, as fast as SQLite takes them."""
    events = [sample_event(n) for n in range(1000)]
    bodies = [chain.canonical(event) for event in events]
    columns = [tuple(event.as_dict()[name] for name in chain.INDEXED) for event in events]
    with closing(sqlite3.connect(path)) as db:
        db.execute("PRAGMA synchronous = OFF")
        indexes = [name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")]
        for name in indexes:  # verification reads in seq order and never uses them
            db.execute(f"DROP INDEX {name}")
        insert = f"INSERT INTO audit ({', '.join(chain.ROW)}) VALUES ({', '.join('?' * len(chain.ROW))})"
        prev, rows = chain.GENESIS, []
        for seq in range(1, entries + 1):
            body = bodies[seq % 1000]
            digest = chain.link(seq, prev, body)
            rows.append((seq, prev, digest, body, *columns[seq % 1000]))
            prev = digest
            if len(rows) == 50_000:
                db.executemany(insert, rows)
                rows.clear()
        db.executemany(insert, rows)
        db.commit()


async def bench_verify(work: Path, entries: int) -> None:
    path = work / "verify.db"
    store = SqliteStore(path)
    await store.open()
    await store.close()
    start = time.perf_counter()
    build_chain(path, entries)
    print(f"\nverification ({entries:,} entries, built in {time.perf_counter() - start:.1f} s)")

    start = time.perf_counter()
    with closing(sqlite3.connect(path)) as db:
        for _ in db.execute(f"SELECT {', '.join(chain.ROW)} FROM audit ORDER BY seq"):
            pass
    read = time.perf_counter() - start

    await store.open()
    try:
        start = time.perf_counter()
        report = await store.verify()
        seconds = time.perf_counter() - start
    finally:
        await store.close()
    assert report.ok and report.entries == entries, report
    print(f"  {'sqlite3 read of the rows (baseline)':<36}{entries / read:>10,.0f}/s   {read:6.2f} s")
    ratio = read / seconds
    print(f"  {'verify()':<36}{entries / seconds:>10,.0f}/s   {seconds:6.2f} s   {ratio:5.2f}x baseline")


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--appends", type=int, default=2000, help="appends per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per append measurement (median shown)")
    parser.add_argument("--entries", type=int, default=1_000_000, help="entries in the chain to verify")
    args = parser.parse_args()
    print(
        f"SQLite {sqlite3.sqlite_version}, aiosqlite {aiosqlite.__version__}, Python {sys.version.split()[0]}"
    )
    with tempfile.TemporaryDirectory(prefix="mcp-guard-bench-") as tmp:
        for sync in ("FULL", "NORMAL"):
            await bench_appends(Path(tmp), sync, args.appends, args.rounds)
        await bench_verify(Path(tmp), args.entries)


if __name__ == "__main__":
    asyncio.run(main())
