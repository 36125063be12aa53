"""Held statements through a real MCP client, a real server process and the real store; the reviewers
act from this (another) process with real keys, as `mcp-guard approve` and the review UI do."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import anyio
import asyncpg
import pytest

from mcp_guard.approvals import ApprovalState, Vote, vote_payload
from mcp_guard.errors import ApprovalError
from mcp_guard.store.base import AuditEvent, EventType
from tests.approval_support import (
    REQUESTER,
    approval_config,
    desk,
    reviewer_toml,
    settled,
    sqlite_connection,
)
from tests.client import guard_client

DROP = {"sql": "DROP TABLE api_keys", "reason": "keys moved to the vault"}


def tables(path: Path) -> set[str]:
    return {
        row[0] for row in sqlite3.connect(path).execute("SELECT name FROM sqlite_master WHERE type='table'")
    }


def audit(tmp_path: Path) -> list[dict]:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mcp_guard",
            "audit",
            "list",
            "--json",
            "--store",
            f"sqlite:///{tmp_path / 'audit.db'}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


async def test_a_held_drop_approved_in_time_runs_and_the_client_hears_progress_meanwhile(
    tmp_path, sqlite_shop
):
    config = approval_config(tmp_path, sqlite_connection(sqlite_shop))
    heard: list[str] = []

    async def progress(done: float, total: float | None, message: str | None) -> None:
        heard.append(message or "")

    async with guard_client(config, tmp_path) as client, desk(config) as reviewers:
        call = asyncio.create_task(client.call("execute", progress=progress, **DROP))
        request = await reviewers.next_request()
        assert "api_keys" in tables(sqlite_shop)
        assert request.statements == ("DROP TABLE api_keys",) and request.requester == REQUESTER
        assert request.reason == "keys moved to the vault" and request.rule == "hold-ddl"
        await asyncio.sleep(2.2)  # long enough for a second progress notification
        assert (await reviewers.vote(request.id, "dana", reason="fine")).state is ApprovalState.APPROVED
        reply = await settled(call)
    assert not reply.is_error, reply.text
    assert reply.text.startswith(f"Approved by local:dana (request {request.id}); ran once")
    assert reply.structured["approval"] == {
        "request_id": request.id,
        "state": "executed",
        "approved_by": ["local:dana"],
    }
    assert "api_keys" not in tables(sqlite_shop)
    assert len(heard) >= 2 and all(f"request {request.id}" in m for m in heard)
    assert "0 of 1 approvals from reviewers" in heard[0]


async def test_the_server_keeps_serving_other_calls_while_one_waits(tmp_path, sqlite_shop):
    config = approval_config(tmp_path, sqlite_connection(sqlite_shop))
    async with guard_client(config, tmp_path) as client, desk(config) as reviewers:
        call = asyncio.create_task(client.call("execute", **DROP))
        request = await reviewers.next_request()
        started = time.monotonic()
        read = await client.call("query", sql="SELECT count(*) FROM orders")
        listed = await client.call("list_tables")
        status = await client.call("approval_status", request_id=request.id)
        elapsed = time.monotonic() - started
        assert not call.done()
        await reviewers.vote(request.id, "omar")
        await settled(call)
    assert read.structured["rows"] == [[240]] and not listed.is_error
    assert status.structured["state"] == "pending" and not status.is_error
    assert elapsed < 2.0


async def test_a_denied_request_is_an_error_carrying_the_reviewers_reason(tmp_path, sqlite_shop):
    config = approval_config(tmp_path, sqlite_connection(sqlite_shop))
    async with guard_client(config, tmp_path) as client, desk(config) as reviewers:
        call = asyncio.create_task(
            client.call("execute", sql="DELETE FROM orders", reason="start over with the orders")
        )
        request = await reviewers.next_request()
        assert request.rule == "hold-write-without-where"
        assert request.details["estimated_rows"] == [240]  # for the reviewer, though no rule asked
        await reviewers.vote(request.id, "dana", "deny", "orders are kept for seven years")
        reply = await settled(call)
        again = await client.call("approval_status", request_id=request.id)
    assert reply.is_error
    assert f"reviewer local:dana denied request {request.id}: orders are kept for seven years" in reply.text
    assert "not executed" in reply.text
    assert again.is_error and "orders are kept for seven years" in again.text
    assert sqlite3.connect(sqlite_shop).execute("SELECT count(*) FROM orders").fetchone()[0] == 240
    [call_record] = [c for c in audit(tmp_path) if c["request"]["tool"] == "execute"]
    assert (
        call_record["outcome"]["decision"] == "deny"
        and call_record["outcome"]["detail"]["status"] == "denied"
    )


async def test_a_request_expires_after_its_ttl_and_never_runs(tmp_path, sqlite_shop):
    policy = (
        '[[policy.rules]]\nname = "quick"\naction = "approve"\nkinds = ["ddl"]\n'
        'approvers = ["reviewers"]\nttl = 1\n'
    )
    config = approval_config(tmp_path, sqlite_connection(sqlite_shop), policy=policy, wait=5)
    async with guard_client(config, tmp_path) as client, desk(config) as reviewers:
        started = time.monotonic()
        reply = await client.call("execute", **DROP)
        waited = time.monotonic() - started
        request = (await reviewers.store.list_approvals())[0]
        with pytest.raises(ApprovalError, match="only a pending request takes votes"):
            await reviewers.vote(request.id, "dana")
        status = await client.call("approval_status", request_id=request.id)
    assert reply.is_error and f"request {request.id} expired at" in reply.text and "never will" in reply.text
    assert 0.9 < waited < 3, "the wait ends when the request expires, not at the configured wait"
    assert status.is_error and "expired" in status.text
    assert request.state is ApprovalState.EXPIRED
    assert "api_keys" in tables(sqlite_shop)
    steps = [e["type"] for c in audit(tmp_path) for e in c.get("trail", [])]
    assert steps == ["approval_requested", "approval_expired"]


async def test_a_pending_request_runs_once_approved_through_approval_status_and_never_twice(
    tmp_path, sqlite_shop
):
    config = approval_config(tmp_path, sqlite_connection(sqlite_shop), wait=0.3)
    async with guard_client(config, tmp_path) as client, desk(config) as reviewers:
        held = await client.call("execute", **DROP)
        request_id = held.structured["request_id"]
        early = await client.call("approval_status", request_id=request_id)
        await reviewers.vote(request_id, "dana", reason="ok by me")
        ran = await client.call("approval_status", request_id=request_id)
        twice = await client.call("approval_status", request_id=request_id)
        stored = await reviewers.request(request_id)
    assert (
        not held.is_error and held.structured["state"] == "pending" and held.structured["executed"] is False
    )
    assert held.text.startswith(f"HELD FOR APPROVAL, NOT EXECUTED. Request {request_id}")
    assert f'approval_status(request_id="{request_id}")' in held.text and "You cannot approve" in held.text
    assert early.structured["state"] == "pending" and "0 of 1 approvals" in early.text
    assert not ran.is_error and ran.text.startswith(f"Approved by local:dana (request {request_id})")
    assert "api_keys" not in tables(sqlite_shop)
    assert twice.is_error and "already ran" in twice.text and "an approval runs once" in twice.text
    assert stored.state is ApprovalState.EXECUTED and stored.outcome["status"] == "ok"
    recorded = [e for c in audit(tmp_path) for e in c.get("trail", [])]
    assert [(e["type"], e["identity"]) for e in recorded] == [
        ("approval_requested", REQUESTER),
        ("approval_vote", "local:dana"),
        ("approval_approved", "local:dana"),
        ("approval_executed", REQUESTER),
        ("approval_outcome", REQUESTER),
    ]
    vote = next(e for e in recorded if e["type"] == "approval_vote")
    assert vote["decision"] == "approve" and vote["detail"]["reason"] == "ok by me"
    assert vote["detail"]["proof"].startswith("ed25519:")


async def test_nobody_approves_their_own_request_not_even_by_writing_the_store(tmp_path, sqlite_shop):
    reviewers_toml = reviewer_toml("me", ["reviewers"], subject=REQUESTER) + reviewer_toml(
        "dana", ["reviewers"]
    )
    config = approval_config(tmp_path, sqlite_connection(sqlite_shop), reviewers=reviewers_toml, wait=0.3)
    async with guard_client(config, tmp_path) as client, desk(config) as reviewers:
        held = await client.call("execute", **DROP)
        request = await reviewers.request(held.structured["request_id"])
        with pytest.raises(ApprovalError, match=f"made by {REQUESTER}; nobody approves or denies their own"):
            await reviewers.vote(request.id, "me")
        # A validly signed vote of the requester's own reviewer key, written straight into the store:
        ts = "2026-01-01T00:00:00.000000+00:00"
        payload = vote_payload(request, "me", "approve", "", ts)
        own = Vote(request.id, "me", "approve", "", ts, payload, reviewers.signer("me").sign(payload))
        event = AuditEvent(type=EventType.APPROVAL_VOTE, session_id="x", identity=REQUESTER, call_id="x")
        assert await reviewers.store.add_vote(own, event, unexpired_at=ts)
        status = await client.call("approval_status", request_id=request.id)
    assert status.structured["state"] == "pending" and "0 of 1 approvals" in status.text
    assert "api_keys" in tables(sqlite_shop)


async def test_n_of_m_counts_distinct_people_whatever_their_groups_or_keys(tmp_path, sqlite_shop):
    policy = (
        '[[policy.rules]]\nname = "two-dbas"\naction = "approve"\nkinds = ["ddl"]\n'
        'approvers = ["dba", "reviewers"]\napprovals = 2\n'
    )
    reviewers_toml = (
        reviewer_toml("dana", ["dba", "reviewers"])
        + reviewer_toml("dana2", ["dba"], subject="local:dana")
        + reviewer_toml("omar", ["dba"])
    )
    config = approval_config(
        tmp_path, sqlite_connection(sqlite_shop), reviewers=reviewers_toml, policy=policy, wait=0.3
    )
    async with guard_client(config, tmp_path) as client, desk(config) as reviewers:
        held = await client.call("execute", **DROP)
        request_id = held.structured["request_id"]
        first = await reviewers.vote(request_id, "dana")
        with pytest.raises(ApprovalError, match="local:dana has already voted"):
            await reviewers.vote(request_id, "dana")
        with pytest.raises(ApprovalError, match="local:dana has already voted"):
            await reviewers.vote(request_id, "dana2")
        between = await client.call("approval_status", request_id=request_id)
        second = await reviewers.vote(request_id, "omar")
        ran = await client.call("approval_status", request_id=request_id)
    assert held.structured["needs"] == ["2 approvals from dba or reviewers"]
    assert (
        first.state is ApprovalState.PENDING and first.describe() == "1 of 2 approvals from dba or reviewers"
    )
    assert between.structured["state"] == "pending" and "1 of 2 approvals" in between.text
    assert second.state is ApprovalState.APPROVED
    assert not ran.is_error and "Approved by local:dana, local:omar" in ran.text


async def test_only_members_of_an_approver_group_decide(tmp_path, sqlite_shop):
    reviewers_toml = reviewer_toml("dana", ["reviewers"]) + reviewer_toml("eve", ["interns"])
    config = approval_config(tmp_path, sqlite_connection(sqlite_shop), reviewers=reviewers_toml, wait=0.3)
    async with guard_client(config, tmp_path) as client, desk(config) as reviewers:
        held = await client.call("execute", **DROP)
        request = await reviewers.request(held.structured["request_id"])
        with pytest.raises(ApprovalError, match=r"'eve' is not in an approver group .* \(reviewers\)"):
            await reviewers.vote(request.id, "eve", "deny", "no")
        ts = "2026-01-01T00:00:00.000000+00:00"
        payload = vote_payload(request, "eve", "approve", "", ts)
        forced = Vote(request.id, "eve", "approve", "", ts, payload, reviewers.signer("eve").sign(payload))
        event = AuditEvent(type=EventType.APPROVAL_VOTE, session_id="x", identity="local:eve", call_id="x")
        assert await reviewers.store.add_vote(forced, event, unexpired_at=ts)
        status = await client.call("approval_status", request_id=request.id)
    assert status.structured["state"] == "pending" and "api_keys" in tables(sqlite_shop)


async def test_a_vote_not_signed_by_the_reviewers_key_counts_for_nothing(tmp_path, sqlite_shop):
    config = approval_config(tmp_path, sqlite_connection(sqlite_shop), wait=0.3)
    async with guard_client(config, tmp_path) as client, desk(config) as reviewers:
        held = await client.call("execute", **DROP)
        request = await reviewers.request(held.structured["request_id"])
        ts = "2026-01-01T00:00:00.000000+00:00"
        payload = vote_payload(request, "dana", "approve", "", ts)
        forged = Vote(request.id, "dana", "approve", "", ts, payload, reviewers.signer("omar").sign(payload))
        event = AuditEvent(type=EventType.APPROVAL_VOTE, session_id="x", identity="local:dana", call_id="x")
        assert await reviewers.store.add_vote(forged, event, unexpired_at=ts)
        # and someone with write access to the store marks it approved
        approved = AuditEvent(
            type=EventType.APPROVAL_APPROVED, session_id="x", identity="local:dana", call_id="x"
        )
        assert await reviewers.store.transition_approval(
            request.id, ApprovalState.PENDING, ApprovalState.APPROVED, approved, {}
        )
        status = await client.call("approval_status", request_id=request.id)
    assert status.is_error
    assert "marked approved, but its votes do not prove it" in status.text
    assert "not signed with that reviewer's key" in status.text
    assert "api_keys" in tables(sqlite_shop)


async def test_an_approval_runs_only_the_stored_statement_for_its_requester(tmp_path, sqlite_shop):
    config = approval_config(tmp_path, sqlite_connection(sqlite_shop), wait=0.3)
    async with guard_client(config, tmp_path) as client, desk(config) as reviewers:
        held = await client.call("execute", **DROP)
        request_id = held.structured["request_id"]
        await reviewers.vote(request_id, "dana")
        async with guard_client(config, tmp_path, USER="mallory", LOGNAME="mallory") as other:
            stolen = await other.call("approval_status", request_id=request_id)
        # the statement swapped in the store after the approval
        db = sqlite3.connect(tmp_path / "audit.db")
        db.execute(
            "UPDATE approval_requests SET body = replace(body, 'DROP TABLE api_keys', 'DROP TABLE customers')"
            " WHERE id = ?",
            (request_id,),
        )
        db.commit()
        db.close()
        swapped = await client.call("approval_status", request_id=request_id)
    assert stolen.is_error and f"made by {REQUESTER}; only the requester's own calls" in stolen.text
    assert swapped.is_error and "signed for another request, statement, parameters" in swapped.text
    assert {"api_keys", "customers"} <= tables(sqlite_shop)


async def test_concurrent_approval_status_calls_in_two_processes_run_it_once(tmp_path, sqlite_shop):
    policy = (
        '[[policy.rules]]\nname = "hold-inserts"\naction = "approve"\nkinds = ["write"]\n'
        'approvers = ["reviewers"]\n'
    )
    config = approval_config(tmp_path, sqlite_connection(sqlite_shop), policy=policy, wait=0.3)
    insert = "INSERT INTO orders (customer_id, total, status, created_at) VALUES (1, 9.99, 'once', 'now')"
    async with (
        guard_client(config, tmp_path) as first,
        guard_client(config, tmp_path) as second,
        desk(config) as reviewers,
    ):
        held = await first.call("execute", sql=insert, reason="one order")
        request_id = held.structured["request_id"]
        await reviewers.vote(request_id, "dana")
        replies = await asyncio.gather(
            *(
                client.call("approval_status", request_id=request_id)
                for client in (first, second, first, second)
            )
        )
    assert sum(not r.is_error for r in replies) == 1, [r.text for r in replies]
    assert all(
        "already ran" in r.text or "changed while it was being claimed" in r.text
        for r in replies
        if r.is_error
    )
    rows = (
        sqlite3.connect(sqlite_shop).execute("SELECT count(*) FROM orders WHERE status = 'once'").fetchone()
    )
    assert rows == (1,)


async def test_a_held_call_cancelled_by_its_client_is_recorded_and_stays_decidable(tmp_path, sqlite_shop):
    config = approval_config(tmp_path, sqlite_connection(sqlite_shop))
    async with guard_client(config, tmp_path) as client, desk(config) as reviewers:
        with anyio.move_on_after(1.0):
            await client.call("execute", **DROP)
        request = await reviewers.next_request()
        await reviewers.vote(request.id, "dana")
        ran = await client.call("approval_status", request_id=request.id)
    assert not ran.is_error and "api_keys" not in tables(sqlite_shop)
    execute = next(c for c in audit(tmp_path) if c["request"]["tool"] == "execute")
    assert execute["outcome"]["detail"]["status"] == "cancelled"


async def test_list_connections_says_what_waits_for_approval(tmp_path, sqlite_shop):
    config = approval_config(tmp_path, sqlite_connection(sqlite_shop))
    async with guard_client(config, tmp_path) as client:
        listed = await client.call("list_connections")
    [shop] = listed.structured["connections"]
    assert shop["execute"] == ["read", "write"] and shop["execute_with_approval"] == ["ddl"]


async def test_the_audit_chain_holds_every_step_and_verifies(tmp_path, sqlite_shop):
    config = approval_config(tmp_path, sqlite_connection(sqlite_shop))
    async with guard_client(config, tmp_path) as client, desk(config) as reviewers:
        call = asyncio.create_task(client.call("execute", **DROP))
        await reviewers.vote((await reviewers.next_request()).id, "dana", reason="agreed")
        await settled(call)
        report = await reviewers.store.verify()
    assert report.ok, report.problem
    [held] = [c for c in audit(tmp_path) if c["request"]["tool"] == "execute"]
    steps = {e["type"]: e for e in held["trail"]}
    assert list(steps) == [
        "approval_requested",
        "approval_vote",
        "approval_approved",
        "approval_executed",
        "approval_outcome",
    ]
    assert steps["approval_requested"]["detail"]["statements"] == ["DROP TABLE api_keys"]
    assert steps["approval_vote"]["identity"] == "local:dana"
    assert steps["approval_outcome"]["detail"]["status"] == "ok"
    assert held["outcome"]["detail"]["approval"]["state"] == "executed"


# PostgreSQL: the planner's estimate decides whether a DELETE is held ---------------------------------


async def test_a_large_delete_is_held_by_the_planners_estimate_and_a_small_one_runs(
    tmp_path, pg_shop_url, monkeypatch
):
    monkeypatch.setenv("SHOP_PG_URL", pg_shop_url)
    conn = await asyncpg.connect(pg_shop_url)
    try:
        extra = await conn.fetchval(
            "INSERT INTO payments (order_id, amount, method, paid_at)"
            " VALUES (1, 1, 'test', now()) RETURNING id"
        )
        await conn.execute("ANALYZE payments")
        before = await conn.fetchval("SELECT count(*) FROM payments")
    finally:
        await conn.close()
    config = approval_config(tmp_path, '[connections.pg]\nurl_env = "SHOP_PG_URL"\n', wait=0.3)
    async with guard_client(config, tmp_path, SHOP_PG_URL=pg_shop_url) as client, desk(config) as reviewers:
        small = await client.call(
            "execute", sql="DELETE FROM payments WHERE id = $1", params=[extra], reason="dup"
        )
        large = await client.call(
            "execute", sql="DELETE FROM payments WHERE id > $1", params=[20], reason="purge"
        )
        request = await reviewers.request(large.structured["request_id"])
    assert not small.is_error and small.structured["rows_affected"] == 1
    assert large.structured["state"] == "pending" and request.rule == "hold-large-delete"
    [estimate] = request.details["estimated_rows"]
    actual = before - 20 - 1  # ids above 20, the test's own row included and gone
    assert abs(estimate - actual) <= 5, (estimate, actual)
    assert request.params == (20,)
    conn = await asyncpg.connect(pg_shop_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM payments") == before - 1
    finally:
        await conn.close()


async def test_a_damaged_approval_record_is_refused_clearly_and_the_server_serves_on(tmp_path, sqlite_shop):
    config = approval_config(tmp_path, sqlite_connection(sqlite_shop), wait=0.2)
    async with guard_client(config, tmp_path) as client:
        held = await client.call("execute", **DROP)
        request_id = held.structured["request_id"]
        db = sqlite3.connect(tmp_path / "audit.db")
        db.execute("UPDATE approval_requests SET body = '{not json' WHERE id = ?", (request_id,))
        db.commit()
        db.close()
        status = await client.call("approval_status", request_id=request_id)
        after = await client.call("query", sql="SELECT count(*) FROM api_keys")
    assert status.is_error
    assert f"approval request {request_id}: its stored record is damaged" in status.text
    assert not after.is_error and "api_keys" in tables(sqlite_shop)


async def test_query_refuses_a_read_a_rule_holds_for_approval(tmp_path, sqlite_shop):
    policy = (
        '[[policy.rules]]\nname = "payments-need-a-reviewer"\naction = "approve"\ntables = ["payments"]\n'
        'approvers = ["reviewers"]\n\n[[policy.rules]]\nname = "reads"\naction = "allow"\nkinds = ["read"]\n'
    )
    config = approval_config(tmp_path, sqlite_connection(sqlite_shop), policy=policy)
    async with guard_client(config, tmp_path) as client:
        read = await client.call("query", sql="SELECT count(*) FROM payments")
        other = await client.call("query", sql="SELECT count(*) FROM orders")
    assert read.is_error and "rule 'payments-need-a-reviewer' holds this" in read.text
    assert "only `execute` can wait for one" in read.text and "rows" not in (read.structured or {})
    assert other.structured["rows"] == [[240]]


async def test_a_held_write_that_reads_masked_data_is_refused_before_any_reviewer_is_asked(
    tmp_path, sqlite_shop
):
    policy = (
        '[[policy.rules]]\nname = "hold-writes"\naction = "approve"\nkinds = ["write"]\n'
        'approvers = ["reviewers"]\n\n'
        '[[masking.rules]]\nname = "contact"\ncolumns = ["*.email"]\nstrategy = "partial"\n'
    )
    config = approval_config(tmp_path, sqlite_connection(sqlite_shop), policy=policy, wait=0.2)
    async with guard_client(config, tmp_path) as client, desk(config) as reviewers:
        copied = await client.call(
            "execute", sql="UPDATE customers SET notes = email WHERE id = 1", reason="keep a copy"
        )
        plain = await client.call("execute", sql="UPDATE orders SET status = 'x' WHERE id = 1", reason="fix")
        requests = await reviewers.store.list_approvals()
    assert copied.is_error and "masking" in copied.text
    assert plain.structured["state"] == "pending"
    assert [r.statements for r in requests] == [("UPDATE orders SET status = 'x' WHERE id = 1",)]
