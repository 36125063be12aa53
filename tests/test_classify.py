"""classify(): statements split by tokens, kinds and risk flags that fail closed, tables and functions."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from sqlglot import exp

from mcp_guard.classify import (
    CACHE_MAX_CHARS,
    RiskFlag,
    StatementKind,
    classify,
)
from mcp_guard.errors import UsageError
from tests.corpus import Case, load

CORPORA = ("escapes_postgres", "escapes_sqlite", "reads_postgres", "reads_sqlite")
CASES = [case for name in CORPORA for case in load(name)]

READ = StatementKind.READ
WRITE = StatementKind.WRITE
UNKNOWN = StatementKind.UNKNOWN


def texts(sql: str, dialect: str = "postgres") -> list[str]:
    return [statement.text for statement in classify(sql, dialect).statements]


# --- the corpora -------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_corpus_case_gets_its_expected_kind_and_flags(case: Case) -> None:
    classification = classify(case.sql, case.dialect)
    errors = [s.error for s in classification.statements if s.error]
    assert (classification.kind, classification.flags) == (case.kind, case.flags), (case.title, errors)


@pytest.mark.parametrize(("name", "least"), [("escapes_postgres", 45), ("escapes_sqlite", 20)])
def test_escape_corpora_are_large_and_mostly_refused(name: str, least: int) -> None:
    cases = load(name)
    assert len(cases) >= least
    harmless = [case for case in cases if case.kind is READ]
    assert len(harmless) <= 5, "an escape corpus holds attempts, only a few of them harmless tricks"


@pytest.mark.parametrize("name", ["reads_postgres", "reads_sqlite"])
def test_read_corpora_hold_only_reads(name: str) -> None:
    cases = load(name)
    assert len(cases) >= 15
    assert {case.kind for case in cases} == {READ}


def test_escape_corpora_touch_only_files_the_integration_test_checks() -> None:
    for case in load("escapes_postgres") + load("escapes_sqlite"):
        for word in case.sql.replace("'", " ").split():
            if word.startswith("/tmp/"):
                assert word.startswith("/tmp/mcp_guard_escape_"), case.id


def test_corpus_loader_reads_multi_line_cases_and_optional_end(tmp_path: Path) -> None:
    (tmp_path / "demo_sqlite.sql").write_text(
        "notes before the first case\n"
        "-- title: first\n-- expect: kind=write flags=multiple_statements\n"
        "SELECT 1;\n-- a comment inside\nDELETE FROM t WHERE id = 1\n-- end\n"
        "ignored notes\n"
        "-- title: second\n-- expect: kind=read flags=-\nSELECT 2\n",
        encoding="utf-8",
    )
    first, second = load("demo_sqlite", tmp_path)
    assert first.sql == "SELECT 1;\n-- a comment inside\nDELETE FROM t WHERE id = 1"
    assert (first.dialect, first.kind, first.flags) == ("sqlite", WRITE, {RiskFlag.MULTIPLE_STATEMENTS})
    assert (second.title, second.sql, second.flags, second.line) == ("second", "SELECT 2", frozenset(), 9)


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("-- title: x\nSELECT 1\n", "must follow"),
        ("-- title: x\n-- expect: kind=read\nSELECT 1\n", "expected 'kind="),
        ("-- title: x\n-- expect: kind=reading flags=-\nSELECT 1\n", "is not a valid StatementKind"),
        ("-- title: x\n-- expect: kind=read flags=nope\nSELECT 1\n", "is not a valid RiskFlag"),
        ("-- title: x\n-- expect: kind=read flags=-\n-- end\n", "has no SQL"),
        ("-- title: x\n-- expect: kind=read flags=-\nSELECT 1\n-- expect: kind=read flags=-\n", "belongs"),
    ],
)
def test_corpus_loader_names_the_line_of_a_broken_case(tmp_path: Path, text: str, complaint: str) -> None:
    (tmp_path / "broken_postgres.sql").write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=complaint) as raised:
        load("broken_postgres", tmp_path)
    assert str(raised.value).startswith("broken_postgres.sql:")


# --- splitting ---------------------------------------------------------------------------------------


def test_statement_text_is_the_exact_source_without_whitespace_or_semicolon() -> None:
    sql = "  SELECT 1 ;\n\n  select  2 -- two\n;\n/* three */ SELECT\n  3\n"
    assert texts(sql) == ["SELECT 1", "select  2 -- two", "/* three */ SELECT\n  3"]
    assert all(text in sql for text in texts(sql))


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT 'a;b', 'it''s; fine'",
        'SELECT "weird;name" FROM customers',
        "SELECT 1 /* ; DELETE FROM t */",
        "SELECT 1 -- ; DELETE FROM t",
        "SELECT $$ ; DELETE FROM t; $$",
        "SELECT $tag$ ; $$ ; $tag$",
        "SELECT E'\\'; DELETE FROM t; --'",
        "SELECT U&'\\0027; DELETE FROM t'",
        "DO $$ BEGIN DELETE FROM t; END $$",
        "EXPLAIN SELECT ';'",
    ],
)
def test_semicolons_inside_strings_comments_and_dollar_quotes_do_not_split(sql: str) -> None:
    assert texts(sql) == [sql]


def test_a_backslash_does_not_escape_a_quote_in_a_standard_postgres_string() -> None:
    assert texts("SELECT '\\'; DELETE FROM t") == ["SELECT '\\'", "DELETE FROM t"]


def test_postgres_comments_nest_and_sqlite_comments_do_not() -> None:
    sql = "/* a /* b */ ; DELETE FROM t */ SELECT 1"
    assert texts(sql, "postgres") == [sql]
    assert texts(sql, "sqlite") == ["DELETE FROM t */ SELECT 1"]


@pytest.mark.parametrize("sql", ["", "   \n", ";", " ; ;; ", "-- only a comment", "/* only */ ; -- comments"])
def test_input_without_statements_gives_an_empty_classification(sql: str) -> None:
    assert classify(sql, "postgres").statements == ()


def test_comment_after_the_last_semicolon_is_not_a_statement() -> None:
    assert texts("SELECT 1; -- done") == ["SELECT 1"]


@pytest.mark.parametrize(
    ("sql", "dialect"),
    [
        ("CREATE FUNCTION f() RETURNS void LANGUAGE sql BEGIN ATOMIC DELETE FROM t; END", "postgres"),
        (
            "CREATE OR REPLACE PROCEDURE p() LANGUAGE sql BEGIN ATOMIC SELECT CASE WHEN x THEN 1 END; END",
            "postgres",
        ),
        ("CREATE TEMP TRIGGER tr AFTER INSERT ON t BEGIN DELETE FROM u; UPDATE v SET a = 1; END", "sqlite"),
    ],
)
def test_a_routine_body_is_one_statement_that_fails_closed(sql: str, dialect: str) -> None:
    classification = classify(sql + "; SELECT 1", dialect)
    assert [s.text for s in classification.statements] == [sql, "SELECT 1"]
    assert classification.statements[0].kind is UNKNOWN


def test_text_the_tokenizer_cannot_read_is_one_unparseable_statement() -> None:
    sql = "SELECT 1; SELECT 'unterminated"
    (statement,) = classify(sql, "postgres").statements
    assert statement.text == sql
    assert (statement.kind, statement.flags) == (UNKNOWN, {RiskFlag.UNPARSEABLE})
    assert statement.error is not None and "tokens" in statement.error


# --- failing closed ----------------------------------------------------------------------------------


def test_unknown_dialect_is_a_usage_error_naming_the_known_ones() -> None:
    with pytest.raises(UsageError, match="'mysql'.*postgres and sqlite"):
        classify("SELECT 1", "mysql")


def test_parse_error_is_unknown_with_a_short_message_saying_where() -> None:
    (statement,) = classify("SELECT * FROM customers WHERE", "postgres").statements
    assert (statement.kind, statement.flags) == (UNKNOWN, {RiskFlag.UNPARSEABLE})
    assert statement.error is not None and "line 1, column" in statement.error
    assert "\x1b" not in statement.error and len(statement.error) < 200


def test_command_sqlglot_cannot_see_inside_is_unknown_and_opaque() -> None:
    (statement,) = classify("CREATE EXTENSION dblink", "postgres").statements
    assert (statement.kind, statement.flags, statement.operation) == (
        UNKNOWN,
        {RiskFlag.OPAQUE_COMMAND},
        "CREATE",
    )


@pytest.mark.parametrize(("sql", "dialect"), [("garbage here", "postgres"), ("NOTIFY c", "sqlite")])
def test_bare_expression_is_not_mistaken_for_a_read(sql: str, dialect: str) -> None:
    (statement,) = classify(sql, dialect).statements
    assert (statement.kind, statement.flags) == (UNKNOWN, {RiskFlag.UNPARSEABLE})


def test_nesting_deeper_than_sqlglot_can_parse_fails_closed() -> None:
    (statement,) = classify("SELECT " + "(" * 3000 + "1" + ")" * 3000, "postgres").statements
    assert statement.kind is UNKNOWN


def test_one_unknown_statement_makes_the_whole_call_unknown() -> None:
    classification = classify("SELECT 1; SELEKT 2", "postgres")
    assert [s.kind for s in classification.statements] == [READ, UNKNOWN]
    assert classification.kind is UNKNOWN


# --- kinds and flags ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE orders SET total = 0",
        "DELETE FROM orders",
        "DELETE FROM orders WHERE 1 = 1",
        "DELETE FROM orders WHERE true",
        "UPDATE orders SET total = 0 WHERE (id = 5 OR 2 > 1)",
        "UPDATE orders SET total = 0 WHERE NOT false AND 'a' = 'a'",
        "UPDATE orders SET total = 0 WHERE id = id",
    ],
)
def test_update_or_delete_without_a_real_where_is_flagged(sql: str) -> None:
    assert RiskFlag.WRITE_WITHOUT_WHERE in classify(sql, "postgres").flags


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE orders SET total = 0 WHERE id = 5",
        "DELETE FROM orders WHERE 1 = 2 OR id = 3",
        "DELETE FROM orders WHERE random() = random()",
        "INSERT INTO orders (total) VALUES (1)",
        "MERGE INTO orders o USING payments p ON o.id = p.order_id WHEN MATCHED THEN UPDATE SET total = 0",
    ],
)
def test_write_with_a_real_condition_is_not_flagged(sql: str) -> None:
    classification = classify(sql, "postgres")
    assert classification.kind is WRITE
    assert RiskFlag.WRITE_WITHOUT_WHERE not in classification.flags


@pytest.mark.parametrize(
    ("sql", "kind", "flags"),
    [
        ("EXPLAIN SELECT 1", READ, set()),
        ("EXPLAIN VERBOSE DELETE FROM t", READ, set()),
        ("EXPLAIN (ANALYZE off) DELETE FROM t", READ, set()),
        ("EXPLAIN (ANALYZE) SELECT 1", READ, {RiskFlag.EXPLAIN_ANALYZE}),
        ("EXPLAIN (COSTS false, ANALYZE 1) DELETE FROM t WHERE id = 1", WRITE, {RiskFlag.EXPLAIN_ANALYZE}),
        ("EXPLAIN (ANALYZE yes) SELECT 1", READ, {RiskFlag.EXPLAIN_ANALYZE}),
        ("EXPLAIN ANALYZE VERBOSE UPDATE t SET a = 1 WHERE id = 1", WRITE, {RiskFlag.EXPLAIN_ANALYZE}),
        (
            "explain analyse select * from t for update",
            WRITE,
            {RiskFlag.EXPLAIN_ANALYZE, RiskFlag.LOCKING_READ},
        ),
        ("EXPLAIN SELECT pg_read_file('x')", StatementKind.ADMIN, {RiskFlag.SIDE_EFFECT_FUNCTION}),
        ("EXPLAIN SELEKT 1", UNKNOWN, {RiskFlag.UNPARSEABLE}),
        ("EXPLAIN (ANALYZE", UNKNOWN, {RiskFlag.UNPARSEABLE}),
    ],
)
def test_explain_is_a_read_unless_it_runs_the_statement(
    sql: str, kind: StatementKind, flags: set[RiskFlag]
) -> None:
    (statement,) = classify(sql, "postgres").statements
    assert (statement.kind, statement.flags) == (kind, flags)


def test_explain_without_analyze_writes_nothing_but_names_the_tables() -> None:
    (statement,) = classify("EXPLAIN DELETE FROM payments WHERE id = 1", "postgres").statements
    assert (statement.tables, statement.written_tables, statement.operation) == (("payments",), (), "EXPLAIN")


@pytest.mark.parametrize(
    ("sql", "kind", "operation"),
    [
        ("SHOW search_path", READ, "SHOW"),
        ("SET statement_timeout = 0", StatementKind.SESSION, "SET"),
        ("SET LOCAL ROLE postgres", StatementKind.DCL, "SET ROLE"),
        ("SET TIME ZONE 'UTC'", StatementKind.SESSION, "SET"),
        ("SET CONSTRAINTS ALL DEFERRED", StatementKind.TRANSACTION, "SET CONSTRAINTS"),
        ("RESET ALL", StatementKind.SESSION, "RESET"),
        ("RESET session_authorization", StatementKind.DCL, "RESET"),
        ("DISCARD PLANS", StatementKind.SESSION, "DISCARD PLANS"),
        ("BEGIN", StatementKind.TRANSACTION, "BEGIN"),
        ("START TRANSACTION", StatementKind.TRANSACTION, "START TRANSACTION"),
        ("RELEASE SAVEPOINT s", StatementKind.TRANSACTION, "RELEASE"),
        ("ROLLBACK TO SAVEPOINT s", StatementKind.TRANSACTION, "ROLLBACK"),
        ("PREPARE TRANSACTION 'x'", StatementKind.TRANSACTION, "PREPARE TRANSACTION"),
        ("FETCH 10 FROM c", StatementKind.SESSION, "FETCH"),
        ("CLOSE c", StatementKind.SESSION, "CLOSE"),
        ("DEALLOCATE ALL", StatementKind.SESSION, "DEALLOCATE"),
        ("UNLISTEN *", StatementKind.SESSION, "UNLISTEN"),
        ("CHECKPOINT", StatementKind.ADMIN, "CHECKPOINT"),
        ("CLUSTER orders", StatementKind.ADMIN, "CLUSTER"),
        ("REINDEX TABLE orders", StatementKind.ADMIN, "REINDEX"),
        ("REFRESH MATERIALIZED VIEW mv", StatementKind.ADMIN, "REFRESH MATERIALIZED VIEW"),
        ("ALTER DEFAULT PRIVILEGES GRANT SELECT ON TABLES TO x", StatementKind.DCL, "ALTER DEFAULT"),
        ("DROP OWNED BY x", StatementKind.DCL, "DROP OWNED"),
        ("GRANT pg_read_server_files TO x", StatementKind.DCL, "GRANT"),
        ("CREATE TABLE t (a int)", StatementKind.DDL, "CREATE TABLE"),
        ("COMMENT ON TABLE t IS 'x'", StatementKind.DDL, "COMMENT"),
        ("ALTER TABLE t RENAME TO u", StatementKind.DDL, "ALTER TABLE"),
    ],
)
def test_statement_sqlglot_has_no_tree_for_is_read_by_its_keywords(
    sql: str, kind: StatementKind, operation: str
) -> None:
    (statement,) = classify(sql, "postgres").statements
    assert (statement.kind, statement.operation) == (kind, operation)


def test_keyword_statements_embed_the_statement_they_carry() -> None:
    (prepare,) = classify("PREPARE p AS UPDATE orders SET total = 0", "postgres").statements
    assert prepare.kind is StatementKind.SESSION
    assert prepare.flags == {RiskFlag.PREPARED_STATEMENT, RiskFlag.WRITE_WITHOUT_WHERE}
    assert prepare.written_tables == ("orders",)
    (declare,) = classify("DECLARE c SCROLL CURSOR FOR SELECT nextval('s')", "postgres").statements
    assert declare.flags == {RiskFlag.CURSOR, RiskFlag.SIDE_EFFECT_FUNCTION}


def test_sqlite_replace_into_is_an_insert() -> None:
    (statement,) = classify("REPLACE INTO customers (id, name) VALUES (1, 'x')", "sqlite").statements
    assert (statement.kind, statement.operation, statement.written_tables) == (
        WRITE,
        "REPLACE",
        ("customers",),
    )


def test_statement_kind_is_the_riskiest_that_applies() -> None:
    (statement,) = classify("SELECT nextval('s'), pg_sleep(1) FROM orders FOR UPDATE", "postgres").statements
    assert statement.kind is StatementKind.ADMIN
    assert statement.flags == {RiskFlag.SIDE_EFFECT_FUNCTION, RiskFlag.LOCKING_READ}


@pytest.mark.parametrize(
    ("sql", "kind"),
    [
        ("SELECT set_config('search_path', 'x', false)", StatementKind.SESSION),
        ("SELECT set_config('Transaction_Read_Only', 'off', true)", StatementKind.TRANSACTION),
        ("SELECT set_config('role', 'postgres', false)", StatementKind.DCL),
        ("SELECT set_config(name, 'x', false) FROM settings", StatementKind.DCL),
    ],
)
def test_set_config_is_as_risky_as_the_setting_it_changes(sql: str, kind: StatementKind) -> None:
    (statement,) = classify(sql, "postgres").statements
    assert statement.kind is kind
    assert RiskFlag.SESSION_SETTING in statement.flags


# --- tables and functions ----------------------------------------------------------------------------


def test_tables_are_normalised_schema_qualified_and_quoted_case_kept() -> None:
    sql = 'SELECT * FROM "Customers" AS c JOIN Public.Orders AS o ON o.customer_id = c.id, PAYMENTS'
    assert classify(sql, "postgres").tables == ("Customers", "public.orders", "payments")


def test_sqlite_folds_quoted_table_names_as_sqlite_does() -> None:
    sql = 'SELECT * FROM "Customers", [Orders], `main`.`Payments`'
    assert classify(sql, "sqlite").tables == ("customers", "orders", "main.payments")


def test_cte_names_are_not_tables_but_what_they_read_is() -> None:
    sql = "WITH recent AS (SELECT * FROM orders), Big AS (SELECT * FROM recent) SELECT * FROM big, recent"
    (statement,) = classify(sql, "postgres").statements
    assert statement.tables == ("orders",)


@pytest.mark.parametrize(
    ("sql", "tables"),
    [
        ("SELECT * FROM orders, (WITH orders AS (SELECT 1) SELECT * FROM orders) AS x", ("orders",)),
        ("WITH orders AS (SELECT * FROM orders) SELECT * FROM orders", ("orders",)),
        ("WITH a AS (SELECT * FROM b), b AS (SELECT 1) SELECT * FROM a, b", ("b",)),
        ("WITH RECURSIVE r AS (SELECT 1 UNION ALL SELECT * FROM r) SELECT * FROM r", ()),
        ("WITH orders AS (SELECT 1) DELETE FROM orders WHERE id = 1", ("orders",)),
    ],
)
def test_a_name_counts_as_a_cte_only_where_the_cte_is_in_scope(sql: str, tables: tuple[str, ...]) -> None:
    assert classify(sql, "postgres").tables == tables


def test_table_functions_are_not_tables() -> None:
    (statement,) = classify("SELECT * FROM generate_series(1, 3), json_each('[]')", "postgres").statements
    assert statement.tables == ()


@pytest.mark.parametrize(
    ("sql", "written"),
    [
        ("INSERT INTO orders (total) SELECT amount FROM payments", ("orders",)),
        ("UPDATE s.orders SET total = 0 FROM customers WHERE customers.id = 1", ("s.orders",)),
        ("DELETE FROM orders USING customers WHERE customers.id = orders.customer_id", ("orders",)),
        (
            "MERGE INTO orders USING payments ON orders.id = payments.order_id WHEN MATCHED THEN DELETE",
            ("orders",),
        ),
        ("TRUNCATE orders, payments", ("orders", "payments")),
        ("CREATE TABLE loot AS SELECT * FROM customers", ("loot",)),
        ("CREATE INDEX i ON orders (status)", ("orders",)),
        ("DROP TABLE orders, payments", ("orders", "payments")),
        ("ALTER TABLE orders ADD COLUMN note text", ("orders",)),
        ("SELECT * INTO loot FROM customers", ("loot",)),
        ("COPY orders FROM STDIN", ("orders",)),
        ("COPY orders TO STDOUT", ()),
        (
            "WITH d AS (DELETE FROM payments RETURNING order_id) SELECT * FROM orders JOIN d USING (id)",
            ("payments",),
        ),
        ("SELECT * FROM customers", ()),
    ],
)
def test_written_tables_are_the_targets_of_writes(sql: str, written: tuple[str, ...]) -> None:
    (statement,) = classify(sql, "postgres").statements
    assert statement.written_tables == written
    assert set(written) <= set(statement.tables)


@pytest.mark.parametrize(
    "call",
    [
        "pg_read_file('x')",
        "PG_READ_FILE('x')",
        "pg_catalog.pg_read_file('x')",
        '"pg_catalog"."PG_READ_FILE"(\'x\')',
        "\"pg_read_file\"('x')",
        "Pg_Catalog . pg_read_file ('x')",
    ],
)
def test_function_names_are_normalised_before_matching(call: str) -> None:
    (statement,) = classify(f"SELECT {call}", "postgres").statements
    assert statement.functions == ("pg_read_file",)
    assert (statement.kind, statement.flags) == (StatementKind.ADMIN, {RiskFlag.SIDE_EFFECT_FUNCTION})


@pytest.mark.parametrize(
    "name",
    ["lo_creat", "dblink_send_query", "pg_advisory_xact_lock_shared", "pg_try_advisory_lock", "pg_ls_waldir"],
)
def test_function_families_are_matched_by_prefix(name: str) -> None:
    assert RiskFlag.SIDE_EFFECT_FUNCTION in classify(f"SELECT {name}(1)", "postgres").flags


def test_functions_lists_every_call_once_in_order() -> None:
    (statement,) = classify(
        "SELECT upper(name), count(*), upper(email), my_fn(1) FROM customers", "postgres"
    ).statements
    assert statement.functions == ("upper", "count", "my_fn")


def test_names_that_only_look_like_calls_are_reads() -> None:
    classification = classify("SELECT 'pg_sleep(10)', \"pg_sleep\" FROM t", "postgres")
    assert (classification.kind, classification.flags, classification.statements[0].functions) == (
        READ,
        set(),
        (),
    )


# --- the tree, the cache and speed -------------------------------------------------------------------


def test_parsed_statement_keeps_its_tree_and_keyword_statement_has_none() -> None:
    select, show = classify("SELECT id FROM orders; SHOW search_path", "postgres").statements
    assert isinstance(select.tree, exp.Select)
    assert show.tree is None


def test_repeated_sql_is_served_from_the_cache() -> None:
    sql = "SELECT id FROM orders WHERE id = 41 -- cache"
    assert classify(sql, "postgres") is classify(sql, "postgres")
    assert classify(sql, "postgres") is not classify(sql, "sqlite")


def test_sql_longer_than_the_cache_limit_is_classified_afresh() -> None:
    sql = "SELECT 1" + " " * CACHE_MAX_CHARS
    first, second = classify(sql, "postgres"), classify(sql, "postgres")
    assert first is not second
    assert first == second


def test_repeated_classification_takes_well_under_50_microseconds() -> None:
    sql = "SELECT c.name, sum(o.total) FROM customers c JOIN orders o ON o.customer_id = c.id GROUP BY c.name"
    classify(sql, "postgres")
    timings = []
    for _ in range(1000):
        start = time.perf_counter()
        classify(sql, "postgres")
        timings.append(time.perf_counter() - start)
    assert sorted(timings)[len(timings) // 2] < 50e-6


def test_classification_serialises_to_json() -> None:
    data = json.loads(json.dumps(classify("SELECT 1; DELETE FROM t", "postgres").as_dict()))
    assert data["kind"] == "write"
    assert data["flags"] == ["multiple_statements", "write_without_where"]
    assert [s["text"] for s in data["statements"]] == ["SELECT 1", "DELETE FROM t"]


def test_sqlglot_falling_back_to_a_command_logs_no_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING"):
        statement = classify("CREATE EXTENSION mcp_guard_no_such_extension", "postgres").statements[0]
    assert statement.flags == {RiskFlag.OPAQUE_COMMAND}
    assert caplog.records == []
