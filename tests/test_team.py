"""Team mode: several gateway processes on one PostgreSQL audit store (127.0.0.1), never mocked."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from pathlib import Path

import asyncpg
import pytest

import mcp_guard
from mcp_guard.approvals import ApprovalState
from mcp_guard.config import load_config
from mcp_guard.errors import AuditError, ConfigError
from mcp_guard.store import open_store
from mcp_guard.store.base import AuditFilter, CallFilter, EventType, StoredCheckpoint
from mcp_guard.store.postgres import SCHEMA_VERSION, PostgresStore
from tests.auditing import audit_cli, audit_json
from tests.client import guard_client
from tests.conftest import PG_ADMIN_URL, _drop_pg_db, empty_pg_store
from tests.test_store import event
from tests.test_store_interface import approval_request, step

REPO = Path(mcp_guard.__file__).resolve().parent.parent


def team_config(tmp_path: Path, shop: Path, extra: str = "") -> Path:
    path = tmp_path / "team.toml"
    path.write_text(
        f'[audit]\nurl_env = "TEAM_STORE_URL"\n{extra}\n\n[connections.shop]\nurl = "sqlite:///{shop}"\n'
    )
    return path


@pytest.fixture
def team_store(pg_store_url: str) -> str:
    asyncio.run(empty_pg_store(pg_store_url))
    return pg_store_url


def test_two_writer_processes_appending_at_once_keep_one_gapless_chain(team_store: str, tmp_path: Path):
    start = tmp_path / "go"
    writers = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.team_appender", team_store, name, "400", str(start), "4"],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("gw-a", "gw-b")
    ]
    for writer in writers:  # both connected before either starts
        assert writer.stdout is not None and writer.stdout.readline() == "ready\n", writer.stderr
    start.touch()
    for writer in writers:
        _, err = writer.communicate(timeout=60)
        assert writer.returncode == 0, err

    async def check() -> None:
        store = open_store(team_store)
        await store.open()
        try:
            records = await store.query(AuditFilter())
            report = await store.verify()
        finally:
            await store.close()
        assert [r.seq for r in records] == list(range(1, 801))
        assert (report.ok, report.entries) == (True, 800)
        names = [r.event.session_id for r in records]
        assert names.count("gw-a") == names.count("gw-b") == 400
        switches = sum(1 for a, b in zip(names, names[1:], strict=False) if a != b)
        assert switches > 2, "the two writers did not interleave; the test proves nothing"

    asyncio.run(check())


async def test_two_gateways_serving_at_once_record_one_chain_that_audit_verify_accepts(
    team_store: str,
    sqlite_shop: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = team_config(tmp_path, sqlite_shop)
    env = {"TEAM_STORE_URL": team_store}

    async def session(n: int) -> None:
        async with guard_client(config, tmp_path, **env) as client:
            for i in range(4):
                reply = await client.call("query", sql=f"SELECT {n * 10 + i} AS x")
                assert not reply.is_error, reply.text

    await asyncio.gather(session(1), session(2))
    store = open_store(team_store)
    await store.open()
    try:
        calls = [call async for call in store.calls(CallFilter(tool="query"))]
    finally:
        await store.close()
    assert len(calls) == 8 and len({call[0].event.session_id for call in calls}) == 2
    monkeypatch.setenv("TEAM_STORE_URL", team_store)
    monkeypatch.setenv("MCP_GUARD_HOME", str(tmp_path))  # the gateways' signing key: trusted
    code, out, err = await asyncio.to_thread(audit_cli, capsys, "audit", "verify", "--config", str(config))
    assert code == 0, out + err
    assert "audit chain intact" in out and "checkpoints:" in out
    listed = await asyncio.to_thread(audit_json, capsys, "audit", "list", "--config", str(config))
    assert sorted(c["request"]["detail"]["arguments"]["sql"] for c in listed) == sorted(
        f"SELECT {n * 10 + i} AS x" for n in (1, 2) for i in range(4)
    )
    (stats,) = await asyncio.to_thread(audit_json, capsys, "audit", "stats", "--config", str(config))
    assert stats["calls"] == 8
    replay = await asyncio.to_thread(audit_json, capsys, "replay", "latest", "--config", str(config))
    assert len(replay["calls"]) == 4 and replay["calls"][0]["sql"].startswith("SELECT ")


def test_a_store_without_the_schema_asks_for_migrate_and_migrate_creates_it(tmp_path: Path, capsys):
    name = "mcpguard_fresh_" + tmp_path.name[-8:].replace("-", "_").lower()

    async def create() -> str:
        admin = await asyncpg.connect(PG_ADMIN_URL)
        try:
            await admin.execute(f'CREATE DATABASE "{name}"')
        finally:
            await admin.close()
        return PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"

    url = asyncio.run(create())
    try:
        with pytest.raises(AuditError, match=r"holds no mcp-guard schema; run `mcp-guard store migrate`"):
            asyncio.run(open_store(url).open())
        code, out, _ = audit_cli(capsys, "store", "migrate", "--store", url)
        assert code == 0 and f"schema version {SCHEMA_VERSION} created" in out
        code, out, _ = audit_cli(capsys, "store", "migrate", "--store", url)
        assert code == 0 and f"schema version {SCHEMA_VERSION}, up to date" in out
    finally:
        asyncio.run(_drop_pg_db(name))


def test_a_foreign_audit_table_is_not_taken_over(pg_shop_url: str, capsys) -> None:
    # the shop database holds tables of its own, none named audit: create one
    async def add() -> None:
        conn = await asyncpg.connect(pg_shop_url)
        try:
            await conn.execute("CREATE TABLE IF NOT EXISTS audit (id int)")
        finally:
            await conn.close()

    asyncio.run(add())
    code, _, err = audit_cli(capsys, "store", "migrate", "--store", pg_shop_url)
    assert code == 1 and "already holds audit but no mcp-guard schema" in err


def test_an_unreachable_store_is_named_without_its_password(
    tmp_path: Path, sqlite_shop: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = team_config(tmp_path, sqlite_shop)
    monkeypatch.setenv("TEAM_STORE_URL", "postgresql://gateway:hunter22@127.0.0.1:1/audit")
    code, _, err = audit_cli(capsys, "audit", "verify", "--config", str(config))
    assert code == 1
    assert "audit store postgresql://gateway@127.0.0.1:1/audit: cannot connect" in err
    assert "hunter22" not in err


def test_the_store_url_comes_from_the_environment_or_a_file_never_inline_with_a_password(
    tmp_path: Path, sqlite_shop: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = team_config(tmp_path, sqlite_shop)
    with pytest.raises(ConfigError, match=r"audit\.url_env: environment variable TEAM_STORE_URL is not set"):
        load_config(config)
    monkeypatch.setenv("TEAM_STORE_URL", "postgresql://gateway:hunter22@db.internal/audit")
    loaded = load_config(config)
    assert loaded.audit_url.endswith("@db.internal/audit") and "hunter22" in loaded.secrets
    url_file = tmp_path / "store-url"
    url_file.write_text("postgresql://gateway:hunter22@db.internal/audit\n")
    config.write_text(config.read_text().replace('url_env = "TEAM_STORE_URL"', f'url_file = "{url_file}"'))
    assert load_config(config).audit_url == "postgresql://gateway:hunter22@db.internal/audit"
    config.write_text(
        config.read_text().replace(
            f'url_file = "{url_file}"', 'url = "postgresql://gateway:hunter22@db.internal/audit"'
        )
    )
    with pytest.raises(ConfigError, match="holds a password") as raised:
        load_config(config)
    assert "hunter22" not in str(raised.value)


def test_store_copy_moves_a_sqlite_history_into_the_team_store_and_it_verifies(
    team_store: str, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.test_audit_store import appended, call_events

    monkeypatch.setenv("MCP_GUARD_HOME", str(tmp_path))
    monkeypatch.setenv("MCP_GUARD_CONFIG", "")
    source = tmp_path / "audit.db"
    asyncio.run(appended(source, call_events(5, "2026-01-05T10:00:00.000000+00:00")))
    assert audit_cli(capsys, "audit", "key", "--generate", "-")[0] == 0
    assert audit_cli(capsys, "audit", "prune", "--before", "2030-01-01")[0] == 0  # a signed checkpoint
    before = audit_json(capsys, "audit", "verify")
    code, out, err = audit_cli(capsys, "store", "copy", "--from", f"sqlite:///{source}", "--to", team_store)
    assert code == 0, err
    assert f"copied 1 entries to {team_store}; its chain verifies" in out
    after = audit_json(capsys, "audit", "verify", "--store", team_store, "--witness", f"{source}.witness")
    assert after["ok"] and (after["first_seq"], after["entries"]) == (before["first_seq"], before["entries"])
    assert after["head_hash"] == before["head_hash"]


def test_a_gateway_refuses_to_start_against_a_store_schema_newer_than_it_knows(
    team_store: str, sqlite_shop: Path, tmp_path: Path
) -> None:
    async def set_version(version: int) -> None:
        conn = await asyncpg.connect(team_store)
        try:
            await conn.execute("UPDATE mcp_guard_schema SET version = $1", version)
        finally:
            await conn.close()

    asyncio.run(set_version(99))
    try:
        served = subprocess.run(
            [sys.executable, "-m", "mcp_guard", "serve", "--config", str(team_config(tmp_path, sqlite_shop))],
            cwd=REPO,
            env={**os.environ, "TEAM_STORE_URL": team_store, "MCP_GUARD_HOME": str(tmp_path)},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        asyncio.run(set_version(SCHEMA_VERSION))
    assert served.returncode != 0
    assert "written by a newer mcp-guard (schema version 99; this one understands up to" in served.stderr


def documented_grants() -> str:
    """The grants docs/deployment.md tells an administrator to run for the gateways and auditors."""
    text = (REPO / "docs" / "deployment.md").read_text()
    blocks = text.split("```sql\n")[1:]
    (grants,) = [block.split("```")[0] for block in blocks if "GRANT SELECT, INSERT ON audit" in block]
    return grants


async def test_the_documented_least_privilege_roles_can_append_read_and_approve_but_not_rewrite(
    tmp_path: Path,
) -> None:
    suffix = uuid.uuid4().hex[:8]
    name, gateway, auditor = f"mcpguard_roles_{suffix}", f"mcpguard_gw_{suffix}", f"mcpguard_au_{suffix}"
    admin = await asyncpg.connect(PG_ADMIN_URL)
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        await admin.execute(f"CREATE ROLE {gateway} LOGIN")
        await admin.execute(f"CREATE ROLE {auditor} LOGIN")
        await PostgresStore(f"{base}/{name}").migrate()
        owner = await asyncpg.connect(f"{base}/{name}")
        try:
            grants = (
                documented_grants()
                .replace("mcp_guard_gateway", gateway)
                .replace("mcp_guard_auditor", auditor)
            )
            await owner.execute(f"GRANT USAGE ON SCHEMA public TO {gateway}, {auditor}; {grants}")
        finally:
            await owner.close()
        gateway_url = f"postgresql://{gateway}@127.0.0.1:5432/{name}"
        store = PostgresStore(gateway_url)
        await store.open()
        try:
            for n in range(1, 6):
                await store.append(event(n), durable=n == 3)
            await store.add_checkpoint(StoredCheckpoint(5, str(await store.entry_hash(5)), "checkpoint"))
            await store.add_approval(approval_request(), step("req-1", EventType.APPROVAL_REQUESTED))
            assert await store.transition_approval(
                "req-1",
                ApprovalState.PENDING,
                ApprovalState.DENIED,
                step("req-1", EventType.APPROVAL_DENIED),
                {},
            )
            assert (await store.verify()).ok
            with pytest.raises(AuditError, match="cannot prune it: the store's role lacks a privilege"):
                await store.prune(StoredCheckpoint(2, str(await store.entry_hash(2)), "prune"))
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                conn = await asyncpg.connect(gateway_url)
                try:
                    await conn.execute("UPDATE audit SET identity = 'mallory' WHERE seq = 1")
                finally:
                    await conn.close()
        finally:
            await store.close()
        reader = PostgresStore(f"postgresql://{auditor}@127.0.0.1:5432/{name}")
        await reader.open()
        try:
            assert (await reader.verify()).entries == 7
            with pytest.raises(AuditError, match="lacks a privilege"):
                await reader.append(event(8))
        finally:
            await reader.close()
    finally:
        await _drop_pg_db(name)
        await admin.execute(f"DROP ROLE IF EXISTS {gateway}")
        await admin.execute(f"DROP ROLE IF EXISTS {auditor}")
        await admin.close()


async def test_appends_while_the_store_connections_are_cut_fail_clearly_and_the_store_then_recovers(
    team_store: str,
) -> None:
    store = PostgresStore(team_store)
    await store.open()
    admin = await asyncpg.connect(PG_ADMIN_URL)
    try:
        assert await store.append(event(1)) == 1
        database = team_store.rsplit("/", 1)[1]
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", database
        )
        outcomes = []
        for n in range(2, 5):
            try:
                outcomes.append(await store.append(event(n)))
            except AuditError as error:
                assert "the entry was not recorded: the connection to the database was lost" in str(error)
                outcomes.append(None)
        assert outcomes[-1] is not None, "the store never reconnected"
        recorded = [r.event.detail["n"] for r in await store.query(AuditFilter())]
        assert recorded == [1, *(n for n, seq in zip(range(2, 5), outcomes, strict=True) if seq)]
        assert (await store.verify()).ok
    finally:
        await admin.close()
        await store.close()
