"""The audit store in one SQLite file (WAL), safe for several processes appending at once.

Every append is ONE statement: the bodies travel as one JSON array, and a recursive CTE links them
onto the current head with `audit_link()` (`chain.link`, registered as an SQL function). A single
writing statement takes SQLite's write lock when it starts and commits when it ends, like
BEGIN IMMEDIATE, so the head it reads cannot move under it, even with another process appending
to the same file; and it is atomic, so a failed batch leaves nothing behind. The indexed columns
are extracted from the bodies by the same statement, so they match by construction.

Where it runs: with nothing else being written, an entry that need not be synced is appended on
the event loop itself, on a connection that never waits for the lock (about 55 µs p50 here, where
a trip to aiosqlite's thread made it 110 µs). When the lock is taken, or appends queue up, or the
entry must be synced, one writer task takes every append queued at that moment (group commit) and
writes them in one statement through aiosqlite's thread, which waits for the lock.

Durability: a batch holding an entry appended with `durable=True` is committed on a connection
with `synchronous=FULL`, which syncs the WAL at the commit, so the entry survives a power cut or
an OS crash: the guard asks for it before a write runs, so "the intent is recorded before the
statement runs" holds even then. Other batches commit with `synchronous=NORMAL` (the WAL is synced
at checkpoints): they survive a crash of mcp-guard, but the newest may vanish on power loss, never
corrupting the chain. `durability` overrides the choice: "full" syncs every batch, "normal" none.
Measured here (bench/bench_store.py): a lone append took about 0.3-0.4 ms p50 with FULL and
0.12-0.19 ms with NORMAL; through the server, two FULL appends per read cost 1.2 ms more per call
than two NORMAL ones. With 20 concurrent appenders group commit shares one sync among a batch.
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
from typing import Any, Literal, TypeAlias

import aiosqlite

from mcp_guard.approvals import ApprovalRequest, ApprovalState, Vote
from mcp_guard.errors import AuditError, ConfigError, UsageError
from mcp_guard.store import chain
from mcp_guard.store.base import AuditEvent, AuditFilter, AuditRecord, ChangeWatch, Store, VerifyReport
from mcp_guard.store.sqlite_approvals import SqliteApprovals
from mcp_guard.values import JsonValue

SCHEMA_VERSION = 1

Durability: TypeAlias = Literal["full", "writes", "normal"]
_Pending: TypeAlias = tuple[str, str, bool, "asyncio.Future[None]"]
"""An append waiting for the writer: canonical body, its indexed fields as JSON, durable, its future."""


def _array(texts: list[str]) -> str:
    return json.dumps(texts, ensure_ascii=False)


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

# Indexes serve the selective filters: a session's story, one call, one person, a time window.
# `type`, `tool` and `decision` take a handful of values: a filter on them alone scans from the
# newest entry, and with a selective filter the planner uses that filter's index. Each index
# writes one more page per commit (about 12 µs per append measured here).
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
    "CREATE INDEX audit_ts ON audit (ts)",
    f"PRAGMA user_version = {SCHEMA_VERSION}",
)

# ?1: the bodies as a JSON array of strings; ?2: chain.GENESIS; ?3: per body, the JSON array of its
# indexed fields in chain.INDEXED order. They come apart from the bodies because extracting eight
# fields from each body would parse it eight times (a 64 KB response made an append cost 1.5 ms);
# `verify` checks that every column matches its hashed body. `batch` is materialized so the
# recursion joins on it instead of re-reading the JSON for every step.
_APPEND = f"""
INSERT INTO audit (seq, {", ".join(chain.INDEXED)}, prev_hash, hash, body)
WITH RECURSIVE
    batch(n, text, meta) AS MATERIALIZED (
        SELECT b.key + 1, b.value, m.value FROM json_each(?1) AS b JOIN json_each(?3) AS m ON m.key = b.key
    ),
    head(seq, hash) AS (SELECT seq, hash FROM audit UNION ALL SELECT 0, ?2 ORDER BY seq DESC LIMIT 1),
    linked(n, seq, prev_hash, hash, text, meta) AS (
        SELECT 0, seq, NULL, hash, NULL, NULL FROM head
        UNION ALL
        SELECT b.n, l.seq + 1, l.hash, audit_link(l.seq + 1, l.hash, CAST(b.text AS BLOB)), b.text, b.meta
        FROM linked AS l JOIN batch AS b ON b.n = l.n + 1
    )
