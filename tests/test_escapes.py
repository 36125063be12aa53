"""The escape corpora through the real server: nothing sent to `query` may change anything.

Each statement of tests/fixtures/sql/escapes_*.sql goes through a real MCP client over stdio; after each
one the database must be unchanged: rows, sequences, large objects, tables, settings and session state
of the pooled connection, other backends alive, no file created. The read corpora must pass.
"""

from __future__ import annotations

import glob
import hashlib
import sqlite3
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from mcp_guard.classify import StatementKind
from tests.client import GuardClient, guard_client
from tests.conftest import write_config
from tests.corpus import load

ESCAPE_FILES = "/tmp/mcp_guard_escape_*"
OURS = ("audit.db", "audit-signing.key", "server.")
"""Files the guard itself writes beside the shop (audit store, witness, signing key, logs)."""

PG_DATA_STATE = """
SELECT
  (SELECT md5(string_agg(c::text, ',' ORDER BY id)) FROM customers c),
  (SELECT md5(string_agg(o::text, ',' ORDER BY id)) FROM orders o),
  (SELECT md5(string_agg(p::text, ',' ORDER BY id)) FROM payments p),
  (SELECT md5(string_agg(k::text, ',' ORDER BY id)) FROM api_keys k),
  (SELECT string_agg(sequencename || '=' || coalesce(last_value, 0), ',' ORDER BY sequencename)
     FROM pg_sequences),
  (SELECT count(*) FROM pg_largeobject_metadata),
  (SELECT string_agg(relname, ',' ORDER BY relname) FROM pg_class
     WHERE relnamespace = 'public'::regnamespace),
  (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'
     AND database = (SELECT oid FROM pg_database WHERE datname = current_database())),
  (SELECT string_agg(name || '=' || setting, ',' ORDER BY name) FROM pg_settings
     WHERE source = 'configuration file')
"""

# Read through the guard itself, on its only pooled connection: nothing may survive from one call to the next.
PG_SESSION_STATE = (
    "SELECT current_user, current_setting('search_path') AS search_path,"
    " current_setting('default_transaction_read_only') AS ro, current_setting('work_mem') AS work_mem,"
    " (SELECT count(*) FROM pg_prepared_statements WHERE name NOT LIKE '\\_\\_asyncpg%') AS prepared,"
    " (SELECT count(*) FROM pg_cursors) AS cursors,"
    " (SELECT count(*) FROM pg_listening_channels()) AS listening,"
    " (SELECT count(*) FROM pg_class WHERE relpersistence = 't') AS temp_tables"
)


def _refused_or_read(reply: Any, case: Any) -> str | None:
    if case.kind is StatementKind.READ:
        return None
    if not reply.is_error:
        return f"{case.id} {case.title}: was NOT refused: {reply.text[:200]}"
    return None


async def _session_state(client: GuardClient) -> Any:
    reply = await client.call("query", sql=PG_SESSION_STATE)
    assert not reply.is_error, reply.text
    return reply.structured["rows"]


async def test_no_postgres_escape_changes_anything(tmp_path, pg_shop_url):
    for leftover in glob.glob(ESCAPE_FILES):
        Path(leftover).unlink()
    config = write_config(tmp_path, '[connections.pg]\nurl_env = "SHOP_PG_URL"\npool_size = 1\ntimeout = 3\n')
    admin = await asyncpg.connect(pg_shop_url)
    victim = await asyncpg.connect(pg_shop_url, server_settings={"application_name": "mcp_guard_victim"})
    failures: list[str] = []
    try:
        before = await admin.fetchrow(PG_DATA_STATE)
        async with guard_client(config, tmp_path, SHOP_PG_URL=pg_shop_url) as client:
            session_before = await _session_state(client)
            for case in load("escapes_postgres"):
                reply = await client.call("query", sql=case.sql)
                problem = _refused_or_read(reply, case)
                if await admin.fetchrow(PG_DATA_STATE) != before:
                    problem = f"{case.id} {case.title}: CHANGED the database"
                if await _session_state(client) != session_before:
                    problem = f"{case.id} {case.title}: left state on the pooled connection"
                if victim.is_closed() or await victim.fetchval("SELECT 1") != 1:
                    problem = f"{case.id} {case.title}: killed another backend"
                if glob.glob(ESCAPE_FILES):
                    problem = f"{case.id} {case.title}: created {glob.glob(ESCAPE_FILES)}"
                if problem:
                    failures.append(problem)
    finally:
        await victim.close()
        await admin.close()
    assert not failures, "\n".join(failures)


def _sqlite_state(path: Path) -> str:
    db = sqlite3.connect(path)
    try:
        digest = hashlib.sha256("\n".join(db.iterdump()).encode()).hexdigest()
        return digest + repr(db.execute("PRAGMA user_version").fetchone())
    finally:
        db.close()


async def test_no_sqlite_escape_changes_anything(tmp_path, sqlite_shop):
    for leftover in glob.glob(ESCAPE_FILES):
        Path(leftover).unlink()
    config = write_config(tmp_path, f'[connections.shop]\nurl = "sqlite:///{sqlite_shop}"\ntimeout = 3\n')
    before = _sqlite_state(sqlite_shop)
    files_before = sorted(
        p.name for p in tmp_path.iterdir() if not p.name.startswith(OURS)
    )
    failures: list[str] = []
    async with guard_client(config, tmp_path) as client:
        for case in load("escapes_sqlite"):
            reply = await client.call("query", sql=case.sql)
            problem = _refused_or_read(reply, case)
            if _sqlite_state(sqlite_shop) != before:
                problem = f"{case.id} {case.title}: CHANGED the database"
            files = sorted(
                p.name for p in tmp_path.iterdir() if not p.name.startswith(OURS)
            )
            created = glob.glob(ESCAPE_FILES) + sorted(
                set(files) - set(files_before) - {"shop.db-wal", "shop.db-shm"}
            )
            if created:
                problem = f"{case.id} {case.title}: created {created}"
            if problem:
                failures.append(problem)
        after = await client.call("query", sql="SELECT count(*) FROM orders")
    assert not failures, "\n".join(failures)
    assert after.structured["rows"] == [[240]]


@pytest.mark.parametrize("dialect", ["postgres", "sqlite"])
async def test_every_read_of_the_corpus_passes(tmp_path, dialect, request):
    if dialect == "postgres":
        url = request.getfixturevalue("pg_shop_url")
        config = write_config(tmp_path, '[connections.db]\nurl_env = "DB_URL"\n')
    else:
        url = str(request.getfixturevalue("sqlite_shop"))
        config = write_config(tmp_path, f'[connections.db]\nurl = "sqlite:///{url}"\n')
    failures = []
    async with guard_client(config, tmp_path, DB_URL=url) as client:
        for case in load(f"reads_{dialect}"):
            reply = await client.call("query", sql=case.sql)
            if reply.is_error:
                failures.append(f"{case.id} {case.title}: {reply.text[:300]}")
    assert not failures, "\n".join(failures)
