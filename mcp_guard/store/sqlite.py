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

Besides the columns copied from the event, two index columns are derived from an outcome's
classification by the same statement: `kind` (the riskiest statement kind) and `tables` (a JSON
array), so that "which writes touched orders" is answered from an index; `verify` recomputes them
from the hashed bytes. Signed checkpoints live in their own table (`checkpoint`), beside the chain.

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
import itertools
import json
import multiprocessing
import os
import sqlite3
from collections.abc import AsyncGenerator, AsyncIterator, Collection, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import AbstractAsyncContextManager, asynccontextmanager, closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeAlias

import aiosqlite

from mcp_guard.approvals import ApprovalRequest, ApprovalState, Vote
from mcp_guard.errors import AuditError, ConfigError, UsageError
from mcp_guard.store import chain
from mcp_guard.store.base import (
    AuditEvent,
    AuditFilter,
    AuditRecord,
    CallFilter,
    ChangeWatch,
    EventType,
    StatsRow,
    Store,
    StoredCheckpoint,
    VerifyReport,
    check_continues,
    check_schema_version,
)
from mcp_guard.store.base import utc_bound as _utc
from mcp_guard.store.sqlite_approvals import SCHEMA as APPROVALS_SCHEMA
from mcp_guard.store.sqlite_approvals import SqliteApprovals
from mcp_guard.values import JsonValue

SCHEMA_VERSION = 3
"""1: the chain. 2: adds the derived index columns kind and tables, and the checkpoint table.
3: adds the approval tables (which a version-2 file may already hold, made on first use)."""

Durability: TypeAlias = Literal["full", "writes", "normal"]
_Pending: TypeAlias = tuple[str, str, bool, "asyncio.Future[int]"]
"""An append waiting for the writer: canonical body, its indexed fields as JSON, durable, its future."""


def _array(texts: list[str]) -> str:
    return json.dumps(texts, ensure_ascii=False)


def _meta(event: AuditEvent) -> str:
    """The columns `_APPEND` indexes, as JSON: chain.INDEXED's fields, then an outcome's classification."""
    fields = event.as_dict()
    classification = event.detail.get("classification") if event.type == EventType.OUTCOME else None
    return json.dumps([*(fields[name] for name in chain.INDEXED), classification], ensure_ascii=False)


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
    ("kind", "TEXT"),
    ("tables", "TEXT"),
)

# The derived index columns: SQL over an entry's JSON text, the same at insert and at verify.
# `{c}` is the outcome's classification: taken from the body at verify, and passed beside the body
# (the last element of `meta`) at insert so that a large body is not parsed once more per column.
_DERIVED = {
    "kind": "{c} ->> '$.kind'",
    "tables": "{c} -> '$.tables'",
}


def _classification_of(text: str) -> str:
    return f"({text} -> '$.detail.classification')"


def _derived(column: str, classification: str, type_: str) -> str:
    return f"CASE WHEN {type_} = 'outcome' THEN {_DERIVED[column].format(c=classification)} END"


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
        body BLOB NOT NULL,
        kind TEXT,
        tables TEXT
    ) STRICT""",
    "CREATE INDEX audit_session ON audit (session_id)",
    "CREATE INDEX audit_identity ON audit (identity)",
    "CREATE INDEX audit_call ON audit (call_id)",
    "CREATE INDEX audit_ts ON audit (ts)",
)

# Version 2, also the migration from version 1. `tables` is indexed with call_id so that a table
# filter reads the small index only.
_SCHEMA_2 = (
    "CREATE INDEX audit_kind ON audit (kind) WHERE kind IS NOT NULL",
    "CREATE INDEX audit_tables ON audit (tables, call_id) WHERE tables IS NOT NULL",
    """CREATE TABLE checkpoint (
        id INTEGER PRIMARY KEY,
        entries INTEGER NOT NULL,
        head BLOB NOT NULL,
        text TEXT NOT NULL
    ) STRICT""",
    "CREATE INDEX checkpoint_entries ON checkpoint (entries)",
)

_MIGRATE_1 = (
    "ALTER TABLE audit ADD COLUMN kind TEXT",
    "ALTER TABLE audit ADD COLUMN tables TEXT",
    f"""UPDATE audit SET
        kind = {_derived("kind", _classification_of("CAST(body AS TEXT)"), "type")},
        tables = {_derived("tables", _classification_of("CAST(body AS TEXT)"), "type")}
    WHERE type = 'outcome'""",
    *_SCHEMA_2,
)

# Each version's migration from the one before; version 0 (a new file) runs `_create`.
_MIGRATIONS: dict[int, tuple[str, ...]] = {1: _MIGRATE_1, 2: APPROVALS_SCHEMA}

# ?1: the bodies as a JSON array of strings; ?2: chain.GENESIS; ?3: per body, the JSON array of its
# indexed fields in chain.INDEXED order, then its outcome's classification (or null). They come
# apart from the bodies because extracting ten columns from each body would parse it ten times (a
# 64 KB response made an append cost 1.5 ms); `verify` checks that every column matches its hashed
# body. `batch` is materialized so the
# recursion joins on it instead of re-reading the JSON for every step.
_META_TYPE = f"(meta ->> {chain.INDEXED.index('type')})"
_META_CLASSIFICATION = f"(meta -> {len(chain.INDEXED)})"
_APPEND = f"""
INSERT INTO audit (seq, {", ".join(chain.INDEXED)}, prev_hash, hash, body, kind, tables)
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
    prev_hash, hash, CAST(text AS BLOB),
    {_derived("kind", _META_CLASSIFICATION, _META_TYPE)},
    {_derived("tables", _META_CLASSIFICATION, _META_TYPE)}
