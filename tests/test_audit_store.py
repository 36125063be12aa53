"""The store behind the auditor: schema migration, pruning, checkpoints as the server writes them, keys."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mcp_types import LATEST_PROTOCOL_VERSION

from mcp_guard.audit.verify import keep_latest_checkpoint
from mcp_guard.errors import AuditError
from mcp_guard.store.base import AuditEvent, CallFilter, EventType
from mcp_guard.store.chain import GENESIS, canonical, link
from mcp_guard.store.checkpoint import KEY_ENV, Ed25519PrivateKey, generate_key_file, public_key_text
from mcp_guard.store.sqlite import SCHEMA_VERSION, SqliteStore
from tests.auditing import audit_cli, audit_json, record, shop_config

V1_SCHEMA = (
    """CREATE TABLE audit (
        seq INTEGER PRIMARY KEY, ts TEXT NOT NULL, type TEXT NOT NULL, session_id TEXT NOT NULL, call_id TEXT,
        identity TEXT NOT NULL, tool TEXT, connection TEXT, decision TEXT, prev_hash BLOB NOT NULL,
        hash BLOB NOT NULL, body BLOB NOT NULL
    ) STRICT""",
    "CREATE INDEX audit_session ON audit (session_id)",
    "CREATE INDEX audit_identity ON audit (identity)",
    "CREATE INDEX audit_call ON audit (call_id)",
    "CREATE INDEX audit_tool ON audit (tool)",
    "CREATE INDEX audit_decision ON audit (decision)",
    "CREATE INDEX audit_ts ON audit (ts)",
    "PRAGMA user_version = 1",
)


def call_events(n: int, ts: str, kind: str = "write", session: str = "s1") -> list[AuditEvent]:
    """A request and an outcome per call, as the guard writes them."""
    events = []
    for i in range(n):
        call = f"{session}-call-{i}"
        sql = f"UPDATE orders SET total = {i} WHERE id = {i}"
        args = {"sql": sql, "reason": f"fix order {i}", "params": [], "connection": None}
        events.append(
            AuditEvent(
                EventType.REQUEST,
                session,
                "local:alice",
                call,
                "execute",
                None,
                detail={"arguments": args},
                ts=ts,
            )
        )
        classification = {"kind": kind, "tables": ["orders"], "flags": [], "statements": []}
        events.append(
            AuditEvent(
                EventType.OUTCOME,
                session,
                "local:alice",
                call,
                "execute",
                "shop",
                "allow",
                detail={"status": "ok", "classification": classification, "masked_cells": i},
                ts=ts,
            )
        )
    return events


def write_v1(path: Path, events: list[AuditEvent]) -> None:
    """An audit file exactly as mcp-guard 0.1 (schema version 1) wrote it."""
    db = sqlite3.connect(path)
    for statement in V1_SCHEMA:
        db.execute(statement)
    prev = GENESIS
    for seq, event in enumerate(events, 1):
        body = canonical(event)
        digest = link(seq, prev, body)
        columns = [event.as_dict()[name] for name in ("ts", "type", "session_id", "call_id", "identity")]
        columns += [event.tool, event.connection, event.decision]
        db.execute(
            "INSERT INTO audit VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (seq, *columns, prev, digest, body),
        )
        prev = digest
    db.commit()
    db.close()


async def appended(path: Path, events: list[AuditEvent]) -> list[int]:
    store = SqliteStore(path)
    await store.open()
    try:
        return [await store.append(event) for event in events]
    finally:
        await store.close()


def test_a_version_1_file_is_migrated_its_chain_intact_and_its_index_filled(tmp_path):
    path = tmp_path / "audit.db"
    write_v1(path, call_events(3, "2026-01-05T10:00:00.000000+00:00"))

    async def check() -> None:
        store = SqliteStore(path)
        await store.open()
        try:
            assert (await store.verify()).ok
            writes = [c async for c in store.calls(CallFilter(table="orders", kind="write"))]
            assert len(writes) == 3
            seq = await store.append(AuditEvent(EventType.SESSION_END, "s1", "local:alice"))
            assert seq == 7
            report = await store.verify()
            assert report.ok and report.entries == 7
        finally:
            await store.close()

    asyncio.run(check())
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    assert (
        db.execute("SELECT kind, tables FROM audit WHERE type = 'outcome'").fetchall()
        == [("write", '["orders"]')] * 3
    )


def test_a_file_from_a_newer_version_is_refused(tmp_path):
    path = tmp_path / "audit.db"
    asyncio.run(appended(path, call_events(1, "2026-01-05T10:00:00.000000+00:00")))
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 9")
    db.commit()
    with pytest.raises(AuditError, match="written by a newer mcp-guard"):
        asyncio.run(appended(path, []))


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("MCP_GUARD_HOME", str(tmp_path))
    monkeypatch.setenv("MCP_GUARD_CONFIG", "")
    return tmp_path


def test_prune_removes_old_entries_after_signing_a_checkpoint_that_keeps_the_chain_verifiable(home, capsys):
    old = call_events(3, "2026-01-05T10:00:00.000000+00:00", session="old")
    new = call_events(2, "2026-03-01T10:00:00.000000+00:00", session="new")
    asyncio.run(appended(home / "audit.db", old + new))
    assert audit_cli(capsys, "audit", "key", "--generate", "-")[0] == 0
    code, out, _ = audit_cli(capsys, "audit", "prune", "--before", "2026-02-01", "--dry-run")
    assert code == 0 and "would remove 6 entries" in out
    assert sqlite3.connect(home / "audit.db").execute("SELECT count(*) FROM audit").fetchone() == (10,)

    code, out, err = audit_cli(capsys, "audit", "prune", "--before", "2026-02-01")
    assert code == 0, err
    assert "removed 6 entries (up to entry 6); the chain now starts at entry 7" in out
    assert "reason: prune before 2026-02-01" in out
    assert "reason: prune before 2026-02-01" in (home / "audit.db.witness").read_text()
    report = audit_json(capsys, "audit", "verify")
    assert report["ok"] and report["first_seq"] == 7 and report["entries"] == 10
    assert [c["request"]["session_id"] for c in audit_json(capsys, "audit", "list")] == ["new", "new"]
    asyncio.run(appended(home / "audit.db", call_events(1, "2026-03-02T10:00:00.000000+00:00")))
    assert audit_json(capsys, "audit", "verify")["ok"]


def test_prune_always_keeps_the_newest_entry(home, capsys):
    asyncio.run(appended(home / "audit.db", call_events(2, "2026-01-05T10:00:00.000000+00:00")))
    audit_cli(capsys, "audit", "key", "--generate", "-")
    code, out, _ = audit_cli(capsys, "audit", "prune", "--before", "2030-01-01")
    assert code == 0 and "removed 3 entries" in out
    assert audit_json(capsys, "audit", "verify")["ok"]


def test_prune_refuses_a_log_that_does_not_verify(home, capsys):
    asyncio.run(appended(home / "audit.db", call_events(3, "2026-01-05T10:00:00.000000+00:00")))
    audit_cli(capsys, "audit", "key", "--generate", "-")
    db = sqlite3.connect(home / "audit.db")
    db.execute(
        "UPDATE audit SET body = CAST(replace(CAST(body AS TEXT), 'fix', 'fax') AS BLOB) WHERE seq = 3"
    )
    db.commit()
    code, _, err = audit_cli(capsys, "audit", "prune", "--before", "2030-01-01")
    assert code == 1 and "does not verify, so nothing was pruned" in err and "entry 3" in err
    assert db.execute("SELECT count(*) FROM audit").fetchone() == (6,)


def test_prune_needs_the_signing_key(home, capsys):
    asyncio.run(appended(home / "audit.db", call_events(1, "2026-01-05T10:00:00.000000+00:00")))
    code, _, err = audit_cli(capsys, "audit", "prune", "--before", "2030-01-01")
    assert code == 2 and "no signing key" in err


def test_a_watcher_keeps_the_latest_checkpoint_and_notices_a_rollback(home, capsys):
    path = home / "audit.db"
    asyncio.run(appended(path, call_events(2, "2026-01-05T10:00:00.000000+00:00")))
    key = generate_key_file(home / "audit-signing.key")
    assert audit_cli(capsys, "audit", "checkpoint", "--new")[0] == 0
    kept = home / "ui" / "seen.txt"
    kept.parent.mkdir()
    trusted = {public_key_text(key.public_key())}

    async def keep() -> object:
        store = SqliteStore(path)
        await store.open()
        try:
            return await keep_latest_checkpoint(store, kept, trusted)
        finally:
            await store.close()

    first = asyncio.run(keep())
    assert first is not None and first.entries == 4 and kept.read_text() == first.text
    db = sqlite3.connect(path)
    db.execute("DELETE FROM audit WHERE seq > 2")
    db.execute("DELETE FROM checkpoint")
    db.commit()
    with pytest.raises(
        AuditError, match="holds 2 entries, fewer than the 4 the checkpoint kept at .* cut or rolled back"
    ):
        asyncio.run(keep())


def test_the_server_signs_with_the_key_from_the_environment(tmp_path, sqlite_shop, capsys, monkeypatch):
    key = Ed25519PrivateKey.generate()
    seed = key.private_bytes_raw()
    import base64

    env_key = base64.b64encode(seed).decode()
    record(shop_config(tmp_path, sqlite_shop), tmp_path, [("list_tables", {})], **{KEY_ENV: env_key})
    assert not (tmp_path / "audit-signing.key").exists()
    text = sqlite3.connect(tmp_path / "audit.db").execute("SELECT text FROM checkpoint").fetchone()[0]
    assert f"key: {public_key_text(key.public_key())}" in text
    monkeypatch.setenv("MCP_GUARD_HOME", str(tmp_path))
    monkeypatch.setenv(KEY_ENV, env_key)
    code, out, _ = audit_cli(capsys, "audit", "verify", "--store", f"sqlite:///{tmp_path / 'audit.db'}")
    assert code == 0, out


def test_a_bad_signing_key_stops_the_server_naming_it(tmp_path, sqlite_shop):
    done = subprocess.run(
        [sys.executable, "-m", "mcp_guard", "serve", "--config", str(shop_config(tmp_path, sqlite_shop))],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "MCP_GUARD_HOME": str(tmp_path), KEY_ENV: "not a key"},
    )
    assert done.returncode == 2
    assert f"environment variable {KEY_ENV}: not an Ed25519 private key" in done.stderr


def test_a_bad_trusted_key_in_the_configuration_is_named(tmp_path, sqlite_shop, capsys, monkeypatch):
    config = shop_config(tmp_path, sqlite_shop, audit='trusted_keys = ["ed25519:nope"]')
    monkeypatch.setenv("MCP_GUARD_HOME", str(tmp_path))
    code, _, err = audit_cli(capsys, "audit", "verify", "--config", str(config))
    assert code == 2 and "audit.trusted_keys: trusted key: 'ed25519:nope' is not an Ed25519 public key" in err


def test_no_checkpoints_and_no_key_when_checkpoints_are_off(tmp_path, sqlite_shop):
    record(shop_config(tmp_path, sqlite_shop, audit="checkpoint_every = 0"), tmp_path, [("list_tables", {})])
    assert not (tmp_path / "audit-signing.key").exists() and not (tmp_path / "audit.db.witness").exists()
    assert sqlite3.connect(tmp_path / "audit.db").execute("SELECT count(*) FROM checkpoint").fetchone() == (
        0,
    )


def test_sigterm_ends_the_session_in_the_audit_log(tmp_path, sqlite_shop):
    """SIGTERM with stdin still open: the session end and its checkpoint are recorded before the exit."""
    config = shop_config(tmp_path, sqlite_shop)
    hello = {
        "protocolVersion": LATEST_PROTOCOL_VERSION,
        "capabilities": {},
        "clientInfo": {"name": "raw", "version": "9"},
    }
    audit = tmp_path / "audit.db"

    def started() -> bool:
        if not audit.exists():
            return False
        with contextlib.closing(sqlite3.connect(audit)) as db:
            return db.execute("SELECT count(*) FROM audit WHERE type = 'session_start'").fetchone() == (1,)

    with subprocess.Popen(
        [sys.executable, "-m", "mcp_guard", "serve", "--config", str(config)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "MCP_GUARD_HOME": str(tmp_path), "MCP_GUARD_CONFIG": ""},
    ) as server:
        assert server.stdin is not None and server.stdout is not None
        initialize = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": hello}
        server.stdin.write(json.dumps(initialize).encode() + b"\n")
        server.stdin.flush()
        assert b'"id":1' in server.stdout.readline().replace(b" ", b"")
        server.stdin.write(b'{"jsonrpc": "2.0", "method": "notifications/initialized"}\n')
        server.stdin.flush()
        deadline = time.monotonic() + 20
        while not started() and time.monotonic() < deadline:
            time.sleep(0.05)
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=20) == 0
    with contextlib.closing(sqlite3.connect(audit)) as db:
        rows = db.execute("SELECT type, body FROM audit ORDER BY seq").fetchall()
        assert [r[0] for r in rows] == ["session_start", "session_end"]
        assert json.loads(rows[0][1])["detail"]["client"] == "raw/9"
        assert json.loads(rows[1][1])["detail"]["how"] == "signal"
        assert db.execute("SELECT count(*) FROM checkpoint WHERE text LIKE '%session end%'").fetchone() == (
            1,
        )


def test_stats_count_masked_cells_from_the_outcome(home, capsys):
    asyncio.run(appended(home / "audit.db", call_events(4, "2026-01-05T10:00:00.000000+00:00")))
    (row,) = audit_json(capsys, "audit", "stats")
    assert (row["day"], row["identity"], row["calls"], row["masked_cells"]) == (
        "2026-01-05",
        "local:alice",
        4,
        6,
    )


def test_the_approver_filter_finds_calls_by_an_entry_recorded_between_request_and_outcome(home, capsys):
    events = call_events(2, "2026-01-05T10:00:00.000000+00:00")
    decided = AuditEvent(EventType.TOOL_USE, "s1", "local:bob", "s1-call-1", detail={"approver": "local:bob"})
    asyncio.run(appended(home / "audit.db", events[:3] + [decided] + events[3:]))
    found = audit_json(capsys, "audit", "list", "--approver", "local:bob")
    assert [c["call_id"] for c in found] == ["s1-call-1"]
    assert found[0]["trail"][0]["identity"] == "local:bob"
    assert audit_json(capsys, "audit", "list", "--approver", "local:carol") == []


HOSTILE_SQL = "SELECT 1 -- \x1b[2J\x1b[1;1H all clear"
HOSTILE_REASON = '=HYPERLINK("http://evil") [bold red]not markup[/]'


def hostile_call() -> list[AuditEvent]:
    """A call whose text an assistant controls: terminal escapes, rich markup, a spreadsheet formula."""
    args = {"sql": HOSTILE_SQL, "reason": HOSTILE_REASON, "params": [], "connection": None}
    return [
        AuditEvent(EventType.SESSION_START, "s9", "local:[blink]x", detail={"cwd": "/tmp/\x1b]0;pwned\x07"}),
        AuditEvent(
            EventType.REQUEST,
            "s9",
            "local:[blink]x",
            "call-hostile-9",
            "execute",
            None,
            detail={"arguments": args},
        ),
        AuditEvent(
            EventType.OUTCOME,
            "s9",
            "local:[blink]x",
            "call-hostile-9",
            "execute",
            "shop",
            "deny",
            detail={"status": "denied", "response": {"text": "no \x1b[31mred\x1b[0m", "is_error": True}},
        ),
    ]


@pytest.mark.parametrize(
    "command",
    [("audit", "list"), ("replay", "latest"), ("audit", "show", "call-hostile-9"), ("audit", "sessions")],
)
def test_recorded_text_cannot_drive_the_auditors_terminal(home, capsys, monkeypatch, command):
    asyncio.run(appended(home / "audit.db", hostile_call()))
    monkeypatch.setenv("COLUMNS", "300")
    code, out, _ = audit_cli(capsys, *command)
    assert code == 0
    assert "\x1b" not in out and "\x07" not in out
    assert "\\x1b" in out
    assert "local:[blink]x" in out  # shown as written, not taken for markup


def test_csv_export_neutralises_formulas_and_jsonl_keeps_them_exact(home, capsys):
    asyncio.run(appended(home / "audit.db", hostile_call()))
    _, out, _ = audit_cli(capsys, "audit", "export", "--format", "csv")
    (row,) = list(__import__("csv").DictReader(__import__("io").StringIO(out)))
    assert row["reason"] == "'" + HOSTILE_REASON and row["sql"] == HOSTILE_SQL
    _, out, _ = audit_cli(capsys, "audit", "export")
    assert json.loads(out)["reason"] == HOSTILE_REASON


def test_servers_starting_at_once_create_and_share_one_signing_key(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from mcp_guard.store.checkpoint import load_signing_key

    path = tmp_path / "keys" / "audit-signing.key"

    def public(_: int) -> str:
        key = load_signing_key(path, create=True)
        assert key is not None
        return public_key_text(key.public_key())

    with ThreadPoolExecutor(8) as pool:
        assert len(set(pool.map(public, range(16)))) == 1
    assert [p.name for p in path.parent.iterdir()] == ["audit-signing.key"]
    assert path.stat().st_mode & 0o777 == 0o600
