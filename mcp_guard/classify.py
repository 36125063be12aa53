"""SQL → statements, each with a kind, the tables it touches and its risk flags.

Fail closed: what sqlglot cannot parse, or parses only as an opaque command, is UNKNOWN,
the riskiest kind.

How a statement is read:
1. The text is split at SEMICOLON tokens of the dialect's own tokenizer, so semicolons in
   strings, comments and dollar quotes never split, and each statement keeps its exact source
   text: that text, not SQL regenerated from a tree, is what the backends execute.
2. Statements that sqlglot cannot represent (SHOW, EXPLAIN, SET, NOTIFY, PREPARE, DO, PRAGMA, ...)
   are recognised by their leading keywords; any statement they embed (EXPLAIN's, PREPARE's,
   DECLARE's) is classified in turn.
3. Everything else is parsed; only known root statement types are accepted, and the whole tree
   is walked: a SELECT may hide a DELETE in a CTE, a locking clause, an INTO, or a call of a
   function with side effects.
"""

from __future__ import annotations

import functools
import logging
import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlglot import exp
from sqlglot.dialects.dialect import Dialect
from sqlglot.errors import ParseError
from sqlglot.tokens import Token, TokenType

from mcp_guard.errors import UsageError
from mcp_guard.kinds import RiskFlag, StatementKind, riskiest


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


DIALECTS = ("postgres", "sqlite")
"""The sqlglot dialects classify() understands."""

CACHE_MAX_CHARS = 8_192
"""Longer SQL is classified afresh each time, so the cache cannot hold megabytes of trees."""

# One place for every function the classifier treats as more than a read. Names are compared after
# normalising: lower case, quotes and schema removed. In PostgreSQL a quoted mixed-case name such as
# "PG_READ_FILE" is another function, but it is flagged all the same: fail closed.

SEQUENCE_FUNCTIONS = frozenset({"nextval", "setval"})
"""Advance or set a sequence: a write that no rollback undoes."""

SETTING_FUNCTIONS = frozenset({"set_config", "setseed"})
"""Change session state that outlives the statement; set_config can flip a transaction to read-write."""

NOTIFY_FUNCTIONS = frozenset({"pg_notify"})

EXTENSION_FUNCTIONS = frozenset({"load_extension"})
"""SQLite: load native code into the database engine."""

DYNAMIC_SQL_FUNCTIONS = frozenset(
    {
        # Each runs SQL given as text (or reads whole tables), out of sight of this classifier.
        "query_to_xml",
        "query_to_xmlschema",
        "query_to_xml_and_xmlschema",
        "cursor_to_xml",
        "cursor_to_xmlschema",
        "table_to_xml",
        "table_to_xmlschema",
        "table_to_xml_and_xmlschema",
        "schema_to_xml",
        "schema_to_xmlschema",
        "schema_to_xml_and_xmlschema",
        "database_to_xml",
        "database_to_xmlschema",
        "database_to_xml_and_xmlschema",
        "ts_stat",
        "ts_rewrite",
    }
)

SIDE_EFFECT_FUNCTIONS = frozenset(
    {
        # Other backends and the server itself.
        "pg_terminate_backend",
        "pg_cancel_backend",
        "pg_reload_conf",
        "pg_rotate_logfile",
        "pg_log_backend_memory_contexts",
        "pg_promote",
        "pg_switch_wal",
        "pg_create_restore_point",
        "pg_logical_emit_message",
        "pg_create_physical_replication_slot",
        "pg_create_logical_replication_slot",
        "pg_drop_replication_slot",
        "pg_copy_physical_replication_slot",
        "pg_copy_logical_replication_slot",
        "pg_replication_slot_advance",
        "pg_logical_slot_get_changes",
        "pg_logical_slot_get_binary_changes",
        "pg_stat_statements_reset",
        "pg_export_snapshot",
        # The server's file system.
        "pg_read_file",
        "pg_read_binary_file",
        "pg_stat_file",
        "pg_logdir_ls",
        "loread",  # large objects (the lo_ functions are matched by prefix)
        "lowrite",
        # Time: a read that holds a connection (and its locks) for as long as it likes.
        "pg_sleep",
        "pg_sleep_for",
        "pg_sleep_until",
        # SQLite extensions that reach the file system or the engine's internals.
        "writefile",
        "readfile",
        "edit",
        "fts3_tokenizer",
    }
)

SIDE_EFFECT_PREFIXES = (
    "lo_",  # large objects: lo_import and lo_export read and write server files
    "dblink",  # runs SQL on another connection, outside this transaction
    "pg_advisory",  # advisory locks outlive the statement
    "pg_try_advisory",
    "pg_ls_",  # directory listings of the server
    "pg_file_",  # adminpack: write, rename and delete server files
    "pg_stat_reset",
    "pg_replication_origin_",
    "pg_wal_replay_",
    "pg_backup_",
    "http_",  # the pgsql-http extension
)


