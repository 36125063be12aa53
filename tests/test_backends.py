"""The backends against real databases: PostgreSQL (database `test`, a schema of our own) and SQLite files.

The second wall is tested on its own: statements the guard would refuse are handed to the backend
directly, and the database itself must refuse them.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import json
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from pathlib import Path

import asyncpg
import pytest

from mcp_guard.backends import open_backend
from mcp_guard.backends.base import Column, ColumnInfo, Limits, TableInfo
from mcp_guard.backends.postgres import PostgresBackend
from mcp_guard.backends.sqlite import SqliteBackend
from mcp_guard.errors import BackendError, ConfigError, StatementTimeout, UsageError
from mcp_guard.values import iso_duration, to_json_value

PG_URL = "postgresql://postgres@127.0.0.1:5432/test"
SCHEMA = f"mcpguard_backends_{uuid.uuid4().hex[:8]}"
TIMEOUT = Limits(timeout_s=0.5)


async def _pg_admin(sql: str) -> None:
    conn = await asyncpg.connect(PG_URL, timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def pg_schema() -> Iterator[str]:
    """A schema of our own in `test`, with a table `items` and a view; dropped afterwards."""
    asyncio.run(
        _pg_admin(
            f"""
            CREATE SCHEMA {SCHEMA};
            CREATE TABLE {SCHEMA}.items (
                id serial PRIMARY KEY, name text NOT NULL, price numeric(10, 2), tags text[]
            );
            INSERT INTO {SCHEMA}.items (name, price) SELECT 'item ' || g, g FROM generate_series(1, 20) g;
            CREATE VIEW {SCHEMA}.cheap AS SELECT id, name FROM {SCHEMA}.items WHERE price < 5;
            """
        )
    )
    yield SCHEMA
    asyncio.run(_pg_admin(f"DROP SCHEMA {SCHEMA} CASCADE"))


@pytest.fixture
async def pg(pg_schema: str) -> AsyncIterator[PostgresBackend]:
    """One pooled connection, so a later call provably runs on the connection an earlier one used."""
    backend = PostgresBackend(PG_URL, pool_size=1)
    await backend.open()
    yield backend
    await backend.close()


@pytest.fixture
def sqlite_path(tmp_path: Path) -> Path:
    path = tmp_path / "shop.db"
    with sqlite3.connect(path) as conn:
        conn.executescript(
            """
            CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT NOT NULL, price REAL, picture BLOB);
            CREATE VIEW cheap AS SELECT id, name FROM items WHERE price < 5;
            """
        )
        conn.executemany(
            "INSERT INTO items (name, price) VALUES (?, ?)", [(f"item {n}", n) for n in range(1, 21)]
        )
    conn.close()
    return path


@pytest.fixture
async def lite(sqlite_path: Path) -> AsyncIterator[SqliteBackend]:
    backend = SqliteBackend(sqlite_path, pool_size=2)
    await backend.open()
    yield backend
    await backend.close()


async def pg_value(backend: PostgresBackend, sql: str) -> object:
    [result] = await backend.read([sql], [], Limits())
    return result.rows[0][0]


async def lite_count(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        (count,) = conn.execute("SELECT count(*) FROM items").fetchone()
    conn.close()
    return int(count)


# values -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        (True, True),
        (7, 7),
        (1.5, 1.5),
        (float("nan"), "NaN"),
        (float("inf"), "Infinity"),
        (float("-inf"), "-Infinity"),
        (Decimal("12.50"), "12.50"),
        (Decimal("1E+3"), "1000"),
        ("text", "text"),
        (b"\x00\xff", "\\x00ff"),
        (bytearray(b"\x01"), "\\x01"),
        (memoryview(b"\x02"), "\\x02"),
        (
            dt.datetime(2024, 5, 1, 12, 30, tzinfo=dt.timezone(dt.timedelta(hours=2))),
            "2024-05-01T12:30:00+02:00",
        ),
        (dt.datetime(2024, 5, 1, 12, 30), "2024-05-01T12:30:00"),
        (dt.date(2024, 5, 1), "2024-05-01"),
        (dt.time(9, 15, tzinfo=dt.UTC), "09:15:00+00:00"),
        (dt.timedelta(days=1, hours=2, minutes=3, seconds=4), "P1DT2H3M4S"),
        (uuid.UUID(int=1), "00000000-0000-0000-0000-000000000001"),
        (ipaddress.ip_address("10.0.0.1"), "10.0.0.1"),
        (ipaddress.ip_interface("10.0.0.1/8"), "10.0.0.1/8"),
        (ipaddress.ip_network("2001:db8::/32"), "2001:db8::/32"),
        ((1, [2, Decimal("3.0")]), [1, [2, "3.0"]]),
        ({1: {"a": b"\x00"}}, {"1": {"a": "\\x00"}}),
        (asyncpg.Range(1, 5), "[1,5)"),
        (asyncpg.Range(None, 10, upper_inc=True), "(,10]"),
        (asyncpg.Range(empty=True), "empty"),
        (object.__new__(type("Opaque", (), {"__str__": lambda self: "opaque"})), "opaque"),
    ],
)
def test_every_driver_value_becomes_json(value: object, expected: object) -> None:
    assert to_json_value(value) == expected
    json.dumps(to_json_value(value), allow_nan=False)


@pytest.mark.parametrize(
    ("delta", "expected"),
    [
        (dt.timedelta(0), "PT0S"),
        (dt.timedelta(hours=2), "PT2H"),
        (dt.timedelta(days=3), "P3D"),
        (dt.timedelta(seconds=1.5), "PT1.5S"),
        (dt.timedelta(seconds=-61), "-PT1M1S"),
    ],
)
def test_intervals_are_iso_durations(delta: dt.timedelta, expected: str) -> None:
    assert iso_duration(delta) == expected


# open_backend -----------------------------------------------------------------------------------


def test_open_backend_picks_the_engine_from_the_url_without_connecting(tmp_path: Path) -> None:
    assert isinstance(open_backend(f"sqlite://{tmp_path}/missing.db"), SqliteBackend)
    assert isinstance(open_backend("postgres://nobody@192.0.2.1:1/x"), PostgresBackend)


@pytest.mark.parametrize(
    "url",
    [
        "sqlite://relative.db",
        "sqlite:///",
        "mysql://u:hunter22@h/db",
        "postgresql://u:hunter22@h:port/db",
        "x",
    ],
)
def test_a_bad_url_is_a_config_error_that_hides_the_password(url: str) -> None:
    with pytest.raises(ConfigError) as error:
        open_backend(url)
    assert "hunter22" not in str(error.value)


# PostgreSQL -------------------------------------------------------------------------------------


async def test_postgres_values_of_every_common_type_come_out_json_safe(pg: PostgresBackend) -> None:
    [result] = await pg.read(
        [
            """SELECT 12.50::numeric AS n, '2024-05-01 12:30+02'::timestamptz AS ts, '2024-05-01'::date AS d,
                      '09:15'::time AS t, '1 day 02:03:04'::interval AS i,
                      'a8098c1a-f86e-11da-bd1a-00112444be1e'::uuid AS u, '\\x00ff'::bytea AS b,
                      ARRAY[1, 2] AS ints, ARRAY['a', NULL] AS texts, '{"k": [1]}'::json AS j,
                      '{"k": {"x": true}}'::jsonb AS jb, '10.0.0.1/8'::inet AS ip, NULL::int AS nothing,
                      'NaN'::float8 AS nan, int4range(1, 5) AS r, ROW(1, 'x') AS composite"""
        ],
        [],
        Limits(),
    )
    assert result.rows == [
        [
            "12.50",
            "2024-05-01T10:30:00+00:00",
            "2024-05-01",
            "09:15:00",
            "P1DT2H3M4S",
            "a8098c1a-f86e-11da-bd1a-00112444be1e",
            "\\x00ff",
            [1, 2],
            ["a", None],
            {"k": [1]},
            {"k": {"x": True}},
            "10.0.0.1/8",
            None,
            "NaN",
            "[1,5)",
            [1, "x"],
        ]
    ]
    json.dumps(result.rows, allow_nan=False)
    assert [c.type for c in result.columns][:9] == [
        "numeric", "timestamptz", "date", "time", "interval", "uuid", "bytea", "int4[]", "text[]",
    ]  # fmt: skip


async def test_postgres_row_cap_keeps_exactly_row_limit_rows_and_says_so(pg: PostgresBackend) -> None:
    over, exact = await pg.read(
        ["SELECT g FROM generate_series(1, 1000) g", "SELECT g FROM generate_series(1, 10) g"],
        [],
        Limits(row_limit=10),
    )
    assert (over.row_count, over.truncated, over.truncated_by) == (10, True, "rows")
    assert over.rows[-1] == [10]
    assert (exact.row_count, exact.truncated) == (10, False)


async def test_postgres_byte_cap_truncates_by_bytes(pg: PostgresBackend) -> None:
    [result] = await pg.read(
        ["SELECT repeat('x', 100) FROM generate_series(1, 50)"], [], Limits(byte_limit=1000)
    )
    assert result.truncated_by == "bytes"
    assert 0 < result.row_count < 10
    assert len(json.dumps(result.rows, separators=(",", ":"))) <= 1000


async def test_postgres_timeout_cancels_the_statement_and_the_connection_still_works(
    pg: PostgresBackend,
) -> None:
    started = time.monotonic()
    with pytest.raises(StatementTimeout, match=r"statement timed out after 0\.5 s"):
        await pg.read(["SELECT pg_sleep(10)"], [], TIMEOUT)
    assert time.monotonic() - started < 1.5
    assert await pg_value(pg, "SELECT 1") == 1


async def test_postgres_backstop_cancels_a_statement_that_switched_its_timeout_off(
    pg: PostgresBackend,
) -> None:
    started = time.monotonic()
    with pytest.raises(StatementTimeout, match=r"statement 2 of 2: statement timed out after 0\.5 s"):
        await pg.read(["SET statement_timeout = 0", "SELECT pg_sleep(10)"], [], TIMEOUT)
    assert time.monotonic() - started < 2.5
    assert await pg_value(pg, "SELECT 1") == 1


async def test_postgres_errors_keep_the_message_but_not_the_row_values_of_detail(
    pg: PostgresBackend, pg_schema: str
) -> None:
    with pytest.raises(BackendError) as error:
        await pg.write([f"INSERT INTO {pg_schema}.items (id, name) VALUES (1, 'twin')"], [], Limits())
    assert "duplicate key value violates unique constraint" in str(error.value)
    assert "(id)=(1)" not in str(error.value)


async def test_postgres_refuses_writes_inside_read_even_if_the_classifier_were_wrong(
    pg: PostgresBackend, pg_schema: str
) -> None:
    for sql in (
        f"INSERT INTO {pg_schema}.items (name) VALUES ('sneaky')",
        f"CREATE TABLE {pg_schema}.sneaky (a int)",
        f"SELECT nextval('{pg_schema}.items_id_seq')",
        "SET TRANSACTION READ WRITE",
    ):
        with pytest.raises(BackendError, match="read-only transaction|read-write mode"):
            await pg.read([sql], [], Limits())
    assert await pg_value(pg, f"SELECT count(*) FROM {pg_schema}.items WHERE name = 'sneaky'") == 0


async def test_postgres_read_stops_at_a_statement_that_ends_the_transaction(
    pg: PostgresBackend, pg_schema: str
) -> None:
    with pytest.raises(BackendError, match="statement 1 of 2 ended the read-only transaction"):
        await pg.read(["COMMIT", f"DELETE FROM {pg_schema}.items"], [], Limits())
    assert await pg_value(pg, f"SELECT count(*) FROM {pg_schema}.items") == 20


async def test_postgres_refuses_several_statements_in_one_string(pg: PostgresBackend, pg_schema: str) -> None:
    for call in (pg.read, pg.write):
        with pytest.raises(BackendError, match="cannot insert multiple commands"):
            await call([f"SELECT 1; DELETE FROM {pg_schema}.items"], [], Limits())
    assert await pg_value(pg, f"SELECT count(*) FROM {pg_schema}.items") == 20


async def test_postgres_write_is_all_or_nothing(pg: PostgresBackend, pg_schema: str) -> None:
    with pytest.raises(
        BackendError, match="statement 2 of 2 failed, nothing was changed: relation .* does not exist"
    ):
        await pg.write([f"DELETE FROM {pg_schema}.items", f"DELETE FROM {pg_schema}.missing"], [], Limits())
    assert await pg_value(pg, f"SELECT count(*) FROM {pg_schema}.items") == 20


async def test_postgres_write_reports_rows_affected_and_returning_rows(
    pg: PostgresBackend, pg_schema: str
) -> None:
    inserted, updated, deleted = await pg.write(
        [
            f"INSERT INTO {pg_schema}.items (name, price) VALUES ('a', 1), ('b', 2) RETURNING name, price",
            f"UPDATE {pg_schema}.items SET price = price + 1 WHERE name IN ('a', 'b')",
            f"DELETE FROM {pg_schema}.items WHERE name IN ('a', 'b')",
        ],
        [],
        Limits(),
    )
    assert (inserted.status, inserted.rows_affected) == ("INSERT 0 2", 2)
    assert inserted.returned is not None
    assert inserted.returned.columns == (Column("name", "text"), Column("price", "numeric"))
    assert inserted.returned.rows == [["a", "1.00"], ["b", "2.00"]]
    assert (updated.status, updated.rows_affected, updated.returned) == ("UPDATE 2", 2, None)
    assert (deleted.status, deleted.rows_affected) == ("DELETE 2", 2)


async def test_postgres_ddl_then_a_statement_using_it_in_one_write(
    pg: PostgresBackend, pg_schema: str
) -> None:
    await pg.read([f"SELECT * FROM {pg_schema}.items LIMIT 1"], [], Limits())
    try:
        _, added = await pg.write(
            [
                f"ALTER TABLE {pg_schema}.items ADD COLUMN note text",
                f"UPDATE {pg_schema}.items SET note = 'n' WHERE id = 1 RETURNING *",
            ],
            [],
            Limits(),
        )
        assert added.returned is not None and added.returned.columns[-1].name == "note"
        # asyncpg cached the read's plan for the old shape: the read is retried once, transparently.
        [result] = await pg.read([f"SELECT * FROM {pg_schema}.items LIMIT 1"], [], Limits())
        assert [c.name for c in result.columns][-1] == "note"
    finally:
        await pg.write([f"ALTER TABLE {pg_schema}.items DROP COLUMN IF EXISTS note"], [], Limits())


SESSION_STATE = """
SELECT json_build_object(
  'pid', pg_backend_pid(),
  'user', current_user,
  'search_path', current_setting('search_path'),
  'work_mem', current_setting('work_mem'),
  'channels', (SELECT count(*) FROM pg_listening_channels()),
  'advisory', (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()),
  'prepared', (SELECT count(*) FROM pg_prepared_statements WHERE from_sql),
  'cursors', (SELECT count(*) FROM pg_cursors WHERE name <> ''),
  'temp', (SELECT count(*) FROM pg_class WHERE relpersistence = 't'))
