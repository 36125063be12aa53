"""PostgreSQL through an asyncpg pool, with the least power that works.

Reads run in one `BEGIN READ ONLY` transaction that is rolled back; writes in one transaction, all
or nothing. Each statement goes alone through the extended protocol, which refuses a second
statement in one message. After the answer, the transaction is ended and the session reset in one
round trip, and only then does the connection go back to the pool. Every driver, network and
timeout error leaves through `_translate`, credentials redacted.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import json
import logging
import re
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import replace
from decimal import Decimal
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

import asyncpg

from mcp_guard.backends.base import (
    Backend,
    Column,
    ColumnInfo,
    DbSchema,
    Limits,
    Relation,
    Relative,
    ResultSet,
    TableInfo,
    WriteResult,
    check_call,
    numbered,
    statement_params,
)
from mcp_guard.classify import Statement
from mcp_guard.errors import BackendError, StatementTimeout, UsageError
from mcp_guard.redact import redact
from mcp_guard.values import JsonScalar, JsonValue, converter_for, to_json_value

log = logging.getLogger(__name__)

_CONNECT_TIMEOUT_S = 10.0
_BACKSTOP_S = 1.0
"""Client-side grace after the server's statement_timeout; then asyncpg cancels the query itself."""

_DRIVER_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
    OSError,  # TimeoutError included
)
_STALE_PLAN = (asyncpg.InvalidCachedStatementError, asyncpg.OutdatedSchemaCacheError)

# asyncpg's own reset (advisory locks, CLOSE ALL, UNLISTEN *, RESET ALL) leaves SET ROLE and
# SET SESSION AUTHORIZATION (RESET ALL keeps both), temp tables, sequence state and SQL-level
# PREPAREd statements behind. DEALLOCATE ALL would also drop asyncpg's cached statements, hence the loop.
_RESET_SQL = """
SET SESSION AUTHORIZATION DEFAULT;
RESET ALL;
SELECT pg_catalog.pg_advisory_unlock_all();
CLOSE ALL;
UNLISTEN *;
DISCARD TEMP;
DISCARD SEQUENCES;
DO $reset$ DECLARE prepared text; BEGIN
  FOR prepared IN SELECT s.name FROM pg_catalog.pg_prepared_statements s WHERE s.from_sql LOOP
    EXECUTE pg_catalog.format('DEALLOCATE %I', prepared);
  END LOOP;
END $reset$;
"""

_LIST_TABLES = r"""
SELECT n.nspname, c.relname, c.relkind IN ('v', 'm')
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f') AND NOT c.relispartition
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg\_toast%' AND n.nspname NOT LIKE 'pg\_temp\_%'
ORDER BY 1, 2
"""

_FIND_TABLE = """
SELECT c.oid FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE c.relname::text = $2::text AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
  AND CASE WHEN $1::text IS NULL THEN pg_catalog.pg_table_is_visible(c.oid) ELSE n.nspname::text = $1 END
"""

_DESCRIBE_TABLE = """
SELECT a.attname, pg_catalog.format_type(a.atttypid, a.atttypmod), NOT a.attnotnull,
       coalesce(a.attnum = ANY (i.indkey), false)
FROM pg_catalog.pg_attribute a
LEFT JOIN pg_catalog.pg_index i ON i.indrelid = a.attrelid AND i.indisprimary
WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""

_SCHEMA = """
SELECT c.oid, n.nspname, c.relname, c.relkind IN ('v', 'm'),
       array_agg(a.attname::text ORDER BY a.attnum),
       array_agg(pg_catalog.format_type(a.atttypid, a.atttypmod) ORDER BY a.attnum),
       CASE WHEN c.relkind IN ('v', 'm') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
            THEN pg_catalog.pg_get_viewdef(c.oid) END,
       n.nspname IN ('pg_catalog', 'information_schema')
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f')
  AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp\\_%'
