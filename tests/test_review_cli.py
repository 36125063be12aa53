"""`mcp-guard pending | approve | deny | reviewer init` as a reviewer runs them: in a terminal, or not."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

from mcp_guard.approvals import ApprovalState
from mcp_guard.config import load_config
from mcp_guard.demo.terminal import run_in_terminal
from mcp_guard.reviewers import ReviewerKey
from tests.approval_support import PASSPHRASES, approval_config, desk, settled, sqlite_connection
from tests.client import guard_client

DROP = {"sql": "DROP TABLE api_keys", "reason": "keys moved to the vault"}


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Without a terminal: a new session (no controlling terminal) and stdin from /dev/null."""
    return subprocess.run(
        [sys.executable, "-m", "mcp_guard", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, "COLUMNS": "200"},
    )


def typed(config: Path, args: list[str], answers: list[str]) -> str:
    """In a terminal, typing `answers` at the passphrase prompts; the exit code and output."""
    argv = [sys.executable, "-m", "mcp_guard", *args, "--config", str(config)]
    done = run_in_terminal(argv, answers, {**os.environ, "TERM": "dumb"})
    return f"exit {done.returncode}\n{done.output}"


async def test_pending_lists_a_held_request_as_json_and_as_a_table(tmp_path, sqlite_shop):
    config = approval_config(tmp_path, sqlite_connection(sqlite_shop), wait=0.2)
    async with guard_client(config, tmp_path) as client:
        held = await client.call("execute", **DROP)
    listed = cli(config, "pending", "--json")
    table = cli(config, "pending")
    assert listed.returncode == 0, listed.stderr
    [request] = json.loads(listed.stdout)
    assert request["request_id"] == held.structured["request_id"]
    assert request["state"] == "pending" and request["statements"] == ["DROP TABLE api_keys"]
    assert request["reason"] == "keys moved to the vault" and request["rule"] == "hold-ddl"
    assert request["details"]["classification"]["kind"] == "ddl"
    assert table.returncode == 0 and held.structured["request_id"] in table.stdout
    assert "DROP TABLE api_keys" in table.stdout


async def test_approving_needs_a_terminal_and_records_nothing_without_one(tmp_path, sqlite_shop):
    config = approval_config(tmp_path, sqlite_connection(sqlite_shop), wait=0.2)
    async with guard_client(config, tmp_path) as client:
        held = await client.call("execute", **DROP)
    request_id = held.structured["request_id"]
    done = cli(config, "approve", request_id, "--reviewer", "dana")
    assert done.returncode == 2
    assert "passphrase is typed at a terminal; this process has none" in done.stderr
    async with desk(config) as reviewers:
        assert (await reviewers.request(request_id)).votes == ()


async def test_approve_in_a_terminal_lets_the_waiting_call_finish(tmp_path, sqlite_shop):
    config = approval_config(tmp_path, sqlite_connection(sqlite_shop))
    async with guard_client(config, tmp_path) as client, desk(config) as reviewers:
        call = asyncio.create_task(client.call("execute", **DROP))
        request = await reviewers.next_request()
        args = ["approve", request.id, "--reviewer", "dana", "--comment", "checked with the team"]
        said = await asyncio.to_thread(typed, config, args, [PASSPHRASES["dana"]])
        reply = await settled(call)
        stored = await reviewers.request(request.id)
    assert said.startswith("exit 0"), said
    assert "DROP TABLE api_keys" in said and "keys moved to the vault" in said  # shown before asking
    assert f"approved request {request.id}" in said and PASSPHRASES["dana"] not in said
    assert not reply.is_error and "Approved by local:dana" in reply.text
    assert [(v.reviewer, v.reason) for v in stored.votes] == [("dana", "checked with the team")]


async def test_a_wrong_passphrase_is_refused_and_records_nothing(tmp_path, sqlite_shop):
    config = approval_config(tmp_path, sqlite_connection(sqlite_shop), wait=0.2)
    async with guard_client(config, tmp_path) as client:
        held = await client.call("execute", **DROP)
    request_id = held.structured["request_id"]
    said = await asyncio.to_thread(
        typed, config, ["approve", request_id, "--reviewer", "dana"], ["not-danas-passphrase"]
    )
    assert said.startswith("exit 1") and "wrong passphrase for reviewer 'dana'" in said
    async with desk(config) as reviewers:
        stored = await reviewers.request(request_id)
    assert stored.votes == () and stored.state is ApprovalState.PENDING