FROM linked WHERE n > 0
RETURNING seq
"""

# The last value says whether the derived columns hold what the body holds. Only outcomes are parsed;
# json_valid keeps an edited, unparseable body from failing the whole read (the hash check names it).
_BODY = "CAST(body AS TEXT)"
_KIND, _TABLES = (_DERIVED[name].format(c=_classification_of(_BODY)) for name in ("kind", "tables"))
_VERIFY = f"""SELECT {", ".join(chain.ROW)},
    CASE WHEN type <> 'outcome' OR NOT json_valid({_BODY}) THEN kind IS NULL AND tables IS NULL
        ELSE kind IS ({_KIND}) AND tables IS ({_TABLES})
    END
FROM audit WHERE seq BETWEEN ? AND ? ORDER BY seq"""
_VERIFY_CHUNK = 4096
_PARALLEL_MIN = 150_000
"""Entries per process below which verification stays in one process (starting one costs ~0.2 s)."""
_CALLS_CHUNK = 512

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
        verify_workers: int = min(8, os.cpu_count() or 1),
    ) -> None:
        if durability not in ("full", "writes", "normal"):
            raise ConfigError(f"durability must be full, writes or normal, not {durability!r}")
        self.path = path
        self.durability = durability
        self.busy_timeout = busy_timeout
        self.verify_workers = verify_workers
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
            meta=_meta,
            appended=self._approval_appended,
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

    def missing(self) -> str | None:
        if self.path.exists():
            return None
        return (
            f"audit store {self.path}: there is no such file; check --store or the configuration's [audit] "
            "url (the server creates the file when it records its first call)"
        )

    async def migrate(self) -> tuple[int, int]:
        """Opening creates or upgrades the file (its owner runs the gateway); this only reports it."""
        found = 0
        if self.path.exists():
            try:
                with closing(sqlite3.connect(self.path.absolute().as_uri() + "?mode=ro", uri=True)) as db:
                    found = int(db.execute("PRAGMA user_version").fetchone()[0])
            except sqlite3.Error as exc:
                raise self._error("cannot read its schema version", exc) from exc
        check_schema_version(str(self.path), found, SCHEMA_VERSION)
        await self.open()
        await self.close()
        return found, SCHEMA_VERSION

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
        if await self._version(db) < SCHEMA_VERSION:
            await db.execute("BEGIN IMMEDIATE")  # another process may be creating it right now
            try:
                version = await self._version(db)
                if version == 0:
                    await self._create(db)
                elif version < SCHEMA_VERSION:
                    await self._check_layout(db, _COLUMNS[:-2] if version == 1 else _COLUMNS)
                    for step in range(version, SCHEMA_VERSION):
                        for statement in _MIGRATIONS[step]:
                            await db.execute(statement)
                if version < SCHEMA_VERSION:
                    await db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
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
        for statement in (*_SCHEMA, *_SCHEMA_2, *APPROVALS_SCHEMA):
            await db.execute(statement)

    async def _check_layout(
        self, db: aiosqlite.Connection, expected: tuple[tuple[str, str], ...] = _COLUMNS
    ) -> None:
        check_schema_version(str(self.path), await self._version(db), SCHEMA_VERSION)
        kind = await db.execute_fetchall("SELECT type FROM sqlite_master WHERE name = 'audit'")
        columns = tuple((row[1], row[2]) for row in await db.execute_fetchall("PRAGMA table_info(audit)"))
        if [tuple(row) for row in kind] != [("table",)] or columns != expected:
            found = ", ".join(name for name, _ in columns) or "no audit table"
            raise AuditError(
                f"audit store {self.path}: not an mcp-guard audit log (found {found}; expected a table "
                f"audit with {', '.join(name for name, _ in expected)}); the file was altered or belongs "
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

    async def append(self, event: AuditEvent, *, durable: bool = False) -> int:
        """Append and return the entry's seq once committed. With the writer idle, an entry that need
        not be synced is appended right here on the event loop, without waiting for the lock: the
        statement takes tens of µs, less than a trip to aiosqlite's thread. Otherwise it joins the
        writer's next batch. A caller cancelled while waiting does not withdraw its entry: it may
        already be on its way to the disk."""
        body = chain.canonical(event).decode()
        meta = _meta(event)
        if self._db is None or self._closing:
            raise AuditError(f"audit store {self.path}: is not open; nothing can be recorded")
        seq: int | None = None
        if not self._pending and not self._writing and not self._synced(durable):
            try:
                seq = self._append_inline(_array([body]), f"[{meta}]")
            except sqlite3.Error as exc:
                raise self._error("the entry was not recorded", exc) from exc
        if seq is None:
            done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            self._pending.append((body, meta, durable, done))
            self._wake.set()
            seq = await done
        if self._after_append is not None:
            await self._after_append(seq)
        return seq

    def _synced(self, durable: bool) -> bool:
        return self.durability == "full" or (self.durability == "writes" and durable)

    def _append_inline(self, bodies: str, metas: str) -> int | None:
        """The first seq appended; None when another writer held the lock (nothing was written)."""
        assert self._inline is not None
        try:
            rows = self._inline.execute(_APPEND, (bodies, chain.GENESIS, metas)).fetchall()
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorname in ("SQLITE_BUSY", "SQLITE_LOCKED"):
                return None
            raise
        return min(row[0] for row in rows)

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
            first = None if synced else self._append_inline(bodies, metas)
            if first is None:
                db = self._synced_db if synced else self._db
                assert db is not None
                rows = await db.execute_fetchall(_APPEND, (bodies, chain.GENESIS, metas))
                first = min(row[0] for row in rows)  # linked in order: seqs first, first + 1, ...
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
        for index, (*_, done) in enumerate(batch):
            if not done.done():
                done.set_result(first + index)

    async def restore(self, records: Sequence[AuditRecord]) -> None:
        """Insert copied entries as they are, in one transaction that first checks they continue the chain;
        the derived index columns are computed from each body by SQLite, as at migration."""
        self._open_db()
        body = "CAST(?4 AS TEXT)"
        insert = f"""INSERT INTO audit (seq, prev_hash, hash, body, {", ".join(chain.INDEXED)}, kind, tables)
            SELECT ?1, ?2, ?3, ?4, {", ".join(f"{body} ->> '$.{name}'" for name in chain.INDEXED)},
                {_derived("kind", _classification_of(body), f"{body} ->> '$.type'")},
                {_derived("tables", _classification_of(body), f"{body} ->> '$.type'")}"""
        try:
            async with aiosqlite.connect(self.path, isolation_level=None) as db:
                await db.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
                await db.execute("BEGIN IMMEDIATE")
                try:
                    newest = "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1"
                    head = list(await db.execute_fetchall(newest))
                    check_continues(str(self.path), (head[0][0], head[0][1]) if head else None, records)
                    await db.executemany(
                        insert,
                        [(r.seq, bytes.fromhex(r.prev_hash), bytes.fromhex(r.hash), r.body) for r in records],
                    )
                    await db.execute("COMMIT")
                except BaseException:
                    await db.rollback()
                    raise
        except sqlite3.Error as exc:
            raise self._error("the copied entries were not recorded", exc) from exc

    # reading ------------------------------------------------------------------------------------

    async def query(self, flt: AuditFilter) -> list[AuditRecord]:
        db = self._open_db()
        where, params = _where(flt)
        sql = f"SELECT seq, prev_hash, hash, body FROM audit{where} ORDER BY seq"
        if flt.limit is not None:
            if flt.limit < 0:
                raise UsageError(f"limit must be 0 or more, not {flt.limit}")
            newest = f"SELECT seq, prev_hash, hash, body FROM audit{where} ORDER BY seq DESC LIMIT ?"
            sql = f"SELECT * FROM ({newest}) ORDER BY seq"
            params.append(flt.limit)
        try:
            rows = await db.execute_fetchall(sql, params)
        except sqlite3.Error as exc:
            raise self._error("cannot read it", exc) from exc
        return [self._record(row) for row in rows]

    async def entries(self, first: int, last: int) -> list[AuditRecord]:
        rows = await self._read(
            "SELECT seq, prev_hash, hash, body FROM audit WHERE seq BETWEEN ? AND ? ORDER BY seq",
            (first, last),
        )
        return [self._record(row) for row in rows]

    async def session_ids(self, prefix: str, limit: int) -> list[str]:
        if prefix:  # through the session index
            sql = "SELECT session_id FROM audit WHERE session_id >= ? AND session_id < ? AND type = ?"
            params: tuple[Any, ...] = (prefix, prefix + "\U0010ffff", "session_start", limit)
        else:  # the newest first, from the end of the table
            sql, params = "SELECT session_id FROM audit WHERE type = ?", ("session_start", limit)
        rows = await self._read(f"{sql} ORDER BY seq DESC LIMIT ?", params)
        return [str(row[0]) for row in rows]

    async def call_ids(self, prefix: str, limit: int) -> list[str]:
        rows = await self._read(
            "SELECT DISTINCT call_id FROM audit WHERE call_id >= ? AND call_id < ? ORDER BY call_id LIMIT ?",
            (prefix, prefix + "\U0010ffff", limit),
        )
        return [str(row[0]) for row in rows]

    def _record(self, row: Any) -> AuditRecord:
        seq, prev_hash, digest, body = row
        try:
            event = chain.decode(body)
        except AuditError as exc:
            raise AuditError(
                f"audit store {self.path}: entry {seq}: {exc}; run `mcp-guard audit verify`"
            ) from exc
        return AuditRecord(seq, prev_hash.hex(), digest.hex(), body, event)

    def _open_db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise AuditError(f"audit store {self.path}: is not open")
        return self._db

    @asynccontextmanager
    async def _snapshot(self) -> AsyncIterator[aiosqlite.Connection]:
        """A read-only connection holding one read transaction: every query sees the same entries."""
        self._open_db()
        try:
            async with aiosqlite.connect(self.path.absolute().as_uri() + "?mode=ro", uri=True) as db:
                await db.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
                await db.execute("BEGIN")
                try:
                    yield db
                finally:
                    await db.rollback()
        except sqlite3.Error as exc:
            raise self._error("cannot read it", exc) from exc

    async def calls(self, flt: CallFilter) -> AsyncGenerator[list[AuditRecord], None]:
        sql, params = _calls_sql(flt)
        async with self._snapshot() as db:
            if flt.limit is not None:
                rows = list(reversed(list(await db.execute_fetchall(sql, params))))
                chunks = [rows[i : i + _CALLS_CHUNK] for i in range(0, len(rows), _CALLS_CHUNK)]
                for part in chunks:
                    for call in await self._gather_calls(db, part):
                        yield call
                return
            async with db.execute(sql, params) as cursor:
                while chunk := await cursor.fetchmany(_CALLS_CHUNK):
                    for call in await self._gather_calls(db, chunk):
                        yield call

    async def _gather_calls(self, db: aiosqlite.Connection, chunk: Any) -> list[list[AuditRecord]]:
        """Every entry of the calls named in `chunk` ((request seq, call_id) rows), in that order."""
        ids = list(dict.fromkeys(row[1] for row in chunk))
        marks = ", ".join("?" * len(ids))
        rows = list(
            await db.execute_fetchall(
                f"SELECT seq, prev_hash, hash, body FROM audit WHERE call_id IN ({marks}) ORDER BY seq", ids
            )
        )
        grouped: dict[str, list[AuditRecord]] = {call_id: [] for call_id in ids}
        for row in rows:
            record = self._record(row)
            grouped[str(record.event.call_id)].append(record)
        return [entries for entries in grouped.values() if entries]

    async def stats(self, flt: CallFilter) -> list[StatsRow]:
        matched, params = _calls_sql(flt, columns="r.call_id, r.identity, r.ts", ordered=False)
        sql = f"""
            SELECT m.identity, substr(m.ts, 1, 10) AS day, count(*),
                coalesce(sum(o.kind IS NOT NULL AND o.kind <> 'read'), 0),
                coalesce(sum(o.decision = 'deny'), 0),
                coalesce(sum(CAST(o.body AS TEXT) ->> '$.detail.status' = 'error'), 0),
                coalesce(sum(o.decision = 'approve' OR EXISTS (
                    SELECT 1 FROM audit AS a WHERE a.call_id = m.call_id AND a.type LIKE 'approval%'
                )), 0),
                coalesce(sum(CAST(o.body AS TEXT) ->> '{MASKED_CELLS}'), 0)
            FROM ({matched}) AS m
            LEFT JOIN audit AS o ON o.call_id = m.call_id AND o.type = 'outcome'
            GROUP BY 1, 2 ORDER BY 2, 1"""
        async with self._snapshot() as db:
            rows = await db.execute_fetchall(sql, params)
        return [StatsRow(str(row[0]), str(row[1]), *(int(value) for value in row[2:])) for row in rows]

    async def verify(
        self, *, base: tuple[int, bytes] | None = None, watch: Collection[int] = ()
    ) -> VerifyReport:
        """Stream every entry through `chain.Verifier`; a large store is split into seq ranges verified in
        parallel processes, whose seams are checked here (each range's first prev_hash against the hash
        the range before ended on)."""
        start = base[0] + 1 if base else 1
        head = await self.head()
        last = head[0] if head else 0
        workers = min(self.verify_workers, (last - start + 1) // _PARALLEL_MIN)
        if workers <= 1:
            async with self._snapshot() as db:
                return await _verify_rows(db, chain.Verifier(base, watch), start, max(last, start))
        bounds = [start + (last - start + 1) * k // workers for k in range(workers + 1)]
        loop = asyncio.get_running_loop()
        context = multiprocessing.get_context("spawn")  # no fork of a process holding threads
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            parts = await asyncio.gather(
                *(
                    loop.run_in_executor(pool, _verify_range, str(self.path), lo, hi - 1, frozenset(watch))
                    for lo, hi in itertools.pairwise(bounds)
                )
            )
        return _join(parts, base)

    async def head(self) -> tuple[int, str] | None:
        rows = await self._read("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")
        return (rows[0][0], rows[0][1].hex()) if rows else None

    async def first_seq(self) -> int | None:
        rows = await self._read("SELECT seq FROM audit ORDER BY seq LIMIT 1")
        return int(rows[0][0]) if rows else None

    async def entry_hash(self, seq: int) -> str | None:
        rows = await self._read("SELECT hash FROM audit WHERE seq = ?", (seq,))
        return rows[0][0].hex() if rows and isinstance(rows[0][0], bytes) else None

    async def first_at_or_after(self, ts: str) -> int | None:
        """The oldest entry recorded at `ts` or later (for pruning by date)."""
        rows = await self._read("SELECT min(seq) FROM audit WHERE ts >= ?", (_utc("before", ts),))
        return int(rows[0][0]) if rows and rows[0][0] is not None else None

    async def _read(self, sql: str, params: tuple[Any, ...] = ()) -> Any:
        try:
            return await self._open_db().execute_fetchall(sql, params)
        except sqlite3.Error as exc:
            raise self._error("cannot read it", exc) from exc

    # checkpoints --------------------------------------------------------------------------------

    async def add_checkpoint(self, checkpoint: StoredCheckpoint) -> None:
        try:
            await self._open_db().execute(
                "INSERT INTO checkpoint (entries, head, text) VALUES (?, ?, ?)",
                (checkpoint.entries, bytes.fromhex(checkpoint.head), checkpoint.text),
            )
        except sqlite3.Error as exc:
            raise self._error("cannot record the checkpoint", exc) from exc

    async def checkpoints(self) -> list[StoredCheckpoint]:
        rows = await self._read("SELECT entries, head, text FROM checkpoint ORDER BY entries, id")
        return [
            StoredCheckpoint(int(entries), head.hex() if isinstance(head, bytes) else str(head), str(text))
            for entries, head, text in rows
        ]

    async def prune(self, checkpoint: StoredCheckpoint) -> int:
        """One transaction on its own connection: keep the checkpoint, then remove what it vouches for."""
        self._open_db()
        try:
            async with aiosqlite.connect(self.path, isolation_level=None) as db:
                await db.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
                await db.execute("BEGIN IMMEDIATE")
                try:
                    head = list(
                        await db.execute_fetchall(
                            "SELECT hash, (SELECT max(seq) FROM audit) FROM audit WHERE seq = ?",
                            (checkpoint.entries,),
                        )
                    )
                    if not head or head[0][0] != bytes.fromhex(checkpoint.head):
                        raise AuditError(
                            f"audit store {self.path}: entry {checkpoint.entries} is not the one the "
                            "checkpoint vouches for; nothing was removed"
                        )
                    if head[0][1] == checkpoint.entries:
                        raise UsageError("the newest entry is always kept; nothing was removed")
                    await db.execute(
                        "INSERT INTO checkpoint (entries, head, text) VALUES (?, ?, ?)",
                        (checkpoint.entries, bytes.fromhex(checkpoint.head), checkpoint.text),
                    )
                    cursor = await db.execute("DELETE FROM audit WHERE seq <= ?", (checkpoint.entries,))
                    removed = cursor.rowcount
                    await db.execute("DELETE FROM checkpoint WHERE entries < ?", (checkpoint.entries,))
                    await db.execute("COMMIT")
                except BaseException:
                    await db.rollback()
                    raise
        except sqlite3.Error as exc:
            raise self._error("cannot prune it", exc) from exc
        return int(removed)

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

    async def _approval_appended(self, seq: int) -> None:
        if self._after_append is not None:
            await self._after_append(seq)

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


async def _verify_rows(db: aiosqlite.Connection, verifier: chain.Verifier, lo: int, hi: int) -> VerifyReport:
    async with db.execute(_VERIFY, (lo, hi)) as cursor:
        # SQLite reads the next chunk in aiosqlite's thread while this one is hashed here
        pending = asyncio.ensure_future(cursor.fetchmany(_VERIFY_CHUNK))
        while rows := await pending:
            pending = asyncio.ensure_future(cursor.fetchmany(_VERIFY_CHUNK))
            if not verifier.feed(rows):
                await pending
                break
    return verifier.report()


@dataclass(frozen=True, slots=True)
class _Range:
    """What one process found in entries lo..hi: the prev_hash its first entry claims, and its report."""

    lo: int
    first_prev: bytes | None
    report: VerifyReport


def _verify_range(path: str, lo: int, hi: int, watch: frozenset[int]) -> _Range:
    """In a worker process: verify entries lo..hi as if the first one's prev_hash were right."""
    db = sqlite3.connect(Path(path).absolute().as_uri() + "?mode=ro", uri=True)
    try:
        db.execute("BEGIN")
        cursor = db.execute(_VERIFY, (lo, hi))
        rows = cursor.fetchmany(_VERIFY_CHUNK)
        first_prev = rows[0][1] if rows and rows[0][0] == lo and isinstance(rows[0][1], bytes) else None
        verifier = chain.Verifier((lo - 1, first_prev or chain.GENESIS), watch)
        while rows and verifier.feed(rows):
            rows = cursor.fetchmany(_VERIFY_CHUNK)
        return _Range(lo, first_prev, verifier.report())
    finally:
        db.close()