GROUP BY n.nspname, c.relname, c.relkind, c.oid
"""
_INHERITS = "SELECT inhrelid, inhparent FROM pg_catalog.pg_inherits"
_GENERATED = """
SELECT ad.adrelid, a.attname, array_agg(r.attname::text)
FROM pg_catalog.pg_attrdef ad
JOIN pg_catalog.pg_attribute a ON a.attrelid = ad.adrelid AND a.attnum = ad.adnum AND a.attgenerated <> ''
JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_attrdef'::regclass AND d.objid = ad.oid
  AND d.refclassid = 'pg_catalog.pg_class'::regclass AND d.refobjid = ad.adrelid AND d.refobjsubid > 0
JOIN pg_catalog.pg_attribute r ON r.attrelid = ad.adrelid AND r.attnum = d.refobjsubid
  AND r.attnum <> a.attnum
GROUP BY ad.adrelid, a.attname
"""
_SEARCH_PATH = "SELECT pg_catalog.current_schemas(true)::text[]"

_COUNTED_COMMANDS = frozenset({"INSERT", "UPDATE", "DELETE", "MERGE", "COPY", "SELECT"})
_DECODED_AS: dict[str, type] = {
    **dict.fromkeys(("int2", "int4", "int8", "oid"), int),
    **dict.fromkeys(("text", "varchar", "bpchar", "name", "char"), str),
    "bool": bool,
    **dict.fromkeys(("float4", "float8"), float),
    "numeric": Decimal,
    "date": dt.date,
    **dict.fromkeys(("timestamp", "timestamptz"), dt.datetime),
    **dict.fromkeys(("time", "timetz"), dt.time),
    "interval": dt.timedelta,
    "uuid": uuid.UUID,
    "bytea": bytes,
}
"""What asyncpg decodes these pg_catalog types into: their conversion is chosen once per column."""

_Converters = tuple[Callable[[object], JsonValue] | None, ...]


def _with_relatives(
    relations: dict[int, Relation], inherits: Sequence[tuple[int, int]]
) -> tuple[Relation, ...]:
    """The relations, each with its ancestors and descendants (`pg_inherits`, followed transitively:
    a partition of a partition, a grandchild). An ancestor shares its own columns (every one is
    inherited), a descendant this table's."""
    parents: dict[int, list[int]] = {}
    children: dict[int, list[int]] = {}
    for child, parent in inherits:
        parents.setdefault(child, []).append(parent)
        children.setdefault(parent, []).append(child)

    def reach(oid: int, edges: dict[int, list[int]]) -> list[int]:
        found: dict[int, None] = {}
        todo = list(edges.get(oid, ()))
        while todo:
            other = todo.pop()
            if other not in found and other != oid:
                found[other] = None
                todo.extend(edges.get(other, ()))
        return [other for other in found if other in relations]

    def columns(relation: Relation) -> frozenset[str]:
        return frozenset(name for name, _ in relation.columns)

    def relatives(oid: int, relation: Relation) -> tuple[Relative, ...]:
        above = [relations[other] for other in reach(oid, parents)]
        below = [relations[other] for other in reach(oid, children)]
        return tuple(
            [Relative(r.schema, r.name, columns(r)) for r in above]
            + [Relative(r.schema, r.name, columns(relation)) for r in below]
        )

    related = parents.keys() | children.keys()
    return tuple(
        replace(relation, relatives=relatives(oid, relation)) if oid in related else relation
        for oid, relation in relations.items()
    )


class _GuardedConnection(asyncpg.Connection):  # type: ignore[misc]
    """A pooled connection that resets fully before reuse and reads with a row cap in one round trip.

    asyncpg's public API offers a capped fetch (a cursor: two or three round trips) or result
    types (`prepare()`: one more, uncached, round trip), not both at once; `fetch_capped` uses the
    internals that `fetchrow()` itself uses, so a repeated read costs one round trip.
    """

    _settled = False

    def get_reset_query(self) -> str:
        """asyncpg's documented hook, run by the pool on release: nothing left to do after `settle`."""
        if self._settled:
            self._settled = False
            return ""
        return _RESET_SQL

    async def settle(self) -> None:
        """End the open transaction, if any, and reset the session, in one round trip."""
        rollback = "ROLLBACK;" if self.is_in_transaction() else ""
        await self.execute(rollback + _RESET_SQL, timeout=_CONNECT_TIMEOUT_S)
        self._settled = True

    async def fetch_capped(
        self, sql: str, params: Sequence[JsonScalar], limit: int, timeout: float
    ) -> tuple[tuple[Column, ...], list[list[JsonValue]]]:
        """At most `limit` rows of `sql` through the unnamed portal, with a cached prepared statement."""

        def bind_execute(state: Any, budget: float | None) -> Any:
            args = _coerce_params(state._get_parameters(), params)
            return self._protocol.bind_execute(state, args, "", limit, False, budget)

        with self._stmt_exclusive_section:
            records, state = await self._do_execute(sql, bind_execute, timeout)
        columns, converters = _shape(state._get_attributes())
        return columns, _json_rows(records, converters)