def function_effect(name: str) -> tuple[StatementKind, frozenset[RiskFlag]] | None:
    """What calling the function `name` (normalised) does beyond reading; None for a plain function."""
    if name in SEQUENCE_FUNCTIONS:
        return StatementKind.WRITE, frozenset({RiskFlag.SIDE_EFFECT_FUNCTION})
    if name in SETTING_FUNCTIONS:
        return StatementKind.SESSION, frozenset({RiskFlag.SESSION_SETTING})
    if name in NOTIFY_FUNCTIONS:
        return StatementKind.SESSION, frozenset({RiskFlag.LISTEN_NOTIFY, RiskFlag.SIDE_EFFECT_FUNCTION})
    if name in EXTENSION_FUNCTIONS:
        return StatementKind.ADMIN, frozenset({RiskFlag.LOAD_EXTENSION, RiskFlag.SIDE_EFFECT_FUNCTION})
    if name in DYNAMIC_SQL_FUNCTIONS:
        return StatementKind.ADMIN, frozenset({RiskFlag.DYNAMIC_SQL})
    if name in SIDE_EFFECT_FUNCTIONS or name.startswith(SIDE_EFFECT_PREFIXES):
        return StatementKind.ADMIN, frozenset({RiskFlag.SIDE_EFFECT_FUNCTION})
    return None


# Settings whose change is more than session state (PostgreSQL names them case-insensitively).
_SETTING_KINDS = {
    "role": StatementKind.DCL,
    "session_authorization": StatementKind.DCL,
    "transaction_read_only": StatementKind.TRANSACTION,
    "default_transaction_read_only": StatementKind.TRANSACTION,
    "transaction_isolation": StatementKind.TRANSACTION,
    "default_transaction_isolation": StatementKind.TRANSACTION,
    "transaction_deferrable": StatementKind.TRANSACTION,
    "default_transaction_deferrable": StatementKind.TRANSACTION,
}

_FALSE_WORDS = frozenset({"FALSE", "OFF", "0", "NO", "F", "N"})
_TRUE_WORDS = frozenset({"true", "t", "yes", "y", "on", "1"})


class _QuietCommandFallback(logging.Filter):
    """sqlglot warns each time it falls back to exp.Command; here that is expected and handled."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Falling back to parsing as a 'Command'" not in record.getMessage()


logging.getLogger("sqlglot").addFilter(_QuietCommandFallback())


def classify(sql: str, dialect: str) -> Classification:
    """Split `sql` into statements and classify each; cached for repeated SQL.

    Repeated calls with the same (sql, dialect) return the same Classification object. It is
    immutable except for each statement's `tree`: a caller that wants to change a tree (masking)
    must work on `statement.tree.copy()`.
    """
    if dialect not in DIALECTS:
        raise UsageError(f"unknown SQL dialect {dialect!r}: mcp-guard classifies {' and '.join(DIALECTS)}")
    if len(sql) > CACHE_MAX_CHARS:
        return _classify(sql, dialect)
    return _classify_cached(sql, dialect)


def _classify(sql: str, dialect: str) -> Classification:
    try:
        tokens = _DIALECTS[dialect].tokenize(sql)
    except Exception as error:  # TokenError, or sqlglot failing on odd input: fail closed either way
        text = sql.strip()
        statements = (_unparseable(text, f"cannot split into tokens: {error}"),) if text else ()
        return Classification(sql=sql, dialect=dialect, statements=statements)
    chunks = _split(sql, tokens, dialect)
    return Classification(sql=sql, dialect=dialect, statements=tuple(_classify_chunk(c) for c in chunks))


_classify_cached = functools.lru_cache(maxsize=1024)(_classify)
_DIALECTS = {name: Dialect.get_or_raise(name) for name in DIALECTS}


# --- Splitting ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Chunk:
    """One statement's tokens; `tokens` index into `source`, the chunk ends at `source[end]`."""

    text: str
    source: str
    tokens: list[Token]
    end: int
    dialect: str

    def word(self, index: int) -> str | None:
        """The upper-cased keyword or bare name at `index`; None for quoted names, literals, symbols."""
        if index >= len(self.tokens):
            return None
        token = self.tokens[index]
        raw = self.source[token.start : token.end + 1]
        # A token whose text is not its source slice is sqlglot's swallowed command text.
        if raw.upper() != token.text.upper() or not raw.replace("_", "a").isalnum() or raw[0].isdigit():
            return None
        return raw.upper()

    def words(self, count: int) -> list[str | None]:
        """The first `count` words, read again past a command keyword (see `tail`)."""
        tail = self.tail() if count > 1 else None
        return [self.word(0)] + [tail.word(i) if tail else None for i in range(count - 1)]

    def operation(self, words: int = 1) -> str:
        return " ".join(w for w in self.words(words) if w) or "UNKNOWN"

    def tail(self) -> _Chunk | None:
        """The text after the leading keyword, tokenized afresh.

        sqlglot swallows what follows a command keyword (EXPLAIN, PREPARE, DO, ...) into one
        string token, so the words after it must be tokenized again.
        """
        return _chunk_of(self.source[self.tokens[0].end + 1 : self.end], self.dialect)

    def slice(self, start: int) -> _Chunk:
        """The statement that starts at token `start`, e.g. the one EXPLAIN explains."""
        text = self.source[self.tokens[start].start : self.end].strip()
        return _Chunk(text, self.source, self.tokens[start:], self.end, self.dialect)


def _chunk_of(text: str, dialect: str) -> _Chunk | None:
    try:
        tokens = _DIALECTS[dialect].tokenize(text)
    except Exception:  # same tokenizer that already read this text whole; fail closed if it does not
        return None
    return _Chunk(text.strip(), text, tokens, len(text), dialect)


