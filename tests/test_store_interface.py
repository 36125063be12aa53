"""The Store interface, one suite run against both engines: SQLite and the team's PostgreSQL.

Every test gets an empty store of each engine (`store_url` in conftest.py): a new SQLite file, or
the test session's PostgreSQL database on 127.0.0.1, emptied.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import closing
from typing import Any

import asyncpg
import pytest

from mcp_guard.approvals import ApprovalRequest, ApprovalState, Vote
from mcp_guard.errors import AuditError, UsageError
from mcp_guard.policy import Requirement
from mcp_guard.store import chain, open_store
from mcp_guard.store.base import (
    AuditEvent,
    AuditFilter,
    CallFilter,
    EventType,
    Store,
    StoredCheckpoint,
    VerifyReport,
)
from mcp_guard.store.commands import copy_store
from mcp_guard.store.postgres import SCHEMA_VERSION
from mcp_guard.store.sqlite import Durability
from tests.test_audit_store import call_events
from tests.test_store import event


async def opened(url: str, durability: Durability = "writes") -> Store:
    store = open_store(url, durability=durability)
    await store.migrate()
    await store.open()
    return store


async def verify(url: str) -> VerifyReport:
    store = await opened(url)
    try:
        return await store.verify()
    finally:
        await store.close()


async def run_sql(url: str, sql: str) -> None:
    """Change the store behind its back, as its database's administrator could."""
    if url.startswith("sqlite:///"):
        with closing(sqlite3.connect(url.removeprefix("sqlite://"))) as db:
            db.execute(sql)
            db.commit()
        return
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    store = await opened(store_url)
    yield store
    await store.close()


async def test_appended_events_come_back_with_the_exact_bytes_that_were_hashed(store: Store) -> None:
    events = [event(1), event(2, detail={"emoji": "🔒", "quote": '"\\\n'}, tool=None, decision=None)]
    for item in events:
        await store.append(item)
    records = await store.query(AuditFilter())
    assert [r.event for r in records] == events
    assert [r.body for r in records] == [chain.canonical(e) for e in events]
    assert records[0].prev_hash == chain.GENESIS.hex()
    assert records[1].prev_hash == records[0].hash
    assert records[1].hash == chain.link(2, bytes.fromhex(records[0].hash), records[1].body).hex()


async def test_concurrent_appends_are_each_recorded_once_in_call_order(store: Store) -> None:
    await asyncio.gather(*(store.append(event(n)) for n in range(50)))
    records = await store.query(AuditFilter())
    assert [r.event.detail["n"] for r in records] == list(range(50))
    assert [r.seq for r in records] == list(range(1, 51))
    assert (await store.verify()).ok


async def test_indexed_text_with_quotes_escapes_and_emoji_is_found_and_verifies(store: Store) -> None:
    odd = ['alice","identity":"eve', "back\\slash", "line\u2028break", "tab\there", "🔒", ""]
    for n, text in enumerate(odd):
        await store.append(event(n, session_id=text, identity=text or "x", tool=text, call_id=text))
    for n, text in enumerate(odd):
        assert [r.seq for r in await store.query(AuditFilter(session_id=text))] == [n + 1]
    assert (await store.verify()).ok


async def test_an_event_that_cannot_be_encoded_fails_alone(store: Store) -> None:
    results = await asyncio.gather(
        store.append(event(1)),
        store.append(event(2, detail={"at": object()})),
        store.append(event(3)),
        return_exceptions=True,
    )
    assert results[0] == 1 and results[2] == 2
    assert isinstance(results[1], AuditError) and "detail.at holds a value of type object" in str(results[1])
    assert [r.event.call_id for r in await store.query(AuditFilter())] == ["call-1", "call-3"]


