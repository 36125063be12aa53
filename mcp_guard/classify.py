"""SQL → statements, each with a kind, the tables it touches and its risk flags.

Fail closed: what sqlglot cannot parse, or parses only as an opaque command, is UNKNOWN,
the riskiest kind.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from sqlglot import exp


class StatementKind(StrEnum):
    """Ordered from the least to the most risky; `riskiest()` relies on this order."""

    READ = "read"
    WRITE = "write"
    SESSION = "session"
    TRANSACTION = "transaction"
    DDL = "ddl"
    DCL = "dcl"
    ADMIN = "admin"
    UNKNOWN = "unknown"


_RISK_ORDER = {kind: rank for rank, kind in enumerate(StatementKind)}


def riskiest(kinds: list[StatementKind] | tuple[StatementKind, ...]) -> StatementKind:
    return max(kinds, key=_RISK_ORDER.__getitem__, default=StatementKind.UNKNOWN)


class RiskFlag(StrEnum):
    MULTIPLE_STATEMENTS = "multiple_statements"
    WRITE_WITHOUT_WHERE = "write_without_where"
    DML_IN_CTE = "dml_in_cte"
    SELECT_INTO = "select_into"
    LOCKING_READ = "locking_read"
    EXPLAIN_ANALYZE = "explain_analyze"
    COPY = "copy"
    COPY_PROGRAM = "copy_program"
    COPY_FILE = "copy_file"
    PROCEDURAL = "procedural"
    PREPARED_STATEMENT = "prepared_statement"
    CURSOR = "cursor"
    TRANSACTION_CONTROL = "transaction_control"
    SESSION_SETTING = "session_setting"
    LISTEN_NOTIFY = "listen_notify"
    SIDE_EFFECT_FUNCTION = "side_effect_function"
    DYNAMIC_SQL = "dynamic_sql"
    ATTACH = "attach"
    PRAGMA = "pragma"
    VACUUM_INTO = "vacuum_into"
    LOAD_EXTENSION = "load_extension"
    UNPARSEABLE = "unparseable"
    OPAQUE_COMMAND = "opaque_command"


@dataclass(frozen=True, slots=True)
class Statement:
    """One statement: `text` is its exact source text, the very string that will be executed."""

    text: str
    kind: StatementKind
    operation: str
    tables: tuple[str, ...] = ()
    written_tables: tuple[str, ...] = ()
    functions: tuple[str, ...] = ()
    flags: frozenset[RiskFlag] = frozenset()
    error: str | None = None
    tree: exp.Expression | None = field(default=None, compare=False, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "kind": str(self.kind),
            "operation": self.operation,
            "tables": list(self.tables),
            "written_tables": list(self.written_tables),
            "functions": list(self.functions),
            "flags": sorted(str(flag) for flag in self.flags),
            "error": self.error,
        }


@dataclass(frozen=True, slots=True)
class Classification:
    sql: str
    dialect: str
    statements: tuple[Statement, ...]

    @property
    def kind(self) -> StatementKind:
        return riskiest([s.kind for s in self.statements])

    @property
    def flags(self) -> frozenset[RiskFlag]:
        flags: set[RiskFlag] = set()
        for statement in self.statements:
            flags |= statement.flags
        if len(self.statements) > 1:
            flags.add(RiskFlag.MULTIPLE_STATEMENTS)
        return frozenset(flags)

    @property
    def tables(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(t for s in self.statements for t in s.tables))

    def as_dict(self) -> dict[str, Any]:
        return {
            "dialect": self.dialect,
            "kind": str(self.kind),
            "flags": sorted(str(flag) for flag in self.flags),
            "tables": list(self.tables),
            "statements": [s.as_dict() for s in self.statements],
        }


def classify(sql: str, dialect: str) -> Classification:
    """Split `sql` into statements and classify each; cached for repeated SQL."""
    raise NotImplementedError
