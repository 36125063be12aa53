"""The audit store in PostgreSQL: one chain shared by every gateway of a team.

Every append goes through one server-side function, `mcp_guard_append`, in one round trip: it takes
a transaction-scoped advisory lock, reads the head, links each body onto it with the same
`chain.link` (SHA-256 over the domain, the seq as 8 big-endian bytes, the previous hash and the
exact body bytes) and inserts. The lock serializes appends from every gateway at the database, so
the chain has no forks and no gaps whatever the interleaving; `seq` is the primary key besides.
`audit verify` reads the rows back and checks them with `chain.Verifier`, the same code as SQLite.

As in the SQLite store, appends queued while a batch is on its way are written together in the
next one (group commit). Durability follows the same rule: a batch holding an entry appended with
`durable=True` commits with `synchronous_commit = on` (the WAL is flushed before the call goes
on); other batches set it `off` for their transaction (they survive a crash of mcp-guard, and a
crash of PostgreSQL loses at most the newest, never corrupting the chain).

The schema is created and upgraded by `mcp-guard store migrate`, run by the store's owner; a
gateway's role needs only SELECT and INSERT (docs/deployment.md). Opening refuses a schema older
(run migrate) or newer (upgrade mcp-guard) than this version.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterator, Collection, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, TypeAlias
from urllib.parse import urlsplit, urlunsplit

import asyncpg

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
    derived_index,
    utc_bound,
)
from mcp_guard.store.postgres_approvals import DB_ERRORS, PostgresApprovals
from mcp_guard.store.postgres_approvals import SCHEMA as APPROVALS_SCHEMA
from mcp_guard.store.sqlite import Durability
from mcp_guard.values import JsonValue

_Pending: TypeAlias = tuple[AuditEvent, bytes, bool, "asyncio.Future[int]"]

_LOCK = 0x6D6367_61756474  # "mcg" "audt": the advisory lock that serializes appends in one database

# Every column compares bytewise (COLLATE "C"), like SQLite: prefixes and ISO times order as text.
_AUDIT = """CREATE TABLE audit (
    seq bigint PRIMARY KEY,
    ts text COLLATE "C" NOT NULL,
    type text COLLATE "C" NOT NULL,
    session_id text COLLATE "C" NOT NULL,
    call_id text COLLATE "C",
    identity text COLLATE "C" NOT NULL,
    tool text COLLATE "C",
    connection text COLLATE "C",
    decision text COLLATE "C",
    prev_hash bytea NOT NULL,
    hash bytea NOT NULL,
    body bytea NOT NULL,
    kind text COLLATE "C",
    tables jsonb
)"""

_ARGS = (
    "p_body bytea[], p_ts text[], p_type text[], p_session text[], p_call text[], p_identity text[], "
    "p_tool text[], p_connection text[], p_decision text[], p_kind text[], p_tables jsonb[], "
    "p_durable boolean"
)

_APPEND_FUNCTION = f"""CREATE OR REPLACE FUNCTION mcp_guard_append({_ARGS}) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    last_seq bigint;
    last_hash bytea;
    first_seq bigint;
    digest bytea;
BEGIN
    -- durable entries wait for the WAL flush whatever the server's default; the others need not
    PERFORM set_config('synchronous_commit', CASE WHEN p_durable THEN 'on' ELSE 'off' END, true);
    PERFORM pg_advisory_xact_lock({_LOCK});
    SELECT seq, hash INTO last_seq, last_hash FROM audit ORDER BY seq DESC LIMIT 1;
    IF NOT FOUND THEN
        last_seq := 0;
        last_hash := '\\x{chain.GENESIS.hex()}'::bytea;
    END IF;
    first_seq := last_seq + 1;
    FOR i IN 1 .. coalesce(cardinality(p_body), 0) LOOP
        last_seq := last_seq + 1;
        digest := sha256('\\x{chain.DOMAIN.hex()}'::bytea || int8send(last_seq) || last_hash || p_body[i]);
        INSERT INTO audit (seq, ts, type, session_id, call_id, identity, tool, connection, decision,
                           prev_hash, hash, body, kind, tables)
        VALUES (last_seq, p_ts[i], p_type[i], p_session[i], p_call[i], p_identity[i], p_tool[i],
                p_connection[i], p_decision[i], last_hash, digest, p_body[i], p_kind[i], p_tables[i]);
        last_hash := digest;
    END LOOP;
    RETURN first_seq;
