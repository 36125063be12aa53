"""The machine's share of a held statement, as ratios against a plain guarded write in the same run.

    python bench/bench_approvals.py [--url postgresql://postgres@127.0.0.1:5432/test] [--n 200]

Prints:
- the row estimate (EXPLAIN without ANALYZE) a `rows_above` rule adds to a DELETE, against the same
  DELETE under a policy that asks for none;
- the bookkeeping of a held write without the human: hold (request + audit), a signed vote from
  another store connection (as another process), then approval_status (re-decide, verify, claim by
  compare-and-set, run, record), against the same write allowed outright;
- how long a waiting call takes to see a decision made on another connection, against the store's
  poll interval (the floor of that latency by design).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mcp_guard.approvals import Approvals  # noqa: E402
from mcp_guard.config import (  # noqa: E402
    ApprovalSettings,
    ConnectionSettings,
    PolicyRule,
    PolicySettings,
    ReviewerSettings,
    Settings,
    build_config,
)
from mcp_guard.guard import CallContext, Guard  # noqa: E402
from mcp_guard.identity import local_identity  # noqa: E402
from mcp_guard.reviewers import MIN_COST, KeyVerifier, enroll, unlock  # noqa: E402
from mcp_guard.store import open_store  # noqa: E402
from mcp_guard.store.sqlite_approvals import POLL_S  # noqa: E402

SCHEMA = "mcpguard_bench_approvals"
DELETE = f"DELETE FROM {SCHEMA}.items WHERE id = -1"
UPDATE = f"UPDATE {SCHEMA}.items SET n = n + 1 WHERE id = 1"
PASSPHRASE = "bench-reviewer-passphrase"


async def prepare(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE; CREATE SCHEMA {SCHEMA}")
        await conn.execute(f"CREATE TABLE {SCHEMA}.items (id int PRIMARY KEY, n int NOT NULL DEFAULT 0)")
        await conn.execute(f"INSERT INTO {SCHEMA}.items SELECT g, 0 FROM generate_series(1, 10000) g")
        await conn.execute(f"ANALYZE {SCHEMA}.items")
    finally:
        await conn.close()


async def drop(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
    finally:
        await conn.close()


def p50_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


async def guard_for(url: str, home: Path, rules: tuple[PolicyRule, ...], key: str, wait: float) -> Guard:
    import os

    os.environ["BENCH_APPROVALS_URL"] = url
    settings = Settings(
        connections={"pg": ConnectionSettings(url_env="BENCH_APPROVALS_URL", pool_size=2)},
        policy=PolicySettings(rules=rules),
        approvals=ApprovalSettings(
            wait=wait, reviewers={"rita": ReviewerSettings(key=key, groups=("reviewers",))}
        ),
    )
    settings = settings.model_copy(
        update={"audit": settings.audit.model_copy(update={"url": f"sqlite:///{home}/audit.db"})}
    )
    return await Guard.start(build_config(settings, "(bench)"))


async def timed_calls(guard: Guard, ctx: CallContext, sql: str, n: int) -> list[float]:
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        result = await guard.execute(ctx, "pg", sql, "bench", None)
        assert not result.is_error, result.text
        samples.append(time.perf_counter() - started)
    return samples


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--n", type=int, default=200)
    args = parser.parse_args()
    await prepare(args.url)
    key = str(enroll(PASSPHRASE, cost=MIN_COST))
    ctx = CallContext(identity=local_identity(), session_id="bench")
    allow_writes = PolicyRule(name="writes", action="allow", kinds=("write",))
    estimate_rule = PolicyRule(
        name="big-deletes", action="approve", operations=("DELETE",), rows_above=100, approvers=("reviewers",)
    )
    hold_updates = PolicyRule(
        name="hold-updates", action="approve", kinds=("write",), approvers=("reviewers",)
    )
    try:
        with tempfile.TemporaryDirectory() as home:
            plain = await guard_for(args.url, Path(home), (allow_writes,), key, 0)
            estimated = await guard_for(args.url, Path(home), (estimate_rule, allow_writes), key, 0)
            try:
                plain_samples: list[float] = []
                estimated_samples: list[float] = []
                await timed_calls(plain, ctx, DELETE, 20)
                await timed_calls(estimated, ctx, DELETE, 20)
                for _ in range(10):  # interleaved, so neither gets the quieter moments
                    plain_samples += await timed_calls(plain, ctx, DELETE, args.n // 10)
                    estimated_samples += await timed_calls(estimated, ctx, DELETE, args.n // 10)
                base, with_estimate = p50_ms(plain_samples), p50_ms(estimated_samples)
            finally:
                await plain.close()
                await estimated.close()
            print(
                f"DELETE (0 rows), p50: plain {base:6.2f} ms | with row estimate {with_estimate:6.2f} ms"
                f" | ratio {with_estimate / base:4.2f}x"
            )

            held = await guard_for(args.url, Path(home), (hold_updates,), key, 0)
            allowed = await guard_for(args.url, Path(home), (allow_writes,), key, 0)
            reviewer_store = open_store(f"sqlite:///{home}/audit.db")
            await reviewer_store.open()
            reviewer = unlock(held.approvals.verifier.reviewer("rita"), PASSPHRASE)  # type: ignore[arg-type]
            desk = Approvals(reviewer_store, KeyVerifier({"rita": reviewer.reviewer}))
            try:
                plain_update = p50_ms(await timed_calls(allowed, ctx, UPDATE, args.n))
                rounds: list[float] = []
                for _ in range(max(20, args.n // 4)):
                    started = time.perf_counter()
                    pending = await held.execute(ctx, "pg", UPDATE, "bench", None)
                    request_id = (pending.structured or {})["request_id"]
                    await desk.vote(str(request_id), reviewer, "approve", "", "bench-review")
                    ran = await held.approval_status(ctx, str(request_id))
                    assert not ran.is_error, ran.text
                    rounds.append(time.perf_counter() - started)
                held_round = p50_ms(rounds)
                print(
                    f"UPDATE, p50: allowed {plain_update:6.2f} ms | held + signed vote + approval_status"
                    f" {held_round:6.2f} ms | ratio {held_round / plain_update:4.2f}x"
                )

                waiting = await guard_for(args.url, Path(home), (hold_updates,), key, 30)
                try:
                    latencies: list[float] = []
                    for _ in range(20):
                        call = asyncio.create_task(waiting.execute(ctx, "pg", UPDATE, "bench", None))
                        while (
                            not (listed := await reviewer_store.list_approvals(limit=1))
                            or str(listed[0].state) != "pending"
                        ):
                            await asyncio.sleep(0.01)
                        await asyncio.sleep(0.05)
                        await desk.vote(listed[0].id, reviewer, "approve", "", "bench-review")
                        voted = time.perf_counter()
                        result = await call
                        assert not result.is_error, result.text
                        latencies.append(time.perf_counter() - voted)
                finally:
                    await waiting.close()
                seen = p50_ms(latencies)
                print(
                    f"decision seen by the waiting call (vote committed → result), p50: {seen:6.1f} ms"
                    f" | poll interval {POLL_S * 1000:.0f} ms | ratio {seen / (POLL_S * 1000):4.2f}x"
                )
            finally:
                await reviewer_store.close()
                await held.close()
                await allowed.close()
    finally:
        await drop(args.url)


if __name__ == "__main__":
    asyncio.run(main())
