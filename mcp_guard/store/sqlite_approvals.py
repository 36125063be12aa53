"""Approval requests and votes in the audit store's SQLite file, for `SqliteStore`.

They live on a connection of their own, opened on first use, so that a change of state and its
audit entry commit in one `BEGIN IMMEDIATE` transaction: the append is the store's own one-statement
chained insert, which links onto the head it reads under the same write lock. The connection syncs
every commit (`synchronous=FULL`) unless the store's durability is "normal": a claim is the intent
of a write, and the audit's promise is that intent is on disk before the write runs. Compare-and-set is a
single `UPDATE ... WHERE state = ?` whose row count says who won, across threads and processes.

Another process's decision is seen by polling `PRAGMA data_version` (it changes when any other
connection commits) every `POLL_S` seconds, and only while someone waits: about 0.1 ms a poll.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosqlite

from mcp_guard.approvals import ApprovalRequest, ApprovalState, Vote
from mcp_guard.errors import AuditError
from mcp_guard.store import chain
from mcp_guard.store.base import REQUEST_COLUMNS, AuditEvent, ChangeWatch, SignalledWatch, check_changes
from mcp_guard.values import JsonValue

log = logging.getLogger(__name__)

POLL_S = 0.15

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS approval_requests (
        id TEXT PRIMARY KEY,
        call_id TEXT NOT NULL,
        session_id TEXT NOT NULL,
        requester TEXT NOT NULL,
        connection TEXT NOT NULL,
        digest TEXT NOT NULL,
        state TEXT NOT NULL,
        created_at TEXT NOT NULL,
        expires_at TEXT NOT NULL,
        decided_at TEXT,
        executed_at TEXT,
        executed_by TEXT,
        body TEXT NOT NULL,
        outcome TEXT
    ) STRICT""",
    "CREATE INDEX IF NOT EXISTS approval_requests_state ON approval_requests (state, created_at)",
    """CREATE TABLE IF NOT EXISTS approval_votes (
        request_id TEXT NOT NULL,
        reviewer TEXT NOT NULL,
        decision TEXT NOT NULL,
        reason TEXT NOT NULL,
        ts TEXT NOT NULL,
        payload BLOB NOT NULL,
        proof TEXT NOT NULL,
        PRIMARY KEY (request_id, reviewer)
    ) STRICT""",
)
"""Version 3 of the SQLite store's schema (store/sqlite.py); IF NOT EXISTS: older code made them."""
_ADD_VOTE = """
INSERT INTO approval_votes (request_id, reviewer, decision, reason, ts, payload, proof)
SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7 WHERE EXISTS (
    SELECT 1 FROM approval_requests WHERE id = ?1 AND state = 'pending' AND expires_at > ?8
)
ON CONFLICT DO NOTHING
"""


