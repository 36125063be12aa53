"""Masking end to end: unmasked reads unchanged, writes that read masked data refused, notes, the
audit's sealed originals, the index scan kept, and the analysis units that fail closed."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import random
import re
import sqlite3
import subprocess
import sys

import asyncpg
import pytest
import sqlglot

from mcp_guard.backends.base import DbSchema, Relation, Relative
from mcp_guard.catalog import Catalog
from mcp_guard.classify import classify
from mcp_guard.config import ALL_DETECTORS, DEMO_MASKING, MaskRule
from mcp_guard.demo.data import shop_rows
from mcp_guard.detectors import Detectors
from mcp_guard.lineage import lineage, statement_lineage
from mcp_guard.masking import ColumnMask, Masking, partial_value, semantic_type
from mcp_guard.rewrite import MaskPlan, rewrite
from mcp_guard.seal import SealError, seal, unseal
from tests.client import guard_client
from tests.conftest import write_config
from tests.test_masking_bypass import KEY, MASKING

AUDIT_KEY = "22" * 32
UNMASKED_READS = [
    "SELECT count(*) FROM customers",
    "SELECT id, name, created_at FROM customers ORDER BY id",
    "SELECT c.id, o.id, o.total FROM customers c JOIN orders o ON o.customer_id = c.id ORDER BY o.id",
    "SELECT status, count(*) AS n FROM orders GROUP BY status ORDER BY status",
    "SELECT k.id, k.label FROM api_keys k JOIN customers c ON c.id = k.customer_id ORDER BY k.id",
    "SELECT count(DISTINCT ssn) AS people FROM customers",
]


def shop_catalog() -> Catalog:
    relations = (
        Relation(
            "public",
            "customers",
            "table",
            tuple((c, "text") for c in ("id", "name", "email", "ssn", "profile")),
        ),
        Relation("public", "orders", "table", (("id", "int"), ("customer_id", "int"), ("total", "numeric"))),
    )
    return Catalog(DbSchema(relations, ("pg_catalog", "public"), True), "postgres")


def outputs(sql: str):
    return lineage(sqlglot.parse_one(sql, "postgres"), shop_catalog())


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT row_to_json(u) FROM customers u",
        "SELECT to_jsonb(u.*) FROM customers u",
        "SELECT u FROM customers u",
        "SELECT json_agg(u) FROM customers u",
    ],
)
def test_whole_row_references_carry_every_column(sql):
    (only,) = outputs(sql)
    assert {s.column for s in only.sources} == {"id", "name", "email", "ssn", "profile"}


def test_a_table_function_carries_its_arguments():
    (key, value) = outputs(
        "SELECT j.key, j.value FROM customers u, LATERAL jsonb_each_text(u.profile::jsonb) j"
    )
    assert {s.column for s in value.sources} == {"profile"} and {s.column for s in key.sources} == {"profile"}


def test_what_lineage_cannot_resolve_counts_as_masked():
    assert outputs("SELECT * FROM nowhere") is None
    (unknown,) = outputs("SELECT nosuch FROM customers")
    assert unknown.unresolved
    plan = MaskPlan(Masking(DEMO_MASKING, b"k" * 32), DEMO_MASKING.rules, shop_catalog())
    assert plan.output_mask(unknown) is not None


def test_values_of_literals_carry_nothing_but_values_reading_a_table_count_as_masked():
    assert [(o.name, o.sources, o.unresolved) for o in outputs("VALUES (1, 'a'), (2, 'b')")] == [
        ("column1", frozenset(), False),
        ("column2", frozenset(), False),
    ]
    assert outputs("VALUES ((SELECT ssn FROM customers LIMIT 1))") is None


def test_a_rename_keeps_the_direct_source():
    (renamed,) = outputs("SELECT e AS x FROM (SELECT email AS e FROM customers) s")
    assert str(renamed.direct) == "public.customers.email"


def test_the_rewrite_wraps_only_relations_with_masked_columns():
    plan = MaskPlan(Masking(DEMO_MASKING, b"k" * 32), DEMO_MASKING.rules, shop_catalog())
    statement = classify(
        "SELECT c.email, o.total FROM customers c JOIN orders o ON o.customer_id = c.id", "postgres"
    )
    done = rewrite(statement.statements[0], plan, 0)
    assert done is not None and done.relations == ("public.customers",)
    assert "JOIN orders AS o" in done.sql and ") AS c" in done.sql
    assert len(done.bound) == 2 and "$1" in done.sql  # the ssn hash binds the key halves
    assert done.bound[0] not in repr(done)


def test_a_cached_rewrite_never_serves_another_caller_or_another_schema():
    masking = Masking(DEMO_MASKING, b"k" * 32)
    exempt = tuple(rule for rule in DEMO_MASKING.rules if not rule.columns or "*.ssn" not in rule.columns)
    statement = classify("SELECT c.ssn, c.phone FROM customers c", "postgres").statements[0]
    masked_plan = MaskPlan(masking, DEMO_MASKING.rules, shop_catalog())
    first = rewrite(statement, masked_plan, 0)
    assert first is not None and rewrite(statement, masked_plan, 0) is first  # computed once
    clear = rewrite(statement, MaskPlan(masking, exempt, shop_catalog()), 0)  # another caller's rules
    assert 'AS "ssn"' in first.sql and clear is not None and 'AS "ssn"' not in clear.sql
    shifted = rewrite(statement, masked_plan, 1)  # one more caller parameter: the key moves to $2, $3
    assert "$3" in shifted.sql and "$3" not in first.sql
    # The schema read again (a phone column added): a new catalog, a new plan, nothing reused.
    assert statement_lineage(statement, masked_plan.catalog) is None  # phone unknown: all masked
    added = Relation("public", "customers", "table", (("id", "int"), ("ssn", "text"), ("phone", "text")))
    catalog = Catalog(DbSchema((added,), ("pg_catalog", "public"), True), "postgres")
    assert str(statement_lineage(statement, catalog)[1].direct) == "public.customers.phone"
    again = rewrite(statement, MaskPlan(masking, DEMO_MASKING.rules, catalog), 0)
    assert again is not None and 'AS "phone"' in again.sql and 'AS "phone"' not in first.sql


def test_the_masked_form_is_the_one_built_without_the_cache():
    plan = MaskPlan(Masking(DEMO_MASKING, b"k" * 32), DEMO_MASKING.rules, shop_catalog())
    sql = (
        "WITH recent AS (SELECT * FROM orders) SELECT c.email, x.email, r.total FROM customers AS c(a, b) "
        "JOIN customers x ON x.id = c.a JOIN recent r ON r.customer_id = x.id"
    )
    done = rewrite(classify(sql, "postgres").statements[0], plan, 0)
    assert done is not None and "mcp_guard_masked" not in done.sql
    assert ") AS c(a, b)" in done.sql and ") AS x ON" in done.sql and "FROM orders" in done.sql
    assert done.sql.count("FROM customers)") == 2


@pytest.mark.parametrize(
    "bug",
    [
        pytest.param(lambda sql: sql + "; DELETE FROM orders", id="a second statement"),
        pytest.param(lambda sql: sql.replace("JOIN orders", "JOIN api_keys"), id="another table"),
        pytest.param(lambda sql: sql.replace(" WHERE ", " FOR UPDATE WHERE "), id="a risk added"),
        pytest.param(lambda sql: re.sub(r"mcp_guard_masked_\w+", "customers", sql), id="a placeholder lost"),
    ],
)
def test_a_generator_bug_in_the_statement_is_refused(monkeypatch, bug):
    """The statement as regenerated (masked tables as placeholders) must read as the original."""
    import mcp_guard.rewrite as rewriting
    from mcp_guard.errors import PolicyDenied

    plan = MaskPlan(Masking(DEMO_MASKING, b"k" * 32), DEMO_MASKING.rules, shop_catalog())
    statement = classify(
        "SELECT c.email, o.total FROM customers c JOIN orders o ON o.customer_id = c.id WHERE o.id = 1",
        "postgres",
    ).statements[0]
    real = rewriting._check_regenerated
    monkeypatch.setattr(rewriting, "_check_regenerated", lambda o, sql, *rest: real(o, bug(sql), *rest))
    with pytest.raises(PolicyDenied, match="did not classify as the same single read"):
        rewrite(statement, plan, 0)


@pytest.mark.parametrize(
    "derived",
    [
        pytest.param("SELECT secret AS email FROM api_keys", id="another table"),
        pytest.param("SELECT email FROM customers FOR UPDATE", id="a risk added"),
        pytest.param("DELETE FROM customers RETURNING email", id="not a read"),
        pytest.param("SELECT email FROM customers) AS x, (SELECT 1", id="not one table expression"),
        pytest.param("SELECT email FROM customers JOIN orders ON true", id="a table of the statement inside"),
    ],
)
def test_a_generator_bug_in_a_derived_table_is_refused(monkeypatch, derived):
    """Each derived table's text must read, alone, exactly its relation, with no risk of its own."""
    import mcp_guard.rewrite as rewriting
    from mcp_guard.errors import PolicyDenied

    plan = MaskPlan(Masking(DEMO_MASKING, b"k" * 32), DEMO_MASKING.rules, shop_catalog())
    statement = classify(
        "SELECT c.email, o.total FROM customers c JOIN orders o ON o.customer_id = c.id", "postgres"
    ).statements[0]
    real = rewriting._check_regenerated
    broken = lambda o, sql, tables, p: real(o, sql, {slot: f"({derived})" for slot in tables}, p)  # noqa: E731
    monkeypatch.setattr(rewriting, "_check_regenerated", broken)
    with pytest.raises(PolicyDenied, match="did not classify as the same single read"):
        rewrite(statement, plan, 0)