class PostgresBackend(Backend):
    """One PostgreSQL database behind a pool of `pool_size` connections."""

    dialect = "postgres"

    def __init__(self, url: str, *, pool_size: int = 4, read_timeout_s: float | None = None) -> None:
        parts = urlsplit(url)
        self._url = url
        self._pool_size = pool_size
        self._read_timeout_s = read_timeout_s
        passwords = [parts.password or "", *parse_qs(parts.query).get("password", [])]
        self._secrets = tuple(
            secret for password in passwords for secret in (password, unquote(password)) if secret
        )
        self._where = f"{parts.hostname or 'localhost'}:{parts.port or 5432}{parts.path or '/'}"
        self._pool: asyncpg.Pool | None = None
        self._write_pool: asyncpg.Pool | None = None
        self._write_pool_lock = asyncio.Lock()
        self._settling: set[asyncio.Task[None]] = set()

    async def open(self) -> None:
        # Read connections start read-only, with the statement timeout, as session defaults that the
        # reset restores: a single-statement read then needs no BEGIN, one round trip in all.
        settings = {"default_transaction_read_only": "on"}
        if self._read_timeout_s is not None:
            settings["statement_timeout"] = str(_timeout_ms(self._read_timeout_s))
        self._pool = await self._create_pool(settings)

    async def _create_pool(self, settings: dict[str, str]) -> asyncpg.Pool:
        where = f"cannot connect to PostgreSQL at {self._where}"
        with self._errors(_CONNECT_TIMEOUT_S, where):
            try:
                return await asyncpg.create_pool(
                    self._url,
                    min_size=1,
                    max_size=self._pool_size,
                    connection_class=_GuardedConnection,
                    init=_install_codecs,
                    timeout=_CONNECT_TIMEOUT_S,
                    server_settings={"application_name": "mcp-guard", **settings},
                )
            except TimeoutError as error:
                raise BackendError(f"{where}: no answer within {_CONNECT_TIMEOUT_S:g} s") from error

    async def _writer_pool(self) -> asyncpg.Pool:
        """Write connections keep the role's own defaults, so a role the DBA made read-only stays so."""
        async with self._write_pool_lock:
            if self._write_pool is None:
                self._write_pool = await self._create_pool({})
            return self._write_pool

    async def close(self) -> None:
        pools = [pool for pool in (self._pool, self._write_pool) if pool is not None]
        self._pool = self._write_pool = None
        await asyncio.gather(*self._settling, return_exceptions=True)
        for pool in pools:
            await pool.close()

    async def read(
        self,
        statements: Sequence[str],
        params: Sequence[JsonScalar],
        limits: Limits,
        bound: Sequence[Sequence[JsonScalar]] | None = None,
    ) -> list[ResultSet]:
        check_call(statements, params, bound)
        try:
            return await self._read(statements, params, limits, bound)
        except BackendError as error:
            if not isinstance(error.__cause__, _STALE_PLAN):
                raise
        # A table changed shape since asyncpg cached the plan; asyncpg has dropped it: once more.
        return await self._read(statements, params, limits, bound)

    async def _read(
        self,
        statements: Sequence[str],
        params: Sequence[JsonScalar],
        limits: Limits,
        bound: Sequence[Sequence[JsonScalar]] | None,
    ) -> list[ResultSet]:
        backstop = limits.timeout_s + _BACKSTOP_S
        results: list[ResultSet] = []
        async with self._connection(self._pool, limits) as conn:
            if len(statements) == 1 and limits.timeout_s == self._read_timeout_s:
                # The session defaults already make its implicit transaction read-only and timed.
                with self._errors(limits.timeout_s):
                    columns, rows = await conn.fetch_capped(
                        statements[0], statement_params(params, bound, 0), limits.row_limit + 1, backstop
                    )
                if conn.is_in_transaction():
                    raise BackendError("the statement opened a transaction: refused")
                return [ResultSet.capped(columns, rows, limits)]
            with self._errors(limits.timeout_s):
                # One snapshot for all statements; the trailing SELECT takes it, after which
                # SET TRANSACTION READ WRITE is refused.
                await conn.execute(
                    f"BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; {_timeout_sql(limits)}; SELECT",
                    timeout=backstop,
                )
            for index, (where, sql) in enumerate(numbered(statements)):
                arguments = statement_params(params, bound, index)
                with self._errors(limits.timeout_s, where):
                    columns, rows = await conn.fetch_capped(sql, arguments, limits.row_limit + 1, backstop)
                if not conn.is_in_transaction():
                    raise BackendError(f"{where or 'the statement'} ended the read-only transaction: refused")
                results.append(ResultSet.capped(columns, rows, limits))
        return results

    async def write(
        self, statements: Sequence[str], params: Sequence[JsonScalar], limits: Limits
    ) -> list[WriteResult]:
        check_call(statements, params)
        backstop = limits.timeout_s + _BACKSTOP_S
        results: list[WriteResult] = []
        async with self._connection(await self._writer_pool(), limits) as conn:
            with self._errors(limits.timeout_s):
                # Plain BEGIN: a role the DBA made read-only by default stays read-only.
                await conn.execute(f"BEGIN; {_timeout_sql(limits)}", timeout=backstop)
            for where, sql in numbered(statements):
                # Uncached prepare: a statement after DDL in the same transaction must see the new shape.
                with self._errors(limits.timeout_s, f"{where or 'statement'} failed, nothing was changed"):
                    prepared = await conn.prepare(sql, timeout=backstop)
                    args = _coerce_params(prepared.get_parameters(), params)
                    records = await prepared.fetch(*args, timeout=backstop)
                status = prepared.get_statusmsg()
                if not conn.is_in_transaction():
                    raise BackendError(
                        f"{where or 'the statement'} ended the transaction early ({status}); "
                        "the statements after it did not run"
                    )
                results.append(_write_result(status, prepared.get_attributes(), records, limits))
            with self._errors(limits.timeout_s, "COMMIT failed, nothing was changed"):
                await conn.execute("COMMIT", timeout=backstop)
        return results

    async def estimate_rows(
        self, statement: Statement, params: Sequence[JsonScalar], limits: Limits
    ) -> int | None:
        """The planner's estimate: EXPLAIN without ANALYZE, in a read-only transaction, so nothing runs."""
        check_call([statement.text], params)
        backstop = limits.timeout_s + _BACKSTOP_S
        async with self._connection(self._pool, limits) as conn:  # the read pool: read-only sessions
            with self._errors(limits.timeout_s, "row estimate"):
                await conn.execute(f"BEGIN READ ONLY; {_timeout_sql(limits)}", timeout=backstop)
                prepared = await conn.prepare("EXPLAIN (FORMAT JSON) " + statement.text, timeout=backstop)
                args = _coerce_params(prepared.get_parameters(), params)
                plan = await prepared.fetchval(*args, timeout=backstop)
        return _planned_rows(plan)

    async def list_tables(self) -> list[TableInfo]:
        limits = Limits()
        async with self._connection(self._pool, limits) as conn:
            with self._errors(limits.timeout_s):
                records = await conn.fetch(_LIST_TABLES, timeout=limits.timeout_s)
        return [TableInfo(schema, name, "view" if is_view else "table") for schema, name, is_view in records]

    async def describe_table(self, table: str) -> list[ColumnInfo]:
        limits = Limits()
        async with self._connection(self._pool, limits) as conn:
            with self._errors(limits.timeout_s):
                for schema, name in _name_candidates(table):
                    oid = await conn.fetchval(_FIND_TABLE, schema, name, timeout=limits.timeout_s)
                    if oid is not None:
                        records = await conn.fetch(_DESCRIBE_TABLE, oid, timeout=limits.timeout_s)
                        return [ColumnInfo(*record) for record in records]
        raise UsageError(
            f"no table named {table!r} on this connection (list_tables shows the names, with their schema)"
        )

    async def schema(self) -> DbSchema:
        limits = Limits(timeout_s=30.0)
        async with self._connection(self._pool, limits) as conn:
            # One snapshot: a partition attached between two reads must not come out without its parent.
            with self._errors(limits.timeout_s):
                async with conn.transaction(isolation="repeatable_read", readonly=True):
                    records = await conn.fetch(_SCHEMA, timeout=limits.timeout_s)
                    inherits = await conn.fetch(_INHERITS, timeout=limits.timeout_s)
                    generated = await conn.fetch(_GENERATED, timeout=limits.timeout_s)
                    path = await conn.fetchval(_SEARCH_PATH, timeout=limits.timeout_s)
        relations = {
            oid: Relation(
                schema,
                name,
                "view" if is_view else "table",
                tuple(zip(names, types, strict=True)),
                definition,
                system,
            )
            for oid, schema, name, is_view, names, types, definition, system in records
        }
        computed: dict[int, list[tuple[str, frozenset[str]]]] = {}
        for oid, column, sources in generated:
            computed.setdefault(oid, []).append((column, frozenset(sources)))
        for oid, columns in computed.items():
            if oid in relations:
                relations[oid] = replace(relations[oid], generated=tuple(columns))
        return DbSchema(_with_relatives(relations, inherits), tuple(path), case_sensitive=True)

    @asynccontextmanager
    async def _connection(
        self, pool: asyncpg.Pool | None, limits: Limits
    ) -> AsyncIterator[_GuardedConnection]:
        """A pooled connection; whatever happens, it is settled (rolled back, reset) after the call."""
        if pool is None:
            raise BackendError("the PostgreSQL connection is not open")
        with self._errors(limits.timeout_s, f"cannot connect to PostgreSQL at {self._where}"):
            try:
                conn = cast(_GuardedConnection, await pool.acquire(timeout=limits.timeout_s))
            except TimeoutError as error:
                raise BackendError(
                    f"all {self._pool_size} connections to PostgreSQL are busy; try again"
                ) from error
        try:
            yield conn
        finally:
            # Off the answer's path: the caller has its result (or its error) already, and the pool
            # hands the connection out again only once it is settled.
            task = asyncio.get_running_loop().create_task(self._settle(pool, conn))
            self._settling.add(task)
            task.add_done_callback(self._settling.discard)

    async def _settle(self, pool: asyncpg.Pool, conn: _GuardedConnection) -> None:
        with suppress(*_DRIVER_ERRORS):  # then the release resets it, or drops it
            await conn.settle()
        try:
            await pool.release(conn)
        except _DRIVER_ERRORS as error:  # asyncpg has dropped it
            log.warning("dropped a connection whose reset failed: %s", self._redact(str(error)))

    @contextmanager
    def _errors(self, timeout_s: float, where: str = "") -> Iterator[None]:
        try:
            yield
        except _DRIVER_ERRORS as error:
            raise self._translate(error, timeout_s, where) from error

    def _translate(self, error: BaseException, timeout_s: float, where: str) -> BackendError:
        """The one mapping from asyncpg, OS and timeout errors to ours: short, actionable, redacted."""
        prefix = f"{where}: " if where else ""
        # asyncpg raises some PostgresErrors itself, without a server message (a parameter it cannot
        # encode: "invalid input for query argument $1: ... (value out of int64 range)").
        message = (error.message or str(error)) if isinstance(error, asyncpg.PostgresError) else ""
        if isinstance(error, TimeoutError) or (
            isinstance(error, asyncpg.QueryCanceledError) and "statement timeout" in message
        ):
            return StatementTimeout(f"{prefix}statement timed out after {timeout_s} s")
        if isinstance(error, asyncpg.PostgresError):  # DETAIL dropped: it can quote row values
            text = message + (f" (hint: {error.hint})" if error.hint else "")
        elif isinstance(error, OSError) and error.strerror:
            text = error.strerror
        else:
            text = str(error) or type(error).__name__
        return BackendError(self._redact(prefix + text))

    def _redact(self, text: str) -> str:
        return redact(text, self._secrets)


