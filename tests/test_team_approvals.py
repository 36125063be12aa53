"""Approvals across hosts on the team's PostgreSQL store: gateway processes and a reviewer (this test
process) share one store; a decision wakes the waiting gateway through LISTEN/NOTIFY, and an approved
request runs once however many gateways race for it."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from textual.widgets import DataTable

from mcp_guard.approvals import ApprovalState
from mcp_guard.demo.terminal import run_in_terminal
from mcp_guard.store import open_store
from mcp_guard.store.base import CallFilter
from tests.approval_support import PASSPHRASES, approval_config, desk, settled, sqlite_connection
from tests.client import guard_client
from tests.conftest import empty_pg_store
from tests.test_review_ui import app_for, rows_appear, type_text

DROP = {"sql": "DROP TABLE api_keys", "reason": "keys moved to the vault"}


@pytest.fixture
def team_store(pg_store_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    asyncio.run(empty_pg_store(pg_store_url))
    monkeypatch.setenv("TEAM_STORE_URL", pg_store_url)  # for the reviewer's desk, in this process
    return pg_store_url


def team_approval_config(tmp_path: Path, shop: Path, **kwargs: object) -> Path:
    """The approval tests' configuration, its audit store the team's PostgreSQL (from the environment)."""
    config = approval_config(tmp_path, sqlite_connection(shop), **kwargs)  # type: ignore[arg-type]
    text = config.read_text().replace(
        f'url = "sqlite:///{tmp_path / "audit.db"}"', 'url_env = "TEAM_STORE_URL"'
    )
    config.write_text(text)
    return config


def tables(path: Path) -> set[str]:
    return {
        row[0] for row in sqlite3.connect(path).execute("SELECT name FROM sqlite_master WHERE type='table'")
    }


async def test_a_decision_in_the_reviewers_process_wakes_the_call_waiting_in_another_gateway_at_once(
    team_store: str, tmp_path: Path, sqlite_shop: Path
) -> None:
    config = team_approval_config(tmp_path, sqlite_shop, wait=20)
    env = {"TEAM_STORE_URL": team_store}
    async with (
        guard_client(config, tmp_path, **env) as holder,
        guard_client(config, tmp_path, **env) as other,
        desk(config) as reviewers,
    ):
        call = asyncio.create_task(holder.call("execute", **DROP))
        request = await reviewers.next_request()
        assert "api_keys" in tables(sqlite_shop)
        assert not (await other.call("query", sql="SELECT count(*) FROM orders")).is_error
        await asyncio.sleep(0.5)  # the holder is waiting now, listening
        assert (await reviewers.vote(request.id, "dana", reason="fine")).state is ApprovalState.APPROVED
        decided = time.monotonic()
        reply = await settled(call)
        woke = time.monotonic() - decided
    assert not reply.is_error, reply.text
    assert reply.text.startswith(f"Approved by local:dana (request {request.id}); ran once")
    assert "api_keys" not in tables(sqlite_shop)
    assert woke < 0.5, f"the waiting gateway took {woke:.2f} s to wake and run"
    store = open_store(team_store)
    await store.open()
    try:
        assert (await store.verify()).ok
        (held,) = [call async for call in store.calls(CallFilter(tool="execute"))]
    finally:
        await store.close()
    assert {"approval_requested", "approval_vote", "approval_approved", "approval_executed"} <= {
        str(r.event.type) for r in held
    }


async def test_an_approved_request_claimed_by_two_gateways_at_once_runs_once(
    team_store: str, tmp_path: Path, sqlite_shop: Path
) -> None:
    policy = (
        '[[policy.rules]]\nname = "hold-inserts"\naction = "approve"\nkinds = ["write"]\n'
        'approvers = ["reviewers"]\n'
    )
    config = team_approval_config(tmp_path, sqlite_shop, policy=policy, wait=0.3)
    env = {"TEAM_STORE_URL": team_store}
    insert = "INSERT INTO orders (customer_id, total, status, created_at) VALUES (1, 9.99, 'once', 'now')"
    async with (
        guard_client(config, tmp_path, **env) as first,
        guard_client(config, tmp_path, **env) as second,
        desk(config) as reviewers,
    ):
        held = await first.call("execute", sql=insert, reason="one order")
        request_id = held.structured["request_id"]
        await reviewers.vote(request_id, "dana")
        replies = await asyncio.gather(
            *(client.call("approval_status", request_id=request_id) for client in (first, second) * 3)
        )
    assert sum(not r.is_error for r in replies) == 1, [r.text for r in replies]
    rows = (
        sqlite3.connect(sqlite_shop).execute("SELECT count(*) FROM orders WHERE status = 'once'").fetchone()
    )
    assert rows == (1,)
    store = open_store(team_store)
    await store.open()
    try:
        request = await store.get_approval(request_id)
        assert (await store.verify()).ok
    finally:
        await store.close()
    assert request is not None and request.state is ApprovalState.EXECUTED


async def test_pending_and_approve_run_by_a_reviewer_on_another_host_work_against_the_team_store(
    team_store: str, tmp_path: Path, sqlite_shop: Path
) -> None:
    config = team_approval_config(tmp_path, sqlite_shop, wait=20)
    env = {**os.environ, "TEAM_STORE_URL": team_store, "COLUMNS": "200"}
    async with guard_client(config, tmp_path, TEAM_STORE_URL=team_store) as client, desk(config) as reviewers:
        call = asyncio.create_task(client.call("execute", **DROP))
        request = await reviewers.next_request()
        listed = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "mcp_guard", "pending", "--json", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
            env=env,
        )
        assert listed.returncode == 0, listed.stderr
        assert [r["request_id"] for r in json.loads(listed.stdout)] == [request.id]
        argv = [sys.executable, "-m", "mcp_guard", "approve", request.id, "--reviewer", "dana"]
        argv += ["--comment", "checked", "--config", str(config)]
        said = await asyncio.to_thread(run_in_terminal, argv, [PASSPHRASES["dana"]], {**env, "TERM": "dumb"})
        reply = await settled(call)
    assert said.returncode == 0, said.output
    assert not reply.is_error and "Approved by local:dana" in reply.text
    assert "api_keys" not in tables(sqlite_shop)


async def test_the_review_ui_on_the_team_store_shows_a_request_live_and_approving_wakes_the_gateway(
    team_store: str, tmp_path: Path, sqlite_shop: Path
) -> None:
    config = team_approval_config(tmp_path, sqlite_shop, wait=20)
    async with guard_client(config, tmp_path, TEAM_STORE_URL=team_store) as client, desk(config) as reviewers:
        app = app_for(reviewers, "dana")
        async with app.run_test(size=(140, 45)) as pilot:
            pending = app.query_one("#pending", DataTable)
            call = asyncio.create_task(client.call("execute", **DROP))
            await rows_appear(pilot, pending)  # live, through LISTEN
            request = (await reviewers.store.list_approvals())[0]
            assert [str(cell) for cell in pending.get_row_at(0)][0] == request.id
            await pilot.press("a")
            await type_text(pilot, "ok")
            await pilot.press("enter")
            await type_text(pilot, PASSPHRASES["dana"])
            await pilot.press("enter")
            reply = await settled(call)
    assert not reply.is_error and reply.text.startswith(f"Approved by local:dana (request {request.id})")
    assert "api_keys" not in tables(sqlite_shop)
