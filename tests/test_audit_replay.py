"""Replay, show and export give back a recorded session exactly as the client received it."""

from __future__ import annotations

import csv
import io
import json
import re
import sqlite3
from pathlib import Path

import pytest

from mcp_guard.cli import main as cli_main
from mcp_guard.demo.data import create_demo_database
from mcp_guard.store.base import AuditRecord
from tests.auditing import Received, audit_cli, audit_json, record, shop_config

CALLS = [
    ("list_tables", {}),
    ("query", {"sql": "SELECT id, status, total FROM orders WHERE id <= 3 ORDER BY id"}),
    (
        "execute",
        {
            "sql": "UPDATE orders SET status = 'shipped' WHERE id = 2",
            "reason": "the customer called: order 2 went out today",
        },
    ),
    ("execute", {"sql": "DROP TABLE payments", "reason": "tidy up"}),
    ("query", {"sql": "SELECT name FROM customers WHERE id = ?", "params": [1]}),
    ("query", {"sql": "SELEC broken"}),
]


@pytest.fixture(scope="module")
def session_home(tmp_path_factory) -> tuple[Path, list[Received]]:
    """One real session through the MCP client, recorded once for this module (the tests only read)."""
    home = tmp_path_factory.mktemp("replay")
    shop = home / "shop.db"
    create_demo_database(shop)
    return home, record(shop_config(home, shop), home, CALLS)


@pytest.fixture
def recorded(session_home, monkeypatch) -> list[Received]:
    home, received = session_home
    monkeypatch.setenv("MCP_GUARD_HOME", str(home))
    monkeypatch.setenv("MCP_GUARD_CONFIG", str(home / "mcp-guard.toml"))
    monkeypatch.setenv("COLUMNS", "200")  # a wide terminal: ids and hashes on one line
    return received


@pytest.fixture
def home(session_home) -> Path:
    return session_home[0]


def test_replay_json_gives_back_every_call_field_by_field_as_the_client_received_it(recorded, capsys):
    replay = audit_json(capsys, "replay", "latest")
    calls = replay["calls"]
    assert len(calls) == len(recorded)
    for got, sent in zip(calls, recorded, strict=True):
        assert got["call_id"] == sent.call_id
        assert got["tool"] == sent.tool
        assert got["sql"] == sent.arguments.get("sql")
        assert got["reason"] == sent.arguments.get("reason")
        assert got["params"] == sent.arguments.get("params", [] if "sql" in sent.arguments else None)
        assert got["response"]["text"] == sent.text
        assert got["response"]["is_error"] == sent.is_error
        assert got["response"].get("structured") == sent.structured
        assert got["session_id"] == replay["session"]["session_id"]
    assert [c["decision"] for c in calls] == ["allow", "allow", "allow", "deny", "allow", "deny"]
    assert calls[2]["rule"] == "allow-writes-with-where" and calls[2]["result"] == {"rows_affected": 1}
    assert calls[3]["rule"] == "hold-ddl" and calls[3]["kind"] == "ddl"  # held, and nobody may approve
    assert calls[3]["classification"]["statements"][0]["operation"] == "DROP TABLE"
    assert calls[5]["status"] == "denied" and calls[5]["kind"] == "unknown"
    times = [c["time"] for c in calls]
    assert times == sorted(times)
    session = replay["session"]
    assert session["client"] == "mcp-guard-tests/1" and session["identity"].startswith("local:")
    assert session["transport"] == "stdio" and session["pid"] > 0 and session["cwd"]
    assert session["started"] < times[0] and session["ended"] > times[-1]
    assert session["ended_how"] == "the client closed the connection"


def test_replay_in_the_terminal_shows_each_call_with_sql_reason_decision_and_response(recorded, capsys):
    code, out, _ = audit_cli(capsys, "replay", "latest")
    assert code == 0
    assert "#1" in out and "#6" in out and "session ended" in out
    assert "the customer called: order 2 went out today" in out
    assert "deny by rule hold-ddl" in out
    assert "UPDATE orders SET status = 'shipped' WHERE id = 2" in out
    assert "response as the model saw it" in out and "Committed: 1 statement, 1 row affected." in out


def test_replay_step_by_step_waits_for_a_key_and_q_stops(recorded, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("\n\nq\n"))
    code, out, _ = audit_cli(capsys, "replay", "latest", "--step")
    assert code == 0
    assert out.count("any key for the next call") == 3
    assert "#3" in out and "#4" not in out and "replay stopped" in out