def _split(sql: str, tokens: list[Token], dialect: str) -> list[_Chunk]:
    """Cut at SEMICOLON tokens, except inside the BEGIN ... END body of a routine or trigger.

    Bodies are tracked the way psql does it (CASE also ends with END). A cut in the wrong place only
    ever yields statements that fail to parse, or one chunk holding several statements, which is
    classified UNKNOWN: never a statement that reads as less than it is.
    """
    chunks: list[_Chunk] = []
    current: list[Token] = []
    start = depth = parens = 0
    for token in tokens:
        kind = token.token_type
        if kind is TokenType.SEMICOLON and depth == 0:
            if current:
                chunks.append(_Chunk(sql[start : token.start].strip(), sql, current, token.start, dialect))
            current, start, parens = [], token.end + 1, 0
            continue
        current.append(token)
        if kind is TokenType.L_PAREN:
            parens += 1
        elif kind is TokenType.R_PAREN:
            parens -= 1
        elif parens == 0 and kind in _BODY_TOKENS and _defines_routine(current):
            if kind is TokenType.BEGIN or (kind is TokenType.CASE and depth > 0):
                depth += 1
            elif kind is TokenType.END and depth > 0:
                depth -= 1
    if current:
        chunks.append(_Chunk(sql[start:].strip(), sql, current, len(sql), dialect))
    return chunks


_BODY_TOKENS = frozenset({TokenType.BEGIN, TokenType.CASE, TokenType.END})


def _defines_routine(tokens: list[Token]) -> bool:
    """CREATE [OR REPLACE] [TEMP] FUNCTION | PROCEDURE | TRIGGER: a body may hold semicolons."""
    words = [t.text.upper() for t in tokens[:5]]
    if words[:1] != ["CREATE"]:
        return False
    rest = words[3:] if words[1:3] == ["OR", "REPLACE"] else words[1:]
    if rest[:1] in (["TEMP"], ["TEMPORARY"]):
        rest = rest[1:]
    return rest[:1] in (["FUNCTION"], ["PROCEDURE"], ["TRIGGER"])


# --- One statement ---------------------------------------------------------------------------------


@dataclass(slots=True)
class _Facts:
    """What one statement does, gathered while reading it."""

    operation: str
    kinds: set[StatementKind] = field(default_factory=set)
    flags: set[RiskFlag] = field(default_factory=set)
    tables: dict[str, None] = field(default_factory=dict)
    written: dict[str, None] = field(default_factory=dict)
    functions: dict[str, None] = field(default_factory=dict)
    error: str | None = None
    tree: exp.Expression | None = None

    def add(self, kind: StatementKind, *flags: RiskFlag) -> _Facts:
        self.kinds.add(kind)
        self.flags.update(flags)
        return self

    def merge(self, statement: Statement, *, written: bool = True) -> _Facts:
        """Take in what an embedded statement (EXPLAIN's, PREPARE's, ...) does."""
        self.add(statement.kind, *statement.flags)
        self.tables.update(dict.fromkeys(statement.tables))
        if written:
            self.written.update(dict.fromkeys(statement.written_tables))
        self.functions.update(dict.fromkeys(statement.functions))
        self.error = self.error or statement.error
        return self

    def statement(self, text: str) -> Statement:
        return Statement(
            text=text,
            kind=riskiest(tuple(self.kinds)),
            operation=self.operation,
            tables=tuple(self.tables),
            written_tables=tuple(self.written),
            functions=tuple(self.functions),
            flags=frozenset(self.flags),
            error=self.error,
            tree=self.tree,
        )


def _unparseable(text: str, error: str, operation: str = "UNKNOWN") -> Statement:
    return Statement(
        text, StatementKind.UNKNOWN, operation, flags=frozenset({RiskFlag.UNPARSEABLE}), error=error
    )


def _classify_chunk(chunk: _Chunk) -> Statement:
    head = chunk.word(0)
    handler = _HANDLERS[chunk.dialect].get(head) if head else None
    statement = handler(chunk) if handler else None
    return statement if statement is not None else _classify_parsed(chunk)


def _classify_parsed(chunk: _Chunk) -> Statement:
    operation = chunk.operation()
    if any(token.token_type is TokenType.SEMICOLON for token in chunk.tokens):  # see _split
        facts = _Facts(operation, error="a routine body mcp-guard cannot see inside")
        return facts.add(StatementKind.UNKNOWN, RiskFlag.OPAQUE_COMMAND).statement(chunk.text)
    try:
        trees = _DIALECTS[chunk.dialect].parser().parse(chunk.tokens, chunk.source)
    except Exception as error:  # ParseError, or sqlglot failing on input it does not expect
        return _unparseable(chunk.text, _parse_message(error), operation)
    tree = trees[0] if len(trees) == 1 else None
    if isinstance(tree, exp.Command):
        kind = _COMMAND_KINDS.get(tree.name.upper())
        if kind is not None:
            return _Facts(operation).add(kind).statement(chunk.text)
        facts = _Facts(operation, error=f"mcp-guard cannot see inside this {operation} statement")
        return facts.add(StatementKind.UNKNOWN, RiskFlag.OPAQUE_COMMAND).statement(chunk.text)
    root = _ROOTS.get(type(tree)) if isinstance(tree, exp.Expression) else None
    if root is None or not isinstance(tree, exp.Expression):
        # e.g. NOTIFY c, which sqlglot reads as the column NOTIFY aliased c
        message = f"not a statement mcp-guard knows (sqlglot reads it as {type(tree).__name__})"
        return _unparseable(chunk.text, message, operation)
    kind, name = root
    if isinstance(tree, (exp.Create, exp.Drop, exp.Alter)):
        name = f"{name} {tree.args.get('kind') or ''}".strip().upper()
    facts = _Facts(name, tree=tree).add(kind)
    _read_tree(tree, facts, chunk.dialect)
    return facts.statement(chunk.text)