END
$$"""

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        'CREATE TABLE mcp_guard_schema (version integer NOT NULL, "one" boolean PRIMARY KEY DEFAULT true '
        'CHECK ("one"))',
        "INSERT INTO mcp_guard_schema (version) VALUES (0)",
        _AUDIT,
        "CREATE INDEX audit_session ON audit (session_id)",
        "CREATE INDEX audit_identity ON audit (identity)",
        "CREATE INDEX audit_call ON audit (call_id)",
        "CREATE INDEX audit_ts ON audit (ts)",
        "CREATE INDEX audit_kind ON audit (kind) WHERE kind IS NOT NULL",
        """CREATE TABLE checkpoint (
            id bigserial PRIMARY KEY,
            entries bigint NOT NULL,
            head bytea NOT NULL,
            text text NOT NULL
        )""",
        "CREATE INDEX checkpoint_entries ON checkpoint (entries)",
        _APPEND_FUNCTION,
    ),
    APPROVALS_SCHEMA,
)
"""Version N is reached by running MIGRATIONS[N - 1] on version N - 1, in one transaction."""

SCHEMA_VERSION = len(MIGRATIONS)

_CALL_APPEND = f"SELECT mcp_guard_append({', '.join(f'${i}' for i in range(1, len(chain.INDEXED) + 5))})"
_ROW = ", ".join(chain.ROW)
_VERIFY = f"SELECT {_ROW}, kind, tables::text FROM audit WHERE seq BETWEEN $1 AND $2 ORDER BY seq"
_VERIFY_CHUNK = 4096
_CALLS_CHUNK = 512
_JSON = "convert_from({a}body, 'UTF8')::json"
"""An entry's body as JSON, for the few filters that look inside `detail`."""