def test_replay_html_is_a_self_contained_page_with_every_call(recorded, capsys, tmp_path):
    page = tmp_path / "report.html"
    code, _, err = audit_cli(capsys, "replay", "latest", "--html", str(page), "--verify")
    assert code == 0, err
    text = page.read_text()
    assert not re.search(r"<(link|img|iframe)\b|\bsrc=|https?://", text), "the page must not load anything"
    assert "Audit log verified" in text
    for sent in recorded:
        assert sent.call_id in text
    assert "the customer called: order 2 went out today" in text
    assert "hold-ddl" in text
    data = re.search(r'<script type="application/json" id="replay-data">(.*)</script>', text, re.S)
    assert data is not None
    embedded = json.loads(data.group(1).replace("<\\/", "</"))
    assert [c["response"]["text"] for c in embedded["calls"]] == [s.text for s in recorded]


def test_export_jsonl_and_csv_carry_what_the_client_received(recorded, capsys):
    code, out, _ = audit_cli(capsys, "audit", "export", "--format", "jsonl")
    assert code == 0
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["call_id"] for line in lines] == [s.call_id for s in recorded]
    assert [line["response"]["text"] for line in lines] == [s.text for s in recorded]
    assert [line["response"].get("structured") for line in lines] == [s.structured for s in recorded]
    code, out, _ = audit_cli(capsys, "audit", "export", "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [row["call_id"] for row in rows] == [s.call_id for s in recorded]
    assert [row["response_text"] for row in rows] == [s.text for s in recorded]
    assert [row["response_is_error"] for row in rows] == [str(s.is_error) for s in recorded]
    assert rows[2]["reason"] == "the customer called: order 2 went out today"
    assert rows[2]["tables"] == "orders" and rows[2]["kind"] == "write" and rows[2]["decision"] == "allow"


def test_export_applies_the_filters(recorded, capsys):
    _, out, _ = audit_cli(capsys, "audit", "export", "--decision", "deny")
    assert [json.loads(line)["sql"] for line in out.splitlines()] == ["DROP TABLE payments", "SELEC broken"]
    _, out, _ = audit_cli(capsys, "audit", "export", "--format", "csv", "--table", "customers")
    assert [row["sql"] for row in csv.DictReader(io.StringIO(out))] == [CALLS[4][1]["sql"]]


def test_audit_show_names_everything_about_one_call(recorded, capsys):
    write = recorded[2]
    shown = audit_json(capsys, "audit", "show", write.call_id[:8])
    assert shown["call_id"] == write.call_id and shown["response"]["text"] == write.text
    assert shown["session"]["client"] == "mcp-guard-tests/1"
    assert [e["type"] for e in shown["entries"]] == ["request", "outcome"]
    code, out, _ = audit_cli(capsys, "audit", "show", str(shown["entries"][1]["seq"]))
    assert code == 0
    assert write.call_id in out and "entries in the chain" in out and shown["entries"][1]["hash"] in out
    code, _, err = audit_cli(capsys, "audit", "show", "deadbeef-00")
    assert code == 1 and "no call whose id starts with 'deadbeef-00'" in err
    code, _, err = audit_cli(capsys, "audit", "show", "999999")
    assert code == 1 and "entry 999999 is not in the audit log" in err


def test_audit_list_filters_by_table_kind_text_and_time(recorded, capsys):
    def listed(*args: str) -> list[str]:
        return [c["call_id"] for c in audit_json(capsys, "audit", "list", *args)]

    ids = [s.call_id for s in recorded]
    assert listed("--table", "orders") == [ids[1], ids[2]]
    assert listed("--table", "main.orders") == []
    assert listed("--kind", "write") == [ids[2]]
    assert listed("--writes") == [ids[2], ids[3], ids[5]]
    assert listed("--text", "status = 'SHIPPED'") == [ids[2]]
    assert listed("--tool", "execute", "--decision", "deny") == [ids[3]]
    assert listed("--connection", "shop", "--limit", "2") == [ids[4], ids[5]]
    assert listed("--since", "2000-01-01", "--until", "2000-01-02") == []
    assert listed("--identity", "local:nobody") == []


def test_audit_why_lists_the_writes_to_a_table_with_reason(recorded, capsys):
    why = audit_json(capsys, "audit", "why", "payments")
    assert [(c["sql"], c["decision"], c["reason"]) for c in why] == [
        ("DROP TABLE payments", "deny", "tidy up")
    ]
    code, out, _ = audit_cli(capsys, "audit", "why", "orders")
    assert code == 0 and "1 call(s) that write or change orders" in out
    assert "the customer called: order 2 went out today" in out


def test_audit_stats_counts_calls_writes_and_denials_by_identity_and_day(recorded, capsys):
    rows = audit_json(capsys, "audit", "stats")
    assert len(rows) == 1
    assert {k: rows[0][k] for k in ("calls", "writes", "denied", "errors", "approvals")} == {
        "calls": 6,
        "writes": 3,
        "denied": 2,
        "errors": 0,
        "approvals": 0,
    }


def test_each_session_has_a_start_and_an_end_record_and_a_signed_checkpoint(recorded, home):
    db = sqlite3.connect(home / "audit.db")
    types = [row[0] for row in db.execute("SELECT type FROM audit ORDER BY seq")]
    assert types[0] == "session_start" and types[-1] == "session_end"
    assert types.count("request") == types.count("outcome") == len(CALLS)
    (entries, text), *_ = db.execute("SELECT entries, text FROM checkpoint ORDER BY entries DESC")
    assert entries == len(types) and "reason: session end" in text
    assert text in (home / "audit.db.witness").read_text()


def test_a_record_without_a_known_type_is_shown_in_the_trail(tmp_path):
    """Entries between request and outcome (approvals, as they land) are shown by their type and detail."""
    from mcp_guard.audit.calls import Call
    from mcp_guard.store.base import AuditEvent, EventType

    def entry(seq: int, type_: EventType, **fields: object) -> AuditRecord:
        event = AuditEvent(type_, "s", "local:a", call_id="c1", **fields)  # type: ignore[arg-type]
        return AuditRecord(seq, "00", "11", b"", event)

    call = Call.from_records(
        [
            entry(1, EventType.REQUEST, tool="execute"),
            entry(2, EventType.TOOL_USE, detail={"approver": "bob"}),
            entry(3, EventType.OUTCOME, decision="allow"),
        ]
    )
    assert [t["type"] for t in call.as_dict()["trail"]] == ["tool_use"]
    assert call.as_dict()["trail"][0]["detail"] == {"approver": "bob"}


def test_the_structured_response_is_kept_whole_up_to_the_cap_and_omitted_beyond(
    tmp_path, monkeypatch, capsys
):
    """`response_cap` bounds what the audit keeps of a response: structured content whole or not at
    all, decided at the exact size (the cap counts characters of its JSON)."""
    shop = tmp_path / "shop.db"
    create_demo_database(shop)
    small = ("query", {"sql": "SELECT id, name FROM customers WHERE id = 1"})
    [probe] = record(shop_config(tmp_path, shop), tmp_path, [small])
    size = len(json.dumps(probe.structured, ensure_ascii=False))
    monkeypatch.setenv("MCP_GUARD_HOME", str(tmp_path))
    kept = []
    for cap in (size, size - 1):
        home = tmp_path / f"cap-{cap}"
        home.mkdir()
        config = shop_config(home, shop, audit=f"response_cap = {cap}")
        monkeypatch.setenv("MCP_GUARD_CONFIG", str(config))
        received, _ = record(config, home, [small, ("query", {"sql": "SELECT * FROM orders"})])
        calls = audit_json(capsys, "replay", "latest")["calls"]
        kept.append([("structured" in c["response"], c["response"].get("structured_omitted")) for c in calls])
        assert calls[0]["response"].get("structured", received.structured) == received.structured
    assert kept == [[(True, None), (False, True)], [(False, True), (False, True)]]


def test_audit_commands_refuse_bad_filters_naming_them(recorded, capsys):
    for args, said in [
        (("audit", "list", "--limit", "1" * 20), "is not a whole number from 0 to 1,000,000,000"),
        (("audit", "sessions", "--limit", "-1"), "'-1' is not a whole number"),
        (("audit", "list", "--kind", "bogus"), "invalid choice: 'bogus'"),
        (("audit", "export", "--decision", "maybe"), "invalid choice: 'maybe'"),
    ]:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exited:
            cli_main(list(args))
        assert exited.value.code == 2 and said in capsys.readouterr().err, args
    code, _, err = audit_cli(capsys, "audit", "why", " ")
    assert code == 2 and "TABLE must name a table" in err
    newest = audit_json(capsys, "audit", "list", "--limit", "1")
    assert [c["call_id"] for c in newest] == [recorded[-1].call_id]


def test_audit_commands_on_a_store_that_is_not_there_say_so_and_create_nothing(tmp_path, capsys):
    """A mistyped --store must not become a new, empty, verified log."""
    absent = tmp_path / "typo" / "audit.db"
    for command in (("audit", "list"), ("audit", "verify"), ("replay", "latest"), ("audit", "why", "orders")):
        code, _, err = audit_cli(capsys, *command, "--store", f"sqlite:///{absent}")
        assert code == 1 and f"audit store {absent}: there is no such file" in err, (command, err)
    assert not absent.parent.exists()