"""


async def _write_pool_state(pg: PostgresBackend) -> object:
    [result] = await pg.write([SESSION_STATE], [], Limits())
    assert result.returned is not None
    return result.returned.rows[0][0]


async def test_postgres_pool_comes_back_clean_after_session_state(
    pg: PostgresBackend, pg_schema: str
) -> None:
    """Writes have their own pool, with the role's defaults: its one connection comes back clean."""
    before = await _write_pool_state(pg)
    await pg.write(
        [
            "SET search_path = pg_catalog",
            "SET work_mem = '64kB'",
            "LISTEN mcpguard_channel",
            "SELECT pg_advisory_lock(4242)",
            "PREPARE mcpguard_plan AS SELECT 1",
            "DECLARE mcpguard_cursor CURSOR WITH HOLD FOR SELECT 1",
            "CREATE TEMP TABLE mcpguard_temp (a int)",
            "SET ROLE pg_read_all_data",
        ],
        [],
        Limits(),
    )
    after = await _write_pool_state(pg)
    assert after == before
    assert before == {**before, "user": "postgres", "channels": 0, "advisory": 0, "prepared": 0, "temp": 0}


@pytest.mark.parametrize("read_timeout_s", [2.0, None])
async def test_postgres_reads_are_read_only_and_timed_with_or_without_a_begin(
    read_timeout_s: float | None,
) -> None:
    """With the pool's own timeout a single read runs in its implicit transaction; otherwise in a BEGIN."""
    backend = PostgresBackend(PG_URL, pool_size=1, read_timeout_s=read_timeout_s)
    await backend.open()
    try:
        sql = "SELECT current_setting('transaction_read_only'), current_setting('statement_timeout')"
        [result] = await backend.read([sql], [], Limits(timeout_s=2.0))
        assert result.rows == [["on", "2s"]]
        with pytest.raises(BackendError, match="read-only transaction"):
            await backend.read(["CREATE TABLE mcpguard_never (a int)"], [], Limits(timeout_s=2.0))
    finally:
        await backend.close()


