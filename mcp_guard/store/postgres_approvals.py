"""Approval requests and votes in the team's PostgreSQL store, for `PostgresStore`.

A change of state and its audit entry commit in one transaction: the row is changed first (which
takes its row lock), then the entry is appended with `mcp_guard_append`, which takes the chain's
advisory lock; always in that order, so two gateways cannot deadlock. Compare-and-set is a single
`UPDATE ... WHERE state = $n`: PostgreSQL makes a second UPDATE of the row wait for the first to
commit and then re-checks its WHERE against the new row, so exactly one gateway's claim wins and the
row count says which. A vote locks its request row (`SELECT ... FOR UPDATE`), so it cannot slip in
beside a decision. Approval steps commit with `synchronous_commit = on` unless the store's
durability is "normal": a claim is the intent of a write.

Every such transaction also sends `NOTIFY mcp_guard_approvals` (delivered at commit): a gateway
waiting for a decision LISTENs on one connection of its own, opened while anyone waits, and wakes
as soon as a reviewer on any host decides, instead of polling.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from mcp_guard.approvals import ApprovalRequest, ApprovalState, Vote
from mcp_guard.errors import AuditError
from mcp_guard.store.base import REQUEST_COLUMNS, AuditEvent, ChangeWatch, SignalledWatch, check_changes
from mcp_guard.values import JsonValue

log = logging.getLogger(__name__)

CHANNEL = "mcp_guard_approvals"

DB_ERRORS = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    OSError,
    TimeoutError,
)
"""What a call through asyncpg may raise besides our own errors: each becomes an AuditError."""

SCHEMA = (
    """CREATE TABLE approval_requests (
        id text COLLATE "C" PRIMARY KEY,
        call_id text NOT NULL,
        session_id text NOT NULL,
        requester text NOT NULL,
        connection text NOT NULL,
        digest text NOT NULL,
        state text NOT NULL,
        created_at text COLLATE "C" NOT NULL,
        expires_at text COLLATE "C" NOT NULL,
        decided_at text,
        executed_at text,
        executed_by text,
        body text NOT NULL,
        outcome text
    )""",
    "CREATE INDEX approval_requests_state ON approval_requests (state, created_at)",
    """CREATE TABLE approval_votes (
        request_id text COLLATE "C" NOT NULL,
        reviewer text COLLATE "C" NOT NULL,
        decision text NOT NULL,
        reason text NOT NULL,
        ts text COLLATE "C" NOT NULL,
        payload bytea NOT NULL,
        proof text NOT NULL,
        PRIMARY KEY (request_id, reviewer)
    )""",
)
"""Created by migration 2 of the PostgreSQL store."""


Append = Callable[[asyncpg.Connection, AuditEvent, bool], Awaitable[int]]


@dataclass
class _Transaction:
    db: asyncpg.Connection
    appended: list[int] = field(default_factory=list)


class _Abort(Exception):
    """Roll the transaction back: the compare-and-set found another state."""


class PostgresApprovals:
    """The approval half of `PostgresStore`: `append` is its chained append inside a transaction,
    `appended` is told each committed entry's seq (the checkpointer counts them), `pool`, `connect`
    and `error` are the store's."""

    def __init__(
        self,
        *,
        pool: Callable[[], asyncpg.Pool],
        append: Append,
        appended: Callable[[int], Awaitable[None]],
        connect: Callable[[], Awaitable[asyncpg.Connection]],
        error: Callable[[str, BaseException], AuditError],
        synced: bool,
    ) -> None:
        self._pool = pool
        self._append_in = append
        self._appended = appended
        self._connect = connect
        self._error = error
        self._synced = synced
        self._watches: set[SignalledWatch] = set()
        self._listener: asyncpg.Connection | None = None
        self._listening = asyncio.Lock()

    async def close(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None and not listener.is_closed():
            with suppress(asyncpg.PostgresError, OSError):
                await listener.close(timeout=2)

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[_Transaction]:
        """One transaction that notifies the waiting gateways when it commits; `_Abort` rolls back."""
        try:
            async with self._pool().acquire() as db, db.transaction():
                transaction = _Transaction(db)
                yield transaction
                await db.execute("SELECT pg_notify($1, '')", CHANNEL)
        except DB_ERRORS as exc:
            raise self._error("the approval change was not recorded", exc) from None
        self._signal()
        for seq in transaction.appended:
            await self._appended(seq)

    async def _append(self, transaction: _Transaction, event: AuditEvent) -> None:
        transaction.appended.append(await self._append_in(transaction.db, event, self._synced))

    # writes -------------------------------------------------------------------------------------

    async def add(self, request: ApprovalRequest, event: AuditEvent) -> None:
        async with self._transaction() as tx:
            db = tx.db
            await db.execute(
                f"INSERT INTO approval_requests ({REQUEST_COLUMNS}) VALUES "
                f"({', '.join(f'${i}' for i in range(1, 15))})",
                request.id,
                request.call_id,
                request.session_id,
                request.requester,
                request.connection,
                request.digest,
                str(request.state),
                request.created_at,
                request.expires_at,
                request.decided_at,
                request.executed_at,
                request.executed_by,
                json.dumps(request.body(), ensure_ascii=False),
                None,
            )
            await self._append(tx, event)

    async def add_vote(self, vote: Vote, event: AuditEvent, unexpired_at: str) -> bool:
        try:
            async with self._transaction() as tx:
                db = tx.db
                pending = await db.fetchval(
                    "SELECT 1 FROM approval_requests WHERE id = $1 AND state = 'pending' AND expires_at > $2"
                    " FOR UPDATE",
                    vote.request_id,
                    unexpired_at,
                )
                if pending is None:
                    raise _Abort
                status = await db.execute(
                    "INSERT INTO approval_votes (request_id, reviewer, decision, reason, ts, payload, proof)"
                    " VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
                    vote.request_id,
                    vote.reviewer,
                    vote.decision,
                    vote.reason,
                    vote.ts,
                    vote.payload,
                    vote.proof,
                )
                if status != "INSERT 0 1":
                    raise _Abort
                await self._append(tx, event)
        except _Abort:
            return False
        return True

    async def transition(
        self,
        request_id: str,
        expected: ApprovalState,
        target: ApprovalState,
        event: AuditEvent,
        changes: Mapping[str, JsonValue],
        unexpired_at: str | None,
    ) -> bool:
        check_changes(changes)
        params: list[Any] = [str(target), *changes.values(), request_id, str(expected)]
        assignments = "".join(f", {name} = ${i}" for i, name in enumerate(changes, 2))
        n = len(changes) + 2
        sql = f"UPDATE approval_requests SET state = $1{assignments} WHERE id = ${n} AND state = ${n + 1}"
        if unexpired_at is not None:
            sql += f" AND expires_at > ${n + 2}"
            params.append(unexpired_at)
        try:
            async with self._transaction() as tx:
                db = tx.db
                if await db.execute(sql, *params) != "UPDATE 1":
                    raise _Abort
                await self._append(tx, event)
        except _Abort:
            return False
        return True

    async def finish(self, request_id: str, outcome: Mapping[str, JsonValue], event: AuditEvent) -> None:
        async with self._transaction() as tx:
            db = tx.db
            await db.execute(
                "UPDATE approval_requests SET outcome = $1 WHERE id = $2 AND state = 'executed'",
                json.dumps(dict(outcome), ensure_ascii=False),
                request_id,
            )
            await self._append(tx, event)

    # reads --------------------------------------------------------------------------------------

    async def get(self, request_id: str) -> ApprovalRequest | None:
        found = await self._read(
            f"SELECT {REQUEST_COLUMNS} FROM approval_requests WHERE id = $1", [request_id]
        )
        return found[0] if found else None

    async def listing(self, states: Collection[ApprovalState] | None, limit: int) -> list[ApprovalRequest]:
        sql = f"SELECT {REQUEST_COLUMNS} FROM approval_requests"
        params: list[Any] = []
        if states is not None:
            params.append([str(state) for state in states])
            sql += " WHERE state = ANY($1::text[])"
        params.append(limit)
        sql += f" ORDER BY created_at DESC, id LIMIT ${len(params)}"
        return await self._read(sql, params)

    async def _read(self, sql: str, params: list[Any]) -> list[ApprovalRequest]:
        try:
            async with (
                self._pool().acquire() as db,
                db.transaction(isolation="repeatable_read", readonly=True),
            ):
                rows = list(await db.fetch(sql, *params))
                votes = await db.fetch(
                    "SELECT request_id, reviewer, decision, reason, ts, payload, proof"
                    " FROM approval_votes WHERE request_id = ANY($1::text[]) ORDER BY ts, reviewer",
                    [row[0] for row in rows],
                )
        except DB_ERRORS as exc:
            raise self._error("cannot read its approval requests", exc) from None
        by_request: dict[str, list[Vote]] = {}
        for request_id, reviewer, decision, reason, ts, payload, proof in votes:
            by_request.setdefault(request_id, []).append(
                Vote(request_id, reviewer, decision, reason, ts, bytes(payload), proof)
            )
        return [ApprovalRequest.from_row(row, tuple(by_request.get(row[0], ()))) for row in rows]

    # watching -----------------------------------------------------------------------------------

    @asynccontextmanager
    async def watch(self) -> AsyncIterator[ChangeWatch]:
        """LISTEN is in place before this yields, so a decision committed after the caller's next read
        is never missed; the listening connection closes when the last watch ends."""
        watch = SignalledWatch()
        await self._listen()
        self._watches.add(watch)
        try:
            yield watch
        finally:
            self._watches.discard(watch)
            if not self._watches:
                await self.close()

    async def _listen(self) -> None:
        async with self._listening:
            if self._listener is not None and not self._listener.is_closed():
                return
            listener = await self._connect()
            try:
                await listener.add_listener(CHANNEL, self._notified)
            except DB_ERRORS as exc:
                await listener.close()
                raise self._error("cannot watch its approval requests", exc) from None
            listener.add_termination_listener(self._lost)
            self._listener = listener

    def _notified(self, *_: object) -> None:
        self._signal()

    def _lost(self, *_: object) -> None:
        """The listening connection died: wake every waiter (each re-reads) and listen anew next time."""
        log.warning("lost the connection that watches approvals; waiting calls re-read and listen again")
        self._listener = None
        self._signal()

    def _signal(self) -> None:
        for watch in self._watches:
            watch.signal()