def _join(parts: list[_Range], base: tuple[int, bytes] | None) -> VerifyReport:
    """One report from consecutive ranges: each must begin where the one before ended."""
    expected = base[1] if base else chain.GENESIS
    watched: dict[int, str] = {}
    done = parts[0].report
    for part in parts:
        report = part.report
        if part.first_prev is not None and part.first_prev != expected:
            problem = (
                "prev_hash is not the genesis value (edited, or entries before it removed)"
                if part.lo == 1
                else f"prev_hash does not match entry {part.lo - 1} (inserted or reordered)"
            )
            report = VerifyReport(
                False, part.lo - 1, done.head_hash, part.lo, f"entry {part.lo}: {problem}", done.first_seq
            )
        watched.update(report.watched)
        done = VerifyReport(
            report.ok,
            report.entries,
            report.head_hash if report.entries >= part.lo else done.head_hash,
            report.first_bad_seq,
            report.problem,
            parts[0].report.first_seq,
            {seq: digest for seq, digest in watched.items() if seq <= report.entries},
        )
        if not report.ok:
            break
        expected = bytes.fromhex(report.head_hash) if report.head_hash else expected
    return done


def _where(flt: AuditFilter) -> tuple[str, list[Any]]:
    """SQL conditions and parameters for every field of the filter that is set."""
    conditions, params = [], []
    for column in ("session_id", "identity", "tool", "decision", "call_id", "type", "connection", "kind"):
        value = getattr(flt, column)
        if value is not None:
            conditions.append(f"{column} = ?")
            params.append(str(value))
    for name, operator in (("since", ">="), ("until", "<")):
        value = getattr(flt, name)
        if value is not None:
            conditions.append(f"ts {operator} ?")
            params.append(_utc(name, value))
    if flt.table is not None:
        conditions.append(_TABLE_MATCH.format(alias=""))
        params.extend([flt.table.lower()] * 3)
    return (" WHERE " + " AND ".join(conditions) if conditions else ""), params


