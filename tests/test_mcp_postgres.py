"""The guarded path on PostgreSQL, driven through a real MCP client over stdio."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import asyncpg

from tests.client import guard_client
from tests.conftest import write_config
from tests.corpus import unanswered_reads


def pg_config(tmp_path: Path, extra: str = "") -> Path:
    return write_config(tmp_path, f'[connections.pg]\nurl_env = "SHOP_PG_URL"\n{extra}')


async def test_values_of_every_common_type_come_out_json_safe(tmp_path, pg_shop_url):
    sql = """SELECT 12.50::numeric AS amount, TIMESTAMPTZ '2026-01-02 03:04:05+02' AS at,
        DATE '2026-01-02' AS day, TIME '10:11:12' AS clock, INTERVAL '1 day 2 hours' AS span,
        'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid AS id, '\\xdeadbeef'::bytea AS raw,
        ARRAY[1, 2, 3] AS ints, ARRAY['a', NULL] AS texts, '{"k": [1, true, null]}'::jsonb AS doc,
        '{"j": 1}'::json AS doc2, '10.0.0.1'::inet AS ip, NULL::text AS nothing, true AS yes,
        1.5::float8 AS f"""
    async with guard_client(pg_config(tmp_path), tmp_path, SHOP_PG_URL=pg_shop_url) as client:
        reply = await client.call("query", sql=sql)
    assert not reply.is_error, reply.text
    row = dict(
        zip([c["name"] for c in reply.structured["columns"]], reply.structured["rows"][0], strict=True)
    )
    assert row["amount"] == "12.50"
    assert row["at"] == "2026-01-02T01:04:05+00:00"
    assert row["day"] == "2026-01-02" and row["clock"] == "10:11:12"
    assert row["span"].startswith("P1DT2H")
    assert row["id"] == "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"
    assert row["raw"] == "\\xdeadbeef"
    assert row["ints"] == [1, 2, 3] and row["texts"] == ["a", None]
    assert row["doc"] == {"k": [1, True, None]} and row["doc2"] == {"j": 1}
    assert row["ip"] == "10.0.0.1" and row["nothing"] is None and row["yes"] is True and row["f"] == 1.5


async def test_parameters_are_bound_not_spliced(tmp_path, pg_shop_url):
    async with guard_client(pg_config(tmp_path), tmp_path, SHOP_PG_URL=pg_shop_url) as client:
        reply = await client.call("query", sql="SELECT name FROM customers WHERE id = $1", params=[3])
        hostile = await client.call(
            "query", sql="SELECT count(*) FROM customers WHERE name = $1", params=["x' OR '1'='1"]
        )
    assert not reply.is_error and reply.structured["row_count"] == 1
    assert hostile.structured["rows"] == [[0]]


async def test_a_slow_statement_is_cancelled_at_the_timeout(tmp_path, pg_shop_url):
    async with guard_client(
        pg_config(tmp_path, "timeout = 1\n"), tmp_path, SHOP_PG_URL=pg_shop_url
    ) as client:
        started = time.monotonic()
        reply = await client.call("query", sql="SELECT count(*) FROM generate_series(1, 10000000000) AS g")
        elapsed = time.monotonic() - started
        after = await client.call("query", sql="SELECT 1 AS one")
    assert reply.is_error and "timed out" in reply.text
    assert elapsed < 4
    assert not after.is_error


async def test_writes_run_in_one_transaction_and_return_rows(tmp_path, pg_shop_url):
    async with guard_client(pg_config(tmp_path), tmp_path, SHOP_PG_URL=pg_shop_url) as client:
        ok = await client.call(
            "execute",
            sql="UPDATE orders SET status = 'refunded' WHERE id = 5 RETURNING id, status",
            reason="refund order 5 as the customer asked",
        )
        failed = await client.call(
            "execute",
            sql="UPDATE orders SET status = 'lost' WHERE id = 6;"
            " UPDATE orders SET total = 'abc' WHERE id = 6",
            reason="atomicity",
        )
    assert not ok.is_error, ok.text
    assert ok.structured["rows_affected"] == 1
    assert ok.structured["statements"][0]["returned"]["rows"] == [[5, "refunded"]]
    assert failed.is_error
    conn = await asyncpg.connect(pg_shop_url)
    try:
        assert await conn.fetchval("SELECT status FROM orders WHERE id = 6") != "lost"
    finally:
        await conn.close()


async def test_connection_errors_never_show_the_password(tmp_path):
    url = "postgresql://postgres:Sup3r-Secret-pw@127.0.0.1:1/test"
    async with guard_client(pg_config(tmp_path), tmp_path, SHOP_PG_URL=url) as client:
        reply = await client.call("query", sql="SELECT 1")
    assert reply.is_error
    assert "Sup3r-Secret-pw" not in reply.text
    for audit_file in tmp_path.glob("audit.db*"):
        assert b"Sup3r-Secret-pw" not in audit_file.read_bytes()
    assert "Sup3r-Secret-pw" not in (tmp_path / "server.stderr").read_text()


async def test_concurrent_calls_are_served_together(tmp_path, pg_shop_url):
    async with guard_client(pg_config(tmp_path), tmp_path, SHOP_PG_URL=pg_shop_url) as client:
        replies = await asyncio.gather(
            *(client.call("query", sql=f"SELECT {i} AS n, count(*) FROM orders") for i in range(12))
        )
    assert [r.structured["rows"][0][0] for r in replies] == list(range(12))


async def test_every_read_of_the_read_corpus_answers(tmp_path, pg_shop_url):
    """tests/fixtures/sql/reads_postgres.sql holds reads the `query` tool must let through: each runs."""
    async with guard_client(pg_config(tmp_path), tmp_path, SHOP_PG_URL=pg_shop_url) as client:
        failed = await unanswered_reads(client, "postgres")
    assert not failed, "\n".join(failed)


async def test_a_parameter_the_driver_cannot_encode_is_refused_with_a_reason(tmp_path, pg_shop_url):
    async with guard_client(pg_config(tmp_path), tmp_path, SHOP_PG_URL=pg_shop_url) as client:
        narrow = await client.call("query", sql="SELECT id FROM orders WHERE id = $1", params=[2**40])
        wide = await client.call("query", sql="SELECT $1::numeric AS n", params=[2**70])
    assert narrow.is_error and "invalid input for query argument $1" in narrow.text
    assert "out of int32 range" in narrow.text and "Internal error" not in narrow.text
    assert wide.structured["rows"] == [[str(2**70)]], wide.text  # numeric: exact, as a string
