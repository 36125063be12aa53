"""SQLite through aiosqlite, with the engine itself refusing what a call may not do.

Reads run on `mode=ro` connections with `PRAGMA query_only` and an authorizer that allows reading
and nothing else: no ATTACH (VACUUM INTO attaches too), no PRAGMA, no transaction control, no
file or extension functions. Writes run on one read-write connection that may not ATTACH, PRAGMA
or load extensions, in `BEGIN IMMEDIATE ... COMMIT`: all or nothing. Neither kind of connection can
attach a database at all (SQLITE_LIMIT_ATTACHED = 0), and a progress handler enforces the timeout
inside the engine.
"""

from __future__ import annotations

import asyncio
import math
import re
import secrets
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from pathlib import Path
from typing import Any

import aiosqlite
import sqlglot
from sqlglot import exp
from sqlglot.errors import SqlglotError

from mcp_guard.backends.base import (
    Backend,
    Column,
    ColumnInfo,
    DbSchema,
    Limits,
    Relation,
    ResultSet,
    SqlFunction,
    TableInfo,
    WriteResult,
    check_call,
    numbered,
    statement_params,
)
from mcp_guard.classify import Statement
from mcp_guard.errors import BackendError, StatementTimeout, UsageError
from mcp_guard.values import JsonScalar, json_rows

_PROGRESS_STEPS = 10_000
"""Virtual machine instructions between two deadline checks: well under a millisecond."""
_BUSY_TIMEOUT_S = 5.0
"""How long a statement waits for another connection's lock on the file."""

_DENIED_FUNCTIONS = frozenset({"load_extension", "readfile", "writefile", "edit", "fts3_tokenizer"})
_READ_ACTIONS = frozenset({sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_RECURSIVE})
_NEVER_ON_WRITE = frozenset({sqlite3.SQLITE_ATTACH, sqlite3.SQLITE_DETACH, sqlite3.SQLITE_PRAGMA})
_SCHEMA_TABLES = frozenset({"sqlite_master", "sqlite_temp_master", "sqlite_schema", "sqlite_temp_schema"})
_TRANSACTION_ACTIONS = frozenset({sqlite3.SQLITE_TRANSACTION, sqlite3.SQLITE_SAVEPOINT})
_ACTION_NAMES = {
    getattr(sqlite3, f"SQLITE_{name}"): name.replace("_", " ")
    for name in (
        "CREATE_INDEX CREATE_TABLE CREATE_TEMP_INDEX CREATE_TEMP_TABLE CREATE_TEMP_TRIGGER CREATE_TEMP_VIEW "
        "CREATE_TRIGGER CREATE_VIEW DELETE DROP_INDEX DROP_TABLE DROP_TEMP_INDEX DROP_TEMP_TABLE "
        "DROP_TEMP_TRIGGER DROP_TEMP_VIEW DROP_TRIGGER DROP_VIEW INSERT PRAGMA TRANSACTION UPDATE ATTACH "
        "DETACH ALTER_TABLE REINDEX ANALYZE CREATE_VTABLE DROP_VTABLE SAVEPOINT"
    ).split()
}

# Python's sqlite3 caches prepared statements by their text, and a cached statement is not shown to
# the authorizer again: our own transaction control carries a token no user statement can repeat.
_OWN = f" /* mcp-guard {secrets.token_hex(16)} */"