async def test_postgres_session_state_made_inside_a_read_does_not_survive_it(pg: PostgresBackend) -> None:
    before = await pg_value(pg, SESSION_STATE)
    await pg.read(["SELECT pg_advisory_lock(4243)"], [], Limits())
    await pg.read(["PREPARE mcpguard_read_plan AS SELECT 1"], [], Limits())
    await pg.read(["SET work_mem = '64kB'"], [], Limits())
    assert await pg_value(pg, SESSION_STATE) == before


async def test_postgres_session_authorization_does_not_survive_a_call(pg: PostgresBackend) -> None:
    await pg.write(["SET SESSION AUTHORIZATION pg_read_all_data"], [], Limits())
    assert await pg_value(pg, "SELECT session_user") == "postgres"


async def test_postgres_params_are_bound_and_json_strings_become_typed(pg: PostgresBackend) -> None:
    [result] = await pg.read(
        ["SELECT $1::int + 1, $2::date, $3::timestamptz, $4::numeric, $5::bytea, $6::interval, $7::text"],
        ["41", "2024-05-01", "2024-05-01T12:00:00+02:00", "12.50", "\\x00ff", "PT1H", 5],
        Limits(),
    )
    assert result.rows == [[42, "2024-05-01", "2024-05-01T10:00:00+00:00", "12.50", "\\x00ff", "PT1H", "5"]]
    with pytest.raises(UsageError, match=r"parameter \$1 is not a valid date: 'soon'; give an ISO 8601 date"):
        await pg.read(["SELECT $1::date"], ["soon"], Limits())
    with pytest.raises(UsageError, match=r"interval: '1 day'; give .* \(or write \$1::text::interval\)"):
        await pg.read(["SELECT $1::interval"], ["1 day"], Limits())
    [spelled] = await pg.read(["SELECT $1::text::interval"], ["1 day"], Limits())
    assert spelled.rows == [["P1D"]]
    with pytest.raises(UsageError, match="takes 1 parameter"):
        await pg.read(["SELECT $1::int"], [], Limits())
    with pytest.raises(UsageError, match="exactly one statement"):
        await pg.read(["SELECT $1::int", "SELECT 2"], [1], Limits())


