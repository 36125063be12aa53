"""The SQLite audit store: round trips, filters, tamper evidence, concurrency and hostile files."""

from __future__ import annotations

import asyncio
import hashlib
import math
import os
import sqlite3
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import closing
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

import mcp_guard
from mcp_guard.cli import main
from mcp_guard.errors import AuditError, ConfigError
from mcp_guard.store import chain, open_store
from mcp_guard.store.base import AuditEvent, AuditFilter, EventType, VerifyReport
from mcp_guard.store.sqlite import SCHEMA_VERSION, SqliteStore

REPO = Path(mcp_guard.__file__).resolve().parent.parent


def event(n: int, **fields: Any) -> AuditEvent:
    values: dict[str, Any] = {
        "type": EventType.REQUEST,
        "session_id": "s1",
        "identity": "alice",
        "call_id": f"call-{n}",
        "tool": "query",
        "connection": "shop",
        "decision": "allow",
        "detail": {"n": n, "sql": "SELECT name FROM customers WHERE note = 'ü \"x\"'"},
        "ts": f"2026-11-01T10:00:{n:02d}.000000+00:00",
    }
    values.update(fields)
    return AuditEvent(**values)


def chain_rows(events: list[AuditEvent]) -> list[tuple[Any, ...]]:
    """Rows as a store would hold them (in `chain.ROW` order), linked from the genesis."""
    rows: list[tuple[Any, ...]] = []
    prev = chain.GENESIS
    for seq, item in enumerate(events, 1):
        body = chain.canonical(item)
        digest = chain.link(seq, prev, body)
        fields = item.as_dict()
        rows.append((seq, prev, digest, body, *(fields[name] for name in chain.INDEXED)))
        prev = digest
    return rows


def run_sql(path: Path, *statements: str | tuple[str, tuple[Any, ...]]) -> None:
    """Change the store file behind the store's back, as an attacker with file access would."""
    with closing(sqlite3.connect(path)) as db:
        for statement in statements:
            sql, params = statement if isinstance(statement, tuple) else (statement, ())
            db.execute(sql, params)
        db.commit()


def insert_rows(path: Path, rows: list[tuple[Any, ...]]) -> None:
    with closing(sqlite3.connect(path)) as db:
        db.executemany(
            f"INSERT INTO audit ({', '.join(chain.ROW)}) VALUES ({', '.join('?' * len(chain.ROW))})", rows
        )
        db.commit()


def row(path: Path, seq: int) -> tuple[Any, ...]:
    with closing(sqlite3.connect(path)) as db:
        found = db.execute(f"SELECT {', '.join(chain.ROW)} FROM audit WHERE seq = ?", (seq,)).fetchone()
    assert found is not None
    return tuple(found)


async def verify(path: Path) -> VerifyReport:
    store = SqliteStore(path)
    await store.open()
    try:
        return await store.verify()
    finally:
        await store.close()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    opened = SqliteStore(tmp_path / "audit" / "audit.db")
    await opened.open()
    yield opened
    await opened.close()


@pytest.fixture
async def log20(tmp_path: Path) -> Path:
    """A closed store file holding entries 1..20, ready to be tampered with."""
    path = tmp_path / "audit.db"
    store = SqliteStore(path)
    await store.open()
    for n in range(1, 21):
        await store.append(event(n))
    await store.close()
    return path


# the chain ---------------------------------------------------------------------------------------


def test_canonical_encoding_is_sorted_compact_utf8_json() -> None:
    body = chain.canonical(event(1, detail={"b": [1, 2.5, None, True], "a": "é"}, tool=None))
    assert (
        body
        == (
            '{"call_id":"call-1","connection":"shop","decision":"allow","detail":{"a":"é","b":[1,2.5,null,true]},'
            '"identity":"alice","session_id":"s1","tool":null,"ts":"2026-11-01T10:00:01.000000+00:00",'
            '"type":"request"}'
        ).encode()
    )