SELECT seq, {", ".join(f"meta ->> {i}" for i in range(len(chain.INDEXED)))},
    prev_hash, hash, CAST(text AS BLOB)
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
    "SQLITE_CORRUPT": "the file is damaged: move it aside and keep it for inspection; a new store starts",
    "SQLITE_NOTADB": "the file is not an SQLite database: point the store at its own file or move it aside",
    "SQLITE_CANTOPEN": "the file cannot be opened: check that it and its directory are writable by this user",
}


class SqliteStore(Store):
    """The audit log in one SQLite file, created with mode 0600 (the audit holds sensitive data)."""

    def __init__(
        self,
        path: Path,
        *,
        durability: Durability = "writes",
        busy_timeout: float = 5.0,
    ) -> None:
        if durability not in ("full", "writes", "normal"):
            raise ConfigError(f"durability must be full, writes or normal, not {durability!r}")
        self.path = path
        self.durability = durability
        self.busy_timeout = busy_timeout
        self._db: aiosqlite.Connection | None = None
        self._synced_db: aiosqlite.Connection | None = None
        self._inline: sqlite3.Connection | None = None
        self._writing = False
        self._writer: asyncio.Task[None] | None = None
        self._pending: list[_Pending] = []
        self._wake = asyncio.Event()
        self._closing = False
        # Approval steps gate writes (a claim is the intent of one): synced unless nothing is.
        self._approvals = SqliteApprovals(
            path,
            busy_timeout=busy_timeout,
            synchronous="NORMAL" if durability == "normal" else "FULL",
            append_sql=_APPEND,
            error=self._error,
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
        opened: list[aiosqlite.Connection] = []
        try:
            for synchronous in ("NORMAL", "FULL"):
                db = await aiosqlite.connect(self.path, isolation_level=None)
                opened.append(db)
                await self._prepare(db, synchronous)
        except BaseException as exc:
            for db in opened:
                await db.close()
            if isinstance(exc, sqlite3.Error):
                raise self._error("cannot open it", exc) from exc
            raise
        self._db, self._synced_db = opened
        try:
            self._inline = self._inline_connection()
        except sqlite3.Error as exc:
            for db in opened:
                await db.close()
            self._db = self._synced_db = None
            raise self._error("cannot open it", exc) from exc
        self._closing = False
        self._writer = asyncio.create_task(self._write_loop())

    def _inline_connection(self) -> sqlite3.Connection:
        """The event loop's own connection: it never waits for a lock (timeout 0), never syncs."""
        db = sqlite3.connect(self.path, isolation_level=None, timeout=0)
        db.execute("PRAGMA trusted_schema = OFF")
        db.execute("PRAGMA synchronous = NORMAL")
        db.create_function("audit_link", 3, chain.link, deterministic=True)
        return db

    async def _prepare(self, db: aiosqlite.Connection, synchronous: str) -> None:
        await db.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
        # The file may come from anyone: its triggers and views must not call our functions.
        await db.execute("PRAGMA trusted_schema = OFF")
        await self._enter_wal(db)
        await db.execute(f"PRAGMA synchronous = {synchronous}")
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

    async def _enter_wal(self, db: aiosqlite.Connection) -> None:
        """Switch the file to WAL. While another process is opening the same file, SQLite refuses
        the switch at once with SQLITE_BUSY instead of waiting (measured), so wait here."""
        deadline = asyncio.get_running_loop().time() + self.busy_timeout
        while True:
            try:
                async with db.execute("PRAGMA journal_mode = WAL") as cursor:
                    mode = await cursor.fetchone()
                break
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorname != "SQLITE_BUSY" or asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(0.005)
        if mode is None or mode[0] != "wal":
            raise AuditError(f"audit store {self.path}: cannot switch to WAL mode (SQLite says {mode!r})")

    @staticmethod
    async def _version(db: aiosqlite.Connection) -> int:
        async with db.execute("PRAGMA user_version") as cursor:
            row = await cursor.fetchone()
        return int(row[0]) if row else 0

    async def _create(self, db: aiosqlite.Connection) -> None:
        found = await db.execute_fetchall("SELECT name FROM sqlite_master WHERE type IN ('table', 'view')")
        tables = [row[0] for row in found]
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
        if self._db is None or self._closing:
            return
        self._closing = True
        self._wake.set()
        if self._writer is not None:
            await self._writer
        await self._db.close()
        if self._synced_db is not None:
            await self._synced_db.close()
        if self._inline is not None:
            self._inline.close()
        self._db, self._synced_db, self._inline, self._writer = None, None, None, None

    # appends ------------------------------------------------------------------------------------

    async def append(self, event: AuditEvent, *, durable: bool = False) -> None:
        """Append and return once committed. With the writer idle, an entry that need not be synced
        is appended right here on the event loop, without waiting for the lock: the statement takes
        tens of µs, less than a trip to aiosqlite's thread. Otherwise it joins the writer's next
        batch. A caller cancelled while waiting does not withdraw its entry: it may already be on
        its way to the disk."""
        body = chain.canonical(event).decode()
        fields = event.as_dict()
        meta = json.dumps([fields[name] for name in chain.INDEXED], ensure_ascii=False)
        if self._db is None or self._closing:
            raise AuditError(f"audit store {self.path}: is not open; nothing can be recorded")
        if not self._pending and not self._writing and not self._synced(durable):
            try:
                if self._append_inline(_array([body]), f"[{meta}]"):
                    return
            except sqlite3.Error as exc:
                raise self._error("the entry was not recorded", exc) from exc
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((body, meta, durable, done))
        self._wake.set()
        await done

    def _synced(self, durable: bool) -> bool:
        return self.durability == "full" or (self.durability == "writes" and durable)

    def _append_inline(self, bodies: str, metas: str) -> bool:
        """True when appended; False when another writer held the lock (nothing was written)."""
        assert self._inline is not None
        try:
            self._inline.execute(_APPEND, (bodies, chain.GENESIS, metas))
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorname in ("SQLITE_BUSY", "SQLITE_LOCKED"):
                return False
            raise
        return True

    async def _write_loop(self) -> None:
        """Write whatever is pending, batch after batch, until closed and drained."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            self._writing = True
            try:
                while self._pending:
                    batch, self._pending = self._pending, []
                    synced = any(self._synced(durable) for _, _, durable, _ in batch)
                    await self._write(synced, batch)
            finally:
                self._writing = False
            if self._closing:
                return

    async def _write(self, synced: bool, batch: list[_Pending]) -> None:
        """One batch in one statement: on the synced connection, or on the unsynced one through
        aiosqlite's thread, which waits for the lock up to the busy timeout."""
        bodies = _array([body for body, _, _, _ in batch])
        metas = "[" + ",".join(meta for _, meta, _, _ in batch) + "]"
        try:
            if synced or not self._append_inline(bodies, metas):
                db = self._synced_db if synced else self._db
                assert db is not None
                await db.execute(_APPEND, (bodies, chain.GENESIS, metas))
        except Exception as exc:  # every failure is the waiting callers' to hear; the writer lives on
            action = (
                "the entry was not recorded" if len(batch) == 1 else f"{len(batch)} entries were not recorded"
            )
            for *_, done in batch:
                if not done.done():
                    error = self._error(action, exc)
                    error.__cause__ = exc
                    done.set_exception(error)
            return
        for *_, done in batch:
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