async def test_postgres_list_and_describe_tables(pg: PostgresBackend, pg_schema: str) -> None:
    tables = await pg.list_tables()
    assert TableInfo(pg_schema, "items", "table") in tables
    assert TableInfo(pg_schema, "cheap", "view") in tables
    assert not [t for t in tables if t.schema in ("pg_catalog", "information_schema")]
    assert await pg.describe_table(f"{pg_schema}.items") == [
        ColumnInfo("id", "integer", False, True),
        ColumnInfo("name", "text", False, False),
        ColumnInfo("price", "numeric(10,2)", True, False),
        ColumnInfo("tags", "text[]", True, False),
    ]
    assert [c.name for c in await pg.describe_table(f"{pg_schema}.CHEAP")] == ["id", "name"]
    assert [c.name for c in await pg.describe_table(f'"{pg_schema}"."cheap"')] == ["id", "name"]
    for missing in ("items", f"{pg_schema}.items'; DROP TABLE {pg_schema}.items; --", "a.b.c.d"):
        with pytest.raises(UsageError, match="no table named"):
            await pg.describe_table(missing)
    assert await pg_value(pg, f"SELECT count(*) FROM {pg_schema}.items") == 20


async def test_postgres_connection_errors_never_show_the_password() -> None:
    backend = PostgresBackend("postgresql://postgres:hunter2-secret@127.0.0.1:1/test")
    with pytest.raises(BackendError, match=r"cannot connect to PostgreSQL at 127\.0\.0\.1:1/test") as error:
        await backend.open()
    assert "hunter2" not in str(error.value)
    assert "hunter2" not in str(error.value.__cause__)


