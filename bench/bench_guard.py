"""The cost of the guard, as ratios against raw asyncpg measured in the same run.

    python bench/bench_guard.py [--url postgresql://postgres@127.0.0.1:5432/test] [--n 2000]

Prints: classification time per statement (novel and repeated), the per-call overhead of a guarded
`query` through guard.py (audit writes included) against the same fetch with raw asyncpg, and the
round trip of `query` through the real stdio transport with the mcp client (10 and 1,000 rows).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mcp_guard.classify import classify  # noqa: E402
from mcp_guard.config import ConnectionSettings, Settings, build_config  # noqa: E402
from mcp_guard.guard import CallContext, Guard  # noqa: E402
from mcp_guard.identity import local_identity  # noqa: E402

SCHEMA = "mcpguard_bench"
QUERY_10 = f"SELECT id, name, email, amount, created_at FROM {SCHEMA}.items WHERE id <= 10 ORDER BY id"
QUERY_1000 = f"SELECT id, name, email, amount, created_at FROM {SCHEMA}.items WHERE id <= 1000 ORDER BY id"


def percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


async def timed_pair(
    baseline: Callable[[], Awaitable[object]], measured: Callable[[], Awaitable[object]], n: int
) -> tuple[list[float], list[float]]:
    """Samples of both, in alternating blocks: a noisy neighbour slows both alike, and neither
    pays for the other's leftovers (the guard resets its connection after answering)."""
    block = 50
    samples: tuple[list[float], list[float]] = ([], [])
    for round_ in range(-1, max(1, n // block)):
        for fn, into in ((baseline, samples[0]), (measured, samples[1])):
            for _ in range(block):
                start = time.perf_counter()
                await fn()
                if round_ >= 0:  # the first round warms up
                    into.append((time.perf_counter() - start) * 1e6)
            await asyncio.sleep(0.01)
    return samples


async def prepare(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE; CREATE SCHEMA {SCHEMA}")
        await conn.execute(
            f"CREATE TABLE {SCHEMA}.items (id int PRIMARY KEY, name text, email text, amount numeric(10,2),"
            " created_at timestamptz)"
        )
        await conn.execute(
            f"INSERT INTO {SCHEMA}.items SELECT g, 'name ' || g, 'user' || g || '@example.com', g * 1.25,"
            " now() - g * interval '1 minute' FROM generate_series(1, 5000) g"
        )
    finally:
        await conn.close()


def bench_classify(n: int) -> None:
    base = (
        "SELECT c.id, c.name, sum(o.total) AS spent FROM customers c JOIN orders o ON o.customer_id = c.id "
        "WHERE o.status IN ('paid', 'shipped') AND o.created_at > now() - interval '30 days' "
        "GROUP BY c.id, c.name ORDER BY spent DESC LIMIT {}"
    )
    novel = []
    for i in range(n):
        sql = base.format(i + 1)
        start = time.perf_counter()
        classify(sql, "postgres")
        novel.append((time.perf_counter() - start) * 1e6)
    repeated = []
    sql = base.format(1)
    for _ in range(n):
        start = time.perf_counter()
        classify(sql, "postgres")
        repeated.append((time.perf_counter() - start) * 1e6)
    (np50, np99), (rp50, rp99) = percentiles(novel), percentiles(repeated)
    print(f"classify, {len(base)}-char SELECT   novel p50 {np50:8.1f} µs  p99 {np99:8.1f} µs")
    print(f"classify, repeated statement    p50 {rp50:8.1f} µs  p99 {rp99:8.1f} µs  (target < 50 µs p50)")


async def bench_guard(url: str, n: int) -> None:
    home = Path(tempfile.mkdtemp(prefix="mcpguard-bench-"))
    os.environ["BENCH_PG_URL"] = url
    settings = Settings.model_validate(
        {
            "connections": {"pg": ConnectionSettings(url_env="BENCH_PG_URL")},
            "audit": {
                "url": f"sqlite:///{home / 'audit.db'}",
                "signing_key_file": str(home / "audit-signing.key"),  # not in the user's data dir
            },
        }
    )
    guard = await Guard.start(build_config(settings, "(bench)"))
    ctx = CallContext(identity=local_identity(), session_id="bench", client="bench")
    pool = await asyncpg.create_pool(url, min_size=1, max_size=4)
    try:
        for label, sql in (("10 rows", QUERY_10), ("1,000 rows", QUERY_1000)):

            async def raw(sql: str = sql) -> object:
                async with pool.acquire() as conn:
                    return await conn.fetch(sql)

            async def guarded(sql: str = sql) -> object:
                result = await guard.query(ctx, "pg", sql, None)
                assert not result.is_error, result.text
                return result

            raw_samples, guard_samples = await timed_pair(raw, guarded, n)
            (raw_p50, _), (guard_p50, guard_p99) = percentiles(raw_samples), percentiles(guard_samples)
            print(
                f"guard.query {label:>10}: raw asyncpg p50 {raw_p50:8.1f} µs"
                f" | guarded p50 {guard_p50:8.1f} µs p99 {guard_p99:8.1f} µs"
                f" | overhead {guard_p50 - raw_p50:8.1f} µs | ratio {guard_p50 / raw_p50:5.2f}x"
            )
    finally:
        await pool.close()
        await guard.close()


async def bench_stdio(url: str, n: int) -> None:
    from mcp.client.session import ClientSession
    from mcp.client.stdio import StdioServerParameters, stdio_client

    home = Path(tempfile.mkdtemp(prefix="mcpguard-bench-"))
    config = home / "guard.toml"
    config.write_text(
        f'[audit]\nurl = "sqlite:///{home / "audit.db"}"\n[connections.pg]\nurl_env = "BENCH_PG_URL"\n'
        "row_limit = 1000\n"
    )
    env = {**os.environ, "BENCH_PG_URL": url, "MCP_GUARD_HOME": str(home)}
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "mcp_guard", "serve", "--config", str(config)], env=env
    )
    pool = await asyncpg.create_pool(url, min_size=1, max_size=2)
    try:
        async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
            await session.initialize()
            for label, sql in (("10 rows", QUERY_10), ("1,000 rows", QUERY_1000)):

                async def raw(sql: str = sql) -> object:
                    async with pool.acquire() as conn:
                        return await conn.fetch(sql)

                async def call(sql: str = sql) -> object:
                    result = await session.call_tool("query", {"sql": sql})
                    assert not result.is_error, result
                    return result

                raw_samples, mcp_samples = await timed_pair(raw, call, n)
                (raw_p50, _), (mcp_p50, mcp_p99) = percentiles(raw_samples), percentiles(mcp_samples)
                print(
                    f"stdio query {label:>10}: raw asyncpg p50 {raw_p50:8.1f} µs"
                    f" | through MCP p50 {mcp_p50:8.1f} µs p99 {mcp_p99:8.1f} µs"
                    f" | ratio {mcp_p50 / raw_p50:5.2f}x"
                )
    finally:
        await pool.close()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--n", type=int, default=2000)
    args = parser.parse_args()
    await prepare(args.url)
    bench_classify(args.n)
    await bench_guard(args.url, args.n)
    await bench_stdio(args.url, max(200, args.n // 4))


if __name__ == "__main__":
    asyncio.run(main())