def display_url(url: str) -> str:
    """The store's URL as it may be shown: without its password or query (which may hold one)."""
    try:
        parts = urlsplit(url)
        netloc = parts.hostname or ""
        if parts.port:
            netloc = f"{netloc}:{parts.port}"
        if parts.username:
            netloc = f"{parts.username}@{netloc}"
    except ValueError:
        return "postgresql://(unparseable URL)"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class PostgresStore(Store):
    """The audit log in a PostgreSQL database whose schema `mcp-guard store migrate` made."""

    def __init__(self, url: str, *, durability: Durability = "writes", pool_size: int = 4) -> None:
        if durability not in ("full", "writes", "normal"):
            raise ConfigError(f"durability must be full, writes or normal, not {durability!r}")
        self.url = url
        self.where = display_url(url)
        self.durability = durability
        self.pool_size = pool_size
        self._pool: asyncpg.Pool | None = None
        self._writer_db: asyncpg.Connection | None = None
        self._writer: asyncio.Task[None] | None = None
        self._pending: list[_Pending] = []
        self._wake = asyncio.Event()
        self._closing = False
        # Approval steps gate writes (a claim is the intent of one): synced unless nothing is.
        self._approvals = PostgresApprovals(
            pool=self._open_pool,
            append=self._append_in,
            appended=self._approval_appended,
            connect=self._connect,
            error=self._error,
            synced=durability != "normal",
        )

    # lifecycle ----------------------------------------------------------------------------------

    async def _connect(self) -> asyncpg.Connection:
        try:
            return await asyncpg.connect(self.url, timeout=10)
        except DB_ERRORS as exc:
            raise self._error("cannot connect", exc) from None

    async def schema_version(self) -> int:
        """The version of the schema in the database; 0 when it holds none."""
        db = await self._connect()
        try:
            return await _version(db)
        except DB_ERRORS as exc:
            raise self._error("cannot read its schema version", exc) from None
        finally:
            await db.close()

    async def migrate(self) -> tuple[int, int]:
        db = await self._connect()
        try:
            async with db.transaction():
                # one migrator at a time; the others then find the schema up to date
                await db.execute("SELECT pg_advisory_xact_lock($1)", _LOCK + 1)
                found = await _version(db)
                check_schema_version(self.where, found, SCHEMA_VERSION)
                if found == 0:
                    await _refuse_foreign_audit_table(db, self.where)
                for version in range(found + 1, SCHEMA_VERSION + 1):
                    for statement in MIGRATIONS[version - 1]:
                        await db.execute(statement)
                    await db.execute("UPDATE mcp_guard_schema SET version = $1", version)
        except DB_ERRORS as exc:
            raise self._error("cannot create or upgrade its schema", exc) from None
        finally:
            await db.close()
        return found, SCHEMA_VERSION

    async def open(self) -> None:
        version = await self.schema_version()
        if version < SCHEMA_VERSION:
            state = "holds no mcp-guard schema" if version == 0 else f"has schema version {version}"
            raise AuditError(
                f"audit store {self.where}: {state}; run `mcp-guard store migrate` (as the store's owner) "
                f"to bring it to version {SCHEMA_VERSION}"
            )
        check_schema_version(self.where, version, SCHEMA_VERSION)
        try:
            self._pool = await asyncpg.create_pool(self.url, min_size=1, max_size=self.pool_size, timeout=10)
        except DB_ERRORS as exc:
            raise self._error("cannot connect", exc) from None
        self._writer_db = await self._connect()
        self._closing = False
        self._writer = asyncio.create_task(self._write_loop())

    async def close(self) -> None:
        await self._approvals.close()
        if self._pool is None or self._closing:
            return
        self._closing = True
        self._wake.set()
        if self._writer is not None:
            await self._writer
        if self._writer_db is not None:
            await self._writer_db.close()
        await self._pool.close()
        self._pool, self._writer_db, self._writer = None, None, None

    # appends ------------------------------------------------------------------------------------

    async def append(self, event: AuditEvent, *, durable: bool = False) -> int:
        """Queue the entry for the writer and return its seq once committed. A caller cancelled while
        waiting does not withdraw its entry: it may already be on its way to the database."""
        body = chain.canonical(event)
        if self._pool is None or self._closing:
            raise AuditError(f"audit store {self.where}: is not open; nothing can be recorded")
        done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pending.append((event, body, durable, done))
        self._wake.set()
        seq = await done
        if self._after_append is not None:
            await self._after_append(seq)
        return seq

    def _synced(self, durable: bool) -> bool:
        return self.durability == "full" or (self.durability == "writes" and durable)

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

    async def _write(self, batch: list[_Pending]) -> None:
        synced = any(self._synced(durable) for _, _, durable, _ in batch)
        columns = _columns([(event, body) for event, body, _, _ in batch])
        try:
            if self._writer_db is None or self._writer_db.is_closed():
                self._writer_db = await self._connect()
            first = await self._writer_db.fetchval(_CALL_APPEND, *columns, synced)
        except Exception as exc:  # every failure is the waiting callers' to hear; the writer lives on
            if _connection_broken(exc) and self._writer_db is not None:
                self._writer_db.terminate()  # the next batch connects anew
                self._writer_db = None
            action = (
                "the entry was not recorded" if len(batch) == 1 else f"{len(batch)} entries were not recorded"
            )
            for *_, done in batch:
                if not done.done():
                    done.set_exception(self._error(action, exc))
            return
        for index, (*_, done) in enumerate(batch):
            if not done.done():
                done.set_result(int(first) + index)

    async def _append_in(self, db: asyncpg.Connection, event: AuditEvent, synced: bool) -> int:
        """Append one entry in the caller's transaction: an approval step and its entry commit together."""
        return int(await db.fetchval(_CALL_APPEND, *_columns([(event, chain.canonical(event))]), synced))

    async def restore(self, records: Sequence[AuditRecord]) -> None:
        """Append entries copied from another store as they are (seq, hashes and bytes), in one
        transaction; they must continue this store's chain (or start it, when it is empty)."""
        rows = []
        for record in records:
            fields = record.event.as_dict()
            kind, tables = derived_index(record.event.type, record.event.detail)
            rows.append(
                (
                    record.seq,
                    *(fields[name] for name in chain.INDEXED),
                    bytes.fromhex(record.prev_hash),
                    bytes.fromhex(record.hash),
                    record.body,
                    kind,
                    tables,
                )
            )
        try:
            async with self._open_pool().acquire() as db, db.transaction():
                await db.execute("SELECT pg_advisory_xact_lock($1)", _LOCK)
                head = await db.fetchrow("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")
                check_continues(self.where, (head[0], head[1]) if head else None, records)
                await db.copy_records_to_table(
                    "audit",
                    records=rows,
                    columns=["seq", *chain.INDEXED, "prev_hash", "hash", "body", "kind", "tables"],
                )
        except DB_ERRORS as exc:
            raise self._error("the copied entries were not recorded", exc) from None

    # reading ------------------------------------------------------------------------------------

    def _open_pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise AuditError(f"audit store {self.where}: is not open")
        return self._pool

    async def _read(self, sql: str, *params: Any) -> list[asyncpg.Record]:
        """Rows of one query; read again once on a fresh connection when the first one was broken."""
        for attempt in (1, 2):
            try:
                return list(await self._open_pool().fetch(sql, *params))
            except DB_ERRORS as exc:
                if attempt == 1 and _connection_broken(exc):
                    continue
                raise self._error("cannot read it", exc) from None
        raise AssertionError("unreachable")

    def _record(self, row: Sequence[Any]) -> AuditRecord:
        seq, prev_hash, digest, body = row
        try:
            event = chain.decode(body)
        except AuditError as exc:
            raise AuditError(
                f"audit store {self.where}: entry {seq}: {exc}; run `mcp-guard audit verify`"
            ) from exc
        return AuditRecord(int(seq), prev_hash.hex(), digest.hex(), body, event)

    async def query(self, flt: AuditFilter) -> list[AuditRecord]:
        sql = _Sql()
        where = _where(flt, sql)
        text = f"SELECT seq, prev_hash, hash, body FROM audit{where} ORDER BY seq"
        if flt.limit is not None:
            if flt.limit < 0:
                raise UsageError(f"limit must be 0 or more, not {flt.limit}")
            limit = sql.add(flt.limit)
            newest = f"SELECT seq, prev_hash, hash, body FROM audit{where} ORDER BY seq DESC LIMIT {limit}"
            text = f"SELECT * FROM ({newest}) AS newest ORDER BY seq"
        return [self._record(row) for row in await self._read(text, *sql.params)]

    async def entries(self, first: int, last: int) -> list[AuditRecord]:
        rows = await self._read(
            "SELECT seq, prev_hash, hash, body FROM audit WHERE seq BETWEEN $1 AND $2 ORDER BY seq",
            first,
            last,
        )
        return [self._record(row) for row in rows]

    async def session_ids(self, prefix: str, limit: int) -> list[str]:
        rows = await self._read(
            "SELECT session_id FROM audit WHERE type = 'session_start' AND starts_with(session_id, $1)"
            " ORDER BY seq DESC LIMIT $2",
            prefix,
            limit,
        )
        return [str(row[0]) for row in rows]

    async def call_ids(self, prefix: str, limit: int) -> list[str]:
        rows = await self._read(
            "SELECT DISTINCT call_id FROM audit WHERE call_id >= $1 AND starts_with(call_id, $1)"
            " ORDER BY call_id LIMIT $2",
            prefix,
            limit,
        )
        return [str(row[0]) for row in rows]

    @asynccontextmanager
    async def _snapshot(self) -> AsyncIterator[asyncpg.Connection]:
        """A connection in one read-only repeatable-read transaction: every query sees the same entries."""
        try:
            async with self._open_pool().acquire() as db:
                async with db.transaction(isolation="repeatable_read", readonly=True):
                    yield db
        except DB_ERRORS as exc:
            raise self._error("cannot read it", exc) from None

    async def calls(self, flt: CallFilter) -> AsyncGenerator[list[AuditRecord], None]:
        sql = _Sql()
        text = _calls_sql(flt, sql)
        async with self._snapshot() as db:
            if flt.limit is not None:
                rows = list(reversed(await db.fetch(text, *sql.params)))
                for i in range(0, len(rows), _CALLS_CHUNK):
                    for call in await self._gather_calls(db, rows[i : i + _CALLS_CHUNK]):
                        yield call
                return
            cursor = await db.cursor(text, *sql.params)
            while chunk := await cursor.fetch(_CALLS_CHUNK):
                for call in await self._gather_calls(db, chunk):
                    yield call

    async def _gather_calls(self, db: asyncpg.Connection, chunk: Sequence[Any]) -> list[list[AuditRecord]]:
        ids = list(dict.fromkeys(str(row[1]) for row in chunk))
        rows = await db.fetch(
            "SELECT seq, prev_hash, hash, body FROM audit WHERE call_id = ANY($1::text[]) ORDER BY seq", ids
        )
        grouped: dict[str, list[AuditRecord]] = {call_id: [] for call_id in ids}
        for row in rows:
            record = self._record(row)
            grouped[str(record.event.call_id)].append(record)
        return [entries for entries in grouped.values() if entries]

    async def stats(self, flt: CallFilter) -> list[StatsRow]:
        sql = _Sql()
        matched = _calls_sql(flt, sql, columns="r.call_id, r.identity, r.ts", ordered=False)
        body = _JSON.format(a="o.")
        text = f"""
            SELECT m.identity, substr(m.ts, 1, 10) AS day, count(*),
                count(*) FILTER (WHERE o.kind IS NOT NULL AND o.kind <> 'read'),
                count(*) FILTER (WHERE o.decision = 'deny'),
                count(*) FILTER (WHERE {body} #>> '{{detail,status}}' = 'error'),
                count(*) FILTER (WHERE o.decision = 'approve' OR EXISTS (
                    SELECT 1 FROM audit AS a WHERE a.call_id = m.call_id AND a.type LIKE 'approval%'
                )),
                coalesce(sum(CASE WHEN json_typeof({body} #> '{{detail,masked_cells}}') = 'number'
                    THEN ({body} #>> '{{detail,masked_cells}}')::numeric END), 0)
            FROM ({matched}) AS m
            LEFT JOIN audit AS o ON o.call_id = m.call_id AND o.type = 'outcome'
            GROUP BY 1, 2 ORDER BY 2, 1"""
        async with self._snapshot() as db:
            rows = await db.fetch(text, *sql.params)
        return [StatsRow(str(row[0]), str(row[1]), *(int(value) for value in row[2:])) for row in rows]

    async def verify(
        self, *, base: tuple[int, bytes] | None = None, watch: Collection[int] = ()
    ) -> VerifyReport:
        """Stream every entry from one snapshot through `chain.Verifier`, as the SQLite store does."""
        verifier = chain.Verifier(base, watch)
        start = base[0] + 1 if base else 1
        async with self._snapshot() as db:
            last = await db.fetchval("SELECT max(seq) FROM audit")
            cursor = await db.cursor(_VERIFY, start, max(last or 0, start))
            while rows := await cursor.fetch(_VERIFY_CHUNK):
                if not verifier.feed(_with_derived_check(row) for row in rows):
                    break
        return verifier.report()

    async def head(self) -> tuple[int, str] | None:
        rows = await self._read("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")
        return (int(rows[0][0]), rows[0][1].hex()) if rows else None

    async def first_seq(self) -> int | None:
        rows = await self._read("SELECT seq FROM audit ORDER BY seq LIMIT 1")
        return int(rows[0][0]) if rows else None

    async def entry_hash(self, seq: int) -> str | None:
        rows = await self._read("SELECT hash FROM audit WHERE seq = $1", seq)
        return rows[0][0].hex() if rows else None

    async def first_at_or_after(self, ts: str) -> int | None:
        rows = await self._read("SELECT min(seq) FROM audit WHERE ts >= $1", utc_bound("before", ts))
        return int(rows[0][0]) if rows and rows[0][0] is not None else None

    # checkpoints --------------------------------------------------------------------------------

    async def add_checkpoint(self, checkpoint: StoredCheckpoint) -> None:
        try:
            await self._open_pool().execute(
                "INSERT INTO checkpoint (entries, head, text) VALUES ($1, $2, $3)",
                checkpoint.entries,
                bytes.fromhex(checkpoint.head),
                checkpoint.text,
            )
        except DB_ERRORS as exc:
            raise self._error("cannot record the checkpoint", exc) from None

    async def checkpoints(self) -> list[StoredCheckpoint]:
        rows = await self._read("SELECT entries, head, text FROM checkpoint ORDER BY entries, id")
        return [StoredCheckpoint(int(entries), head.hex(), str(text)) for entries, head, text in rows]

    async def prune(self, checkpoint: StoredCheckpoint) -> int:
        """One transaction: keep the checkpoint, then remove what it vouches for (needs DELETE)."""
        try:
            async with self._open_pool().acquire() as db, db.transaction():
                await db.execute("SELECT pg_advisory_xact_lock($1)", _LOCK)
                head = await db.fetchrow(
                    "SELECT hash, (SELECT max(seq) FROM audit) FROM audit WHERE seq = $1", checkpoint.entries
                )
                if head is None or head[0] != bytes.fromhex(checkpoint.head):
                    raise AuditError(
                        f"audit store {self.where}: entry {checkpoint.entries} is not the one the "
                        "checkpoint vouches for; nothing was removed"
                    )
                if head[1] == checkpoint.entries:
                    raise UsageError("the newest entry is always kept; nothing was removed")
                await db.execute(
                    "INSERT INTO checkpoint (entries, head, text) VALUES ($1, $2, $3)",
                    checkpoint.entries,
                    bytes.fromhex(checkpoint.head),
                    checkpoint.text,
                )
                status = await db.execute("DELETE FROM audit WHERE seq <= $1", checkpoint.entries)
                await db.execute("DELETE FROM checkpoint WHERE entries < $1", checkpoint.entries)
        except DB_ERRORS as exc:
            raise self._error("cannot prune it", exc) from None
        return int(status.split()[-1])

    # approvals (store/postgres_approvals.py) ----------------------------------------------------

    async def add_approval(self, request: ApprovalRequest, event: AuditEvent) -> None:
        await self._approvals.add(request, event)

    async def get_approval(self, request_id: str) -> ApprovalRequest | None:
        return await self._approvals.get(request_id)

    async def list_approvals(
        self, states: Collection[ApprovalState] | None = None, limit: int = 100
    ) -> list[ApprovalRequest]:
        return await self._approvals.listing(states, limit)

    async def add_vote(self, vote: Vote, event: AuditEvent, *, unexpired_at: str) -> bool:
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
        return await self._approvals.transition(request_id, expected, target, event, changes, unexpired_at)

    async def finish_approval(
        self, request_id: str, outcome: Mapping[str, JsonValue], event: AuditEvent
    ) -> None:
        await self._approvals.finish(request_id, outcome, event)

    def watch_approvals(self) -> AbstractAsyncContextManager[ChangeWatch]:
        self._open_pool()
        return self._approvals.watch()

    async def _approval_appended(self, seq: int) -> None:
        if self._after_append is not None:
            await self._after_append(seq)

    # errors -------------------------------------------------------------------------------------

    def _error(self, action: str, exc: BaseException) -> AuditError:
        """A database failure in words naming the store (never its password) and the cause."""
        if isinstance(exc, AuditError):
            return exc
        if isinstance(exc, asyncpg.InsufficientPrivilegeError):
            cause = f"the store's role lacks a privilege ({exc}); see docs/deployment.md for the grants"
        elif isinstance(exc, asyncpg.InvalidPasswordError | asyncpg.InvalidAuthorizationSpecificationError):
            cause = f"PostgreSQL refused the credentials ({type(exc).__name__})"
        elif isinstance(exc, OSError | asyncio.TimeoutError):
            cause = f"the server is unreachable ({exc or type(exc).__name__})"
        elif _connection_broken(exc):
            cause = f"the connection to the database was lost or broken ({exc or type(exc).__name__})"
        else:
            cause = str(exc) or type(exc).__name__
        password = urlsplit(self.url).password if "://" in self.url else None
        if password:
            cause = cause.replace(password, "***")
        return AuditError(f"audit store {self.where}: {action}: {cause}")


