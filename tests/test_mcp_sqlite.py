"""The guarded path on SQLite, driven through a real MCP client over stdio."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

from tests.client import guard_client
from tests.conftest import write_config
from tests.corpus import unanswered_reads


def shop_config(tmp_path: Path, shop: Path, extra: str = "") -> Path:
    return write_config(tmp_path, f'[connections.shop]\nurl = "sqlite:///{shop}"\n{extra}')


def audit_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The audit command as the operator runs it: same home as the server (where its signing key is)."""
    return subprocess.run(
        [sys.executable, "-m", "mcp_guard", "audit", *args, "--store", f"sqlite:///{tmp_path / 'audit.db'}"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "MCP_GUARD_HOME": str(tmp_path), "MCP_GUARD_CONFIG": ""},
    )


async def test_the_tools_are_listed_with_their_annotations(tmp_path, sqlite_shop):
    async with guard_client(shop_config(tmp_path, sqlite_shop), tmp_path) as client:
        tools = {tool.name: tool for tool in (await client.session.list_tools()).tools}
    assert set(tools) == {
        "list_connections",
        "list_tables",
        "describe_table",
        "query",
        "execute",
        "approval_status",
    }
    for name in ("list_connections", "list_tables", "describe_table", "query"):
        assert tools[name].annotations.read_only_hint is True, name
    for name in ("execute", "approval_status"):
        assert tools[name].annotations.destructive_hint is True, name
        assert tools[name].annotations.read_only_hint is False, name
    assert "reason" in tools["execute"].input_schema["required"]


async def test_a_read_returns_a_text_table_and_structured_rows(tmp_path, sqlite_shop):
    async with guard_client(shop_config(tmp_path, sqlite_shop), tmp_path) as client:
        reply = await client.call(
            "query", sql="SELECT id, name, created_at FROM customers WHERE id <= 3 ORDER BY id"
        )
    assert not reply.is_error, reply.text
    assert reply.structured["columns"][0]["name"] == "id"
    assert [row[0] for row in reply.structured["rows"]] == [1, 2, 3]
    assert reply.structured["row_count"] == 3 and reply.structured["truncated"] is False
    assert [h.strip() for h in reply.text.splitlines()[0].split("|")] == ["id", "name", "created_at"]
    assert reply.text.rstrip().endswith("(3 rows)")


async def test_the_row_cap_truncates_and_says_so(tmp_path, sqlite_shop):
    config = shop_config(tmp_path, sqlite_shop, "row_limit = 7\n")
    async with guard_client(config, tmp_path) as client:
        reply = await client.call("query", sql="SELECT id FROM orders ORDER BY id")
    assert reply.structured["row_count"] == 7
    assert reply.structured["truncated"] is True and reply.structured["row_limit"] == 7
    assert "truncated at the row limit of 7" in reply.text


async def test_list_and_describe_tables(tmp_path, sqlite_shop):
    async with guard_client(shop_config(tmp_path, sqlite_shop), tmp_path) as client:
        connections = await client.call("list_connections")
        tables = await client.call("list_tables")
        described = await client.call("describe_table", table="customers")
        missing = await client.call("describe_table", table="nope")
    assert connections.structured["connections"][0]["name"] == "shop"
    assert connections.structured["connections"][0]["dialect"] == "sqlite"
    assert connections.structured["connections"][0]["query"] == ["read"]
    names = {t["name"] for t in tables.structured["tables"]}
    assert {"customers", "orders", "payments", "api_keys"} <= names
    columns = {c["name"]: c for c in described.structured["columns"]}
    assert columns["id"]["primary_key"] is True and columns["email"]["nullable"] is False
    assert missing.is_error and "nope" in missing.text


async def test_an_allowed_write_changes_the_data_and_reports_rows_affected(tmp_path, sqlite_shop):
    async with guard_client(shop_config(tmp_path, sqlite_shop), tmp_path) as client:
        reply = await client.call(
            "execute",
            sql="UPDATE orders SET status = 'shipped' WHERE id IN (1, 2)",
            reason="ship orders 1 and 2",
        )
    assert not reply.is_error, reply.text
    assert reply.structured["rows_affected"] == 2
    db = sqlite3.connect(sqlite_shop)
    assert db.execute("SELECT status FROM orders WHERE id IN (1, 2)").fetchall() == [
        ("shipped",),
        ("shipped",),
    ]


async def test_execute_requires_a_reason(tmp_path, sqlite_shop):
    async with guard_client(shop_config(tmp_path, sqlite_shop), tmp_path) as client:
        reply = await client.call("execute", sql="UPDATE orders SET status = 'x' WHERE id = 1", reason="  ")
    assert reply.is_error and "reason is required" in reply.text


async def test_a_multi_statement_write_is_all_or_nothing(tmp_path, sqlite_shop):
    async with guard_client(shop_config(tmp_path, sqlite_shop), tmp_path) as client:
        reply = await client.call(
            "execute",
            sql="UPDATE orders SET status = 'gone' WHERE id = 3;"
            " INSERT INTO orders (id, customer_id, total, status, created_at) VALUES (3, 1, 1, 'dup', 'x')",
            reason="test atomicity",
        )
    assert reply.is_error and "UNIQUE" in reply.text.upper()
    db = sqlite3.connect(sqlite_shop)
    assert db.execute("SELECT status FROM orders WHERE id = 3").fetchone()[0] != "gone"


