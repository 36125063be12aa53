"""The command line as a user runs it: exit codes, one-line errors, readable output."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys

import pytest

from mcp_guard.cli import main
from tests.client import guard_client
from tests.conftest import write_config


def run(*args: str, home, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mcp_guard", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**__import__("os").environ, "MCP_GUARD_HOME": str(home), "MCP_GUARD_CONFIG": "", **env},
    )


def test_check_prints_the_decision_and_exits_1_on_a_denial(tmp_path):
    denied = run("check", "DELETE FROM orders", home=tmp_path)
    assert denied.returncode == 1
    assert "write_without_where" in denied.stdout and "hold-write-without-where" in denied.stdout
    allowed = run("check", "--json", "SELECT name FROM customers WHERE id = 1", home=tmp_path)
    assert allowed.returncode == 0
    report = json.loads(allowed.stdout)
    assert report["decision"] == {
        "action": "allow",
        "rule": "allow-reads",
        "reason": report["decision"]["reason"],
        "statement_index": None,
    }
    assert report["classification"]["tables"] == ["customers"] and report["tool"] == "query"


def test_check_names_the_statement_that_decides(tmp_path, capsys):
    assert main(["check", "SELECT 1; DROP TABLE orders"]) == 1
    out = capsys.readouterr().out
    assert "statement 2 decides the call" in out and "hold-ddl" in out


def test_check_as_query_refuses_a_write(tmp_path, capsys):
    assert main(["check", "--tool", "query", "--json", "UPDATE orders SET status = 'x' WHERE id = 1"]) == 1
    assert json.loads(capsys.readouterr().out)["decision"]["rule"] == "builtin:query-reads-only"


def test_check_reads_sql_from_stdin_and_refuses_empty_sql(tmp_path):
    piped = subprocess.run(
        [sys.executable, "-m", "mcp_guard", "check", "-"],
        input="VACUUM",
        capture_output=True,
        text=True,
        timeout=60,
        env={**__import__("os").environ, "MCP_GUARD_HOME": str(tmp_path)},
    )
    assert piped.returncode == 1 and "admin" in piped.stdout
    empty = run("check", "-- nothing", home=tmp_path)
    assert empty.returncode == 2 and empty.stderr.strip() == "mcp-guard: the SQL holds no statement"


def test_unknown_connection_is_a_usage_error(tmp_path):
    done = run("check", "--connection", "nope", "SELECT 1", home=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip() == "mcp-guard: no connection named 'nope'; known: shop"


@pytest.mark.parametrize(
    "args",
    [
        ["audit", "list", "--store", "postgresql://auditor:hunter2@db.example/audit"],
        ["audit", "verify", "--store", "postgresql://auditor@db.example/audit?password=hunter2"],
        ["store", "copy", "--from", "postgresql://auditor:hunter2@db.example/audit"],
        ["store", "migrate", "--store", "postgresql://auditor:hunter2@db.example/audit"],
    ],
)
def test_a_store_url_with_a_password_on_the_command_line_is_refused(args, capsys):
    """Every user of the machine reads a process's arguments (`ps`): the password is refused before
    anything connects, and the error does not print it again."""
    with pytest.raises(SystemExit) as exit:
        main(args)
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "holds a password" in err and "PGPASSWORD" in err
    assert "hunter2" not in err


def test_the_demo_plays_a_session_and_exits_0(tmp_path):
    done = run("demo", home=tmp_path, COLUMNS="200")
    assert done.returncode == 0, done.stderr
    out = " ".join(done.stdout.split())
    assert "query runs reads only" in out
    assert "UPDATE 1" in out and "audit chain intact" in out
    # a held DROP approved from the CLI by a second identity, a held DELETE denied with her reason
    assert "held: waiting for a reviewer to decide request" in out
    assert "mcp-guard approve" in out and "--reviewer dana" in out
    assert "Approved by local:dana (request" in out and "ran once, exactly as requested" in out
    assert "reviewer local:dana denied request" in out
    assert "orders are kept 7 years for accounting; archive them instead" in out
    shop = sqlite3.connect(tmp_path / "walkthrough" / "shop.db")
    tables = {row[0] for row in shop.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "api_keys" not in tables and shop.execute("SELECT count(*) FROM orders").fetchone() == (240,)
    assert (tmp_path / "walkthrough" / "audit.db").exists()


async def test_audit_list_filters_by_session_identity_tool_and_time(tmp_path, sqlite_shop):
    config = write_config(tmp_path, f'[connections.shop]\nurl = "sqlite:///{sqlite_shop}"\n')
    for _ in range(2):
        async with guard_client(config, tmp_path) as client:
            await client.call("query", sql="SELECT 1")
            await client.call("list_tables")
    store = ["--store", f"sqlite:///{tmp_path / 'audit.db'}", "--json"]
    every = json.loads(run("audit", "list", *store, home=tmp_path).stdout)
    assert len(every) == 4
    first_session = every[0]["request"]["session_id"]
    by_session = json.loads(run("audit", "list", *store, "--session", first_session, home=tmp_path).stdout)
    assert [c["request"]["tool"] for c in by_session] == ["query", "list_tables"]
    by_tool = json.loads(run("audit", "list", *store, "--tool", "list_tables", home=tmp_path).stdout)
    assert len(by_tool) == 2
    identity = every[0]["request"]["identity"]
    assert len(json.loads(run("audit", "list", *store, "--identity", identity, home=tmp_path).stdout)) == 4
    assert json.loads(run("audit", "list", *store, "--identity", "local:nobody", home=tmp_path).stdout) == []
    assert json.loads(run("audit", "list", *store, "--since", "2999-01-01", home=tmp_path).stdout) == []
    newest = json.loads(run("audit", "list", *store, "--limit", "1", home=tmp_path).stdout)
    assert [c["request"]["tool"] for c in newest] == ["list_tables"]
    table = run("audit", "list", "--store", f"sqlite:///{tmp_path / 'audit.db'}", home=tmp_path)
    assert table.returncode == 0 and "4 call(s)" in table.stdout and "allow-reads" in table.stdout