async def _install_codecs(conn: asyncpg.Connection) -> None:
    """json and jsonb come out as Python values, not strings; a str parameter is JSON text."""
    for name in ("json", "jsonb"):
        await conn.set_type_codec(
            name, schema="pg_catalog", encoder=_encode_json, decoder=json.loads, format="text"
        )


def _encode_json(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _timeout_ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _timeout_sql(limits: Limits) -> str:
    return f"SET LOCAL statement_timeout = {_timeout_ms(limits.timeout_s)}"


@functools.lru_cache(maxsize=1024)
def _shape(attributes: tuple[Any, ...]) -> tuple[tuple[Column, ...], _Converters]:
    """Columns of a statement's result, and per column the conversion its values need (None: none)."""
    columns = tuple(Column(attribute.name, _type_name(attribute.type)) for attribute in attributes)
    converters = tuple(
        converter_for(_DECODED_AS[attribute.type.name])
        if attribute.type.schema == "pg_catalog" and attribute.type.name in _DECODED_AS
        else to_json_value
        for attribute in attributes
    )
    return columns, converters


def _json_rows(records: Sequence[asyncpg.Record], converters: _Converters) -> list[list[JsonValue]]:
    """Records → JSON rows, column by column: one converter call per non-NULL value, none for JSON types."""
    if not records or not any(converters):
        return [list(record) for record in records]
    columns: list[Sequence[Any]] = list(zip(*records, strict=True))
    for index, convert in enumerate(converters):
        if convert is not None:
            values = columns[index]
            columns[index] = (
                list(map(convert, values))
                if None not in values
                else [None if value is None else convert(value) for value in values]
            )
    return [list(row) for row in zip(*columns, strict=True)]


def _type_name(pg_type: Any) -> str:
    if pg_type.kind == "array" and pg_type.name.startswith("_"):
        return f"{pg_type.name[1:]}[]"
    return str(pg_type.name)


def _write_result(
    status: str, attributes: tuple[Any, ...], records: list[asyncpg.Record], limits: Limits
) -> WriteResult:
    command, _, count = status.rpartition(" ")
    counted = count.isdigit() and command.split(" ", 1)[0] in _COUNTED_COMMANDS
    returned = None
    if attributes:
        columns, converters = _shape(attributes)
        returned = ResultSet.capped(columns, _json_rows(records[: limits.row_limit + 1], converters), limits)
    return WriteResult(status, int(count) if counted else None, returned)


def _planned_rows(plan: Any) -> int | None:
    """Rows the plan's writes (ModifyTable nodes, nested ones included) are estimated to touch."""
    try:
        root = (json.loads(plan) if isinstance(plan, str) else plan)[0]["Plan"]
        total, writes, nodes = 0, 0, [root]
        while nodes:
            node = nodes.pop()
            children = node.get("Plans", [])
            if node["Node Type"] == "ModifyTable":
                writes += 1
                total += int((children[0] if children else node)["Plan Rows"])
            nodes.extend(children)
        return total if writes else int(root["Plan Rows"])
    except (LookupError, TypeError, ValueError):
        return None


def _name_candidates(table: str) -> list[tuple[str | None, str]]:
    """(schema, name) readings of `table`: `schema.table` as written, the whole text as one name,
    then both folded to lower case as PostgreSQL folds unquoted names."""
    text = table.replace('"', "")
    schema, dot, name = text.partition(".")
    readings: list[tuple[str | None, str]] = [(schema, name)] if dot else []
    readings.append((None, text))
    if '"' not in table:
        readings += [(schema and schema.lower(), name.lower()) for schema, name in readings]
    return list(dict.fromkeys(readings))


# JSON has no dates, decimals or bytes: a str parameter is converted to what its placeholder needs.
_ISO_DURATION = re.compile(
    r"(?P<sign>-)?P(?:(?P<days>\d+)D)?(?:T(?:(?P<hours>\d+)H)?(?:(?P<minutes>\d+)M)?"
    r"(?:(?P<seconds>\d+(?:\.\d+)?)S)?)?"
)


def _to_int(value: JsonScalar) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(value)
    return int(value)  # type: ignore[arg-type]


def _to_float(value: JsonScalar) -> float:
    if isinstance(value, bool):
        raise ValueError(value)
    return float(value)  # type: ignore[arg-type]


def _to_decimal(value: JsonScalar) -> Decimal:
    if isinstance(value, bool):
        raise ValueError(value)
    return Decimal(str(value))


def _to_bool(value: JsonScalar) -> bool:
    text = str(value).lower()
    if text in ("true", "t", "yes", "y", "on", "1"):
        return True
    if text in ("false", "f", "no", "n", "off", "0"):
        return False
    raise ValueError(value)


def _to_text(value: JsonScalar) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _to_bytes(value: JsonScalar) -> bytes:
    text = str(value)
    return bytes.fromhex(text[2:]) if text.startswith("\\x") else text.encode()


def _to_interval(value: JsonScalar) -> dt.timedelta:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return dt.timedelta(seconds=value)
    match = _ISO_DURATION.fullmatch(str(value))
    if match is None or not any(match[part] for part in ("days", "hours", "minutes", "seconds")):
        raise ValueError(value)
    delta = dt.timedelta(
        days=int(match["days"] or 0),
        hours=int(match["hours"] or 0),
        minutes=int(match["minutes"] or 0),
        seconds=float(match["seconds"] or 0),
    )
    return -delta if match["sign"] else delta


def _from_iso(parse: Callable[[str], Any]) -> Callable[[JsonScalar], Any]:
    def convert(value: JsonScalar) -> Any:
        if not isinstance(value, str):
            raise ValueError(value)
        return parse(value)

    return convert


_PARAM_CONVERTERS: dict[str, Callable[[JsonScalar], object]] = {
    "int2": _to_int,
    "int4": _to_int,
    "int8": _to_int,
    "oid": _to_int,
    "float4": _to_float,
    "float8": _to_float,
    "numeric": _to_decimal,
    "bool": _to_bool,
    "text": _to_text,
    "varchar": _to_text,
    "bpchar": _to_text,
    "name": _to_text,
    "bytea": _to_bytes,
    "date": _from_iso(dt.date.fromisoformat),
    "timestamp": _from_iso(dt.datetime.fromisoformat),
    "timestamptz": _from_iso(dt.datetime.fromisoformat),
    "time": _from_iso(dt.time.fromisoformat),
    "timetz": _from_iso(dt.time.fromisoformat),
    "interval": _to_interval,
}


_PARAM_FORMS = {
    **dict.fromkeys(("int2", "int4", "int8", "oid"), "a whole number"),
    **dict.fromkeys(("float4", "float8", "numeric"), "a number"),
    "bool": "true or false",
    "date": "an ISO 8601 date such as '2026-11-27'",
    **dict.fromkeys(("timestamp", "timestamptz"), "an ISO 8601 time such as '2026-11-27T09:30:00+00:00'"),
    **dict.fromkeys(("time", "timetz"), "an ISO 8601 time of day such as '09:30:00'"),
    "interval": "seconds as a number or an ISO 8601 duration such as 'P1DT2H' (or write $N::text::interval)",
}
"""What each converted type takes, for the refusal of a value it cannot take."""


def _coerce_params(types: Sequence[Any], params: Sequence[JsonScalar]) -> list[object]:
    if len(types) != len(params):
        raise UsageError(f"the statement takes {len(types)} parameter(s), {len(params)} given")
    coerced: list[object] = []
    for position, (pg_type, value) in enumerate(zip(types, params, strict=True), 1):
        convert = _PARAM_CONVERTERS.get(pg_type.name) if pg_type.schema == "pg_catalog" else None
        if value is None or convert is None:
            coerced.append(value)
            continue
        try:
            coerced.append(convert(value))
        except (ValueError, TypeError, ArithmeticError) as error:
            form = _PARAM_FORMS.get(pg_type.name)
            takes = f"; give {form.replace('$N', f'${position}')}" if form else ""
            refusal = f"parameter ${position} is not a valid {pg_type.name}: {value!r}{takes}"
            raise UsageError(refusal) from error
    return coerced