async def test_every_filter_selects_exactly_the_matching_entries(store: Store) -> None:
    entries = [
        event(1, session_id="s1", identity="alice", tool="query", decision="allow"),
        event(2, session_id="s1", identity="alice", tool="execute", decision="deny", type=EventType.OUTCOME),
        event(3, session_id="s2", identity="bob", tool="query", decision=None, call_id=None),
        event(4, session_id="s2", identity="bob", tool="list_tables", decision="allow"),
        event(5, session_id="s3", identity="alice", tool=None, decision=None, type=EventType.SESSION_END),
    ]
    for item in entries:
        await store.append(item)

    async def seqs(**fields: Any) -> list[int]:
        return [r.seq for r in await store.query(AuditFilter(**fields))]

    assert await seqs() == [1, 2, 3, 4, 5]
    assert await seqs(session_id="s2") == [3, 4]
    assert await seqs(identity="alice") == [1, 2, 5]
    assert await seqs(tool="query") == [1, 3]
    assert await seqs(decision="allow") == [1, 4]
    assert await seqs(call_id="call-2") == [2]
    assert await seqs(type=EventType.OUTCOME) == [2]
    assert await seqs(since="2026-11-01T10:00:03.000000+00:00") == [3, 4, 5]
    assert await seqs(until="2026-11-01T10:00:03Z") == [1, 2]
    assert await seqs(since="2026-11-01T12:00:02+02:00", until="2026-11-01T10:00:04") == [2, 3]
    assert await seqs(identity="alice", session_id="s1", decision="deny") == [2]
    assert await seqs(limit=2) == [4, 5]
    assert await seqs(identity="alice", limit=2) == [2, 5]
    assert await seqs(limit=0) == []
    assert await seqs(identity="carol") == []


async def test_bad_filter_values_are_usage_errors(store: Store) -> None:
    with pytest.raises(UsageError, match="since: 'yesterday' is not an ISO 8601 time"):
        await store.query(AuditFilter(since="yesterday"))
    with pytest.raises(UsageError, match="limit must be 0 or more"):
        await store.query(AuditFilter(limit=-1))


async def test_close_records_appends_still_waiting(store_url: str) -> None:
    store = await opened(store_url)
    waiting = [asyncio.create_task(store.append(event(n))) for n in range(10)]
    await asyncio.sleep(0)
    await store.close()
    assert all(task.done() and task.exception() is None for task in waiting)
    report = await verify(store_url)
    assert (report.ok, report.entries) == (True, 10)
    with pytest.raises(AuditError, match="is not open"):
        await store.append(event(11))


async def test_an_empty_store_verifies(store: Store) -> None:
    assert await store.verify() == VerifyReport(ok=True, entries=0, head_hash=None)


@pytest.mark.parametrize("durability", ["writes", "full", "normal"])
async def test_durable_and_ordinary_appends_share_one_chain_in_call_order(
    store_url: str, durability: Durability
) -> None:
    """Durable entries commit synced (SQLite: a second connection; PostgreSQL: synchronous_commit on);
    the chain does not fork between them."""
    store = await opened(store_url, durability)
    try:
        await asyncio.gather(*(store.append(event(n), durable=n % 3 == 0) for n in range(30)))
        records = await store.query(AuditFilter())
        assert [r.event.detail["n"] for r in records] == list(range(30))
        assert (await store.verify()) == VerifyReport(True, 30, records[-1].hash)
    finally:
        await store.close()


async def test_migrate_is_safe_to_run_twice_and_reports_the_version(store_url: str) -> None:
    store = open_store(store_url)
    found, now = await store.migrate()
    assert now >= 1 and await store.migrate() == (now, now)
    assert found in (0, now)


async def test_head_first_seq_and_entry_hashes_follow_the_chain(store: Store) -> None:
    assert (await store.head(), await store.first_seq()) == (None, None)
    for n in range(1, 6):
        await store.append(event(n))
    records = await store.entries(2, 4)
    assert [r.seq for r in records] == [2, 3, 4]
    assert await store.head() == (5, (await store.entries(5, 5))[0].hash)
    assert await store.first_seq() == 1
    assert await store.entry_hash(3) == records[1].hash and await store.entry_hash(99) is None
    assert await store.first_at_or_after("2026-11-01T10:00:03Z") == 3
    assert await store.first_at_or_after("2030-01-01") is None


async def test_session_and_call_ids_are_found_by_prefix(store: Store) -> None:
    for n, session in enumerate(["alpha-1", "alpha-2", "beta-1"]):
        await store.append(event(n, type=EventType.SESSION_START, session_id=session, call_id=None))
    await store.append(event(7, call_id="call-x1"))
    await store.append(event(8, call_id="call-x2"))
    assert await store.session_ids("alpha", 10) == ["alpha-2", "alpha-1"]
    assert await store.session_ids("", 2) == ["beta-1", "alpha-2"]
    assert await store.call_ids("call-x", 10) == ["call-x1", "call-x2"]


