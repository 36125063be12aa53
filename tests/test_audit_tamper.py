"""Tampering with the audit log, each way an attacker with the file but not the key would: every one is
caught by `mcp-guard audit verify`, with a message that names what is wrong."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest

from mcp_guard.demo.data import create_demo_database
from mcp_guard.store.chain import GENESIS, link
from mcp_guard.store.checkpoint import Ed25519PrivateKey, parse_checkpoints, sign
from tests.auditing import audit_cli, record, shop_config

CALLS = [
    ("query", {"sql": "SELECT count(*) FROM orders"}),
    ("execute", {"sql": "UPDATE orders SET status = 'shipped' WHERE id = 7", "reason": "order 7 shipped"}),
    ("execute", {"sql": "DELETE FROM orders WHERE id = 9", "reason": "tidy up"}),
    ("query", {"sql": "SELECT id FROM customers WHERE id < 3"}),
    ("list_tables", {}),
]
ENTRIES = 2 + 2 * len(CALLS)
"""Session start and end, a request and an outcome per call: 12."""


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A log recorded once through the real server, with a checkpoint every 4 entries."""
    home = tmp_path_factory.mktemp("tamper")
    shop = home / "shop.db"
    create_demo_database(shop)
    record(shop_config(home, shop, audit="checkpoint_every = 4"), home, CALLS)
    return home


@pytest.fixture
def home(template, tmp_path, monkeypatch) -> Path:
    """A fresh copy of the recorded log for one test to attack."""
    for name in ("audit.db", "audit.db.witness", "audit-signing.key", "mcp-guard.toml"):
        shutil.copy(template / name, tmp_path / name)
    config = (tmp_path / "mcp-guard.toml").read_text().replace(str(template), str(tmp_path))
    (tmp_path / "mcp-guard.toml").write_text(config)
    monkeypatch.setenv("MCP_GUARD_HOME", str(tmp_path))
    monkeypatch.setenv("MCP_GUARD_CONFIG", str(tmp_path / "mcp-guard.toml"))
    return tmp_path


def db(home: Path) -> sqlite3.Connection:
    return sqlite3.connect(home / "audit.db", isolation_level=None)


def verify(capsys, *args: str) -> tuple[int, str]:
    code, out, err = audit_cli(capsys, "audit", "verify", *args)
    return code, out + err


def broken(capsys, *args: str) -> str:
    code, out = verify(capsys, *args)
    assert code == 1, out
    assert "audit chain BROKEN" in out
    return out


def rehash_from(conn: sqlite3.Connection, start: int) -> None:
    """What anyone can do without the key: recompute every hash from `start` on."""
    prev = conn.execute("SELECT hash FROM audit WHERE seq = ?", (start - 1,)).fetchone()
    head = prev[0] if prev else GENESIS
    for seq, body in conn.execute(
        "SELECT seq, body FROM audit WHERE seq >= ? ORDER BY seq", (start,)
    ).fetchall():
        digest = link(seq, head, body)
        conn.execute("UPDATE audit SET prev_hash = ?, hash = ? WHERE seq = ?", (head, digest, seq))
        head = digest


def replace_in_body(conn: sqlite3.Connection, seq: int, old: str, new: str) -> None:
    conn.execute(
        "UPDATE audit SET body = CAST(replace(CAST(body AS TEXT), ?, ?) AS BLOB) WHERE seq = ?",
        (old, new, seq),
    )


def seq_of(conn: sqlite3.Connection, text: str) -> int:
    return conn.execute("SELECT seq FROM audit WHERE instr(CAST(body AS TEXT), ?) > 0", (text,)).fetchone()[0]


def test_an_untouched_log_verifies_with_every_checkpoint_and_reports_the_rate(home, capsys):
    code, out = verify(capsys)
    assert code == 0, out
    assert f"audit chain intact: {ENTRIES} entries" in out
    assert f"the latest vouches for {ENTRIES} entries" in out
    assert "entries/s" in out
    stored = db(home).execute("SELECT entries FROM checkpoint ORDER BY entries").fetchall()
    assert [row[0] for row in stored] == [4, 8, 12, 12]  # every 4 entries, and the session's end


def test_an_edited_entry_is_named(home, capsys):
    conn = db(home)
    seq = seq_of(conn, "tidy up")
    replace_in_body(conn, seq, "tidy up", "approved")
    assert f"entry {seq}: its body does not match its hash (edited)" in broken(capsys)


def test_a_deleted_entry_is_named(home, capsys):
    conn = db(home)
    seq = seq_of(conn, "DELETE FROM orders")
    conn.execute("DELETE FROM audit WHERE seq = ?", (seq,))
    assert f"entry {seq}: expected seq {seq} but found {seq + 1} (an entry is missing)" in broken(capsys)