# SQLite -----------------------------------------------------------------------------------------


async def test_sqlite_values_come_out_json_safe(lite: SqliteBackend) -> None:
    [result] = await lite.read(["SELECT 1, 1.5, 'x', x'00ff', NULL, 9e999"], [], Limits())
    assert result.rows == [[1, 1.5, "x", "\\x00ff", None, "Infinity"]]
    assert [c.type for c in result.columns] == ["integer", "real", "text", "blob", "", "real"]


async def test_sqlite_rows_of_plain_values_and_a_late_blob_come_out_json_safe(lite: SqliteBackend) -> None:
    """Rows holding only JSON scalars are copied; one value needing a conversion, however late,
    has it."""
    sql = "SELECT column1, column2 FROM (VALUES (1, 'a'), (2, NULL), (3, x'0a'), (4, 2.5))"
    [result] = await lite.read([sql], [], Limits())
    assert result.rows == [[1, "a"], [2, None], [3, "\\x0a"], [4, 2.5]]
    [plain] = await lite.read(["SELECT 1, 'x', NULL"], [], Limits())
    assert plain.rows == [[1, "x", None]] and type(plain.rows[0]) is list


async def test_sqlite_row_and_byte_caps(lite: SqliteBackend) -> None:
    [by_rows] = await lite.read(["SELECT * FROM items"], [], Limits(row_limit=5))
    assert (by_rows.row_count, by_rows.truncated_by) == (5, "rows")
    [by_bytes] = await lite.read(["SELECT name FROM items"], [], Limits(byte_limit=50))
    assert by_bytes.truncated_by == "bytes"
    assert len(json.dumps(by_bytes.rows, separators=(",", ":"))) <= 50 < len(json.dumps([["item 1"]] * 20))