def test_semantic_types_come_from_column_names():
    assert semantic_type("contact_email") == "email" and semantic_type("card_number") == "card"
    assert (
        semantic_type("ssn") == "ssn" and semantic_type("id_token") == "jwt" and semantic_type("name") is None
    )


def test_partial_masks_keep_only_the_safe_part():
    assert partial_value("ada@example.com", "email") == "***@example.com"
    assert partial_value('{"to": "ada@example.com", "cc": "bob@corp.test"}', "email") == '***@corp.test"}'
    assert partial_value("4111 1111 1111 1234", "card") == "**** 1234"
    assert partial_value("123-45-6789", "ssn") == "***-**-6789"
    assert partial_value("short", "") == "[masked]"


def test_detectors_validate_before_replacing():
    detectors = Detectors(ALL_DETECTORS)
    assert detectors.replace("card 4111 1111 1111 1111 ok")[0] == "card [masked:card] ok"
    assert detectors.replace("order 4111 1111 1111 1112")[1] == ()  # fails Luhn
    assert detectors.replace("ssn 000-12-3456")[1] == ()  # no SSN starts with 000
    assert detectors.replace("mail ada@example.com now")[0] == "mail [masked:email] now"
    rows = [["a", {"ada@example.com": ["call +1-202-555-0143"]}]]
    found = detectors.scan(rows, [1])
    assert rows[0][1] == {"[masked:email]": ["call [masked:phone]"]} and found[0].kinds == ("email", "phone")

    class Text(str):  # a driver's own string type is still text
        pass

    mixed = [[Text("mail ada@example.com")], [12345678901234], ["4111 1111 1111 1111"], [None]]
    found = detectors.scan(mixed, [0])
    assert [f.row for f in found] == [0, 2] and mixed[0][0] == "mail [masked:email]"
    numbers = [[7], [4111111111111111], [None], [2.5]]  # a column of numbers: a long one is still scanned
    assert [f.row for f in detectors.scan(numbers, [0])] == [1] and numbers[1][0] == "[masked:card]"


