"""The audit store in one SQLite file (WAL), safe for several processes appending at once.

Appends go through one writer task. It takes every append queued at that moment (group commit)
and records them with ONE statement, in one trip to aiosqlite's thread (each trip costs about
0.1 ms here): the bodies travel as one JSON array, and a recursive CTE links them onto the
current head with `audit_link()` (`chain.link`, registered as an SQL function). A single
writing statement takes SQLite's write lock when it starts and commits when it ends, like
BEGIN IMMEDIATE, so the head it reads cannot move under it, even with another process
appending to the same file; and it is atomic, so a failed batch leaves nothing behind. The
indexed columns are extracted from the bodies by the same statement, so they match by
construction.

Durability: `synchronous="FULL"` (the default) syncs the WAL at every commit, so an entry
that `append()` returned for survives a power cut or OS crash; that is the promise "intent is
recorded before the statement runs" needs. `"NORMAL"` skips that sync (the WAL is synced at
checkpoints): it survives a crash of mcp-guard but may lose the newest entries on power loss,
never corrupting the chain. Measured here (bench/bench_store.py): FULL adds ~0.15 ms to a
lone append; under concurrent load group commit shares one sync among the whole batch.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
from collections.abc import Collection, Mapping
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import aiosqlite

from mcp_guard.approvals import ApprovalRequest, ApprovalState, Vote
from mcp_guard.errors import AuditError, ConfigError, UsageError
from mcp_guard.store import chain
from mcp_guard.store.base import AuditEvent, AuditFilter, AuditRecord, ChangeWatch, Store, VerifyReport
from mcp_guard.store.sqlite_approvals import SqliteApprovals
from mcp_guard.values import JsonValue

SCHEMA_VERSION = 1

_COLUMNS = (
    ("seq", "INTEGER"),
    ("ts", "TEXT"),
    ("type", "TEXT"),
    ("session_id", "TEXT"),
    ("call_id", "TEXT"),
    ("identity", "TEXT"),
    ("tool", "TEXT"),
    ("connection", "TEXT"),
    ("decision", "TEXT"),
    ("prev_hash", "BLOB"),
    ("hash", "BLOB"),
    ("body", "BLOB"),
)

# `type` has a handful of values and is left unindexed: a scan from the newest entry finds
# plenty. Every index costs about 6 µs per commit.
_SCHEMA = (
    """CREATE TABLE audit (
        seq INTEGER PRIMARY KEY,
        ts TEXT NOT NULL,
        type TEXT NOT NULL,
        session_id TEXT NOT NULL,
        call_id TEXT,
        identity TEXT NOT NULL,
        tool TEXT,
        connection TEXT,
        decision TEXT,
        prev_hash BLOB NOT NULL,
        hash BLOB NOT NULL,
        body BLOB NOT NULL
    ) STRICT""",
    "CREATE INDEX audit_session ON audit (session_id)",
    "CREATE INDEX audit_identity ON audit (identity)",
    "CREATE INDEX audit_call ON audit (call_id)",
    "CREATE INDEX audit_tool ON audit (tool)",
    "CREATE INDEX audit_decision ON audit (decision)",
    "CREATE INDEX audit_ts ON audit (ts)",
    f"PRAGMA user_version = {SCHEMA_VERSION}",
)

# ?1: the bodies as a JSON array of strings; ?2: chain.GENESIS. `batch` is materialized so the
# recursion joins on it instead of re-reading the JSON for every step.
_APPEND = f"""
INSERT INTO audit (seq, {", ".join(chain.INDEXED)}, prev_hash, hash, body)
WITH RECURSIVE
    batch(n, text) AS MATERIALIZED (SELECT key + 1, value FROM json_each(?1)),
    head(seq, hash) AS (SELECT seq, hash FROM audit UNION ALL SELECT 0, ?2 ORDER BY seq DESC LIMIT 1),
    linked(n, seq, prev_hash, hash, text) AS (
        SELECT 0, seq, NULL, hash, NULL FROM head
        UNION ALL
        SELECT b.n, l.seq + 1, l.hash, audit_link(l.seq + 1, l.hash, CAST(b.text AS BLOB)), b.text
        FROM linked AS l JOIN batch AS b ON b.n = l.n + 1
    )