async def test_sqlite_timeout_interrupts_a_runaway_query_and_the_connection_still_works(
    lite: SqliteBackend,
) -> None:
    runaway = "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT count(*) FROM r"
    started = time.monotonic()
    with pytest.raises(StatementTimeout, match=r"statement timed out after 0\.5 s"):
        await lite.read([runaway], [], TIMEOUT)
    assert time.monotonic() - started < 1.5
    with pytest.raises(StatementTimeout):
        await lite.write([f"INSERT INTO items (name) {runaway}"], [], TIMEOUT)
    [result] = await lite.read(["SELECT count(*) FROM items"], [], Limits())
    assert result.rows == [[20]]


@pytest.mark.parametrize(
    ("sql", "refusal"),
    [
        ("INSERT INTO items (name) VALUES ('sneaky')", "INSERT items"),
        ("DELETE FROM items", "DELETE items"),
        ("CREATE TABLE sneaky (a)", "changing the schema"),
        ("CREATE TEMP TABLE sneaky (a)", "changing the schema"),
        ("PRAGMA query_only = 0", "PRAGMA query_only"),
        ("BEGIN", "transaction control"),
        ("SELECT load_extension('/tmp/nothing')", "load_extension()"),
        ("SELECT * FROM pragma_table_info('items')", "PRAGMA table_info"),
    ],
)
async def test_sqlite_read_connection_refuses_anything_but_reading(
    lite: SqliteBackend, sqlite_path: Path, sql: str, refusal: str
) -> None:
    with pytest.raises(BackendError, match=f"not allowed on this read-only connection: .*{refusal}"):
        await lite.read([sql], [], Limits())
    assert await lite_count(sqlite_path) == 20


async def test_sqlite_query_only_cannot_be_switched_off_from_a_read(
    lite: SqliteBackend, sqlite_path: Path
) -> None:
    with pytest.raises(BackendError):
        await lite.read(["PRAGMA query_only = 0"], [], Limits())
    with pytest.raises(BackendError):
        await lite.read(["INSERT INTO items (name) VALUES ('after')"], [], Limits())
    assert await lite_count(sqlite_path) == 20


async def test_sqlite_attach_and_vacuum_into_create_no_file(lite: SqliteBackend, tmp_path: Path) -> None:
    for call in (lite.read, lite.write):
        for sql in (f"ATTACH '{tmp_path}/new.db' AS other", f"VACUUM INTO '{tmp_path}/copy.db'"):
            with pytest.raises(BackendError, match="ATTACH|cannot VACUUM"):
                await call([sql], [], Limits())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shop.db"]


async def test_sqlite_refuses_several_statements_in_one_string(
    lite: SqliteBackend, sqlite_path: Path
) -> None:
    for call in (lite.read, lite.write):
        with pytest.raises(BackendError, match="one statement at a time"):
            await call(["SELECT 1; DELETE FROM items"], [], Limits())
    assert await lite_count(sqlite_path) == 20


async def test_sqlite_write_is_all_or_nothing(lite: SqliteBackend, sqlite_path: Path) -> None:
    with pytest.raises(BackendError, match="statement 2 of 2 failed, nothing was changed: no such table"):
        await lite.write(["DELETE FROM items", "DELETE FROM missing"], [], Limits())
    assert await lite_count(sqlite_path) == 20