def test_sealed_originals_open_only_with_the_key_and_untouched():
    key, other = bytes(range(32)), bytes(32)
    record = seal(key, "call-1", [{"columns": ["ssn"], "rows": [["123-45-6789"]]}])
    assert "123-45-6789" not in json.dumps(record)
    assert unseal(key, "call-1", record) == [{"columns": ["ssn"], "rows": [["123-45-6789"]]}]
    with pytest.raises(SealError, match="another key"):
        unseal(other, "call-1", record)
    with pytest.raises(SealError, match="changed"):
        unseal(key, "call-2", record)  # moved to another call
    blob = bytearray(record["sealed"].encode())
    blob[20] = ord("A") if blob[20] != ord("A") else ord("B")
    with pytest.raises(SealError, match="changed"):
        unseal(key, "call-1", {**record, "sealed": blob.decode()})


def _config(tmp_path, shop, extra=""):
    return write_config(tmp_path, f'[connections.shop]\nurl = "sqlite:///{shop}"\n{MASKING}{extra}')


async def test_reads_where_nothing_sensitive_flows_return_the_same_rows(tmp_path, sqlite_shop, pg_shop_url):
    for url, body, env in (
        (sqlite_shop, f'[connections.db]\nurl = "sqlite:///{sqlite_shop}"\n', {}),
        (pg_shop_url, '[connections.db]\nurl_env = "DB_URL"\n', {"DB_URL": pg_shop_url}),
    ):
        plain = write_config(tmp_path, body)
        async with guard_client(plain, tmp_path, **env) as client:
            expected = [
                (await client.call("query", sql=sql)).structured["rows"] for sql in UNMASKED_READS[:-1]
            ]
        masked = write_config(tmp_path, body + MASKING)
        async with guard_client(masked, tmp_path, TEST_MASK_KEY=KEY, **env) as client:
            got = [await client.call("query", sql=sql) for sql in UNMASKED_READS]
        assert [r.structured["rows"] for r in got[:-1]] == expected, url
        assert all(not r.structured["masked_columns"] for r in got[:-1])
        assert got[-1].structured["rows"] == [[60]]  # distinct counts survive the keyed hash


async def test_a_guess_in_where_compares_against_masked_values(tmp_path, sqlite_shop):
    ssn = shop_rows()["customers"][0][4]
    async with guard_client(_config(tmp_path, sqlite_shop), tmp_path, TEST_MASK_KEY=KEY) as client:
        reply = await client.call("query", sql="SELECT count(*) FROM customers WHERE ssn = ?", params=[ssn])
    assert reply.structured["rows"] == [[0]]


async def test_a_parenthesized_join_stays_outside_the_masked_table(tmp_path, sqlite_shop):
    """sqlglot hangs `(c JOIN v ON ...)`'s join on the table `c`: it must stay outside c's derived
    table, where its ON clause compares against masked values (it once moved inside, next to the
    clear ones: an oracle, `customers.ssn = ?` counting 1 for a right guess)."""
    customer = shop_rows()["customers"][0]
    db = sqlite3.connect(sqlite_shop)
    db.executescript(
        f"CREATE TABLE visits (owner INTEGER, day TEXT); INSERT INTO visits VALUES ({customer[0]}, 'mon');"
    )
    db.close()
    guess = (
        "SELECT count(*) AS n FROM (customers JOIN visits v ON v.owner = customers.id AND customers.ssn = ?)"
    )
    async with guard_client(_config(tmp_path, sqlite_shop), tmp_path, TEST_MASK_KEY=KEY) as client:
        counted = await client.call("query", sql=guess, params=[customer[4]])
        shown = await client.call(
            "query", sql="SELECT c.email, v.day FROM (customers c JOIN visits v ON v.owner = c.id)"
        )
    assert counted.structured["rows"] == [[0]], counted.text
    assert shown.structured["rows"] == [["***@" + customer[2].split("@")[1], "mon"]], shown.text