def _connection_broken(exc: BaseException) -> bool:
    """Whether the connection that raised `exc` cannot serve the next statement: it was lost, or the
    driver's state is confused (seen after the server terminated it mid-call), rather than
    PostgreSQL refusing this one statement (a privilege, a constraint) or a value failing to encode."""
    if isinstance(exc, OSError | asyncio.TimeoutError | asyncpg.InternalClientError):
        return True
    if isinstance(exc, asyncpg.PostgresConnectionError):
        return True
    return isinstance(exc, asyncpg.InterfaceError) and not isinstance(exc, asyncpg.DataError)


async def _version(db: asyncpg.Connection) -> int:
    exists = await db.fetchval("SELECT to_regclass('mcp_guard_schema') IS NOT NULL")
    if not exists:
        return 0
    return int(await db.fetchval("SELECT version FROM mcp_guard_schema") or 0)


async def _refuse_foreign_audit_table(db: asyncpg.Connection, where: str) -> None:
    found = [
        row[0]
        for row in await db.fetch(
            "SELECT name FROM unnest(ARRAY['audit', 'checkpoint']) AS name"
            " WHERE to_regclass(name) IS NOT NULL"
        )
    ]
    if found:
        raise AuditError(
            f"audit store {where}: the database already holds {', '.join(found)} but no mcp-guard schema; "
            "give the audit store a database (or a schema on the role's search_path) of its own"
        )