def test_link_binds_position_predecessor_and_bytes() -> None:
    body = chain.canonical(event(1))
    expected = hashlib.sha256(
        b"mcp-guard/audit/v1\n" + (1).to_bytes(8, "big") + chain.GENESIS + body
    ).digest()
    assert chain.link(1, chain.GENESIS, body) == expected
    assert chain.link(2, chain.GENESIS, body) != expected
    assert chain.link(1, b"\x01" * 32, body) != expected
    assert chain.link(1, chain.GENESIS, body + b" ") != expected


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        (
            {"detail": {"rows": [{"amount": Decimal("1.50")}]}},
            "detail.rows[0].amount holds a value of type Decimal, which is not JSON",
        ),
        ({"detail": {"ratio": math.nan}}, "detail.ratio holds nan"),
        ({"detail": {"note": "\ud800"}}, "detail.note holds text that is not valid Unicode"),
        ({"detail": {"ids": {1: "a", "b": 2}}}, "detail.ids has a key that is not text"),
        ({"identity": 42}, "field identity must be text"),
        ({"tool": b"query"}, "field tool must be text or None"),
        ({"session_id": "s\x001"}, "field session_id contains a NUL character"),
    ],
)
def test_an_event_json_cannot_hold_is_refused_naming_the_field(fields: dict[str, Any], named: str) -> None:
    with pytest.raises(AuditError, match=named.replace("[", r"\[").replace("]", r"\]")):
        chain.canonical(event(1, **fields))


def test_decode_gives_back_the_event_and_refuses_a_body_that_is_not_one() -> None:
    original = event(3, detail={"nested": {"list": [1, "two", None]}})
    assert chain.decode(chain.canonical(original)) == original
    with pytest.raises(AuditError, match="not a valid audit event"):
        chain.decode(b'{"type":"request"}')
    with pytest.raises(AuditError, match="not a valid audit event"):
        chain.decode(chain.canonical(original).replace(b'"request"', b'"party"'))


def test_verifier_names_a_duplicated_entry_from_any_row_source() -> None:
    rows = chain_rows([event(1), event(2)])
    report = chain.verify([rows[0], rows[1], rows[1]])
    assert report.problem == "entry 3: expected seq 3 but found 2 (an entry is duplicated or out of order)"
    assert (report.entries, report.first_bad_seq, report.head_hash) == (2, 3, rows[1][2].hex())


# round trip and filters ----------------------------------------------------------------------------