async def test_calls_are_read_whole_and_filtered_by_request_and_outcome(store: Store) -> None:
    ts = "2026-01-05T10:00:00.000000+00:00"
    events = call_events(3, ts) + call_events(2, ts, kind="read", session="s2")
    decided = AuditEvent(EventType.TOOL_USE, "s1", "local:bob", "s1-call-1", detail={"approver": "local:bob"})
    for item in events[:3] + [decided] + events[3:]:
        await store.append(item)

    async def ids(**fields: Any) -> list[str]:
        return [str(call[0].event.call_id) async for call in store.calls(CallFilter(**fields))]

    assert await ids() == ["s1-call-0", "s1-call-1", "s1-call-2", "s2-call-0", "s2-call-1"]
    assert await ids(writes=True) == ["s1-call-0", "s1-call-1", "s1-call-2"]
    assert await ids(kind="read", limit=1) == ["s2-call-1"]
    assert await ids(table="public.orders") == [] and len(await ids(table="ORDERS")) == 5
    assert await ids(text="total = 2") == ["s1-call-2"]
    assert await ids(approver="local:bob") == ["s1-call-1"]
    assert await ids(session_id="s2", decision="allow") == ["s2-call-0", "s2-call-1"]
    trail = [call async for call in store.calls(CallFilter(approver="local:bob"))][0]
    assert [r.event.type for r in trail] == [EventType.REQUEST, EventType.TOOL_USE, EventType.OUTCOME]
    assert [r.seq for r in await store.query(AuditFilter(table="orders", kind="write"))] == [2, 5, 7]


async def test_stats_count_calls_writes_and_masked_cells_by_identity_and_day(store: Store) -> None:
    for item in call_events(4, "2026-01-05T10:00:00.000000+00:00") + call_events(
        1, "2026-01-06T10:00:00.000000+00:00", kind="read", session="s2"
    ):
        await store.append(item)
    rows = await store.stats(CallFilter())
    assert [(r.day, r.identity, r.calls, r.writes, r.denied, r.masked_cells) for r in rows] == [
        ("2026-01-05", "local:alice", 4, 4, 0, 6),
        ("2026-01-06", "local:alice", 1, 0, 0, 0),
    ]


async def test_an_edited_column_and_a_deleted_entry_are_named_by_verify(store_url: str) -> None:
    store = await opened(store_url)
    for n in range(1, 11):
        await store.append(event(n))
    await store.close()
    await run_sql(store_url, "UPDATE audit SET identity = 'mallory' WHERE seq = 3")
    report = await verify(store_url)
    assert (report.ok, report.first_bad_seq, report.entries) == (False, 3, 2)
    assert "column identity says 'mallory'" in str(report.problem)
    await run_sql(store_url, "UPDATE audit SET identity = 'alice' WHERE seq = 3")
    await run_sql(store_url, "DELETE FROM audit WHERE seq = 7")
    assert (await verify(store_url)).problem == "entry 7: expected seq 7 but found 8 (an entry is missing)"


async def test_an_altered_derived_index_column_is_named_by_verify(store_url: str) -> None:
    store = await opened(store_url)
    for item in call_events(2, "2026-01-05T10:00:00.000000+00:00"):
        await store.append(item)
    await store.close()
    await run_sql(store_url, "UPDATE audit SET kind = 'read' WHERE seq = 4")
    report = await verify(store_url)
    assert report.first_bad_seq == 4 and "index columns kind/tables disagree" in str(report.problem)


async def test_checkpoints_are_kept_and_prune_keeps_the_chain_verifiable_from_the_checkpoint(
    store: Store,
) -> None:
    for n in range(1, 11):
        await store.append(event(n))
    fourth = StoredCheckpoint(4, str(await store.entry_hash(4)), "checkpoint text 4")
    await store.add_checkpoint(StoredCheckpoint(2, str(await store.entry_hash(2)), "checkpoint text 2"))
    assert [c.entries for c in await store.checkpoints()] == [2]
    with pytest.raises(AuditError, match="entry 5 is not the one the checkpoint vouches for"):
        await store.prune(StoredCheckpoint(5, fourth.head, "wrong"))
    assert await store.prune(fourth) == 4
    assert await store.checkpoints() == [fourth]
    assert await store.first_seq() == 5
    report = await store.verify(base=(4, bytes.fromhex(fourth.head)))
    assert (report.ok, report.first_seq, report.entries) == (True, 5, 10)
    assert not (await store.verify()).ok  # without the checkpoint, entry 5 seems to follow nothing
    with pytest.raises(UsageError, match="newest entry is always kept"):
        await store.prune(StoredCheckpoint(10, str(await store.entry_hash(10)), "all"))
    await store.append(event(11))
    assert (await store.verify(base=(4, bytes.fromhex(fourth.head)))).ok


