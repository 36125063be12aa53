"""What every database backend offers the guard: run statements with the least power that works.

A backend never sees a policy or an identity. It receives statements that the guard has already
classified and decided, one source text per statement, and runs each one alone (never a
multi-statement string in one protocol message).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from mcp_guard.errors import UsageError
from mcp_guard.values import JsonScalar, JsonValue

if TYPE_CHECKING:
    from mcp_guard.classify import Statement


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on one call; reported to the assistant when they bite."""

    row_limit: int = 500
    byte_limit: int = 1_000_000
    timeout_s: float = 5.0


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    type: str


@dataclass(frozen=True, slots=True)
class ResultSet:
    """Rows of one statement, already JSON-safe."""

    columns: tuple[Column, ...]
    rows: list[list[JsonValue]]
    truncated: bool = False
    truncated_by: Literal["rows", "bytes"] | None = None

    @property
    def row_count(self) -> int:
        return len(self.rows)

    @classmethod
    def capped(cls, columns: tuple[Column, ...], rows: list[list[JsonValue]], limits: Limits) -> ResultSet:
        """Apply both caps: `rows` holds up to row_limit + 1 rows (one more says the cap bit), then
        the longest prefix whose JSON (UTF-8, compact) fits in byte_limit is kept."""
        truncated_by: Literal["rows", "bytes"] | None = None
        if len(rows) > limits.row_limit:
            rows, truncated_by = rows[: limits.row_limit], "rows"
        fitting = _rows_within(rows, limits.byte_limit)
        if fitting < len(rows):
            rows, truncated_by = rows[:fitting], "bytes"
        return cls(columns, rows, truncated_by is not None, truncated_by)


def json_size(value: object) -> int:
    """Bytes of `value` as compact UTF-8 JSON: what the byte cap counts."""
    return len(_COMPACT.encode(value).encode())


def _rows_within(rows: list[list[JsonValue]], byte_limit: int) -> int:
    """How many leading rows fit in `byte_limit` as one JSON array; one encode when all fit."""
    if json_size(rows) <= byte_limit:
        return len(rows)
    total = 2  # the brackets
    for index, row in enumerate(rows):
        total += json_size(row) + (1 if index else 0)
        if total > byte_limit:
            return index
    return len(rows)


_COMPACT = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class WriteResult:
    """Outcome of one statement of a write call."""

    status: str
    rows_affected: int | None
    returned: ResultSet | None = None


@dataclass(frozen=True, slots=True)
class TableInfo:
    schema: str | None
    name: str
    kind: Literal["table", "view"]

    @property
    def qualified_name(self) -> str:
        return f"{self.schema}.{self.name}" if self.schema else self.name


@dataclass(frozen=True, slots=True)
class ColumnInfo:
    name: str
    type: str
    nullable: bool
    primary_key: bool


@dataclass(frozen=True, slots=True)
class Relative:
    """A table whose rows and columns another one shares: an ancestor, whose columns it inherits and
    whose rule on a column therefore speaks for its own column of that name, or a descendant, whose
    rows a read of it includes (partitions, inheritance children). `columns` are the ones they share."""

    schema: str
    name: str
    columns: frozenset[str]


@dataclass(frozen=True, slots=True)
class Relation:
    """A table or view as the database names it; `definition` is a view's SELECT text."""

    schema: str
    name: str
    kind: Literal["table", "view"]
    columns: tuple[tuple[str, str], ...]
    """(name, type) in the order `SELECT *` gives them."""
    definition: str | None = None
    system: bool = False
    """A catalog relation (pg_catalog, information_schema, sqlite_master...)."""
    relatives: tuple[Relative, ...] = ()
    """Tables sharing rows with this one through inheritance or partitioning (PostgreSQL)."""
    generated: tuple[tuple[str, frozenset[str]], ...] = ()
    """Generated columns and the columns their expressions read: a copy of what those hold."""

    @property
    def qualified_name(self) -> str:
        return f"{self.schema}.{self.name}"


@dataclass(frozen=True, slots=True)
class DbSchema:
    """Every relation of a database and how an unqualified name is looked up, read once and cached.

    Names are as the database stores them (PostgreSQL: case-sensitive; SQLite: compared folded).
    """

    relations: tuple[Relation, ...]
    search_path: tuple[str, ...]
    """Schemas searched, in order, for an unqualified name."""
    case_sensitive: bool


@dataclass(frozen=True, slots=True)
class SqlFunction:
    """A deterministic scalar function the guard registers on SQLite read connections (masks)."""

    name: str
    arguments: int
    function: Callable[..., object]


class Backend(ABC):
    """One configured database connection."""

    dialect: str

    @abstractmethod
    async def open(self) -> None:
        """Connect (or create the pool); raises BackendError with a redacted message."""

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def read(
        self,
        statements: Sequence[str],
        params: Sequence[JsonScalar],
        limits: Limits,
        bound: Sequence[Sequence[JsonScalar]] | None = None,
    ) -> list[ResultSet]:
        """Run read statements in one read-only transaction, each alone; params go to a single one.

        `bound`, one list per statement, holds parameters the guard appends after the caller's
        (mask keys on PostgreSQL): placeholders the caller's SQL was checked never to name.
        """

    @abstractmethod
    async def write(
        self, statements: Sequence[str], params: Sequence[JsonScalar], limits: Limits
    ) -> list[WriteResult]:
        """Run statements in one read-write transaction: all or nothing."""

    @abstractmethod
    async def estimate_rows(
        self, statement: Statement, params: Sequence[JsonScalar], limits: Limits
    ) -> int | None:
        """Rows a write statement would change, without running it (read-only); None when unknown."""

    @abstractmethod
    async def list_tables(self) -> list[TableInfo]: ...

    @abstractmethod
    async def describe_table(self, table: str) -> list[ColumnInfo]:
        """Columns of `table` (optionally schema-qualified); UsageError when it does not exist."""

    @abstractmethod
    async def schema(self) -> DbSchema:
        """Every table and view with its columns (catalog ones included), view definitions, search path."""


def check_call(
    statements: Sequence[str],
    params: Sequence[JsonScalar],
    bound: Sequence[Sequence[JsonScalar]] | None = None,
) -> None:
    """For backends: a call has statements, params only with exactly one of them, `bound` one per each."""
    if not statements:
        raise UsageError("no SQL statement to run")
    if params and len(statements) != 1:
        raise UsageError(f"params need exactly one statement; this call has {len(statements)}")
    if bound is not None and len(bound) != len(statements):
        raise UsageError(f"bound parameters for {len(bound)} statement(s), {len(statements)} given")


def statement_params(
    params: Sequence[JsonScalar], bound: Sequence[Sequence[JsonScalar]] | None, index: int
) -> list[JsonScalar]:
    """For backends: the caller's params followed by what the guard bound for statement `index`."""
    return [*params, *(bound[index] if bound else ())]


def numbered(statements: Sequence[str]) -> Iterator[tuple[str, str]]:
    """For backends: (where, sql), `where` naming the statement in messages when there are several."""
    count = len(statements)
    for index, sql in enumerate(statements, 1):
        yield (f"statement {index} of {count}" if count > 1 else ""), sql