def test_an_inserted_entry_is_named_even_with_a_correct_hash_of_its_own(home, capsys):
    conn = db(home)
    at = seq_of(conn, "DELETE FROM orders")
    conn.execute("UPDATE audit SET seq = -seq WHERE seq >= ?", (at,))
    conn.execute("UPDATE audit SET seq = 1 - seq WHERE seq < 0")  # shift them up by one
    prev, body = conn.execute("SELECT hash, body FROM audit WHERE seq = ?", (at - 1,)).fetchone()
    forged = body.replace(b"SELECT count(*)", b"SELECT 1 AS ok")
    conn.execute(
        "INSERT INTO audit SELECT ?, ts, type, session_id, call_id, identity, tool, connection, decision,"
        " ?, ?, ?, kind, tables FROM audit WHERE seq = ?",
        (at, prev, link(at, prev, forged), forged, at - 1),
    )
    assert f"entry {at + 1}: prev_hash does not match entry {at} (inserted or reordered)" in broken(capsys)


def test_reordered_entries_are_named(home, capsys):
    conn = db(home)
    conn.execute("UPDATE audit SET seq = -1 WHERE seq = 5")
    conn.execute("UPDATE audit SET seq = 5 WHERE seq = 6")
    conn.execute("UPDATE audit SET seq = 6 WHERE seq = -1")
    assert "entry 5: prev_hash does not match entry 4 (inserted or reordered)" in broken(capsys)


def test_a_cut_tail_is_caught_by_the_witness_file(home, capsys):
    conn = db(home)
    conn.execute("DELETE FROM audit WHERE seq > 9")
    conn.execute(
        "DELETE FROM checkpoint WHERE entries > 9"
    )  # the attacker removes the tail's checkpoints too
    out = broken(capsys)
    assert "the chain ends at entry 9, but this checkpoint vouches for 12 entries" in out
    assert "entries 10..12 were removed (the tail was cut or the file rolled back)" in out
    assert "witness file" in out


def test_a_cut_tail_with_the_witness_gone_is_caught_by_a_checkpoint_kept_elsewhere(
    home, capsys, tmp_path_factory
):
    kept = tmp_path_factory.mktemp("safe") / "checkpoint.txt"
    code, out, _ = audit_cli(capsys, "audit", "checkpoint")
    assert code == 0
    kept.write_text(out)
    conn = db(home)
    conn.execute("DELETE FROM audit WHERE seq > 6")
    conn.execute("DELETE FROM checkpoint")
    (home / "audit.db.witness").unlink()
    out = broken(capsys, "--since-checkpoint", str(kept))
    assert f"checkpoint file {kept}, line 1 (entries 12): the chain ends at entry 6" in out


def test_a_history_rewritten_and_rehashed_without_the_key_is_caught(home, capsys):
    conn = db(home)
    seq = seq_of(conn, "tidy up")
    replace_in_body(conn, seq, "tidy up", "the DBA approved")
    rehash_from(conn, seq)
    out = broken(capsys)
    assert "the history up to entry 8 was rewritten" in out
    assert "store checkpoint" in out and "witness file" in out
    assert "entry 4 " not in out  # entries before the rewrite still match their checkpoint


def test_a_history_rewritten_and_signed_again_with_another_key_is_caught(home, capsys):
    conn = db(home)
    rehash_from(conn, 1)  # even the same content: the attacker's checkpoints must be signed
    rogue = Ed25519PrivateKey.generate()
    conn.execute("DELETE FROM checkpoint")
    for entries in (4, 8, 12):
        head = conn.execute("SELECT hash FROM audit WHERE seq = ?", (entries,)).fetchone()[0]
        forged = sign(rogue, entries, head.hex(), "every 4 entries")
        conn.execute(
            "INSERT INTO checkpoint (entries, head, text) VALUES (?, ?, ?)", (entries, head, forged.text)
        )
    (home / "audit.db.witness").unlink()
    out = broken(capsys)
    assert "which is not a trusted key" in out


def test_a_deleted_set_of_checkpoints_is_noticed_when_the_tail_is_long(home, capsys):
    conn = db(home)
    conn.execute("DELETE FROM checkpoint")
    (home / "audit.db.witness").unlink()
    out = broken(capsys)
    assert "entries 1..12 are covered by no signed checkpoint, though one is signed every 4 entries" in out