def _parse_message(error: Exception) -> str:
    if isinstance(error, ParseError) and error.errors:
        first = error.errors[0]
        near = f" near {first['highlight']!r}" if first.get("highlight") else ""
        where = f"line {first.get('line')}, column {first.get('col')}"
        return f"{first.get('description') or 'cannot parse'}{near} ({where})"
    return f"cannot parse: {error}"[:200]


_ROOTS: dict[type[exp.Expr], tuple[StatementKind, str]] = {
    exp.Select: (StatementKind.READ, "SELECT"),
    exp.Union: (StatementKind.READ, "UNION"),
    exp.Intersect: (StatementKind.READ, "INTERSECT"),
    exp.Except: (StatementKind.READ, "EXCEPT"),
    exp.Values: (StatementKind.READ, "VALUES"),
    exp.Subquery: (StatementKind.READ, "SELECT"),
    exp.Insert: (StatementKind.WRITE, "INSERT"),
    exp.Update: (StatementKind.WRITE, "UPDATE"),
    exp.Delete: (StatementKind.WRITE, "DELETE"),
    exp.Merge: (StatementKind.WRITE, "MERGE"),
    exp.Create: (StatementKind.DDL, "CREATE"),
    exp.Drop: (StatementKind.DDL, "DROP"),
    exp.Alter: (StatementKind.DDL, "ALTER"),
    exp.TruncateTable: (StatementKind.DDL, "TRUNCATE"),
    exp.Comment: (StatementKind.DDL, "COMMENT"),
    exp.Grant: (StatementKind.DCL, "GRANT"),
    exp.Revoke: (StatementKind.DCL, "REVOKE"),
    exp.Copy: (StatementKind.ADMIN, "COPY"),
}

# Generic commands whose leading keyword alone bounds what they can do.
_COMMAND_KINDS = {"GRANT": StatementKind.DCL, "REVOKE": StatementKind.DCL}

# Nodes sqlglot models as functions though SQL writes them as keywords (AND, OR, CASE).
_OPERATORS = (exp.Connector, exp.Case, exp.If)
_DML = (exp.Insert, exp.Update, exp.Delete, exp.Merge)  # not exp.DML: sqlglot counts COPY as DML too


def _read_tree(tree: exp.Expression, facts: _Facts, dialect: str) -> None:
    """Walk the whole tree: a READ root may hide a write, a lock, an INTO or a dangerous call."""
    if isinstance(tree, exp.Copy):
        _read_copy(tree, facts, dialect)
    elif isinstance(tree, (exp.Create, exp.Drop, exp.Alter, exp.TruncateTable, exp.Comment)):
        _write_to(facts, _targets(tree), dialect)
    for node in tree.walk(bfs=False):
        if isinstance(node, exp.Table):
            name = _table_name(node, dialect)
            if (
                name
                and not isinstance(node.parent, exp.UserDefinedFunction)
                and not _names_cte(node, dialect)
            ):
                facts.tables[name] = None
        elif isinstance(node, _DML):
            facts.add(StatementKind.WRITE)
            if node is not tree and node.find_ancestor(exp.CTE) is not None:
                facts.add(StatementKind.WRITE, RiskFlag.DML_IN_CTE)
            # MERGE's WHEN ... THEN UPDATE/DELETE is bounded by its ON condition, not by a WHERE.
            if isinstance(node, (exp.Update, exp.Delete)) and not isinstance(node.parent, exp.When):
                where = node.args.get("where")
                if where is None or _truth(where.this) is True:
                    facts.add(StatementKind.WRITE, RiskFlag.WRITE_WITHOUT_WHERE)
            _write_to(facts, _targets(node), dialect)
        elif isinstance(node, exp.Into):
            facts.add(StatementKind.DDL, RiskFlag.SELECT_INTO)
            _write_to(facts, _targets(node), dialect)
        elif isinstance(node, exp.Lock):
            facts.add(StatementKind.WRITE, RiskFlag.LOCKING_READ)
        elif isinstance(node, exp.Func) and not isinstance(node, _OPERATORS):
            _read_call(node, facts)
        elif isinstance(node, (exp.Command, exp.Block)):
            # sqlglot misreads BEGIN ATOMIC ... END routine bodies (a DELETE in one came out as an alias).
            facts.add(StatementKind.UNKNOWN, RiskFlag.OPAQUE_COMMAND)
            facts.error = facts.error or "mcp-guard cannot see inside part of this statement"
    # A write's target is always a real table, even when a CTE has the same name.
    facts.tables.update(dict.fromkeys(facts.written))


def refers_to_cte(table: exp.Table, dialect: str) -> bool:
    """Whether a table reference names a CTE in scope (masking rewrites only real tables)."""
    return _names_cte(table, dialect)