_LIST_TABLES = r"""
SELECT name, type FROM sqlite_master
WHERE type IN ('table', 'view') AND name NOT LIKE 'sqlite\_%' ESCAPE '\'
ORDER BY name
"""
# table_xinfo, not table_info, which leaves out generated columns; hidden = 1 is a virtual table's
# hidden column, which `SELECT *` leaves out too (2 and 3: generated, virtual or stored).
_DESCRIBE_TABLE = (
    'SELECT name, type, "notnull", pk FROM pragma_table_xinfo(?, ?) WHERE hidden <> 1 ORDER BY cid'
)
_SCHEMA = """
SELECT s.name, s.type, s.sql, c.name, c.type, c.hidden
FROM (SELECT name, type, sql FROM sqlite_master WHERE type IN ('table', 'view')
      UNION ALL SELECT 'sqlite_master', 'table', NULL UNION ALL SELECT 'sqlite_schema', 'table', NULL
      UNION ALL SELECT 'sqlite_temp_master', 'table', NULL
      UNION ALL SELECT 'sqlite_temp_schema', 'table', NULL) AS s
JOIN pragma_table_xinfo(s.name) AS c
WHERE c.hidden <> 1
ORDER BY s.name, c.cid
"""
_SYSTEM_PREFIX = "sqlite_"
_FIRST_WORD = re.compile(r"\s*(?:(?:--[^\n]*(?:\n|$)|/\*.*?\*/)\s*)*([A-Za-z]+)", re.S)