def _columns(entries: Sequence[tuple[AuditEvent, bytes]]) -> list[list[Any]]:
    """`mcp_guard_append`'s arguments but the last: one array per column, one element per entry."""
    columns: list[list[Any]] = [[] for _ in range(len(chain.INDEXED) + 3)]
    for event, body in entries:
        fields = event.as_dict()
        kind, tables = derived_index(event.type, event.detail)
        for column, value in zip(
            columns, (body, *(fields[name] for name in chain.INDEXED), kind, tables), strict=True
        ):
            column.append(value)
    return columns


def _with_derived_check(row: Sequence[Any]) -> tuple[Any, ...]:
    """The row as `chain.Verifier` takes it: the derived columns replaced by whether they match."""
    *values, kind, tables = row
    try:
        fields = json.loads(values[3])
    except (ValueError, TypeError):
        fields = None
    if isinstance(fields, dict) and fields.get("type") == EventType.OUTCOME:
        detail = fields.get("detail")
        expected = derived_index(EventType.OUTCOME, detail if isinstance(detail, dict) else {})
    else:
        expected = (None, None)
    found = (kind, None if tables is None else json.loads(tables))
    wanted = (expected[0], None if expected[1] is None else json.loads(expected[1]))
    return (*values, 1 if found == wanted else 0)


