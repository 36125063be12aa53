"""The Claude Code hook records the user's prompt, and replay and `audit show` link calls to it."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from tests.auditing import audit_cli, audit_json, run_hook, shop_config
from tests.client import Reply, guard_client

WRITE = {
    "sql": "UPDATE orders SET status = 'shipped' WHERE id = 7",
    "reason": "the user says order 7 went out",
}
READ = {"sql": "SELECT status FROM orders WHERE id = 7"}


def prompt_payload(session: str, prompt: str, cwd: Path) -> dict[str, Any]:
    """What Claude Code sends on UserPromptSubmit."""
    return {
        "session_id": session,
        "transcript_path": f"/home/me/.claude/projects/shop/{session}.jsonl",
        "cwd": str(cwd),
        "permission_mode": "default",
        "hook_event_name": "UserPromptSubmit",
        "prompt": prompt,
    }


def tool_payload(session: str, tool: str, arguments: dict[str, Any], cwd: Path) -> dict[str, Any]:
    """What Claude Code sends on PreToolUse for a tool of the MCP server registered as mcp-guard."""
    return {
        "session_id": session,
        "transcript_path": f"/home/me/.claude/projects/shop/{session}.jsonl",
        "cwd": str(cwd),
        "permission_mode": "default",
        "hook_event_name": "PreToolUse",
        "tool_name": f"mcp__mcp-guard__{tool}",
        "tool_input": arguments,
        "tool_use_id": "toolu_01ABC",
    }


@pytest.fixture
def setup(tmp_path, sqlite_shop, monkeypatch) -> tuple[Path, Path]:
    config = shop_config(tmp_path, sqlite_shop)
    monkeypatch.setenv("MCP_GUARD_HOME", str(tmp_path))
    monkeypatch.setenv("MCP_GUARD_CONFIG", str(config))
    monkeypatch.setenv("COLUMNS", "200")
    project = tmp_path / "project"
    project.mkdir()
    return config, project


def hook(tmp_path: Path, config: Path, payload: dict[str, Any], **env: str) -> None:
    done = run_hook(tmp_path, config, payload, **env)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "", "stdout of a UserPromptSubmit hook would be added to the conversation"


def test_a_prompt_is_linked_to_the_calls_it_led_to(setup, tmp_path, capsys):
    config, project = setup

    async def session() -> list[Reply]:
        async with guard_client(config, tmp_path, cwd=project) as client:
            hook(
                tmp_path,
                config,
                prompt_payload("claude-1", "Order 7 was delivered: mark it shipped", project),
            )
            hook(tmp_path, config, prompt_payload("claude-2", "Another session's prompt", project))
            hook(tmp_path, config, tool_payload("claude-1", "execute", WRITE, project))
            write = await client.call("execute", **WRITE)
            read = await client.call("query", **READ)  # not announced: linked through its session
            hook(tmp_path, config, prompt_payload("claude-1", "Thanks. Now show me customer 1", project))
            hook(tmp_path, config, tool_payload("claude-1", "query", {"sql": "SELECT 1"}, project))
            return [write, read, await client.call("query", sql="SELECT 1")]

    write, read, later = asyncio.run(session())
    assert not write.is_error and not read.is_error and not later.is_error
    calls = audit_json(capsys, "replay", "latest")["calls"]
    links = [(c["prompt"]["text"], c["prompt"]["method"], c["prompt"]["claude_session_id"]) for c in calls]
    assert links == [
        ("Order 7 was delivered: mark it shipped", "tool call", "claude-1"),
        ("Order 7 was delivered: mark it shipped", "session", "claude-1"),
        ("Thanks. Now show me customer 1", "tool call", "claude-1"),
    ]
    code, out, _ = audit_cli(capsys, "audit", "show", write.structured["call_id"])
    assert code == 0 and "Order 7 was delivered: mark it shipped" in out and "linked by tool call" in out
    why = audit_json(capsys, "audit", "why", "orders")
    assert [c["prompt"]["text"] for c in why] == ["Order 7 was delivered: mark it shipped"]


def test_without_the_tool_hook_a_prompt_is_linked_by_project_directory_and_time(setup, tmp_path, capsys):
    config, project = setup
    elsewhere = tmp_path / "elsewhere"

    async def session() -> None:
        async with guard_client(config, tmp_path, cwd=project) as client:
            payload = prompt_payload("claude-1", "Mark order 7 shipped", project)
            hook(tmp_path, config, payload, CLAUDE_PROJECT_DIR=str(project))
            hook(tmp_path, config, prompt_payload("claude-9", "In another project", elsewhere))
            await client.call("execute", **WRITE)

    asyncio.run(session())
    (call,) = audit_json(capsys, "replay", "latest")["calls"]
    assert call["prompt"]["text"] == "Mark order 7 shipped"
    assert call["prompt"]["method"] == "project directory and time"


def test_a_call_with_no_prompt_recorded_has_no_link(setup, tmp_path, capsys):
    config, project = setup

    async def session() -> None:
        async with guard_client(config, tmp_path, cwd=project) as client:
            await client.call("query", **READ)

    asyncio.run(session())
    (call,) = audit_json(capsys, "replay", "latest")["calls"]
    assert call["prompt"] is None


def test_the_hook_records_a_prompt_in_the_chain_and_prints_nothing(setup, tmp_path, capsys):
    config, project = setup
    hook(tmp_path, config, prompt_payload("claude-1", "Delete the test orders", project))
    row = (
        sqlite3.connect(tmp_path / "audit.db").execute("SELECT type, session_id, body FROM audit").fetchone()
    )
    assert row[:2] == ("prompt", "claude-code:claude-1")
    detail = json.loads(row[2])["detail"]
    assert detail["prompt"] == "Delete the test orders" and detail["cwd"] == str(project)
    code, out, _ = audit_cli(capsys, "audit", "verify")
    assert code == 0, out


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ("not json", "the hook input is not JSON"),
        ("[1, 2]", "the hook input must be a JSON object"),
        ('{"hook_event_name": "UserPromptSubmit"}', "no hook_event_name or session_id"),
        (
            '{"hook_event_name": "UserPromptSubmit", "session_id": "s", "prompt": 5}',
            "must carry the prompt as text",
        ),
    ],
)
def test_a_bad_hook_input_is_reported_without_blocking_unless_required(setup, tmp_path, payload, message):
    config, _ = setup
    done = run_hook(tmp_path, config, payload)
    assert done.returncode == 1 and message in done.stderr and done.stdout == ""
    assert run_hook(tmp_path, config, payload, "--require").returncode == 2


def test_events_that_say_nothing_about_the_guard_are_ignored(setup, tmp_path):
    config, project = setup
    other_tool = {**tool_payload("claude-1", "execute", {}, project), "tool_name": "Bash"}
    session_start = {"session_id": "claude-1", "hook_event_name": "SessionStart", "source": "startup"}
    for payload in (other_tool, session_start):
        hook(tmp_path, config, payload)
    assert not (tmp_path / "audit.db").exists() or sqlite3.connect(tmp_path / "audit.db").execute(
        "SELECT count(*) FROM audit"
    ).fetchone() == (0,)