async def test_sqlite_write_cannot_commit_or_pragma_on_its_own(
    lite: SqliteBackend, sqlite_path: Path
) -> None:
    for sql in ("COMMIT", "SAVEPOINT s", "PRAGMA journal_mode = off", "SELECT load_extension('x')"):
        with pytest.raises(BackendError, match="not allowed on this connection"):
            await lite.write(["DELETE FROM items", sql], [], Limits())
    assert await lite_count(sqlite_path) == 20


async def test_sqlite_write_reports_rows_affected_and_returning_rows(lite: SqliteBackend) -> None:
    inserted, updated, created = await lite.write(
        [
            "INSERT INTO items (name, price) VALUES ('a', 1), ('b', 2) RETURNING name, price",
            "UPDATE items SET price = price + 1 WHERE price < 3",
            "CREATE TABLE notes (body TEXT)",
        ],
        [],
        Limits(),
    )
    assert (inserted.status, inserted.rows_affected) == ("INSERT 2", 2)
    assert inserted.returned is not None and inserted.returned.rows == [["a", 1.0], ["b", 2.0]]
    assert (updated.status, updated.rows_affected, updated.returned) == ("UPDATE 4", 4, None)
    assert (created.status, created.rows_affected) == ("CREATE", None)


async def test_sqlite_params_are_bound(lite: SqliteBackend) -> None:
    [result] = await lite.read(["SELECT name FROM items WHERE id = ? OR name = ?"], [3, "item 4"], Limits())
    assert result.rows == [["item 3"], ["item 4"]]
    with pytest.raises(UsageError, match="exactly one statement"):
        await lite.read(["SELECT ?", "SELECT 2"], [1], Limits())


async def test_sqlite_reads_see_one_snapshot_and_leave_no_transaction_open(lite: SqliteBackend) -> None:
    counts = await lite.read(["SELECT count(*) FROM items", "SELECT count(*) FROM cheap"], [], Limits())
    assert [r.rows for r in counts] == [[[20]], [[4]]]
    await lite.write(["DELETE FROM items WHERE id = 1"], [], Limits())  # would wait if a reader held a lock
    assert (await lite.read(["SELECT count(*) FROM items"], [], Limits()))[0].rows == [[19]]


async def test_sqlite_list_and_describe_tables(lite: SqliteBackend) -> None:
    assert await lite.list_tables() == [TableInfo(None, "cheap", "view"), TableInfo(None, "items", "table")]
    assert await lite.describe_table("items") == [
        ColumnInfo("id", "INTEGER", False, True),
        ColumnInfo("name", "TEXT", False, False),
        ColumnInfo("price", "REAL", True, False),
        ColumnInfo("picture", "BLOB", True, False),
    ]
    assert [c.name for c in await lite.describe_table("main.cheap")] == ["id", "name"]
    with pytest.raises(UsageError, match="no table named 'items; DROP TABLE items'"):
        await lite.describe_table("items; DROP TABLE items")


async def test_sqlite_open_needs_an_existing_file_and_creates_none(tmp_path: Path) -> None:
    backend = SqliteBackend(tmp_path / "missing.db")
    with pytest.raises(BackendError, match="does not exist"):
        await backend.open()
    assert not (tmp_path / "missing.db").exists()


async def test_sqlite_user_transaction_control_is_refused_even_after_ours_ran(
    sqlite_path: Path,
) -> None:
    """sqlite3 reuses a cached statement without asking the authorizer: ours must never match a user's."""
    backend = SqliteBackend(sqlite_path, pool_size=1)
    await backend.open()
    try:
        await backend.read(["SELECT 1", "SELECT 2"], [], Limits())  # our BEGIN and ROLLBACK ran
        await backend.write(
            ["DELETE FROM items WHERE id = 1"], [], Limits()
        )  # our BEGIN IMMEDIATE and COMMIT
        for sql in ("BEGIN", "ROLLBACK", "BEGIN IMMEDIATE", "COMMIT"):
            with pytest.raises(BackendError, match="transaction control"):
                await backend.read([sql], [], Limits())
            with pytest.raises(BackendError, match="transaction control"):
                await backend.write(["DELETE FROM items", sql], [], Limits())
    finally:
        await backend.close()
    assert await lite_count(sqlite_path) == 19