class _Sql:
    """Parameters gathered while SQL is built; `add` gives each one's placeholder."""

    def __init__(self) -> None:
        self.params: list[Any] = []

    def add(self, value: Any) -> str:
        self.params.append(value)
        return f"${len(self.params)}"


_TABLE_MATCH = (
    "{alias}tables IS NOT NULL AND EXISTS (SELECT 1 FROM jsonb_array_elements_text({alias}tables) AS t(name)"
    " WHERE lower(t.name) = {p} OR right(lower(t.name), length({p}) + 1) = '.' || {p})"
)


def _where(flt: AuditFilter, sql: _Sql) -> str:
    conditions = []
    for column in ("session_id", "identity", "tool", "decision", "call_id", "type", "connection", "kind"):
        value = getattr(flt, column)
        if value is not None:
            conditions.append(f"{column} = {sql.add(str(value))}")
    for name, operator in (("since", ">="), ("until", "<")):
        value = getattr(flt, name)
        if value is not None:
            conditions.append(f"ts {operator} {sql.add(utc_bound(name, value))}")
    if flt.table is not None:
        conditions.append(_TABLE_MATCH.format(alias="", p=sql.add(flt.table.lower())))
    return " WHERE " + " AND ".join(conditions) if conditions else ""


def _calls_sql(flt: CallFilter, sql: _Sql, columns: str = "r.seq, r.call_id", ordered: bool = True) -> str:
    """The requests of the calls that match, joined to their outcome when the filter asks about it."""
    request, outcome = ["r.type = 'request'"], []
    for column in ("session_id", "identity", "tool"):
        value = getattr(flt, column)
        if value is not None:
            request.append(f"r.{column} = {sql.add(value)}")
    for name, operator in (("since", ">="), ("until", "<")):
        value = getattr(flt, name)
        if value is not None:
            request.append(f"r.ts {operator} {sql.add(utc_bound(name, value))}")
    if flt.text:
        body = _JSON.format(a="r.")
        request.append(
            f"strpos(lower({body} #>> '{{detail,arguments,sql}}'), lower({sql.add(flt.text)})) > 0"
        )
    if flt.approver is not None:
        p = sql.add(flt.approver)
        request.append(
            "EXISTS (SELECT 1 FROM audit AS a WHERE a.call_id = r.call_id"
            " AND a.type NOT IN ('request', 'outcome')"
            f" AND (a.identity = {p} OR {_JSON.format(a='a.')} #>> '{{detail,approver}}' = {p}))"
        )
    for column in ("connection", "decision", "kind"):
        value = getattr(flt, column)
        if value is not None:
            outcome.append(f"o.{column} = {sql.add(value)}")
    if flt.writes:
        outcome.append("o.kind IS NOT NULL AND o.kind <> 'read'")
    if flt.table is not None:
        outcome.append(_TABLE_MATCH.format(alias="o.", p=sql.add(flt.table.lower())))
    text = f"SELECT {columns} FROM audit AS r"
    if outcome:
        text += " JOIN audit AS o ON o.call_id = r.call_id AND o.type = 'outcome'"
    text += " WHERE " + " AND ".join(request + outcome)
    if flt.limit is not None:
        if flt.limit < 0:
            raise UsageError(f"limit must be 0 or more, not {flt.limit}")
        return f"{text} ORDER BY r.seq DESC LIMIT {sql.add(flt.limit)}"
    return f"{text} ORDER BY r.seq" if ordered else text