async def test_new_store_is_a_private_wal_file_in_created_directories(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "audit.db"
    store = SqliteStore(path)
    await store.open()
    try:
        await store.append(event(1))
        for name in ("audit.db", "audit.db-wal"):
            assert stat.S_IMODE((path.parent / name).stat().st_mode) == 0o600, name
        with closing(sqlite3.connect(path)) as db:
            assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    finally:
        await store.close()


# tamper evidence -----------------------------------------------------------------------------------


async def test_an_untouched_chain_verifies(log20: Path) -> None:
    report = await verify(log20)
    assert report == VerifyReport(ok=True, entries=20, head_hash=row(log20, 20)[2].hex())


async def test_an_edited_body_byte_is_found(log20: Path) -> None:
    body = row(log20, 17)[3]
    run_sql(log20, ("UPDATE audit SET body = ? WHERE seq = 17", (body.replace(b"alice", b"alicf"),)))
    report = await verify(log20)
    assert not report.ok
    assert report.problem == "entry 17: its body does not match its hash (edited)"
    assert (report.first_bad_seq, report.entries, report.head_hash) == (17, 16, row(log20, 16)[2].hex())


@pytest.mark.parametrize(
    ("column", "value", "shown"),
    [
        ("identity", "eve", "'eve'"),
        ("identity", 'alice","session_id":"s1', '\'alice","session_id":"s1\''),
        ("session_id", "s9", "'s9'"),
        ("type", "outcome", "'outcome'"),
        ("ts", "2026-11-02T10:00:05.000000+00:00", "'2026-11-02T10:00:05.000000+00:00'"),
        ("call_id", None, "NULL"),
        ("tool", "execute", "'execute'"),
        ("connection", None, "NULL"),
        ("decision", "deny", "'deny'"),
    ],
)
async def test_an_edited_indexed_column_is_found(log20: Path, column: str, value: Any, shown: str) -> None:
    hashed = {"identity": "'alice'", "session_id": "'s1'", "type": "'request'", "call_id": "'call-5'"}
    hashed |= {"ts": "'2026-11-01T10:00:05.000000+00:00'", "tool": "'query'", "connection": "'shop'"}
    hashed |= {"decision": "'allow'"}
    run_sql(log20, (f"UPDATE audit SET {column} = ? WHERE seq = 5", (value,)))
    report = await verify(log20)
    assert (
        report.problem == f"entry 5: column {column} says {shown} but the hashed body says {hashed[column]}"
    )
    assert report.first_bad_seq == 5


async def test_only_the_first_of_several_breaks_is_named(log20: Path) -> None:
    run_sql(log20, "DELETE FROM audit WHERE seq = 15", "UPDATE audit SET identity = 'eve' WHERE seq = 6")
    report = await verify(log20)
    assert (report.first_bad_seq, report.entries) == (6, 5)
    assert report.problem == "entry 6: column identity says 'eve' but the hashed body says 'alice'"


async def test_a_deleted_entry_is_found(log20: Path) -> None:
    run_sql(log20, "DELETE FROM audit WHERE seq = 10")
    report = await verify(log20)
    assert report.problem == "entry 10: expected seq 10 but found 11 (an entry is missing)"
    assert report.first_bad_seq == 10


async def test_a_deleted_first_entry_is_found(log20: Path) -> None:
    run_sql(log20, "DELETE FROM audit WHERE seq = 1")
    assert (await verify(log20)).problem == "entry 1: expected seq 1 but found 2 (an entry is missing)"


async def test_a_well_forged_inserted_entry_is_found_where_it_joins_the_real_chain(log20: Path) -> None:
    prev = row(log20, 9)[2]
    forged = event(99, identity="mallory")
    body = chain.canonical(forged)
    fields = forged.as_dict()
    run_sql(
        log20, "UPDATE audit SET seq = -seq WHERE seq >= 10", "UPDATE audit SET seq = 1 - seq WHERE seq < 0"
    )
    insert_rows(
        log20, [(10, prev, chain.link(10, prev, body), body, *(fields[name] for name in chain.INDEXED))]
    )
    report = await verify(log20)
    assert report.problem == "entry 11: prev_hash does not match entry 10 (inserted or reordered)"


async def test_swapped_bodies_are_found(log20: Path) -> None:
    body4, body8 = row(log20, 4)[3], row(log20, 8)[3]
    run_sql(
        log20,
        ("UPDATE audit SET body = ? WHERE seq = 4", (body8,)),
        ("UPDATE audit SET body = ? WHERE seq = 8", (body4,)),
    )
    assert (await verify(log20)).problem == "entry 4: its body does not match its hash (edited)"


async def test_swapped_seq_numbers_are_found(log20: Path) -> None:
    run_sql(
        log20,
        "UPDATE audit SET seq = -1 WHERE seq = 6",
        "UPDATE audit SET seq = 6 WHERE seq = 9",
        "UPDATE audit SET seq = 9 WHERE seq = -1",
    )
    assert (
        await verify(log20)
    ).problem == "entry 6: prev_hash does not match entry 5 (inserted or reordered)"


async def test_an_edit_with_its_hash_recomputed_breaks_the_next_link(log20: Path) -> None:
    seq, prev, _, body = row(log20, 7)[:4]
    edited = body.replace(b'"n":7', b'"n":70')
    run_sql(
        log20, ("UPDATE audit SET body = ?, hash = ? WHERE seq = 7", (edited, chain.link(seq, prev, edited)))
    )
    assert (
        await verify(log20)
    ).problem == "entry 8: prev_hash does not match entry 7 (inserted or reordered)"


async def test_verification_streams_past_one_chunk_and_finds_a_late_break(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    store = SqliteStore(path)
    await store.open()
    await store.close()
    rows = chain_rows([event(seq % 60) for seq in range(1, 5001)])
    insert_rows(path, rows)
    assert await verify(path) == VerifyReport(ok=True, entries=5000, head_hash=rows[-1][2].hex())
    run_sql(path, "UPDATE audit SET tool = 'execute' WHERE seq = 4500")
    report = await verify(path)
    assert (report.first_bad_seq, report.entries) == (4500, 4499)


# concurrency ---------------------------------------------------------------------------------------

APPENDER = """
import asyncio, sys, time
from pathlib import Path
from mcp_guard.store.sqlite import SCHEMA_VERSION, SqliteStore
from mcp_guard.store.base import AuditEvent, EventType

async def main(path, name, go):
    store = SqliteStore(Path(path))
    await store.open()
    print("ready", flush=True)
    while not Path(go).exists():
        time.sleep(0.005)

    async def worker(w):
        for n in range(w, 500, 10):
            await store.append(AuditEvent(EventType.REQUEST, "s-" + name, name, detail={"n": n}))
            await asyncio.sleep(0.001)  # leave the lock free now and then, as real callers do

    await asyncio.gather(*(worker(w) for w in range(10)))
    await store.close()

asyncio.run(main(*sys.argv[1:]))
"""


async def test_two_processes_appending_at_once_make_one_gapless_chain(tmp_path: Path) -> None:
    path, go = tmp_path / "audit.db", tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    children = [
        subprocess.Popen(
            [sys.executable, "-c", APPENDER, str(path), name, str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for name in ("alpha", "beta")
    ]
    try:
        for child in children:  # both have opened the new file at once; now append at once
            assert child.stdout is not None and child.stdout.readline() == "ready\n", child.communicate()[1]
        go.touch()
        for child in children:
            _, errors = child.communicate(timeout=60)
            assert child.returncode == 0, errors
    finally:
        for child in children:
            child.kill()
            child.communicate()
    report = await verify(path)
    assert (report.ok, report.entries) == (True, 1000), report.problem
    with closing(sqlite3.connect(path)) as db:
        who = [identity for (identity,) in db.execute("SELECT identity FROM audit ORDER BY seq")]
    assert who.count("alpha") == who.count("beta") == 500
    switches = sum(a != b for a, b in zip(who, who[1:], strict=False))
    assert switches > 10, "the two processes did not append at the same time"


# failures and hostile files ------------------------------------------------------------------------


async def test_appends_during_a_lock_fail_clearly_and_the_store_then_recovers(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    store = SqliteStore(path, busy_timeout=0.2)
    await store.open()
    try:
        await store.append(event(1))
        with closing(sqlite3.connect(path, isolation_level=None)) as other:
            other.execute("BEGIN IMMEDIATE")
            results = await asyncio.gather(
                *(store.append(event(n)) for n in range(2, 7)), return_exceptions=True
            )
            other.execute("ROLLBACK")
        assert all(isinstance(result, AuditError) for result in results), results
        message = str(results[0])
        assert str(path) in message and "locked" in message and "busy timeout (0.2 s)" in message
        await store.append(event(7))
        records = await store.query(AuditFilter())
        assert [(r.seq, r.event.call_id) for r in records] == [(1, "call-1"), (2, "call-7")]
        assert (await store.verify()).ok
    finally:
        await store.close()


async def test_a_file_that_is_not_sqlite_is_refused_with_advice(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    path.write_bytes(b"this is not a database, it is a shopping list\n" * 200)
    with pytest.raises(AuditError, match=r"audit\.db: cannot open it: the file is not an SQLite database"):
        await SqliteStore(path).open()


async def test_a_damaged_store_gives_an_audit_error_not_a_traceback(log20: Path) -> None:
    data = bytearray(log20.read_bytes())
    data[4096:8192] = b"\xff" * 4096  # page 2 onward: the table's pages
    log20.write_bytes(bytes(data))
    with pytest.raises(AuditError, match=r"audit\.db: .*damaged"):
        await verify(log20)


async def test_another_applications_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "shop.db"
    run_sql(path, "CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
    with pytest.raises(AuditError, match=r"holds other data \(customers\) and no mcp-guard audit log"):
        await SqliteStore(path).open()


async def test_an_audit_table_with_the_wrong_layout_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    run_sql(path, "CREATE TABLE audit (seq INTEGER PRIMARY KEY, what TEXT)", "PRAGMA user_version = 1")
    with pytest.raises(AuditError, match=r"not an mcp-guard audit log \(found seq, what; expected a table"):
        await SqliteStore(path).open()


async def test_a_store_with_triggers_is_refused(log20: Path) -> None:
    run_sql(
        log20, "CREATE TRIGGER hide AFTER INSERT ON audit BEGIN DELETE FROM audit WHERE identity = 'x'; END"
    )
    with pytest.raises(AuditError, match="has triggers \\(hide\\), which mcp-guard never creates"):
        await SqliteStore(log20).open()


async def test_a_newer_schema_version_is_refused(log20: Path) -> None:
    newer = SCHEMA_VERSION + 1
    run_sql(log20, f"PRAGMA user_version = {newer}")
    with pytest.raises(
        AuditError,
        match=rf"newer mcp-guard \(schema version {newer}; this one understands up to {SCHEMA_VERSION}\)",
    ):
        await SqliteStore(log20).open()


async def test_a_store_path_that_cannot_be_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "plain").write_text("a file, not a directory")
    with pytest.raises(AuditError, match=r"plain/audit\.db: cannot create it"):
        await SqliteStore(tmp_path / "plain" / "audit.db").open()
    with pytest.raises(AuditError, match="is a directory"):
        await SqliteStore(tmp_path).open()


# the factory ---------------------------------------------------------------------------------------


def test_open_store_takes_a_sqlite_url_or_a_path(tmp_path: Path) -> None:
    url_store = open_store(f"sqlite://{tmp_path}/a.db")
    path_store = open_store(str(tmp_path / "b.db"))
    assert isinstance(url_store, SqliteStore) and url_store.path == tmp_path / "a.db"
    assert isinstance(path_store, SqliteStore) and path_store.path == tmp_path / "b.db"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("sqlite://audit.db", "the path must be absolute"),
        ("mysql://root:hunter22@db/audit", "scheme mysql:// is not supported"),
        ("  ", "location is empty"),
    ],
)
def test_open_store_refuses_what_it_cannot_serve_without_echoing_secrets(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as raised:
        open_store(url)
    assert "hunter22" not in str(raised.value)


def test_an_unknown_durability_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="durability must be full, writes or normal"):
        SqliteStore(tmp_path / "audit.db", durability="sometimes")  # type: ignore[arg-type]


def test_store_migrate_upgrades_a_version_2_file_and_says_so(
    log20: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_sql(log20, "DROP TABLE approval_requests", "DROP TABLE approval_votes", "PRAGMA user_version = 2")
    assert main(["store", "migrate", "--store", f"sqlite://{log20}"]) == 0
    said = capsys.readouterr().out
    assert f"audit store sqlite://{log20}: schema upgraded from version 2 to {SCHEMA_VERSION}" in said
    with closing(sqlite3.connect(log20)) as db:
        names = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    assert {"approval_requests", "approval_votes", "audit", "checkpoint"} <= names
    assert main(["store", "migrate", "--store", f"sqlite://{log20}"]) == 0
    assert f"schema version {SCHEMA_VERSION}, up to date" in capsys.readouterr().out