def test_an_edited_checkpoint_is_named(home, capsys):
    conn = db(home)
    conn.execute(
        "UPDATE checkpoint SET text = replace(text, 'every 4 entries', 'every 5 entries') WHERE entries = 8"
    )
    out = broken(capsys)
    assert "store checkpoint 2 (entries 8): its signature does not verify (the checkpoint was altered)" in out


def test_an_altered_index_column_is_named(home, capsys):
    conn = db(home)
    seq = conn.execute("SELECT seq FROM audit WHERE kind = 'write' ORDER BY seq LIMIT 1").fetchone()[0]
    conn.execute("UPDATE audit SET kind = 'read' WHERE seq = ?", (seq,))  # hide a write from `audit why`
    assert f"entry {seq}: its index columns kind/tables disagree with the hashed body" in broken(capsys)


def test_entries_removed_from_the_start_without_prune_are_named(home, capsys):
    db(home).execute("DELETE FROM audit WHERE seq <= 3")
    out = broken(capsys)
    assert "entries 1..3 are not in the store and no signed checkpoint vouches for entry 3" in out


def test_without_a_trusted_key_the_checkpoints_cannot_vouch(home, capsys, monkeypatch):
    (home / "audit-signing.key").unlink()
    out = broken(capsys)
    assert "checkpoint(s) found but no trusted public key to check them with" in out


def test_the_public_key_alone_lets_an_auditor_verify_elsewhere(home, capsys):
    code, public, _ = audit_cli(capsys, "audit", "key")
    assert code == 0 and public.startswith("ed25519:")
    (home / "audit-signing.key").unlink()
    code, out = verify(capsys, "--key", public.strip())
    assert code == 0, out


def test_a_malformed_checkpoint_file_is_refused_naming_the_line(home, capsys):
    bad = home / "bad.txt"
    bad.write_text("mcp-guard audit checkpoint v1\nentries: 3\nhead: zz\n")
    out = broken(capsys, "--since-checkpoint", str(bad))
    assert f"checkpoint file {bad}, line 4: expected 'time: ...' in the checkpoint" in out


def test_checkpoints_parse_back_to_the_same_text(home):
    text = (home / "audit.db.witness").read_text()
    found = parse_checkpoints(text, "witness")
    assert [f.checkpoint.entries for f in found] == [4, 8, 12, 12]
    assert "\n".join(f.checkpoint.text for f in found) + "\n" == text


def _swap(conn: sqlite3.Connection, a: int, b: int) -> None:
    conn.execute("UPDATE audit SET seq = -1 WHERE seq = ?", (a,))
    conn.execute("UPDATE audit SET seq = ? WHERE seq = ?", (a, b))
    conn.execute("UPDATE audit SET seq = ? WHERE seq = -1", (b,))


def _rehash_one(conn: sqlite3.Connection, seq: int) -> None:
    """Edit entry `seq` and fix its own hash only: the break shows at the next entry's prev_hash."""
    replace_in_body(conn, seq, "order 7 shipped", "order 8 shipped")
    prev, body = conn.execute("SELECT prev_hash, body FROM audit WHERE seq = ?", (seq,)).fetchone()
    conn.execute("UPDATE audit SET hash = ? WHERE seq = ?", (link(seq, prev, body), seq))


TAMPERING = {
    "untouched": lambda conn: None,
    "rehashed up to a seam": lambda conn: _rehash_one(conn, 4),
    "reordered across a seam": lambda conn: _swap(conn, 4, 5),
    "edited in the last range": lambda conn: replace_in_body(conn, 10, "list_tables", "list_tablez"),
    "first entry of a range deleted": lambda conn: conn.execute("DELETE FROM audit WHERE seq = 9"),
    "rehashed from a range's start": lambda conn: (
        replace_in_body(conn, 5, "SELECT", "select"),
        rehash_from(conn, 5),
    ),
}


@pytest.mark.parametrize("tamper", TAMPERING.values(), ids=TAMPERING.keys())
def test_verifying_in_parallel_ranges_finds_exactly_what_one_pass_finds(home, monkeypatch, tamper):
    """A large store is verified by several processes, one seq range each; the seams are checked too."""
    import asyncio

    from mcp_guard.store import sqlite as engine

    tamper(db(home))
    monkeypatch.setattr(engine, "_PARALLEL_MIN", 2)

    async def both() -> tuple[object, object]:
        reports = []
        for workers in (1, 3):
            store = engine.SqliteStore(home / "audit.db", verify_workers=workers)
            await store.open()
            try:
                reports.append(await store.verify(watch={4, 8, 11}))
            finally:
                await store.close()
        return reports[0], reports[1]

    single, parallel = asyncio.run(both())
    assert parallel == single