def _names_cte(table: exp.Table, dialect: str) -> bool:
    """Whether `table` refers to a CTE in scope rather than to a real table of that name.

    A CTE is visible in its query's body and in the CTEs after it (itself too under RECURSIVE). A
    name this cannot prove to be a CTE counts as a table, so no table is ever missed.
    """
    if table.args.get("db") or table.args.get("catalog") or not isinstance(table.this, exp.Identifier):
        return False  # a qualified name, a table function, ROWS FROM (...)
    name = _identifier(table.this, dialect)
    child: exp.Expr = table
    node = table.parent
    while node is not None:
        ctes: list[exp.Expr] = []
        if isinstance(node, exp.With):  # inside the definition of one of its CTEs
            position = next((i for i, cte in enumerate(node.expressions) if cte is child), 0)
            ctes = node.expressions[: position + 1 if node.args.get("recursive") else position]
        elif isinstance(node.args.get("with_"), exp.With) and node.args["with_"] is not child:
            ctes = node.args["with_"].expressions
        if any(
            cte.args.get("alias") and _identifier(cte.args["alias"].this, dialect) == name for cte in ctes
        ):
            return True
        child, node = node, node.parent
    return False


def _read_copy(copy: exp.Copy, facts: _Facts, dialect: str) -> None:
    facts.add(StatementKind.ADMIN, RiskFlag.COPY)
    for target in copy.args.get("files") or [None]:
        word = target.name.upper() if isinstance(target, (exp.Identifier, exp.Var, exp.Column)) else ""
        if word == "PROGRAM":
            facts.add(StatementKind.ADMIN, RiskFlag.COPY_PROGRAM)
        elif word not in ("STDIN", "STDOUT"):
            facts.add(StatementKind.ADMIN, RiskFlag.COPY_FILE)
    if copy.args.get("kind"):  # COPY ... FROM fills the table
        _write_to(facts, _targets(copy), dialect)


def _read_call(node: exp.Func, facts: _Facts) -> None:
    name = node.name.lower() if isinstance(node, exp.Anonymous) else node.sql_name().lower()
    facts.functions[name] = None
    if name == "set_config":
        setting = node.expressions[0] if node.expressions else None
        _set_setting(facts, setting.name if isinstance(setting, exp.Literal) and setting.is_string else None)
        return
    effect = function_effect(name)
    if effect is not None:
        facts.add(effect[0], *effect[1])


def _set_setting(facts: _Facts, name: str | None) -> None:
    """SET, RESET or set_config() of `name`; None when the name is only known at run time."""
    facts.add(StatementKind.SESSION, RiskFlag.SESSION_SETTING)
    # A name computed at run time could be "role": assume the worst.
    kind = _SETTING_KINDS.get(name.lower()) if name is not None else StatementKind.DCL
    if kind is StatementKind.TRANSACTION:
        facts.add(kind, RiskFlag.TRANSACTION_CONTROL)
    elif kind is not None:
        facts.add(kind)


def _targets(node: exp.Expression) -> list[exp.Table]:
    """The tables a statement (or DML node) changes."""
    if isinstance(node, exp.Drop):
        candidates = list(node.args.get("tables") or [node.this])
    elif isinstance(node, exp.TruncateTable):
        candidates = list(node.expressions)
    elif isinstance(node, exp.Create) and isinstance(node.this, exp.Index):
        candidates = [node.this.args.get("table")]
    else:
        candidates = [node.this]
    tables = []
    for candidate in candidates:
        if isinstance(candidate, exp.Schema):
            candidate = candidate.this
        if isinstance(candidate, exp.Table):
            tables.append(candidate)
    return tables


def _write_to(facts: _Facts, tables: Iterable[exp.Table], dialect: str) -> None:
    for table in tables:
        name = _table_name(table, dialect)
        if name:
            facts.written[name] = None


def _identifier(node: exp.Expression, dialect: str) -> str:
    """Lower case unless quoted; SQLite folds even quoted names, so it always lower-cases."""
    if isinstance(node, exp.Identifier) and node.quoted and dialect == "postgres":
        return node.name
    return node.name.lower()


def _table_name(table: exp.Table, dialect: str) -> str | None:
    """`schema.table` as written, normalised; None for table functions and schema-only targets."""
    if not isinstance(table.this, exp.Identifier):
        return None
    parts = [table.args.get("catalog"), table.args.get("db"), table.this]
    return ".".join(_identifier(part, dialect) for part in parts if part is not None)


def _truth(node: exp.Expression) -> bool | None:
    """The value of a condition when it is constant (`1=1`, `true`, `id = id`), else None."""
    try:
        return _constant_truth(node)
    except (ValueError, RecursionError):  # an odd number literal, a very deep condition: not provable
        return None


