"""The audit store's rates, each as a ratio against a baseline measured in the same run.

    python bench/bench_audit.py [--entries 1000000] [--calls 2000] [--keep /tmp/audit-1m.db]

Prints:
- append: a request then an outcome per call, each awaited before the next step (the server's
  write pattern), by one caller and by 16 concurrent callers, through SqliteStore with a signed
  checkpoint every 1000 entries; baseline: plain sqlite3 INSERT + COMMIT of the same bytes, no chain;
- verify: `audit verify` (chain, index columns, every checkpoint) over a store of --entries entries;
  baseline: reading every body and SHA-256 over it, the least any verification must do;
- export: `audit export --format jsonl` of every call; baseline: reading every body and writing it out;
- search: `audit why TABLE` and `--text` over the same store;
- hook: one `mcp-guard hook claude-code` process, as Claude Code runs it.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mcp_guard.audit.calls import iter_calls  # noqa: E402
from mcp_guard.audit.export import export  # noqa: E402
from mcp_guard.audit.verify import verify_audit  # noqa: E402
from mcp_guard.store.base import AuditEvent, CallFilter, EventType  # noqa: E402
from mcp_guard.store.checkpoint import Checkpointer, Ed25519PrivateKey, public_key_text  # noqa: E402
from mcp_guard.store.sqlite import SqliteStore  # noqa: E402

TABLES = ("orders", "customers", "payments", "api_keys")


def call_events(i: int, session: str) -> tuple[AuditEvent, AuditEvent]:
    """A request and its outcome shaped like the guard's: a read mostly, a write every tenth call."""
    call = f"{session}-{i:08d}"
    table = TABLES[i % len(TABLES)]
    write = i % 10 == 0
    sql = (
        f"UPDATE {table} SET status = 'shipped' WHERE id = {i}"
        if write
        else f"SELECT id, name, created_at FROM {table} WHERE id BETWEEN {i} AND {i + 20} ORDER BY id"
    )
    args = {"connection": None, "sql": sql, "params": [], **({"reason": f"ticket {i}"} if write else {})}
    request = AuditEvent(
        EventType.REQUEST,
        session,
        "local:bench",
        call,
        "execute" if write else "query",
        None,
        detail={"arguments": args, "client": "claude-code/2.1", "groups": ["analysts"]},
    )
    rows = [[n, f"customer {n}", "2026-11-01T10:00:00+00:00"] for n in range(i, i + 20)]
    text = "id | name | created_at\n---+------+-----------\n" + "\n".join(
        " | ".join(map(str, r)) for r in rows
    )
    kind = "write" if write else "read"
    outcome = AuditEvent(
        EventType.OUTCOME,
        session,
        "local:bench",
        call,
        request.tool,
        "shop",
        "allow",
        detail={
            "status": "ok",
            "duration_ms": 1.234,
            "response": {"text": text, "text_truncated": False, "is_error": False},
            "classification": {
                "dialect": "postgres",
                "kind": kind,
                "flags": [],
                "tables": [table],
                "statements": [{"text": sql, "kind": kind, "operation": "UPDATE" if write else "SELECT"}],
            },
            "decision": {"action": "allow", "rule": f"allow-{kind}s", "reason": "", "statement_index": None},
        },
    )
    return request, outcome


# append -----------------------------------------------------------------------------------------


async def append_rate(path: Path, calls: int, callers: int, key: Ed25519PrivateKey) -> float:
    store = SqliteStore(path)
    await store.open()
    await Checkpointer(store, key, 1000, path.with_name(path.name + ".witness")).start()

    async def caller(number: int) -> None:
        for i in range(number, calls, callers):
            request, outcome = call_events(i, f"session-{number}")
            await store.append(request)
            await store.append(outcome)

    started = time.perf_counter()
    await asyncio.gather(*(caller(n) for n in range(callers)))
    seconds = time.perf_counter() - started
    await store.close()
    return 2 * calls / seconds


def baseline_append_rate(path: Path, calls: int) -> float:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = FULL")
    db.execute("CREATE TABLE log (seq INTEGER PRIMARY KEY, body BLOB NOT NULL)")
    bodies = [json.dumps(e.as_dict()).encode() for i in range(calls) for e in call_events(i, "s")]
    started = time.perf_counter()
    for body in bodies:
        db.execute("INSERT INTO log (body) VALUES (?)", (body,))
    seconds = time.perf_counter() - started
    db.close()
    return len(bodies) / seconds


# a big store ------------------------------------------------------------------------------------