async def test_sqlite_rowid_of_a_masked_table_is_refused_not_answered_with_nulls(tmp_path, sqlite_shop):
    async with guard_client(_config(tmp_path, sqlite_shop), tmp_path, TEST_MASK_KEY=KEY) as client:
        masked = await client.call("query", sql="SELECT name FROM customers c WHERE c.rowid = 1")
        plain = await client.call("query", sql="SELECT rowid, status FROM orders WHERE rowid = 1")
    assert masked.is_error and "has no rowid" in masked.text and "primary key" in masked.text
    assert plain.structured["rows"][0][0] == 1, plain.text


async def test_results_and_describe_table_say_which_columns_are_masked(tmp_path, sqlite_shop):
    async with guard_client(_config(tmp_path, sqlite_shop), tmp_path, TEST_MASK_KEY=KEY) as client:
        reply = await client.call("query", sql="SELECT id, upper(email) AS e, ssn, notes FROM customers")
        described = await client.call("describe_table", table="customers")
    columns = {c["name"]: c for c in reply.structured["columns"]}
    assert columns["e"]["masked"] == "derived" and columns["ssn"]["masked"] == "hash"
    assert columns["id"]["masked"] is None and "email" in columns["notes"]["detected"]
    assert "masked: e (derived), ssn (hash), notes (detected:" in reply.text
    marks = {c["name"]: c["masked"] for c in described.structured["columns"]}
    assert marks["email"] == "partial" and marks["ssn"] == "hash" and marks["name"] is None


async def test_a_pii_reader_sees_clear_values(tmp_path, sqlite_shop):
    config = write_config(
        tmp_path,
        f'[identity]\ngroups = ["pii-readers"]\n[connections.shop]\nurl = "sqlite:///{sqlite_shop}"\n'
        + MASKING.replace('strategy = "hash"', 'strategy = "hash"\nexcept_groups = ["pii-readers"]'),
    )
    async with guard_client(config, tmp_path, TEST_MASK_KEY=KEY) as client:
        reply = await client.call("query", sql="SELECT ssn, email FROM customers WHERE id = 1")
    ssn, email = reply.structured["rows"][0]
    assert ssn == shop_rows()["customers"][0][4] and email.startswith("***@")


async def test_writes_that_read_masked_columns_are_refused(tmp_path, sqlite_shop):
    async with guard_client(_config(tmp_path, sqlite_shop), tmp_path, TEST_MASK_KEY=KEY) as client:
        copy = await client.call(
            "execute",
            sql="UPDATE orders SET status = (SELECT ssn FROM customers WHERE id = 1) WHERE id = 1",
            reason="t",
        )
        oracle = await client.call(
            "execute", sql="UPDATE customers SET name = name WHERE ssn LIKE '1%'", reason="t"
        )
        returning = await client.call(
            "execute", sql="UPDATE customers SET name = 'x' WHERE id = 1 RETURNING *", reason="t"
        )
        fine = await client.call(
            "execute", sql="UPDATE customers SET email = 'new@example.com' WHERE id = 2", reason="t"
        )
    assert copy.is_error and "masked column" in copy.text
    assert oracle.is_error and "ssn" in oracle.text
    assert returning.is_error and "whole rows" in returning.text
    assert not fine.is_error, fine.text
    assert (
        sqlite3.connect(sqlite_shop).execute("SELECT name FROM customers WHERE id = 1").fetchone()[0] != "x"
    )


async def test_the_audit_keeps_sealed_originals_that_unseal_with_the_key(tmp_path, sqlite_shop):
    extra = 'originals = "sealed"\n'
    config = _config(tmp_path, sqlite_shop).read_text().replace("[masking]\n", "[masking]\n" + extra)
    path = tmp_path / "sealed.toml"
    path.write_text(config)
    ssn = shop_rows()["customers"][0][4]
    async with guard_client(path, tmp_path, TEST_MASK_KEY=KEY, MCP_GUARD_AUDIT_KEY=AUDIT_KEY) as client:
        reply = await client.call(
            "query", sql="SELECT id, ssn, notes FROM customers WHERE id <= 3 ORDER BY id"
        )
    call_id = reply.structured["call_id"]
    audit = (tmp_path / "audit.db").read_bytes()
    assert ssn.encode() not in audit and AUDIT_KEY.encode() not in audit and KEY.encode() not in audit
    store = f"sqlite:///{tmp_path / 'audit.db'}"
    command = [sys.executable, "-m", "mcp_guard", "audit", "show", call_id, "--unseal", "--store", store]
    command.append("--json")
    opened = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=60,
        env={"MCP_GUARD_AUDIT_KEY": AUDIT_KEY, "PATH": ""},
    )
    assert opened.returncode == 0, opened.stderr
    statements = json.loads(opened.stdout)["originals"]
    assert statements[0]["columns"] == ["ssn"] and statements[0]["rows"][0] == [ssn]
    wrong = subprocess.run(
        command, capture_output=True, text=True, timeout=60, env={"MCP_GUARD_AUDIT_KEY": "33" * 32}
    )
    assert wrong.returncode == 1 and "another key" in wrong.stderr and ssn not in wrong.stdout