async def test_deny_needs_a_reason_and_the_assistant_is_told_it(tmp_path, sqlite_shop):
    config = approval_config(tmp_path, sqlite_connection(sqlite_shop))
    async with guard_client(config, tmp_path) as client, desk(config) as reviewers:
        call = asyncio.create_task(client.call("execute", **DROP))
        request = await reviewers.next_request()
        blank = cli(config, "deny", request.id, "--reviewer", "dana", "--reason", "  ")
        args = ["deny", request.id, "--reviewer", "omar", "--reason", "the vault migration is not done"]
        said = await asyncio.to_thread(typed, config, args, [PASSPHRASES["omar"]])
        reply = await settled(call)
    assert blank.returncode == 2 and "--reason must say why" in blank.stderr
    assert said.startswith("exit 0") and f"denied request {request.id}" in said
    assert (
        reply.is_error
        and "local:omar denied" in reply.text
        and "the vault migration is not done" in reply.text
    )


async def test_someone_who_is_no_reviewer_is_refused_before_any_passphrase(tmp_path, sqlite_shop):
    config = approval_config(tmp_path, sqlite_connection(sqlite_shop), wait=0.2)
    async with guard_client(config, tmp_path) as client:
        held = await client.call("execute", **DROP)
    done = cli(config, "approve", held.structured["request_id"], "--reviewer", "mallory")
    unknown = cli(config, "approve", "nosuchid", "--reviewer", "dana")
    assert done.returncode == 1 and "'mallory' is not a reviewer of this server" in done.stderr
    assert unknown.returncode == 1 and "there is no approval request 'nosuchid'" in unknown.stderr


def test_reviewer_init_prints_a_key_the_configuration_accepts(tmp_path):
    argv = [sys.executable, "-m", "mcp_guard", "reviewer", "init", "zoe", "--group", "dba", "--cost", "14"]
    done = run_in_terminal(argv, ["zoe-long-passphrase"] * 2, {**os.environ, "TERM": "dumb"})
    assert done.returncode == 0, done.output
    snippet = done.output[done.output.index("[approvals.reviewers.zoe]") :]
    config = tmp_path / "c.toml"
    config.write_text(f'[connections.x]\nurl = "sqlite:////tmp/x.db"\n{snippet}')
    reviewer = load_config(config).settings.approvals.reviewer_map()["zoe"]
    assert reviewer.groups == {"dba"} and reviewer.subject == "local:zoe"
    assert reviewer.key.derive("zoe-long-passphrase") is not None
    assert "zoe-long-passphrase" not in done.output
    assert isinstance(ReviewerKey.parse(str(reviewer.key)), ReviewerKey)


def test_reviewer_init_refuses_a_short_or_mistyped_passphrase():
    argv = [sys.executable, "-m", "mcp_guard", "reviewer", "init", "zoe", "--cost", "14"]
    short = run_in_terminal(argv, ["short", "short"], {**os.environ, "TERM": "dumb"})
    mistyped = run_in_terminal(argv, ["zoe-long-passphrase", "zoe-long-passphrasE"], {**os.environ})
    assert short.returncode == 2 and "at least 12 characters" in short.output
    assert mistyped.returncode == 2 and "the two passphrases differ" in mistyped.output


def test_check_says_a_statement_would_be_held_and_for_whom(tmp_path):
    config = approval_config(tmp_path, sqlite_connection(tmp_path / "x.db"))
    done = cli(config, "check", "DROP TABLE orders")
    as_json = cli(config, "check", "DROP TABLE orders", "--json")
    assert done.returncode == 1 and "execute: approve by rule hold-ddl" in done.stdout
    assert "held for reviewers: 1 approval from reviewers, within 3600 s" in done.stdout
    assert json.loads(as_json.stdout)["decision"]["action"] == "approve"


async def test_what_the_assistant_wrote_cannot_act_on_the_reviewers_terminal(tmp_path, sqlite_shop):
    config = approval_config(tmp_path, sqlite_connection(sqlite_shop), wait=0.2)
    sql = "DROP TABLE api_keys -- \x1b[2K\x1b[1A\rharmless \u202eeton"
    async with guard_client(config, tmp_path) as client:
        held = await client.call("execute", sql=sql, reason="tidy \x1b]0;title\x07up")
    request_id = held.structured["request_id"]
    said = await asyncio.to_thread(
        typed, config, ["approve", request_id, "--reviewer", "dana"], ["not-the-passphrase"]
    )
    listed = cli(config, "pending")
    for shown in (said, listed.stdout):
        assert not any(ch in shown for ch in "\x1b\x07\r\u202e"), repr(shown)
    assert "-- \\x1b[2K\\x1b[1A\\x0dharmless \\u202eeton" in said
    assert "tidy \\x1b]0;title\\x07up" in said