async def test_a_copy_keeps_every_entry_hash_and_checkpoint_and_refuses_another_chain(
    store: Store, tmp_path: Any
) -> None:
    source = await opened(f"sqlite:///{tmp_path / 'source.db'}")
    try:
        for n in range(1, 13):
            await source.append(event(n, detail={"n": n, "é": "🔒"}))
        head = await source.entry_hash(3)
        await source.prune(StoredCheckpoint(3, str(head), "signed checkpoint at 3"))
        copied, report = await copy_store(source, store)
        assert copied == 9 and (report.ok, report.first_seq, report.entries) == (True, 4, 12)
        assert [r.body for r in await store.entries(1, 99)] == [r.body for r in await source.entries(1, 99)]
        assert await store.checkpoints() == await source.checkpoints()
        assert (await copy_store(source, store))[0] == 0  # resumes at the target's head: nothing left
        await source.append(event(13))
        assert (await copy_store(source, store))[0] == 1
        assert await store.head() == await source.head()
    finally:
        await source.close()
    other = await opened(f"sqlite:///{tmp_path / 'other.db'}")
    try:
        await other.append(event(99))
        with pytest.raises(UsageError, match="already holds another chain"):
            await copy_store(other, store)
    finally:
        await other.close()


async def test_a_newer_schema_is_refused_naming_the_versions(store_url: str) -> None:
    store = await opened(store_url)
    await store.close()
    if store_url.startswith("sqlite"):
        await run_sql(store_url, "PRAGMA user_version = 99")
    else:
        await run_sql(store_url, "UPDATE mcp_guard_schema SET version = 99")
    try:
        for attempt in (store.open, store.migrate):
            with pytest.raises(AuditError, match="schema version 99; this one understands up to"):
                await attempt()
    finally:
        if not store_url.startswith("sqlite"):
            await run_sql(store_url, f"UPDATE mcp_guard_schema SET version = {SCHEMA_VERSION}")


# approvals -------------------------------------------------------------------------------------------


def approval_request(
    request_id: str = "req-1", expires_at: str = "2999-01-01T00:00:00+00:00"
) -> ApprovalRequest:
    return ApprovalRequest(
        id=request_id,
        call_id=f"call-{request_id}",
        session_id="s1",
        requester="local:alice",
        connection="shop",
        statements=("DROP TABLE api_keys",),
        params=(),
        digest="d" * 64,
        reason="keys moved",
        rule="hold-ddl",
        requirements=(Requirement("hold-ddl", ("reviewers",), 1),),
        details={"kind": "ddl"},
        state=ApprovalState.PENDING,
        created_at="2026-11-01T10:00:00+00:00",
        expires_at=expires_at,
    )


def step(request_id: str, what: EventType) -> AuditEvent:
    return AuditEvent(what, "s1", "local:alice", call_id=f"call-{request_id}", detail={"request": request_id})


def vote(request_id: str, reviewer: str) -> Vote:
    return Vote(request_id, reviewer, "approve", "fine", "2026-11-01T10:01:00+00:00", b"payload", "proof")


async def test_approval_requests_and_votes_are_stored_with_their_entries_in_the_chain(store: Store) -> None:
    await store.add_approval(approval_request(), step("req-1", EventType.APPROVAL_REQUESTED))
    await store.add_approval(approval_request("req-2"), step("req-2", EventType.APPROVAL_REQUESTED))
    now = "2026-11-01T10:01:00+00:00"
    assert await store.add_vote(
        vote("req-1", "local:dana"), step("req-1", EventType.APPROVAL_VOTE), unexpired_at=now
    )
    assert not await store.add_vote(
        vote("req-1", "local:dana"), step("req-1", EventType.APPROVAL_VOTE), unexpired_at=now
    ), "one vote per reviewer"
    assert not await store.add_vote(
        vote("req-9", "local:dana"), step("req-9", EventType.APPROVAL_VOTE), unexpired_at=now
    ), "no vote on a request that does not exist"
    found = await store.get_approval("req-1")
    assert found is not None and found.statements == ("DROP TABLE api_keys",)
    assert [v.reviewer for v in found.votes] == ["local:dana"] and found.votes[0].payload == b"payload"
    assert sorted(r.id for r in await store.list_approvals([ApprovalState.PENDING])) == ["req-1", "req-2"]
    assert await store.list_approvals([ApprovalState.EXECUTED]) == []
    types = [r.event.type for r in await store.query(AuditFilter())]
    assert types == [EventType.APPROVAL_REQUESTED, EventType.APPROVAL_REQUESTED, EventType.APPROVAL_VOTE]
    assert (await store.verify()).ok