def _constant_truth(node: exp.Expression) -> bool | None:
    if isinstance(node, exp.Paren):
        return _constant_truth(node.this)
    if isinstance(node, exp.Boolean):
        return bool(node.this)
    if isinstance(node, exp.Literal):
        if node.is_string:
            return True if node.name.lower() in _TRUE_WORDS else None
        return float(node.name) != 0
    if isinstance(node, exp.Not):
        inner = _constant_truth(node.this)
        return None if inner is None else not inner
    if isinstance(node, (exp.And, exp.Or)):
        left, right = _constant_truth(node.this), _constant_truth(node.expression)
        absorbing = isinstance(node, exp.Or)  # true absorbs OR, false absorbs AND
        if absorbing in (left, right):
            return absorbing
        return None if None in (left, right) else not absorbing
    if type(node) in _COMPARE:
        left, right = node.this, node.expression
        if (
            isinstance(left, exp.Literal)
            and isinstance(right, exp.Literal)
            and left.is_number == right.is_number
        ):
            return _COMPARE[type(node)](_literal(left), _literal(right))
        if left == right and not left.find(exp.Func, exp.Subquery):
            return isinstance(node, (exp.EQ, exp.GTE, exp.LTE))
    return None


_COMPARE: dict[type[exp.Expr], Callable[[Any, Any], bool]] = {
    exp.EQ: operator.eq,
    exp.NEQ: operator.ne,
    exp.GT: operator.gt,
    exp.GTE: operator.ge,
    exp.LT: operator.lt,
    exp.LTE: operator.le,
}


def _literal(node: exp.Literal) -> float | str:
    return float(node.name) if node.is_number else node.name


# --- Statements read by their leading keywords -----------------------------------------------------
# sqlglot has no tree for these (it falls back to exp.Command, or misreads `NOTIFY c` as a column
# with an alias), so their kind comes from the keywords; a statement they embed is classified too.

Handler = Callable[[_Chunk], Statement | None]


def _fixed(kind: StatementKind, *flags: RiskFlag, words: int = 1) -> Handler:
    """A statement whose leading keyword alone says what it is."""

    def handle(chunk: _Chunk) -> Statement:
        return _Facts(chunk.operation(words)).add(kind, *flags).statement(chunk.text)

    return handle


def _transaction(chunk: _Chunk) -> Statement | None:
    first, second = chunk.words(2)
    if first == "START" and second != "TRANSACTION":
        return None
    facts = _Facts("START TRANSACTION" if first == "START" else chunk.operation())
    facts.add(StatementKind.TRANSACTION, RiskFlag.TRANSACTION_CONTROL)
    return facts.statement(chunk.text)


def _explain(chunk: _Chunk) -> Statement:
    tail = chunk.tail()
    analyze, start = _explain_options(tail) if tail and tail.tokens else (False, 0)
    if tail is None or start >= len(tail.tokens):
        return _unparseable(chunk.text, "EXPLAIN needs a statement to explain", "EXPLAIN")
    inner = _classify_chunk(tail.slice(start))
    facts = _Facts("EXPLAIN ANALYZE" if analyze else "EXPLAIN")
    if analyze:
        # EXPLAIN ANALYZE runs the statement: it is everything the statement is.
        return facts.merge(inner).add(StatementKind.READ, RiskFlag.EXPLAIN_ANALYZE).statement(chunk.text)
    facts.merge(inner, written=False)
    # Only plans: a write or a locking read explained is a read. The planner may still evaluate
    # functions with constant arguments, so what calls do is kept, and rarer kinds stay what they are.
    facts.kinds = (
        {StatementKind.READ} if inner.kind in (StatementKind.READ, StatementKind.WRITE) else {inner.kind}
    )
    facts.flags = {flag for flag in facts.flags if flag in _CALL_FLAGS}
    for name in inner.functions:
        effect = function_effect(name)
        if effect is not None:
            facts.add(effect[0], *effect[1])
    return facts.statement(chunk.text)


_CALL_FLAGS = frozenset(
    {
        RiskFlag.SIDE_EFFECT_FUNCTION,
        RiskFlag.DYNAMIC_SQL,
        RiskFlag.SESSION_SETTING,
        RiskFlag.LISTEN_NOTIFY,
        RiskFlag.LOAD_EXTENSION,
        RiskFlag.UNPARSEABLE,
        RiskFlag.OPAQUE_COMMAND,
    }
)


def _explain_options(tail: _Chunk) -> tuple[bool, int]:
    """Whether EXPLAIN runs its statement (ANALYZE), and the index of the statement's first token."""
    if tail.dialect == "postgres" and tail.tokens[0].token_type is TokenType.L_PAREN:
        close = _closing_paren(tail.tokens, 0)
        if close is None:
            return True, len(tail.tokens)
        analyze = False
        for option in _split_commas(tail.tokens[1:close]):
            if option and option[0].text.upper() in ("ANALYZE", "ANALYSE"):
                value = option[1].text.upper() if len(option) > 1 else "TRUE"
                analyze = analyze or value not in _FALSE_WORDS  # fail closed on unusual spellings
        return analyze, close + 1
    prefixes = ("ANALYZE", "ANALYSE", "VERBOSE") if tail.dialect == "postgres" else ("QUERY", "PLAN")
    index = 0
    while tail.word(index) in prefixes:
        index += 1
    return any(tail.word(i) in ("ANALYZE", "ANALYSE") for i in range(index)), index


def _closing_paren(tokens: list[Token], open_index: int) -> int | None:
    depth = 0
    for index in range(open_index, len(tokens)):
        if tokens[index].token_type is TokenType.L_PAREN:
            depth += 1
        elif tokens[index].token_type is TokenType.R_PAREN:
            depth -= 1
            if depth == 0:
                return index
    return None