SELECT seq, {", ".join(f"text ->> '{name}'" for name in chain.INDEXED)}, prev_hash, hash, CAST(text AS BLOB)
FROM linked WHERE n > 0
"""

_VERIFY = f"SELECT {', '.join(chain.ROW)} FROM audit ORDER BY seq"
_VERIFY_CHUNK = 4096

# What each SQLite error means for the person who must fix it.
_CAUSES = {
    "SQLITE_BUSY": "another process held the database locked for longer than the busy timeout ({timeout} s)",
    "SQLITE_LOCKED": "the database is locked",
    "SQLITE_READONLY": "the file is read-only: check its permissions and owner, and its directory's",
    "SQLITE_FULL": "the disk is full",
    "SQLITE_IOERR": "the disk reported an I/O error",
    "SQLITE_CORRUPT": "the file is damaged: move it aside (a new store starts in its place) and keep it",
    "SQLITE_NOTADB": "the file is not an SQLite database: point the store at its own file or move it aside",
    "SQLITE_CANTOPEN": "the file cannot be opened: check that its directory exists and is writable",
}


class SqliteStore(Store):
    """The audit log in one SQLite file, created with mode 0600 (the audit holds sensitive data)."""

    def __init__(
        self,
        path: Path,
        *,
        synchronous: Literal["FULL", "NORMAL"] = "FULL",
        busy_timeout: float = 5.0,
    ) -> None:
        if synchronous not in ("FULL", "NORMAL"):
            raise ConfigError(f"synchronous must be FULL or NORMAL, not {synchronous!r}")
        self.path = path
        self.synchronous = synchronous
        self.busy_timeout = busy_timeout
        self._db: aiosqlite.Connection | None = None
        self._writer: asyncio.Task[None] | None = None
        self._pending: list[tuple[str, asyncio.Future[None]]] = []
        self._wake = asyncio.Event()
        self._closing = False
        self._approvals = SqliteApprovals(
            path, busy_timeout=busy_timeout, synchronous=synchronous, append_sql=_APPEND, error=self._error
        )

    # lifecycle ----------------------------------------------------------------------------------

    async def open(self) -> None:
        if self.path.is_dir():
            raise AuditError(f"audit store {self.path}: is a directory; name a file for the audit store")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if not self.path.exists():
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
        except OSError as exc:
            raise AuditError(f"audit store {self.path}: cannot create it: {exc.strerror}") from exc
        try:
            self._db = await aiosqlite.connect(self.path, isolation_level=None)
        except sqlite3.Error as exc:
            raise self._error("cannot open it", exc) from exc
        try:
            await self._prepare(self._db)
        except BaseException as exc:
            await self._db.close()
            self._db = None
            if isinstance(exc, sqlite3.Error):
                raise self._error("cannot open it", exc) from exc
            raise
        self._closing = False
        self._writer = asyncio.create_task(self._write_loop())

    async def _prepare(self, db: aiosqlite.Connection) -> None:
        await db.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
        # The file may come from anyone: its triggers and views must not call our functions.
        await db.execute("PRAGMA trusted_schema = OFF")
        async with db.execute("PRAGMA journal_mode = WAL") as cursor:
            mode = await cursor.fetchone()
        if mode is None or mode[0] != "wal":
            raise AuditError(f"audit store {self.path}: cannot switch to WAL mode (SQLite says {mode!r})")
        await db.execute(f"PRAGMA synchronous = {self.synchronous}")
        if await self._version(db) == 0:
            await db.execute("BEGIN IMMEDIATE")  # another process may be creating it right now
            try:
                if await self._version(db) == 0:
                    await self._create(db)
                await db.execute("COMMIT")
            except BaseException:
                await db.rollback()
                raise
        await self._check_layout(db)
        await db.create_function("audit_link", 3, chain.link, deterministic=True)

    @staticmethod
    async def _version(db: aiosqlite.Connection) -> int:
        async with db.execute("PRAGMA user_version") as cursor:
            row = await cursor.fetchone()
        return int(row[0]) if row else 0

    async def _create(self, db: aiosqlite.Connection) -> None:
        tables = [row[0] for row in await db.execute_fetchall("SELECT name FROM sqlite_master")]
        if tables:
            raise AuditError(
                f"audit store {self.path}: this SQLite file holds other data ({', '.join(sorted(tables))}) "
                "and no mcp-guard audit log; give the audit store a file of its own"
            )
        for statement in _SCHEMA:
            await db.execute(statement)

    async def _check_layout(self, db: aiosqlite.Connection) -> None:
        version = await self._version(db)
        if version > SCHEMA_VERSION:
            raise AuditError(
                f"audit store {self.path}: written by a newer mcp-guard (schema version {version}; "
                f"this one understands up to {SCHEMA_VERSION}); upgrade mcp-guard to use this file"
            )
        kind = await db.execute_fetchall("SELECT type FROM sqlite_master WHERE name = 'audit'")
        columns = tuple((row[1], row[2]) for row in await db.execute_fetchall("PRAGMA table_info(audit)"))
        if [tuple(row) for row in kind] != [("table",)] or columns != _COLUMNS:
            found = ", ".join(name for name, _ in columns) or "no audit table"
            raise AuditError(
                f"audit store {self.path}: not an mcp-guard audit log (found {found}; expected a table "
                f"audit with {', '.join(name for name, _ in _COLUMNS)}); the file was altered or belongs "
                "to something else"
            )
        triggers = await db.execute_fetchall("SELECT name FROM sqlite_master WHERE type = 'trigger'")
        if triggers:
            raise AuditError(
                f"audit store {self.path}: has triggers ({', '.join(row[0] for row in triggers)}), which "
                "mcp-guard never creates; someone altered the file: inspect it before using it"
            )

    async def close(self) -> None:
        await self._approvals.close()
        if self._db is None:
            return
        self._closing = True
        self._wake.set()
        if self._writer is not None:
            await self._writer
            self._writer = None
        await self._db.close()
        self._db = None

    # appends ------------------------------------------------------------------------------------

    async def append(self, event: AuditEvent) -> None:
        body = chain.canonical(event)
        if self._db is None or self._closing:
            raise AuditError(f"audit store {self.path}: is not open; nothing can be recorded")
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((body.decode(), done))
        self._wake.set()
        await done

    async def _write_loop(self) -> None:
        """Write whatever is pending, batch after batch, until closed and drained."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                batch, self._pending = self._pending, []
                await self._write(batch)
            if self._closing:
                return

    async def _write(self, batch: list[tuple[str, asyncio.Future[None]]]) -> None:
        assert self._db is not None
        bodies = json.dumps([body for body, _ in batch], ensure_ascii=False)
        try:
            await self._db.execute(_APPEND, (bodies, chain.GENESIS))
        except Exception as exc:  # every failure is the waiting callers' to hear; the writer lives on
            action = (
                "the entry was not recorded" if len(batch) == 1 else f"{len(batch)} entries were not recorded"
            )
            for _, done in batch:
                if not done.done():
                    error = self._error(action, exc)
                    error.__cause__ = exc
                    done.set_exception(error)
            return
        for _, done in batch:
            if not done.done():
                done.set_result(None)

    # reading ------------------------------------------------------------------------------------

    async def query(self, flt: AuditFilter) -> list[AuditRecord]:
        if self._db is None:
            raise AuditError(f"audit store {self.path}: is not open")
        where, params = _where(flt)
        sql = f"SELECT seq, prev_hash, hash, body FROM audit{where} ORDER BY seq"
        if flt.limit is not None:
            if flt.limit < 0:
                raise UsageError(f"limit must be 0 or more, not {flt.limit}")
            newest = f"SELECT seq, prev_hash, hash, body FROM audit{where} ORDER BY seq DESC LIMIT ?"
            sql = f"SELECT * FROM ({newest}) ORDER BY seq"
            params.append(flt.limit)
        try:
            rows = await self._db.execute_fetchall(sql, params)
        except sqlite3.Error as exc:
            raise self._error("cannot read it", exc) from exc
        records = []
        for seq, prev_hash, digest, body in rows:
            try:
                event = chain.decode(body)
            except AuditError as exc:
                raise AuditError(
                    f"audit store {self.path}: entry {seq}: {exc}; run `mcp-guard audit verify`"
                ) from exc
            records.append(AuditRecord(seq, prev_hash.hex(), digest.hex(), body, event))
        return records

    async def verify(self) -> VerifyReport:
        """Stream every entry through `chain.Verifier` from one read snapshot, on its own connection."""
        verifier = chain.Verifier()
        try:
            async with aiosqlite.connect(self.path.absolute().as_uri() + "?mode=ro", uri=True) as db:
                await db.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
                async with db.execute(_VERIFY) as cursor:
                    while rows := await cursor.fetchmany(_VERIFY_CHUNK):
                        if not verifier.feed(rows):
                            break
        except sqlite3.Error as exc:
            raise self._error("cannot read it", exc) from exc
        return verifier.report()

    # approvals (store/sqlite_approvals.py) ------------------------------------------------------

    async def add_approval(self, request: ApprovalRequest, event: AuditEvent) -> None:
        self._require_open()
        await self._approvals.add(request, event)

    async def get_approval(self, request_id: str) -> ApprovalRequest | None:
        self._require_open()
        return await self._approvals.get(request_id)

    async def list_approvals(
        self, states: Collection[ApprovalState] | None = None, limit: int = 100
    ) -> list[ApprovalRequest]:
        self._require_open()
        return await self._approvals.listing(states, limit)

    async def add_vote(self, vote: Vote, event: AuditEvent, *, unexpired_at: str) -> bool:
        self._require_open()
        return await self._approvals.add_vote(vote, event, unexpired_at)

    async def transition_approval(
        self,
        request_id: str,
        expected: ApprovalState,
        target: ApprovalState,
        event: AuditEvent,
        changes: Mapping[str, JsonValue],
        *,
        unexpired_at: str | None = None,
    ) -> bool:
        self._require_open()
        return await self._approvals.transition(request_id, expected, target, event, changes, unexpired_at)

    async def finish_approval(
        self, request_id: str, outcome: Mapping[str, JsonValue], event: AuditEvent
    ) -> None:
        self._require_open()
        await self._approvals.finish(request_id, outcome, event)

    def watch_approvals(self) -> AbstractAsyncContextManager[ChangeWatch]:
        self._require_open()
        return self._approvals.watch()

    def _require_open(self) -> None:
        if self._db is None or self._closing:
            raise AuditError(f"audit store {self.path}: is not open")

    # errors -------------------------------------------------------------------------------------

    def _error(self, action: str, exc: BaseException) -> AuditError:
        """One place that turns a database failure into words naming the file and the cause."""
        cause = str(exc)
        if isinstance(exc, sqlite3.Error):
            name = getattr(exc, "sqlite_errorname", "").split("_", 2)
            explained = _CAUSES.get("_".join(name[:2]))
            if explained:
                cause = f"{explained.format(timeout=self.busy_timeout)} ({exc})"
        return AuditError(f"audit store {self.path}: {action}: {cause}")


def _where(flt: AuditFilter) -> tuple[str, list[Any]]:
    """SQL conditions and parameters for every field of the filter that is set."""
    conditions, params = [], []
    for column in ("session_id", "identity", "tool", "decision", "call_id", "type"):
        value = getattr(flt, column)
        if value is not None:
            conditions.append(f"{column} = ?")
            params.append(str(value))
    for name, operator in (("since", ">="), ("until", "<")):
        value = getattr(flt, name)
        if value is not None:
            conditions.append(f"ts {operator} ?")
            params.append(_utc(name, value))
    return (" WHERE " + " AND ".join(conditions) if conditions else ""), params


def _utc(name: str, value: str) -> str:
    """An ISO timestamp in the form entries carry (UTC, microseconds), so text order is time order."""
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise UsageError(f"{name}: {value!r} is not an ISO 8601 time (e.g. 2026-11-01T09:30:00Z)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat(timespec="microseconds")