MASKED_CELLS = "$.detail.masked_cells"
"""Where an outcome records how many cells masking replaced (counted by `stats`)."""

# A table name matches itself and, unqualified, any schema's table of that name.
_TABLE_MATCH = (
    "{alias}tables IS NOT NULL AND EXISTS (SELECT 1 FROM json_each({alias}tables) AS t"
    " WHERE lower(t.value) = ? OR substr(lower(t.value), -length(?) - 1) = '.' || ?)"
)

# Entries a call gains between request and outcome (approvals) that name `approver`.
_APPROVER_MATCH = (
    "EXISTS (SELECT 1 FROM audit AS a WHERE a.call_id = r.call_id AND a.type NOT IN ('request', 'outcome')"
    " AND (a.identity = ? OR CAST(a.body AS TEXT) ->> '$.detail.approver' = ?))"
)


def _calls_sql(
    flt: CallFilter, columns: str = "r.seq, r.call_id", ordered: bool = True
) -> tuple[str, list[Any]]:
    """The requests of the calls that match, joined to their outcome when the filter asks about it."""
    request, outcome, params = ["r.type = 'request'"], [], []
    for column in ("session_id", "identity", "tool"):
        value = getattr(flt, column)
        if value is not None:
            request.append(f"r.{column} = ?")
            params.append(value)
    for name, operator in (("since", ">="), ("until", "<")):
        value = getattr(flt, name)
        if value is not None:
            request.append(f"r.ts {operator} ?")
            params.append(_utc(name, value))
    if flt.text:
        request.append("instr(lower(CAST(r.body AS TEXT) ->> '$.detail.arguments.sql'), lower(?)) > 0")
        params.append(flt.text)
    if flt.approver is not None:
        request.append(_APPROVER_MATCH)
        params.extend([flt.approver] * 2)
    outcome_params: list[Any] = []
    for column in ("connection", "decision", "kind"):
        value = getattr(flt, column)
        if value is not None:
            outcome.append(f"o.{column} = ?")
            outcome_params.append(value)
    if flt.writes:
        outcome.append("o.kind IS NOT NULL AND o.kind <> 'read'")
    if flt.table is not None:
        outcome.append(_TABLE_MATCH.format(alias="o."))
        outcome_params.extend([flt.table.lower()] * 3)
    sql = f"SELECT {columns} FROM audit AS r"
    if outcome:
        sql += " JOIN audit AS o ON o.call_id = r.call_id AND o.type = 'outcome'"
    sql += " WHERE " + " AND ".join(request + outcome)
    params += outcome_params
    if flt.limit is not None:
        if flt.limit < 0:
            raise UsageError(f"limit must be 0 or more, not {flt.limit}")
        return f"{sql} ORDER BY r.seq DESC LIMIT ?", [*params, flt.limit]
    return (f"{sql} ORDER BY r.seq" if ordered else sql), params