def test_sealed_originals_without_a_key_stop_the_server_at_start(tmp_path, sqlite_shop):
    path = _config(tmp_path, sqlite_shop, "")
    path.write_text(path.read_text().replace("[masking]\n", '[masking]\noriginals = "sealed"\n'))
    done = subprocess.run(
        [sys.executable, "-m", "mcp_guard", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        env={"PATH": "", "MCP_GUARD_HOME": str(tmp_path)},
    )
    assert done.returncode == 2 and "masking.originals_key_env" in done.stderr


async def test_postgres_keeps_the_index_scan_of_a_point_query(pg_shop_url):
    from mcp_guard.backends.postgres import PostgresBackend

    backend = PostgresBackend(pg_shop_url, pool_size=1)
    await backend.open()
    try:
        catalog = Catalog(await backend.schema(), "postgres")
    finally:
        await backend.close()
    masking = Masking(DEMO_MASKING, b"k" * 32)
    plan = MaskPlan(masking, DEMO_MASKING.rules, catalog)
    statement = classify("SELECT name, email, ssn FROM customers WHERE id = $1", "postgres").statements[0]
    done = rewrite(statement, plan, 1)
    assert done is not None and len(done.bound) == 2
    conn = await asyncpg.connect(pg_shop_url)
    try:
        await conn.execute("SET enable_seqscan = off")  # 60 rows: make the planner's choice visible
        plan_text = "\n".join(
            r[0]
            for r in await conn.fetch(f"EXPLAIN {done.sql}", 7, *(bytes.fromhex(k[2:]) for k in done.bound))
        )
        row = await conn.fetchrow(done.sql, 7, *(bytes.fromhex(k[2:]) for k in done.bound))
    finally:
        await conn.close()
    assert "Index Scan using customers_pkey" in plan_text and "Subquery Scan" not in plan_text
    assert row["ssn"] == masking.hash_value(shop_rows()["customers"][6][4])  # PostgreSQL's HMAC is Python's


def test_masks_agree_between_python_and_their_sql(tmp_path):
    masking = Masking(DEMO_MASKING, b"k" * 32)
    assert masking.mask_value(ColumnMask("hash", "r"), "x") == masking.hash_value("x")
    for key in (b"k" * 32, b"long key " * 10):  # the precomputed HMAC is the standard one
        expected = hmac.new(key, "ssn é 123".encode(), hashlib.sha256).hexdigest()[:16]
        assert Masking(DEMO_MASKING, key).hash_value("ssn é 123") == expected
    assert masking.mask_value(ColumnMask("redact", "r"), "x") == "[masked]"


def test_check_shows_the_masked_sql_and_each_columns_lineage(tmp_path, sqlite_shop):
    config = _config(tmp_path, sqlite_shop)
    sql = "SELECT upper(c.email) AS e, c.name FROM customers c"
    done = subprocess.run(
        [sys.executable, "-m", "mcp_guard", "check", sql, "--config", str(config), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"TEST_MASK_KEY": KEY, "PATH": ""},
    )
    assert done.returncode == 0, done.stderr
    (entry,) = json.loads(done.stdout)["masking"]
    assert "MCP_GUARD_PARTIAL" in entry["rewritten"]
    columns = {c["name"]: c for c in entry["columns"]}
    assert columns["e"]["strategy"] == "derived" and columns["e"]["sources"] == ["main.customers.email"]
    assert columns["name"]["masked"] is False
    refused = subprocess.run(
        [sys.executable, "-m", "mcp_guard", "check", "SELECT * FROM sqlite_stat1", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"TEST_MASK_KEY": KEY, "PATH": ""},
    )
    assert refused.returncode == 1 and "masking refuses" in refused.stdout


def test_check_previews_masks_without_the_key_that_seals_originals(tmp_path, sqlite_shop):
    """The operator checking a statement need not hold the auditors' key."""
    config = _config(tmp_path, sqlite_shop)
    config.write_text(config.read_text().replace("[masking]\n", '[masking]\noriginals = "sealed"\n'))
    done = subprocess.run(
        [sys.executable, "-m", "mcp_guard", "check", "SELECT email FROM customers", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"TEST_MASK_KEY": KEY, "PATH": ""},
    )
    assert done.returncode == 0, done.stderr
    assert "MCP_GUARD_PARTIAL" in done.stdout and "email" in done.stdout


async def test_audit_stats_count_the_cells_the_assistant_saw_masked(tmp_path):
    async with guard_client(None, tmp_path) as client:
        reply = await client.call("query", sql="SELECT email, phone FROM customers ORDER BY id LIMIT 3")
    assert reply.structured["masked_columns"]
    done = subprocess.run(
        [sys.executable, "-m", "mcp_guard", "audit", "stats", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "MCP_GUARD_HOME": str(tmp_path), "MCP_GUARD_CONFIG": ""},
    )
    assert done.returncode == 0, done.stderr
    [row] = json.loads(done.stdout)
    assert row["masked_cells"] == 6 and row["calls"] == 1


def test_a_column_without_digits_or_markers_is_skipped_but_a_bare_secret_is_still_found():
    detectors = Detectors(ALL_DETECTORS)
    plain = [["shipped"], ["waiting for the courier"], [None]]
    assert detectors.scan(plain, [0]) == [] and plain[1] == ["waiting for the courier"]
    secrets = [["key is sk_live_abcdefghijkl"], ["xoxb-abcdefghijk"], ["ghp_abcdefghijklmnop"]]
    assert len(detectors.scan(secrets, [0])) == 3
    assert all(row[0].endswith("[masked:secret]") for row in secrets)


_PIECES = [
    *"4111 1111 1111 1111|4111-1111-1111-1112|123-45-6789|000-12-3456|+1-202-555-0143".split("|"),
    *"(202) 555-0143|202.555.0143|+44 20 7946 0958|ada@example.com|a.b+c@x-y.co.uk|@|x@y".split("|"),
    *"GB82 WEST 1234 5698 7654 32".split("|"),
    *"DE89370400440532013000|192.168.1.20|10.0.0.256|dead:beef:cafe|sk_live_abcdefghijkl".split("|"),
    *"ghp_abcdefgh1|SG.abcdefgh.ijkl|github_pat_abcdefgh1".split("|"),
    *"2001:0db8:85a3:0000:0000:8a2e:0370:7334|xoxb-123456789|AKIAIOSFODNN7EXAMPLE|ASIA12345678".split("|"),
    *"AIzaSyA1234567|sk-ant-api03-abcdefgh|sk-proj-abcdefghij".split("|"),
    *"glpat-abcdefghij|pypi-AgEIcHlwaS5vcmc|hf_abcdefghij|npm_abcdefghij|shpat_abcdefghij".split("|"),
    *"rk_test_abcdefghij|eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.abc|eyJhbGciOiJI.eyJzdWIi.".split("|"),
    *" |-|.|(|)|+|:|_|a|Z|0|9|12|123|1234|12345|user1234|\n|é|AB12|GB82|555|\0|sk|xox|A|K|IA|SG".split("|"),
]


def _alternation(enabled):
    """The detectors' meaning as written: one leftmost-first alternation of `_DETECTORS`."""
    from mcp_guard.detectors import _DETECTORS

    chosen = [d for d in _DETECTORS if d[0] in enabled]
    pattern = re.compile("|".join(f"(?P<d{i}>{regex})" for i, (_, regex, _) in enumerate(chosen)))
    checks = {f"d{i}": (name, check) for i, (name, _, check) in enumerate(chosen)}

    def replace(text):
        found = []

        def substitute(match):
            name, check = checks[match.lastgroup]
            if not check(match.group()):
                return match.group()
            found.append(name)
            return f"[masked:{name}]"

        return pattern.sub(substitute, text), tuple(dict.fromkeys(found))

    return replace


@pytest.mark.parametrize(
    "enabled", [ALL_DETECTORS, ("email", "phone"), ("card", "ssn", "ip"), ("secret", "jwt", "iban")]
)
def test_the_fast_detectors_replace_exactly_what_the_alternation_does(enabled):
    rng = random.Random(3)
    texts = ["".join(rng.choice(_PIECES) for _ in range(rng.randint(0, 8))) for _ in range(3000)]
    reference, detectors = _alternation(enabled), Detectors(enabled)
    assert [detectors.replace(text) for text in texts] == [reference(text) for text in texts]
    rows = [[index, text] for index, text in enumerate(texts)]
    found = detectors.scan(rows, [1])  # the whole column as one text
    assert [row[1] for row in rows] == [reference(text)[0] for text in texts]
    assert [(f.row, f.kinds, f.original) for f in found] == [
        (i, reference(text)[1], text) for i, text in enumerate(texts) if reference(text)[1]
    ]
    for start in range(0, len(texts), 40):  # small columns: most have no overlapping matches at all
        part = texts[start : start + 40]
        rows = [[text] for text in part]
        found = detectors.scan(rows, [0])
        assert [row[0] for row in rows] == [reference(text)[0] for text in part]
        assert [f.row for f in found] == [i for i, text in enumerate(part) if reference(text)[1]]


async def test_postgres_partial_masks_are_the_python_ones(pg_shop_url):
    masking = Masking(DEMO_MASKING, b"k" * 32)
    values = [
        *("ada@example.com", "a@b@c", "{ada@x.example,bob@y.example}", "no at sign", "12345"),
        *("4111 1111 1111 1234", "+1 (202) 555-0143"),
        *("123-45-6789", "１２３４５６７８９０１２", "tel 12 34 56 7", "GB82 WEST 1234 5698 7654 32"),
        *("192.168.1.20", "sk_live_abcdefghijkl", "short", "", "é" * 9, "a1b2c3d4e5f6g7h8", "99 99 999"),
        *("9999 9999 9999", "9999-9999", "999 999", "9999-999"),  # at each threshold
        *("+1 202 555 0143 ext", "4111 1111 1111 1234.", "123-45-678 9", "1234567x8", "12345678９"),  # tails
    ]
    conn = await asyncpg.connect(pg_shop_url)
    try:
        for kind in ("email", "card", "phone", "ssn", "iban", "ip", "secret", None):
            mask = ColumnMask("partial", "r", kind)
            expression = masking.expression(mask, sqlglot.exp.column("v"), "postgres", (2, 3)).sql("postgres")
            rows = await conn.fetch(
                f"SELECT {expression} FROM unnest($1::text[]) WITH ORDINALITY AS u(v, i) ORDER BY i", values
            )
            assert [row[0] for row in rows] == [partial_value(value, kind or "") for value in values], kind
    finally:
        await conn.close()


def test_a_rule_speaks_for_the_same_column_of_every_table_sharing_its_rows():
    masking = Masking(DEMO_MASKING, b"k" * 32)
    rules = (MaskRule(name="pins", columns=("accounts.pin",), strategy="redact"),)
    columns = tuple((c, "text") for c in ("id", "pin", "level"))
    child = Relation(
        "public",
        "vip",
        "table",
        columns,
        relatives=(Relative("public", "accounts", frozenset({"id", "pin"})),),
    )
    parent = Relation(
        "public",
        "ledger",
        "table",
        columns[:2],
        relatives=(Relative("public", "accounts", frozenset({"id", "pin"})),),
    )
    stranger = Relation("public", "vip", "table", columns)
    assert set(masking.table_masks(rules, child)) == {"pin"}  # not its own column `level`
    assert set(masking.table_masks(rules, parent)) == {"pin"}
    assert masking.table_masks(rules, stranger) == {}
    everything = (MaskRule(name="all", columns=("accounts.*",), strategy="redact"),)
    assert set(masking.table_masks(everything, child)) == {"id", "pin"}


FAMILY = """
DROP TABLE IF EXISTS family_accounts, family_ledger CASCADE;
CREATE TABLE family_accounts (id int, owner text, pin text);
CREATE TABLE family_accounts_closed (closed_on text) INHERITS (family_accounts);
INSERT INTO family_accounts VALUES (1, 'open one', 'pin-open-7781');
INSERT INTO family_accounts_closed VALUES (2, 'closed one', 'pin-closed-5531', 'last year');
CREATE TABLE family_ledger (id int, entry text, code text) PARTITION BY RANGE (id);
CREATE TABLE family_ledger_old PARTITION OF family_ledger FOR VALUES FROM (MINVALUE) TO (100);
CREATE TABLE family_ledger_new PARTITION OF family_ledger FOR VALUES FROM (100) TO (MAXVALUE);
INSERT INTO family_ledger VALUES (1, 'old entry', 'code-old-4410'), (200, 'new entry', 'code-new-9920');
"""
FAMILY_RULES = """
[[masking.rules]]
name = "pins"
columns = ["family_accounts.pin"]
strategy = "redact"

[[masking.rules]]
name = "old-codes"
columns = ["family_ledger_old.code"]
strategy = "redact"
"""


async def test_inheritance_children_and_partitions_are_masked_like_their_relatives(tmp_path, pg_shop_url):
    """A rule on a table masks its inheritance children and partitions read directly (they hold its
    column), and a rule on a partition masks the column of the table whose reads include its rows."""
    admin = await asyncpg.connect(pg_shop_url)
    try:
        await admin.execute(FAMILY)
    finally:
        await admin.close()
    config = write_config(
        tmp_path, f'[connections.pg]\nurl_env = "DB_URL"\n[masking]\ndetectors = []\n{FAMILY_RULES}'
    )
    async with guard_client(config, tmp_path, DB_URL=pg_shop_url) as client:
        replies = {
            sql: await client.call("query", sql=sql)
            for sql in (
                "SELECT id, pin FROM family_accounts ORDER BY id",
                "SELECT pin, closed_on FROM family_accounts_closed",
                "SELECT * FROM ONLY family_accounts_closed",
                "SELECT upper(code) AS c FROM family_ledger ORDER BY id",
                "SELECT code FROM family_ledger_old",
                "TABLE family_ledger_new",
            )
        }
        described = await client.call("describe_table", table="family_accounts_closed")
    for sql, reply in replies.items():
        assert not reply.is_error, (sql, reply.text)
        for secret in ("pin-open-7781", "pin-closed-5531", "code-old-4410"):
            assert secret.upper() not in reply.text.upper(), (sql, reply.text)
    rows = {sql: reply.structured["rows"] for sql, reply in replies.items()}
    assert rows["SELECT id, pin FROM family_accounts ORDER BY id"] == [[1, "[masked]"], [2, "[masked]"]]
    assert rows["SELECT pin, closed_on FROM family_accounts_closed"] == [["[masked]", "last year"]]
    assert rows["SELECT upper(code) AS c FROM family_ledger ORDER BY id"] == [["[MASKED]"], ["[MASKED]"]]
    assert rows["SELECT code FROM family_ledger_old"] == [["[masked]"]]
    assert rows["TABLE family_ledger_new"] == [[200, "new entry", "code-new-9920"]]  # a sibling: not its rows
    marks = {c["name"]: c["masked"] for c in described.structured["columns"]}
    assert marks == {"id": None, "owner": None, "pin": "redact", "closed_on": None}


PINS = """
[masking]
detectors = []

[[masking.rules]]
name = "pins"
columns = ["gen_accounts.pin"]
strategy = "hash"
except_groups = ["pin-readers"]
"""
GENERATED_PG = (
    "CREATE TABLE gen_accounts (id int, pin text,"
    " pin_tail text GENERATED ALWAYS AS (right(pin, 4)) STORED,"
    " plain text GENERATED ALWAYS AS ('n' || id) STORED);"
    "INSERT INTO gen_accounts (id, pin) VALUES (1, 'pin-secret-4471')"
)
GENERATED_SQLITE = (
    "CREATE TABLE gen_accounts (id INTEGER, pin TEXT, pin_tail TEXT AS (substr(pin, -4)) STORED,"
    " plain TEXT GENERATED ALWAYS AS ('n' || id) VIRTUAL, shout TEXT AS (upper(pin_tail)));"
    "INSERT INTO gen_accounts (id, pin) VALUES (1, 'pin-secret-4471');"
)


async def test_a_generated_column_computed_from_a_masked_one_is_masked(tmp_path, sqlite_shop, pg_shop_url):
    """Generated columns are copies of what they read: `pin_tail` computed from a masked `pin` is
    redacted under pin's rule (its excepted group sees both clear); `plain` computed from `id` is not.
    On SQLite, generated columns (which table_info leaves out) are also part of the masked table."""
    admin = await asyncpg.connect(pg_shop_url)
    try:
        await admin.execute(GENERATED_PG)
    finally:
        await admin.close()
    db = sqlite3.connect(sqlite_shop)
    db.executescript(GENERATED_SQLITE)
    db.close()
    for body, env, extra in (
        (f'[connections.db]\nurl = "sqlite:///{sqlite_shop}"\n', {}, {"shout": "[masked]"}),
        ('[connections.db]\nurl_env = "DB_URL"\n', {"DB_URL": pg_shop_url}, {}),
    ):
        async with guard_client(write_config(tmp_path, body + PINS), tmp_path, **env) as client:
            everything = await client.call("query", sql="SELECT * FROM gen_accounts")
            direct = await client.call("query", sql="SELECT lower(pin_tail) AS t FROM gen_accounts")
            described = await client.call("describe_table", table="gen_accounts")
        names = [c["name"] for c in everything.structured["columns"]]
        row = dict(zip(names, everything.structured["rows"][0], strict=True))
        assert len(row.pop("pin")) == 16  # the keyed hash
        assert row == {"id": 1, "pin_tail": "[masked]", "plain": "n1", **extra}, body
        assert direct.structured["rows"] == [["[masked]"]], direct.text
        marks = {c["name"]: c["masked"] for c in described.structured["columns"]}
        assert marks["pin_tail"] == "redact" and marks["plain"] is None, marks
        reader = write_config(tmp_path, f'[identity]\ngroups = ["pin-readers"]\n{body}{PINS}')
        async with guard_client(reader, tmp_path, **env) as client:
            clear = await client.call("query", sql="SELECT pin_tail FROM gen_accounts")
        assert clear.structured["rows"] == [["4471"]], clear.text


ANYTHING_GOES = """
[[policy.rules]]
name = "anything"
action = "allow"
kinds = ["read", "write", "ddl", "admin", "session", "unknown"]
"""


async def test_code_and_copies_out_of_sight_of_the_rewrite_are_refused_while_masking(tmp_path, pg_shop_url):
    """Even where the policy allows anything: a DO block's queries are text no rewrite reads (its
    error would print a secret the detectors do not know), and COPY t TO sends stored values."""
    body = f'[connections.pg]\nurl_env = "DB_URL"\n{MASKING}{ANYTHING_GOES}'
    secret = "SELECT secret FROM api_keys ORDER BY id LIMIT 1"
    async with guard_client(
        write_config(tmp_path, body), tmp_path, DB_URL=pg_shop_url, TEST_MASK_KEY=KEY
    ) as client:
        block = await client.call(
            "execute", sql=f"DO $$ BEGIN RAISE EXCEPTION '%', ({secret}); END $$", reason="probe"
        )
        called = await client.call("execute", sql="CALL no_such_procedure()", reason="probe")
        prepared = await client.call("execute", sql="PREPARE p AS SELECT ssn FROM customers", reason="probe")
        copied = await client.call("execute", sql="COPY api_keys TO STDOUT", reason="probe")
        listed = await client.call("execute", sql="COPY customers (id, ssn) TO STDOUT", reason="probe")
        plain = await client.call("execute", sql="COPY customers (id, name) TO STDOUT", reason="probe")
    assert block.is_error and "DO runs code or text mcp-guard cannot read (procedural)" in block.text
    assert called.is_error and called.text.startswith("Denied: masking"), called.text
    assert prepared.is_error and "by its keywords only, so masking cannot rewrite" in prepared.text
    assert copied.is_error and "api_keys.secret as stored" in copied.text, copied.text
    assert listed.is_error and "customers.ssn as stored" in listed.text, listed.text
    assert not plain.is_error, plain.text


def test_a_sqlite_generated_column_whose_expression_cannot_be_read_counts_as_reading_every_column():
    from mcp_guard.backends.sqlite import _generated_sources

    columns = ["id", "pin", "g", "h"]
    create = "CREATE TABLE t (id, pin, g AS (upper(pin)), h AS (id + 1))"
    read = _generated_sources(create, ["g", "h"], columns)
    assert read == (("g", frozenset({"pin"})), ("h", frozenset({"id"})))
    unreadable = _generated_sources("CREATE TABLE t (id, pin, g AS (((", ["g"], columns)
    assert unreadable == (("g", frozenset({"id", "pin", "h"})),)
