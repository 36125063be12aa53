"""What a statement is, for policy: its kind, ordered by risk, and the risks it carries.

Apart from classify.py, which finds them in SQL, so that what only names them (the configuration's
policy rules, the command line) loads without the SQL parser.
"""

from __future__ import annotations

from enum import StrEnum


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