class SqliteApprovals:
    """The approval half of `SqliteStore`: `append_sql` and `meta` (an entry's indexed columns) are
    its chained insert, `appended` is told each committed entry's seq, `error` words failures."""

    def __init__(
        self,
        path: Path,
        *,
        busy_timeout: float,
        synchronous: str,
        append_sql: str,
        meta: Callable[[AuditEvent], str],
        appended: Callable[[int], Awaitable[None]],
        error: Callable[[str, BaseException], AuditError],
    ) -> None:
        self._path = path
        self._busy_timeout = busy_timeout
        self._synchronous = synchronous
        self._append_sql = append_sql
        self._meta = meta
        self._appended = appended
        self._error = error
        self._db: aiosqlite.Connection | None = None
        self._opening = asyncio.Lock()
        self._lock = asyncio.Lock()
        self._watches: set[SignalledWatch] = set()
        self._poller: asyncio.Task[None] | None = None
        self._baseline = asyncio.Event()
        self._version: int | None = None

    async def close(self) -> None:
        poller, self._poller = self._poller, None
        if poller is not None:
            poller.cancel()
            with suppress(asyncio.CancelledError):
                await poller
        db, self._db = self._db, None
        if db is not None:
            await db.close()

    async def _connection(self) -> aiosqlite.Connection:
        async with self._opening:
            if self._db is None:
                try:
                    db = await aiosqlite.connect(self._path, isolation_level=None)
                except sqlite3.Error as exc:
                    raise self._error("cannot open it", exc) from exc
                try:
                    await db.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
                    await db.execute("PRAGMA trusted_schema = OFF")
                    await db.execute(f"PRAGMA synchronous = {self._synchronous}")
                    await db.create_function("audit_link", 3, chain.link, deterministic=True)
                except BaseException as exc:
                    await db.close()
                    if isinstance(exc, sqlite3.Error):
                        raise self._error("cannot open it for approvals", exc) from exc
                    raise
                self._db = db
            return self._db

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[_Transaction]:
        """BEGIN IMMEDIATE ... COMMIT; any exception, or `_Abort`, rolls back. After the commit the
        store hears of the entries appended (its checkpointer counts them)."""
        db = await self._connection()
        transaction = _Transaction(db)
        async with self._lock:
            try:
                await db.execute("BEGIN IMMEDIATE")
                try:
                    yield transaction
                except BaseException:
                    await db.execute("ROLLBACK")
                    raise
                await db.execute("COMMIT")
            except sqlite3.Error as exc:
                raise self._error("the approval change was not recorded", exc) from exc
        self._signal()
        for seq in transaction.appended:
            await self._appended(seq)

    async def _append(self, transaction: _Transaction, event: AuditEvent) -> None:
        """The store's chained insert, for one entry: its body, and its indexed columns beside it."""
        body = chain.canonical(event).decode()
        rows = await transaction.db.execute_fetchall(  # RETURNING: read to the end before COMMIT
            self._append_sql,
            (json.dumps([body], ensure_ascii=False), chain.GENESIS, f"[{self._meta(event)}]"),
        )
        transaction.appended.extend(int(row[0]) for row in rows)

    # writes -------------------------------------------------------------------------------------

    async def add(self, request: ApprovalRequest, event: AuditEvent) -> None:
        async with self._transaction() as tx:
            await self._append(tx, event)
            await tx.db.execute(
                f"INSERT INTO approval_requests ({REQUEST_COLUMNS}) VALUES ({', '.join('?' * 14)})",
                (
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
                ),
            )

    async def add_vote(self, vote: Vote, event: AuditEvent, unexpired_at: str) -> bool:
        try:
            async with self._transaction() as tx:
                cursor = await tx.db.execute(
                    _ADD_VOTE,
                    (
                        vote.request_id,
                        vote.reviewer,
                        vote.decision,
                        vote.reason,
                        vote.ts,
                        vote.payload,
                        vote.proof,
                        unexpired_at,
                    ),
                )
                if cursor.rowcount != 1:
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
        assignments = "".join(f", {name} = ?" for name in changes)
        sql = f"UPDATE approval_requests SET state = ?{assignments} WHERE id = ? AND state = ?"
        params: list[Any] = [str(target), *changes.values(), request_id, str(expected)]
        if unexpired_at is not None:
            sql += " AND expires_at > ?"
            params.append(unexpired_at)
        try:
            async with self._transaction() as tx:
                cursor = await tx.db.execute(sql, params)
                if cursor.rowcount != 1:
                    raise _Abort
                await self._append(tx, event)
        except _Abort:
            return False
        return True

    async def finish(self, request_id: str, outcome: Mapping[str, JsonValue], event: AuditEvent) -> None:
        async with self._transaction() as tx:
            await tx.db.execute(
                "UPDATE approval_requests SET outcome = ? WHERE id = ? AND state = 'executed'",
                (json.dumps(dict(outcome), ensure_ascii=False), request_id),
            )
            await self._append(tx, event)

    # reads --------------------------------------------------------------------------------------

    async def get(self, request_id: str) -> ApprovalRequest | None:
        found = await self._read(
            f"SELECT {REQUEST_COLUMNS} FROM approval_requests WHERE id = ?", [request_id]
        )
        return found[0] if found else None

    async def listing(self, states: Collection[ApprovalState] | None, limit: int) -> list[ApprovalRequest]:
        sql = f"SELECT {REQUEST_COLUMNS} FROM approval_requests"
        params: list[Any] = []
        if states is not None:
            sql += f" WHERE state IN ({', '.join('?' * len(states))})"
            params.extend(str(state) for state in states)
        sql += " ORDER BY created_at DESC, id LIMIT ?"
        params.append(limit)
        return await self._read(sql, params)

    async def _read(self, sql: str, params: list[Any]) -> list[ApprovalRequest]:
        db = await self._connection()
        try:
            async with self._lock:
                rows = list(await db.execute_fetchall(sql, params))
                ids = [row[0] for row in rows]
                votes: list[Any] = []
                if ids:
                    votes = list(
                        await db.execute_fetchall(
                            "SELECT request_id, reviewer, decision, reason, ts, payload, proof"
                            f" FROM approval_votes WHERE request_id IN ({', '.join('?' * len(ids))})"
                            " ORDER BY ts, reviewer",
                            ids,
                        )
                    )
        except sqlite3.Error as exc:
            raise self._error("cannot read its approval requests", exc) from exc
        by_request: dict[str, list[Vote]] = {}
        for request_id, reviewer, decision, reason, ts, payload, proof in votes:
            by_request.setdefault(request_id, []).append(
                Vote(request_id, reviewer, decision, reason, ts, bytes(payload), proof)
            )
        return [ApprovalRequest.from_row(row, tuple(by_request.get(row[0], ()))) for row in rows]

    # watching -----------------------------------------------------------------------------------

    @asynccontextmanager
    async def watch(self) -> AsyncIterator[ChangeWatch]:
        watch = SignalledWatch()
        self._watches.add(watch)
        try:
            joining = self._poller is not None
            if not joining:
                self._baseline = asyncio.Event()
                self._poller = asyncio.get_running_loop().create_task(self._poll(self._baseline))
            await self._baseline.wait()
            if joining:
                # commits since the running poller's last poll are owed to the watches already
                # waiting; what they signal now precedes this watch's caller's next read
                self._saw(await self._data_version())
            watch.reset()
            yield watch
        finally:
            self._watches.discard(watch)

    async def _poll(self, baseline: asyncio.Event) -> None:
        """One poller per process while anyone watches; it stops when the last watch ends."""
        try:
            try:
                self._version = await self._data_version()
            finally:
                baseline.set()
            while True:
                await asyncio.sleep(POLL_S)
                if not self._watches:
                    return
                self._saw(await self._data_version())
        except AuditError as error:  # the waiters fall back to their own time-outs
            log.warning("stopped watching approvals: %s", error)
        finally:
            self._poller = None

    async def _data_version(self) -> int:
        db = await self._connection()
        try:
            async with self._lock:
                rows = list(await db.execute_fetchall("PRAGMA data_version"))
        except sqlite3.Error as exc:
            raise self._error("cannot watch it", exc) from exc
        return int(rows[0][0])

    def _saw(self, version: int) -> None:
        if version != self._version:
            self._version = version
            self._signal()

    def _signal(self) -> None:
        for watch in self._watches:
            watch.signal()


@dataclass(slots=True)
class _Transaction:
    db: aiosqlite.Connection
    appended: list[int] = field(default_factory=list)


class _Abort(Exception):
    """Roll the transaction back: the compare-and-set found another state."""