def _split_commas(tokens: list[Token]) -> list[list[Token]]:
    parts: list[list[Token]] = [[]]
    depth = 0
    for token in tokens:
        if token.token_type is TokenType.COMMA and depth == 0:
            parts.append([])
            continue
        depth += {TokenType.L_PAREN: 1, TokenType.R_PAREN: -1}.get(token.token_type, 0)
        parts[-1].append(token)
    return parts


def _find_word(chunk: _Chunk, word: str, start: int = 0) -> int | None:
    """Index of the first `word` outside parentheses, from `start`."""
    depth = 0
    for index in range(start, len(chunk.tokens)):
        depth += {TokenType.L_PAREN: 1, TokenType.R_PAREN: -1}.get(chunk.tokens[index].token_type, 0)
        if depth == 0 and chunk.word(index) == word:
            return index
    return None


def _embedding(chunk: _Chunk, operation: str, keyword: str, after: str | None = None) -> Statement:
    """A statement that carries another after `keyword` (PREPARE ... AS, DECLARE ... CURSOR ... FOR)."""
    tail = chunk.tail()
    anchor = _find_word(tail, after) if tail and after else 0
    index = _find_word(tail, keyword, anchor) if tail and anchor is not None else None
    if tail is None or index is None or index + 1 >= len(tail.tokens):
        return _unparseable(chunk.text, f"{operation} without {keyword} and a statement", operation)
    return _Facts(operation).merge(_classify_chunk(tail.slice(index + 1))).statement(chunk.text)


def _prepare(chunk: _Chunk) -> Statement:
    if chunk.words(2)[1] == "TRANSACTION":  # two-phase commit, not a prepared statement
        return (
            _Facts("PREPARE TRANSACTION")
            .add(StatementKind.TRANSACTION, RiskFlag.TRANSACTION_CONTROL)
            .statement(chunk.text)
        )
    statement = _embedding(chunk, "PREPARE", "AS")
    return _with(statement, StatementKind.SESSION, RiskFlag.PREPARED_STATEMENT)


def _declare(chunk: _Chunk) -> Statement:
    statement = _embedding(chunk, "DECLARE", "FOR", after="CURSOR")
    return _with(statement, StatementKind.SESSION, RiskFlag.CURSOR)


def _with(statement: Statement, kind: StatementKind, *flags: RiskFlag) -> Statement:
    facts = _Facts(statement.operation, tree=None, error=statement.error).merge(statement).add(kind, *flags)
    return facts.statement(statement.text)


def _arguments(chunk: _Chunk, facts: _Facts, first: int) -> Statement:
    """EXECUTE p(args) and CALL f(args) evaluate expressions: read them as a SELECT of those
    expressions (analysis only; the statement's own text is what runs)."""
    tail = chunk.tail()
    if tail is not None and len(tail.tokens) > first:
        probe = _chunk_of("SELECT " + tail.source[tail.tokens[first].start :], chunk.dialect)
        if probe is None or not probe.tokens:
            return _unparseable(chunk.text, "cannot read the arguments", facts.operation)
        facts.merge(_classify_parsed(probe), written=False)
        facts.kinds.discard(StatementKind.READ)
    return facts.statement(chunk.text)


def _execute(chunk: _Chunk) -> Statement:
    facts = _Facts("EXECUTE").add(StatementKind.SESSION, RiskFlag.PREPARED_STATEMENT)
    return _arguments(chunk, facts, first=1)


def _call(chunk: _Chunk) -> Statement:
    return _arguments(chunk, _Facts("CALL").add(StatementKind.ADMIN, RiskFlag.PROCEDURAL), first=0)


def _set(chunk: _Chunk) -> Statement:
    tail = chunk.tail()
    words = [tail.word(i) if tail else None for i in range(4)]
    facts = _Facts("SET")
    index = (
        1 if words[0] in ("SESSION", "LOCAL") and words[1] not in ("AUTHORIZATION", "CHARACTERISTICS") else 0
    )
    key, following = words[index], words[index + 1]
    if key in ("TRANSACTION", "CONSTRAINTS") or (key, following) == ("SESSION", "CHARACTERISTICS"):
        facts.operation = f"SET {key}" if key != "SESSION" else "SET SESSION CHARACTERISTICS"
        return facts.add(StatementKind.TRANSACTION, RiskFlag.TRANSACTION_CONTROL).statement(chunk.text)
    if key == "ROLE" or (key, following) == ("SESSION", "AUTHORIZATION"):
        facts.operation = "SET ROLE" if key == "ROLE" else "SET SESSION AUTHORIZATION"
        return facts.add(StatementKind.DCL, RiskFlag.SESSION_SETTING).statement(chunk.text)
    if tail is None or index >= len(tail.tokens):
        return _unparseable(chunk.text, "SET needs a setting", "SET")
    name = "timezone" if (key, following) == ("TIME", "ZONE") else tail.tokens[index].text
    _set_setting(facts, name)
    return facts.statement(chunk.text)