async def test_a_drop_nobody_can_approve_is_refused_at_once_and_the_server_serves_on(tmp_path, sqlite_shop):
    async with guard_client(shop_config(tmp_path, sqlite_shop), tmp_path) as client:
        denied = await client.call("execute", sql="DROP TABLE payments", reason="cleanup")
        after = await client.call("query", sql="SELECT count(*) AS n FROM payments")
    assert denied.is_error
    assert "schema changes wait for a reviewer's approval" in denied.text
    assert "rule 'hold-ddl' needs 1 approval from reviewers, but no reviewer" in denied.text
    assert not after.is_error and after.structured["rows"][0][0] > 0


async def test_query_refuses_a_write_hidden_behind_a_read(tmp_path, sqlite_shop):
    async with guard_client(shop_config(tmp_path, sqlite_shop), tmp_path) as client:
        reply = await client.call("query", sql="SELECT 1; DELETE FROM orders")
    assert reply.is_error and "query runs reads only; statement 2" in reply.text
    assert sqlite3.connect(sqlite_shop).execute("SELECT count(*) FROM orders").fetchone()[0] == 240


async def test_every_call_is_audited_and_the_chain_verifies(tmp_path, sqlite_shop):
    async with guard_client(shop_config(tmp_path, sqlite_shop), tmp_path) as client:
        await client.call("list_tables")
        await client.call("query", sql="SELECT count(*) FROM customers")
        await client.call("execute", sql="DELETE FROM orders", reason="oops")
        await client.call("query", sql="SELEC nonsense")
    listed = audit_cli(tmp_path, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    calls = json.loads(listed.stdout)
    assert [c["request"]["tool"] for c in calls] == ["list_tables", "query", "execute", "query"]
    assert [c["outcome"]["decision"] for c in calls] == ["allow", "allow", "deny", "deny"]
    denied = calls[2]["outcome"]["detail"]
    assert denied["decision"]["rule"] == "hold-write-without-where"
    assert "no reviewer other than the requester is configured" in denied["decision"]["reason"]
    assert "write_without_where" in denied["classification"]["flags"]
    assert calls[2]["request"]["detail"]["arguments"]["reason"] == "oops"
    assert calls[1]["request"]["detail"]["client"] == "mcp-guard-tests/1"
    assert calls[1]["request"]["identity"].startswith("local:")
    assert len({c["request"]["session_id"] for c in calls}) == 1
    assert "unknown" == calls[3]["outcome"]["detail"]["classification"]["kind"]
    denials = json.loads(audit_cli(tmp_path, "list", "--json", "--decision", "deny").stdout)
    assert len(denials) == 2
    verified = audit_cli(tmp_path, "verify")
    assert verified.returncode == 0 and "intact" in verified.stdout


async def test_audit_verify_names_the_first_edited_entry(tmp_path, sqlite_shop):
    async with guard_client(shop_config(tmp_path, sqlite_shop), tmp_path) as client:
        await client.call("query", sql="SELECT 1")
        await client.call("query", sql="SELECT 2")
    db = sqlite3.connect(tmp_path / "audit.db")
    db.execute("UPDATE audit SET body = CAST(replace(body, 'SELECT 2', 'SELECT 3') AS BLOB) WHERE seq = 4")
    db.commit()
    db.close()
    verified = audit_cli(tmp_path, "verify")
    assert verified.returncode == 1
    assert "BROKEN" in verified.stdout and "entry 4" in verified.stdout


async def test_every_read_of_the_read_corpus_answers(tmp_path, sqlite_shop):
    """tests/fixtures/sql/reads_sqlite.sql holds reads the `query` tool must let through: each runs."""
    async with guard_client(shop_config(tmp_path, sqlite_shop), tmp_path) as client:
        failed = await unanswered_reads(client, "sqlite")
    assert not failed, "\n".join(failed)


async def test_sql_over_the_connections_limit_is_refused_and_the_server_serves_on(tmp_path, sqlite_shop):
    long_read = "SELECT count(*) AS n FROM customers /*" + "x" * 300_000 + "*/"
    async with guard_client(shop_config(tmp_path, sqlite_shop), tmp_path) as client:
        refused = await client.call("query", sql=long_read)
        after = await client.call("query", sql="SELECT count(*) AS n FROM customers")
    assert refused.is_error
    assert f"sql is {len(long_read):,} characters; connection 'shop' takes at most 256,000" in refused.text
    assert after.structured["rows"] == [[60]]
    raised = shop_config(tmp_path, sqlite_shop).read_text() + "sql_limit = 400000\n"
    (tmp_path / "raised.toml").write_text(raised)
    async with guard_client(tmp_path / "raised.toml", tmp_path) as client:
        answered = await client.call("query", sql=long_read)
    assert answered.structured["rows"] == [[60]], answered.text[:300]


async def test_an_integer_parameter_beyond_64_bits_is_refused_with_a_reason(tmp_path, sqlite_shop):
    async with guard_client(shop_config(tmp_path, sqlite_shop), tmp_path) as client:
        huge = await client.call("query", sql="SELECT id FROM orders WHERE id = ?", params=[2**70])
        as_text = await client.call("query", sql="SELECT CAST(? AS TEXT) AS n", params=[str(2**70)])
    assert huge.is_error and "integer beyond 64 bits" in huge.text and "Internal error" not in huge.text
    assert as_text.structured["rows"] == [[str(2**70)]]