async def test_a_transition_is_a_compare_and_set_that_one_racer_wins(store_url: str, store: Store) -> None:
    await store.add_approval(approval_request(), step("req-1", EventType.APPROVAL_REQUESTED))
    assert await store.transition_approval(
        "req-1",
        ApprovalState.PENDING,
        ApprovalState.APPROVED,
        step("req-1", EventType.APPROVAL_APPROVED),
        {"decided_at": "2026-11-01T10:02:00+00:00"},
    )
    other = await opened(store_url)  # another gateway on the same store
    try:
        won = await asyncio.gather(
            *(
                racer.transition_approval(
                    "req-1",
                    ApprovalState.APPROVED,
                    ApprovalState.EXECUTED,
                    step("req-1", EventType.APPROVAL_EXECUTED),
                    {"executed_at": "2026-11-01T10:03:00+00:00", "executed_by": f"gw-{n}"},
                )
                for n, racer in enumerate([store, other] * 4)
            )
        )
    finally:
        await other.close()
    assert won.count(True) == 1
    await store.finish_approval("req-1", {"status": "ok"}, step("req-1", EventType.APPROVAL_OUTCOME))
    done = await store.get_approval("req-1")
    assert done is not None and done.state is ApprovalState.EXECUTED and done.outcome == {"status": "ok"}
    assert done.executed_by == f"gw-{won.index(True)}"
    executed = [r for r in await store.query(AuditFilter(type=EventType.APPROVAL_EXECUTED))]
    assert len(executed) == 1 and (await store.verify()).ok
    assert not await store.transition_approval(
        "req-1", ApprovalState.PENDING, ApprovalState.DENIED, step("req-1", EventType.APPROVAL_DENIED), {}
    )


async def test_a_watch_hears_a_change_made_through_another_store(store_url: str, store: Store) -> None:
    await store.add_approval(approval_request(), step("req-1", EventType.APPROVAL_REQUESTED))
    other = await opened(store_url)  # the reviewer's host
    try:
        async with store.watch_approvals() as changes:
            assert not await changes.wait(0.3)
            started = time.monotonic()
            deciding = asyncio.create_task(
                other.transition_approval(
                    "req-1",
                    ApprovalState.PENDING,
                    ApprovalState.DENIED,
                    step("req-1", EventType.APPROVAL_DENIED),
                    {"decided_at": "2026-11-01T10:02:00+00:00"},
                )
            )
            assert await changes.wait(5)
            heard = time.monotonic() - started
            assert await deciding
    finally:
        await other.close()
    found = await store.get_approval("req-1")
    assert found is not None and found.state is ApprovalState.DENIED
    assert heard < 1.0


async def test_a_sqlite_watch_starts_from_now_even_when_another_watch_is_already_waiting(tmp_path) -> None:
    """A change committed before a watch began is not news to it (a reviewer's long poll that
    answered "changed" for it would re-list for nothing), but still wakes the watch that was waiting.
    SQLite's poller knows when each watch began; PostgreSQL's notification of a commit may arrive
    after a watch began, a wake-up the watch's contract ("may have changed") allows."""
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    store, other = await opened(url), await opened(url)
    try:
        await store.add_approval(approval_request(), step("req-1", EventType.APPROVAL_REQUESTED))
        async with store.watch_approvals() as earlier:
            assert await other.transition_approval(
                "req-1",
                ApprovalState.PENDING,
                ApprovalState.DENIED,
                step("req-1", EventType.APPROVAL_DENIED),
                {"decided_at": "2026-11-01T10:02:00+00:00"},
            )
            async with store.watch_approvals() as later:
                assert not await later.wait(0.5)
            assert await earlier.wait(1)
    finally:
        await other.close()
        await store.close()