class _NoAttach(sqlite3.Connection):
    """Can attach no database: ATTACH, and VACUUM INTO (which attaches), fail in the engine."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)


class _QueryOnly(_NoAttach):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.execute("PRAGMA query_only = ON")


class _Guard:
    """What one connection's authorizer and progress handler decide by; they run in sqlite's thread."""

    def __init__(self, read_only: bool) -> None:
        self.read_only = read_only
        self.own_statement = False
        self.deadline = math.inf
        self.timed_out = False
        self.denied: str | None = None

    def start(self, timeout_s: float = math.inf) -> None:
        self.deadline = time.monotonic() + timeout_s
        self.timed_out = False
        self.denied = None

    def stop(self) -> None:
        self.deadline = math.inf

    def authorize(
        self, action: int, arg1: str | None, arg2: str | None, _db: str | None, _trigger: Any
    ) -> int:
        if action == sqlite3.SQLITE_FUNCTION:
            if (arg2 or "").lower() in _DENIED_FUNCTIONS:
                return self._deny(f"the function {arg2}()")
            return sqlite3.SQLITE_OK
        if action in _TRANSACTION_ACTIONS:
            return sqlite3.SQLITE_OK if self.own_statement else self._deny("transaction control")
        if action == sqlite3.SQLITE_UPDATE and arg1 in _SCHEMA_TABLES and self.read_only:
            # A table-valued function's first use (json_each, ...) asks this while declaring its table.
            # No write follows: a schema change asks its own action too, which is refused, and
            # `query_only` (and SQLite, for sqlite_master) refuse any write to the file anyway.
            return sqlite3.SQLITE_OK
        if (self.read_only and action not in _READ_ACTIONS) or action in _NEVER_ON_WRITE:
            if arg1 in _SCHEMA_TABLES:  # SQLite checks the catalogue write before the CREATE itself
                return self._deny(f"changing the schema ({arg1})")
            return self._deny(" ".join(part for part in (_ACTION_NAMES.get(action), arg1) if part))
        return sqlite3.SQLITE_OK

    def progress(self) -> int:
        if time.monotonic() > self.deadline:
            self.timed_out = True
            return 1
        return 0

    def _deny(self, what: str) -> int:
        self.denied = what
        return sqlite3.SQLITE_DENY


class _Link:
    """One aiosqlite connection and its guard."""

    def __init__(self, conn: aiosqlite.Connection, guard: _Guard) -> None:
        self.conn = conn
        self.guard = guard

    async def own(self, sql: str) -> None:
        """Run our own transaction control, which the authorizer refuses to user statements."""
        self.guard.start()
        self.guard.own_statement = True
        try:
            await self.conn.execute(sql + _OWN)
        finally:
            self.guard.own_statement = False

    async def run(self, sql: str, params: Sequence[JsonScalar], limits: Limits, count: int | None) -> Any:
        """Run `sql` under the deadline: (description, up to `count` rows or all, rowcount)."""
        self.guard.start(limits.timeout_s)
        cursor = await self.conn.execute(sql, params)
        rows = await (cursor.fetchall() if count is None else cursor.fetchmany(count))
        await cursor.close()  # an unfinished SELECT would hold its read lock or WAL snapshot
        # Not in a `finally`: a cancelled call's statement runs on in sqlite's thread, under the deadline.
        self.guard.stop()
        return cursor.description, rows, cursor.rowcount


class SqliteBackend(Backend):
    """One SQLite database file that already exists."""

    dialect = "sqlite"

    def __init__(
        self, path: str | Path, *, pool_size: int = 4, functions: Sequence[SqlFunction] = ()
    ) -> None:
        self._path = Path(path).absolute()
        self._pool_size = pool_size
        self._functions = tuple(functions)
        self._readers: asyncio.Queue[_Link] = asyncio.Queue()
        self._links: list[_Link] = []
        self._writer: _Link | None = None
        self._catalogue: aiosqlite.Connection | None = None
        self._write_lock = asyncio.Lock()

    async def open(self) -> None:
        if not self._path.is_file():
            raise BackendError(f"the SQLite database {self._path} does not exist; create it first")
        try:
            with _errors(None, 0.0):
                for _ in range(self._pool_size):
                    self._readers.put_nowait(await self._connect(read_only=True))
                self._writer = await self._connect(read_only=False)
                # Our own catalogue queries use the table_info pragma: a connection no user statement reaches.
                self._catalogue = await aiosqlite.connect(
                    self._uri("ro"), uri=True, isolation_level=None, factory=_QueryOnly
                )
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        links, self._links, self._writer = self._links, [], None
        catalogue, self._catalogue = self._catalogue, None
        self._readers = asyncio.Queue()
        for conn in [link.conn for link in links] + ([catalogue] if catalogue else []):
            await conn.close()

    async def read(
        self,
        statements: Sequence[str],
        params: Sequence[JsonScalar],
        limits: Limits,
        bound: Sequence[Sequence[JsonScalar]] | None = None,
    ) -> list[ResultSet]:
        check_call(statements, params, bound)
        results: list[ResultSet] = []
        async with self._reader(limits) as link:
            several = len(statements) > 1
            if several:  # one snapshot for all of them
                with _errors(link.guard, limits.timeout_s):
                    await link.own("BEGIN")
            try:
                for index, (where, sql) in enumerate(numbered(statements)):
                    arguments = statement_params(params, bound, index)
                    with _errors(link.guard, limits.timeout_s, where):
                        description, rows, _ = await link.run(sql, arguments, limits, limits.row_limit + 1)
                    results.append(_result_set(description, rows, limits))
            finally:
                if several:
                    with suppress(sqlite3.Error):
                        await link.own("ROLLBACK")
        return results

    async def write(
        self, statements: Sequence[str], params: Sequence[JsonScalar], limits: Limits
    ) -> list[WriteResult]:
        check_call(statements, params)
        if self._writer is None:
            raise BackendError("the SQLite connection is not open")
        link = self._writer
        results: list[WriteResult] = []
        async with self._write_lock:
            with _errors(link.guard, limits.timeout_s):
                await link.own("BEGIN IMMEDIATE")
            try:
                for where, sql in numbered(statements):
                    with _errors(
                        link.guard, limits.timeout_s, f"{where or 'statement'} failed, nothing was changed"
                    ):
                        description, rows, rowcount = await link.run(sql, params, limits, None)
                    results.append(_write_result(sql, description, rows, rowcount, limits))
                with _errors(link.guard, limits.timeout_s, "COMMIT failed, nothing was changed"):
                    await link.own("COMMIT")
            except BaseException:
                with suppress(sqlite3.Error):
                    await link.own("ROLLBACK")
                raise
        return results

    async def estimate_rows(
        self, statement: Statement, params: Sequence[JsonScalar], limits: Limits
    ) -> int | None:
        """SQLite has no planner estimate: count the rows the WHERE selects, on a read-only connection."""
        check_call([statement.text], params)
        counting = _counting_query(statement)
        if counting is None:
            return None
        async with self._reader(limits) as link:
            with _errors(link.guard, limits.timeout_s, "row estimate"):
                _, rows, _ = await link.run(counting, params, limits, 1)
        return int(rows[0][0])

    async def list_tables(self) -> list[TableInfo]:
        with _errors(None, 0.0):
            rows = await self._require_catalogue().execute_fetchall(_LIST_TABLES)
        return [TableInfo(None, name, "view" if kind == "view" else "table") for name, kind in rows]

    async def describe_table(self, table: str) -> list[ColumnInfo]:
        catalogue = self._require_catalogue()
        text = table.replace('"', "")
        schema, dot, name = text.partition(".")
        with _errors(None, 0.0):
            for reading in ([(name, schema)] if dot else []) + [(text, None)]:
                rows = list(await catalogue.execute_fetchall(_DESCRIBE_TABLE, reading))
                if rows:
                    return _column_infos(rows)
        raise UsageError(f"no table named {table!r} on this connection (list_tables shows the names)")

    async def schema(self) -> DbSchema:
        with _errors(None, 0.0):
            rows = await self._require_catalogue().execute_fetchall(_SCHEMA)
        relations: dict[str, tuple[str, str | None, list[tuple[str, str]], list[str]]] = {}
        for name, kind, sql, column, kind_of_column, hidden in rows:
            relation = relations.setdefault(name, (kind, sql, [], []))
            relation[2].append((column, kind_of_column or ""))
            if hidden:
                relation[3].append(column)
        return DbSchema(
            relations=tuple(
                Relation(
                    "main",
                    name,
                    "view" if kind == "view" else "table",
                    tuple(columns),
                    sql if kind == "view" else None,
                    system=name.lower().startswith(_SYSTEM_PREFIX),
                    generated=_generated_sources(sql, computed, [column for column, _ in columns]),
                )
                for name, (kind, sql, columns, computed) in relations.items()
            ),
            search_path=("main",),
            case_sensitive=False,
        )

    def _uri(self, mode: str) -> str:
        return f"{self._path.as_uri()}?mode={mode}"

    def _require_catalogue(self) -> aiosqlite.Connection:
        if self._catalogue is None:
            raise BackendError("the SQLite connection is not open")
        return self._catalogue

    async def _connect(self, *, read_only: bool) -> _Link:
        conn = await aiosqlite.connect(
            self._uri("ro" if read_only else "rw"),
            uri=True,
            isolation_level=None,  # we say BEGIN and COMMIT ourselves
            timeout=_BUSY_TIMEOUT_S,
            factory=_QueryOnly if read_only else _NoAttach,
        )
        guard = _Guard(read_only)
        if read_only:
            for function in self._functions:
                await conn.create_function(
                    function.name, function.arguments, function.function, deterministic=True
                )
        await conn.set_authorizer(guard.authorize)
        await conn.set_progress_handler(guard.progress, _PROGRESS_STEPS)
        link = _Link(conn, guard)
        self._links.append(link)
        return link

    @asynccontextmanager
    async def _reader(self, limits: Limits) -> AsyncIterator[_Link]:
        if not self._links:
            raise BackendError("the SQLite connection is not open")
        readers = self._readers
        try:
            async with asyncio.timeout(limits.timeout_s):
                link = await readers.get()
        except TimeoutError as error:
            raise BackendError(f"all {self._pool_size} SQLite connections are busy; try again") from error
        try:
            yield link
        finally:
            readers.put_nowait(link)


@contextmanager
def _errors(guard: _Guard | None, timeout_s: float, where: str = "") -> Iterator[None]:
    """The one mapping from sqlite3 errors to ours: the timeout, what the authorizer refused, or the text."""
    prefix = f"{where}: " if where else ""
    try:
        yield
    except sqlite3.Error as error:
        if guard is not None and guard.timed_out:
            raise StatementTimeout(f"{prefix}statement timed out after {timeout_s} s") from error
        if guard is not None and guard.denied:
            scope = "read-only connection" if guard.read_only else "connection"
            raise BackendError(f"{prefix}not allowed on this {scope}: {guard.denied}") from error
        raise BackendError(f"{prefix}{error}") from error
    except OverflowError as error:  # sqlite3 binds a Python int only up to 64 bits
        raise BackendError(
            f"{prefix}a parameter is an integer beyond 64 bits, which SQLite cannot hold; send it as a string"
        ) from error


def _counting_query(statement: Statement) -> str | None:
    """`SELECT count(*)` over the target and WHERE of a plain UPDATE or DELETE, with the same
    parameters; None for anything else (joins, LIMIT, parameters outside the WHERE)."""
    tree = statement.tree
    if not isinstance(tree, exp.Delete | exp.Update) or not isinstance(tree.this, exp.Table):
        return None
    if any(tree.args.get(name) for name in ("tables", "using", "from", "joins", "order", "limit")):
        return None
    query = exp.select(exp.Count(this=exp.Star())).from_(tree.this.copy())
    where = tree.args.get("where")
    if where is not None:
        query = query.where(where.this.copy())
    if tree.args.get("with_") is not None:
        query.set("with_", tree.args["with_"].copy())
    if len(list(query.find_all(exp.Placeholder))) != len(list(tree.find_all(exp.Placeholder))):
        return None
    return query.sql("sqlite")


def _result_set(description: Any, rows: list[tuple[Any, ...]], limits: Limits) -> ResultSet:
    converted = json_rows(rows)
    names = [entry[0] for entry in description or ()]
    columns = tuple(Column(name, _storage_class(rows, index)) for index, name in enumerate(names))
    return ResultSet.capped(columns, converted, limits)


def _generated_sources(
    sql: str | None, generated: list[str], columns: list[str]
) -> tuple[tuple[str, frozenset[str]], ...]:
    """Each generated column and the columns its expression reads, from the table's CREATE statement;
    one that cannot be read counts as reading every other column (fail closed)."""
    if not generated:
        return ()
    expressions: dict[str, exp.Expression] = {}
    with suppress(SqlglotError, RecursionError):
        create = sqlglot.parse_one(sql or "", read="sqlite")
        for definition in create.find_all(exp.ColumnDef):
            for constraint in definition.args.get("constraints") or ():
                if isinstance(constraint.kind, exp.ComputedColumnConstraint):
                    expressions[definition.name.lower()] = constraint.kind
    found = []
    for column in generated:
        expression = expressions.get(column.lower())
        if expression is None:
            sources = frozenset(name for name in columns if name != column)
        else:
            named = {node.name.lower() for node in expression.find_all(exp.Column)}
            sources = frozenset(name for name in columns if name.lower() in named)
        found.append((column, sources))
    return tuple(found)


def _column_infos(rows: list[Any]) -> list[ColumnInfo]:
    """table_info rows → columns. The pragma calls a lone INTEGER PRIMARY KEY nullable, but that
    column is the rowid (or, WITHOUT ROWID, a NOT NULL key): it never holds NULL."""
    single_key = sum(pk > 0 for *_, pk in rows) == 1
    return [
        ColumnInfo(name, kind, not (notnull or (single_key and pk and kind.upper() == "INTEGER")), pk > 0)
        for name, kind, notnull, pk in rows
    ]


def _storage_class(rows: list[tuple[Any, ...]], index: int) -> str:
    """SQLite types values, not columns: the class of the first non-NULL value, "" if none."""
    for row in rows:
        value = row[index]
        if value is not None:
            return _STORAGE_CLASSES.get(type(value), "")
    return ""


_STORAGE_CLASSES: dict[type, str] = {int: "integer", float: "real", str: "text", bytes: "blob"}


def _write_result(
    sql: str, description: Any, rows: list[tuple[Any, ...]], rowcount: int, limits: Limits
) -> WriteResult:
    match = _FIRST_WORD.match(sql)
    verb = match[1].upper() if match else ""
    affected = rowcount if rowcount >= 0 else None
    status = f"{verb} {affected}" if affected is not None else verb
    returned = _result_set(description, rows[: limits.row_limit + 1], limits) if description else None
    return WriteResult(status, affected, returned)