async def build(path: Path, entries: int, key: Ed25519PrivateKey) -> float:
    """Fill a store through the real append path, many appends in flight (group commit)."""
    store = SqliteStore(path, synchronous="NORMAL")
    await store.open()
    await Checkpointer(store, key, 1000, path.with_name(path.name + ".witness")).start()
    started = time.perf_counter()
    batch = []
    for i in range(entries // 2):
        request, outcome = call_events(i, f"s{i // 500}")
        batch += [store.append(request), store.append(outcome)]
        if len(batch) >= 10_000:
            await asyncio.gather(*batch)
            batch = []
    await asyncio.gather(*batch)
    rate = entries / (time.perf_counter() - started)
    await store.close()
    return rate


def baseline_scan(path: Path) -> tuple[float, float]:
    """Read every body and hash it; read every body and write it out. Entries per second each."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    started = time.perf_counter()
    count = 0
    for (body,) in db.execute("SELECT body FROM audit ORDER BY seq"):
        hashlib.sha256(body).digest()
        count += 1
    hashed = count / (time.perf_counter() - started)
    out = io.StringIO()
    started = time.perf_counter()
    for (body,) in db.execute("SELECT body FROM audit WHERE type = 'outcome' ORDER BY seq"):
        out.write(body.decode() + "\n")
        out.seek(0)
        out.truncate()
    written = (count // 2) / (time.perf_counter() - started)
    db.close()
    return hashed, written


async def verify_rate(path: Path, key: Ed25519PrivateKey) -> tuple[float, bool, int]:
    store = SqliteStore(path)
    await store.open()
    try:
        report = await verify_audit(
            store,
            trusted={public_key_text(key.public_key())},
            witness=path.with_name(path.name + ".witness"),
            every=1000,
        )
    finally:
        await store.close()
    if not report.ok:
        print("verification failed:", report.problems[:3])
    return report.rate, report.ok, report.checkpoints


async def export_rate(path: Path) -> float:
    store = SqliteStore(path)
    await store.open()

    class Sink(io.TextIOBase):
        def write(self, text: str) -> int:
            return len(text)

    started = time.perf_counter()
    count = await export(store, CallFilter(), Sink(), "jsonl")
    seconds = time.perf_counter() - started
    await store.close()
    return count / seconds


async def search_times(path: Path) -> dict[str, float]:
    store = SqliteStore(path)
    await store.open()
    found = {}
    for label, flt in (
        ("why payments (writes to a table)", CallFilter(table="payments", writes=True)),
        ("list --table payments --limit 50", CallFilter(table="payments", limit=50)),
        ("list --text 'ticket 4242' (SQL scan)", CallFilter(text="WHERE id = 4240")),
        ("list --session s42", CallFilter(session_id="s42")),
    ):
        started = time.perf_counter()
        count = sum([1 async for _ in iter_calls(store, flt)])
        found[f"{label}: {count} calls"] = time.perf_counter() - started
    await store.close()
    return found


def hook_seconds(home: Path, runs: int = 5) -> float:
    payload = json.dumps(
        {"session_id": "b", "hook_event_name": "UserPromptSubmit", "prompt": "hi", "cwd": "/"}
    )
    env = {**os.environ, "MCP_GUARD_HOME": str(home), "MCP_GUARD_CONFIG": ""}
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "mcp_guard",
                "hook",
                "claude-code",
                "--store",
                f"sqlite:///{home / 'hook.db'}",
            ],
            input=payload,
            text=True,
            check=True,
            env=env,
            cwd=Path(__file__).resolve().parent.parent,
        )
        samples.append(time.perf_counter() - started)
    return sorted(samples)[len(samples) // 2]


def row(label: str, rate: float, unit: str, baseline: float | None = None) -> None:
    ratio = f"  ({rate / baseline:.2f}x)" if baseline else ""
    print(f"  {label:<50} {rate:>10,.0f} {unit}{ratio}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--calls", type=int, default=2_000)
    parser.add_argument("--keep", help="build the big store here and reuse it on later runs")
    args = parser.parse_args()
    key = Ed25519PrivateKey.generate()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        print(f"append ({args.calls} calls, request + outcome each, checkpoint every 1000 entries):")
        base = baseline_append_rate(work / "baseline.db", args.calls)
        row("baseline: sqlite3 INSERT + COMMIT, no chain", base, "entries/s")
        for callers in (1, 16):
            rate = asyncio.run(append_rate(work / f"append-{callers}.db", args.calls, callers, key))
            row(f"SqliteStore, {callers} concurrent caller(s)", rate, "entries/s", base)

        big = Path(args.keep) if args.keep else work / "big.db"
        keyfile = big.with_name(big.name + ".key")
        if big.exists() and keyfile.exists():
            key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(keyfile.read_text()))
            print(f"\nreusing {big}")
        else:
            rate = asyncio.run(build(big, args.entries, key))
            keyfile.write_text(key.private_bytes_raw().hex())
            print(f"\nbuilt {args.entries:,} entries at {rate:,.0f} entries/s (many appends in flight)")
        hashed, written = baseline_scan(big)
        verified, ok, checkpoints = asyncio.run(verify_rate(big, key))
        print(f"verify ({'ok' if ok else 'FAILED'}, {checkpoints} checkpoints checked):")
        row("baseline: read every body + SHA-256", hashed, "entries/s")
        row("audit verify", verified, "entries/s", hashed)
        print(f"  a million entries in {1_000_000 / verified:.1f} s")
        exported = asyncio.run(export_rate(big))
        print("export (jsonl, to a sink):")
        row("baseline: read every outcome body, write it out", written, "calls/s")
        row("audit export", exported, "calls/s", written)
        print("search:")
        for label, seconds in asyncio.run(search_times(big)).items():
            print(f"  {label:<60} {seconds * 1000:>8,.0f} ms")
        print(f"hook: one `mcp-guard hook claude-code` process {hook_seconds(work) * 1000:>22,.0f} ms")


if __name__ == "__main__":
    main()