def _reset(chunk: _Chunk) -> Statement:
    tail = chunk.tail()
    facts = _Facts("RESET")
    first, second = (tail.word(0), tail.word(1)) if tail else (None, None)
    if first == "ROLE" or (first, second) == ("SESSION", "AUTHORIZATION"):
        # Back to the login role: undoes a SET ROLE the server may have used to lower privileges.
        return facts.add(StatementKind.DCL, RiskFlag.SESSION_SETTING).statement(chunk.text)
    if tail is None or not tail.tokens:
        return _unparseable(chunk.text, "RESET needs a setting or ALL", "RESET")
    if first == "ALL":  # leaves role and session_authorization alone (PostgreSQL's GUC_NO_RESET_ALL)
        return facts.add(StatementKind.SESSION, RiskFlag.SESSION_SETTING).statement(chunk.text)
    _set_setting(facts, tail.tokens[0].text)
    return facts.statement(chunk.text)


def _discard(chunk: _Chunk) -> Statement:
    facts = _Facts(chunk.operation(2)).add(StatementKind.SESSION, RiskFlag.SESSION_SETTING)
    if chunk.words(2)[1] == "ALL":  # includes SET SESSION AUTHORIZATION DEFAULT
        facts.add(StatementKind.DCL)
    return facts.statement(chunk.text)


def _vacuum(chunk: _Chunk) -> Statement:
    tail = chunk.tail()
    facts = _Facts("VACUUM").add(StatementKind.ADMIN)
    if tail is None or _find_word(tail, "INTO") is not None:  # SQLite: writes a copy anywhere
        facts.operation = "VACUUM INTO"
        facts.add(StatementKind.ADMIN, RiskFlag.VACUUM_INTO)
    return facts.statement(chunk.text)


def _replace(chunk: _Chunk) -> Statement | None:
    """SQLite's REPLACE INTO is INSERT OR REPLACE INTO; sqlglot only parses the latter."""
    probe = _chunk_of("INSERT OR " + chunk.source[chunk.tokens[0].start : chunk.end], chunk.dialect)
    if probe is None:
        return None
    return _Facts("REPLACE").merge(_classify_parsed(probe)).statement(chunk.text)


_PRIVILEGE_OBJECTS = {
    "ROLE": StatementKind.DCL,
    "USER": StatementKind.DCL,  # also USER MAPPING, which holds credentials
    "GROUP": StatementKind.DCL,
    "DEFAULT": StatementKind.DCL,  # ALTER DEFAULT PRIVILEGES
    "OWNED": StatementKind.DCL,  # DROP OWNED BY
    "SYSTEM": StatementKind.ADMIN,  # ALTER SYSTEM writes the server's configuration
}


def _privileges(chunk: _Chunk) -> Statement | None:
    """CREATE/ALTER/DROP of roles and privileges; any other object is parsed as DDL."""
    kind = _PRIVILEGE_OBJECTS.get(chunk.words(2)[1] or "")
    return _Facts(chunk.operation(2)).add(kind).statement(chunk.text) if kind else None


_COMMON: dict[str, Handler] = {
    "EXPLAIN": _explain,
    "BEGIN": _transaction,
    "START": _transaction,
    "COMMIT": _transaction,
    "END": _transaction,
    "ROLLBACK": _transaction,
    "SAVEPOINT": _transaction,
    "RELEASE": _transaction,
    "VACUUM": _vacuum,
    "ANALYZE": _fixed(StatementKind.ADMIN),
    "REINDEX": _fixed(StatementKind.ADMIN),
}

_HANDLERS: dict[str, dict[str, Handler]] = {
    "postgres": {
        **_COMMON,
        "SHOW": _fixed(StatementKind.READ),
        "ABORT": _transaction,
        "SET": _set,
        "RESET": _reset,
        "DISCARD": _discard,
        "LISTEN": _fixed(StatementKind.SESSION, RiskFlag.LISTEN_NOTIFY),
        "UNLISTEN": _fixed(StatementKind.SESSION, RiskFlag.LISTEN_NOTIFY),
        "NOTIFY": _fixed(StatementKind.SESSION, RiskFlag.LISTEN_NOTIFY),
        "PREPARE": _prepare,
        "EXECUTE": _execute,
        "DEALLOCATE": _fixed(StatementKind.SESSION, RiskFlag.PREPARED_STATEMENT),
        "DECLARE": _declare,
        "FETCH": _fixed(StatementKind.SESSION, RiskFlag.CURSOR),
        "MOVE": _fixed(StatementKind.SESSION, RiskFlag.CURSOR),
        "CLOSE": _fixed(StatementKind.SESSION, RiskFlag.CURSOR),
        "DO": _fixed(StatementKind.ADMIN, RiskFlag.PROCEDURAL),
        "CALL": _call,
        "ANALYSE": _fixed(StatementKind.ADMIN),
        "CLUSTER": _fixed(StatementKind.ADMIN),
        "CHECKPOINT": _fixed(StatementKind.ADMIN),
        "LOAD": _fixed(StatementKind.ADMIN, RiskFlag.LOAD_EXTENSION),  # loads a shared library
        "LOCK": _fixed(StatementKind.ADMIN),
        "REFRESH": _fixed(StatementKind.ADMIN, words=3),
        "CREATE": _privileges,
        "ALTER": _privileges,
        "DROP": _privileges,
    },
    "sqlite": {
        **_COMMON,
        "ATTACH": _fixed(StatementKind.ADMIN, RiskFlag.ATTACH),
        "DETACH": _fixed(StatementKind.ADMIN, RiskFlag.ATTACH),
        "PRAGMA": _fixed(StatementKind.ADMIN, RiskFlag.PRAGMA),
        "REPLACE": _replace,
    },
}
