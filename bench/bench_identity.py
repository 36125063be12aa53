"""The cost of identity: token verification, and guarded calls over streamable HTTP against stdio.

    python bench/bench_identity.py [--url postgresql://postgres@127.0.0.1:5432/test] [--n 2000]
                                   [--clients 20] [--calls 50]

Prints: the p50 of `OidcVerifier.verify()` with the key set cached (RS256 and ES256), against python-jose's
bare `jwt.decode` with a ready key measured in the same run; then guarded `query` calls per second with
`--clients` concurrent MCP clients over streamable HTTP (each with its own token and session), and the
same number of concurrent calls through one stdio session (token from the environment), as a ratio.
A local OIDC provider (tests/idp.py) on 127.0.0.1 issues the tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jose import jwt  # noqa: E402

from mcp_guard.config import IdentitySettings  # noqa: E402
from mcp_guard.identity import OidcVerifier  # noqa: E402
from tests.client import guard_http_client, http_server  # noqa: E402
from tests.idp import AUDIENCE, LocalIdP  # noqa: E402

SCHEMA = "mcpguard_bench_identity"
QUERY = f"SELECT id, name, amount FROM {SCHEMA}.items WHERE id <= 10 ORDER BY id"


async def prepare(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE; CREATE SCHEMA {SCHEMA}")
        await conn.execute(
            f"CREATE TABLE {SCHEMA}.items (id int PRIMARY KEY, name text, amount numeric(10,2))"
        )
        await conn.execute(
            f"INSERT INTO {SCHEMA}.items SELECT g, 'name ' || g, g * 1.25 FROM generate_series(1, 1000) g"
        )
    finally:
        await conn.close()


async def bench_verify(idp: LocalIdP, n: int) -> None:
    settings = IdentitySettings(mode="oidc", issuer=idp.issuer, audience=AUDIENCE)
    verifier = OidcVerifier(settings)
    options = {"require_aud": True, "require_exp": True, "verify_at_hash": False, "leeway": 60}
    try:
        for kid, alg in (("rsa-1", "RS256"), ("ec-1", "ES256")):
            token = idp.token("alice", ["analysts"], kid=kid)
            await verifier.verify(token)  # fetches and caches the key set
            key = await verifier.keys.key(kid, alg)
            ours, bare = [], []
            for _ in range(n):
                start = time.perf_counter()
                await verifier.verify(token)
                ours.append((time.perf_counter() - start) * 1e6)
                start = time.perf_counter()
                jwt.decode(
                    token, key, algorithms=[alg], audience=AUDIENCE, issuer=idp.issuer, options=options
                )
                bare.append((time.perf_counter() - start) * 1e6)
            ours_p50, bare_p50 = statistics.median(ours), statistics.median(bare)
            print(
                f"verify {alg}, cached key set: p50 {ours_p50:7.1f} µs | bare jose jwt.decode p50 "
                f"{bare_p50:7.1f} µs | ratio {ours_p50 / bare_p50:5.2f}x"
            )
    finally:
        await verifier.aclose()


def write_config(home: Path, idp: LocalIdP, extra: str) -> Path:
    config = home / "guard.toml"
    config.write_text(
        f'[audit]\nurl = "sqlite:///{home / "audit.db"}"\n\n'
        f'[identity]\nmode = "oidc"\nissuer = "{idp.issuer}"\naudience = "{AUDIENCE}"\n{extra}\n\n'
        '[connections.pg]\nurl_env = "BENCH_PG_URL"\npool_size = 8\n'
    )
    return config


def children_cpu() -> float:
    """CPU seconds used so far by this process's children (the server), from /proc (Linux)."""
    total = 0.0
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                fields = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass(frozen=True)
class Rate:
    calls_per_s: float
    server_ms_per_call: float
    client_ms_per_call: float

    def __str__(self) -> str:
        return (
            f"{self.calls_per_s:7.1f} calls/s | CPU per call: server {self.server_ms_per_call:5.2f} ms, "
            f"clients {self.client_ms_per_call:5.2f} ms"
        )


async def measure(total: int, run: Awaitable[object]) -> Rate:
    server, client, start = children_cpu(), own_cpu(), time.perf_counter()
    await run
    elapsed = time.perf_counter() - start
    return Rate(
        total / elapsed,
        (children_cpu() - server) * 1000 / total,
        (own_cpu() - client) * 1000 / total,
    )


async def http_rate(idp: LocalIdP, url: str, clients: int, calls: int) -> Rate:
    home = Path(tempfile.mkdtemp(prefix="mcpguard-bench-http-"))
    os.environ["BENCH_PG_URL"] = url
    with http_server(write_config(home, idp, ""), home, "streamable-http") as endpoint:

        async def client(number: int, ready: asyncio.Barrier) -> None:
            token = idp.token(f"user{number}", ["analysts"])
            async with guard_http_client(endpoint, "streamable-http", token) as session:
                await session.call("query", sql=QUERY)  # warm: session started, pool connection open
                await ready.wait()
                for _ in range(calls):
                    reply = await session.call("query", sql=QUERY)
                    assert not reply.is_error, reply.text

        barrier = asyncio.Barrier(clients + 1)
        tasks = [asyncio.create_task(client(i, barrier)) for i in range(clients)]
        await barrier.wait()
        return await measure(clients * calls, asyncio.gather(*tasks))


async def stdio_rate(idp: LocalIdP, url: str, clients: int, calls: int) -> Rate:
    from mcp.client.session import ClientSession
    from mcp.client.stdio import StdioServerParameters, stdio_client

    home = Path(tempfile.mkdtemp(prefix="mcpguard-bench-stdio-"))
    config = write_config(home, idp, 'token_env = "BENCH_TOKEN"')
    env = {
        **os.environ,
        "BENCH_PG_URL": url,
        "BENCH_TOKEN": idp.token("alice", ["analysts"]),
        "MCP_GUARD_HOME": str(home),
    }
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "mcp_guard", "serve", "--config", str(config)], env=env
    )
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        await session.initialize()

        async def caller() -> None:
            for _ in range(calls):
                result = await session.call_tool("query", {"sql": QUERY})
                assert not result.is_error, result

        await asyncio.gather(*(session.call_tool("query", {"sql": QUERY}) for _ in range(clients)))
        return await measure(clients * calls, asyncio.gather(*(caller() for _ in range(clients))))


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--n", type=int, default=2000, help="token verifications per algorithm")
    parser.add_argument(
        "--clients", type=int, default=20, help="concurrent clients (HTTP) or callers (stdio)"
    )
    parser.add_argument("--calls", type=int, default=50, help="query calls per client")
    args = parser.parse_args()
    await prepare(args.url)
    idp = LocalIdP().start()
    try:
        await bench_verify(idp, args.n)
        stdio = await stdio_rate(idp, args.url, args.clients, args.calls)
        http = await http_rate(idp, args.url, args.clients, args.calls)
    finally:
        idp.stop()
    print(f"guarded query, {args.clients} concurrent callers, one stdio session: {stdio}")
    print(f"guarded query, {args.clients} concurrent clients, streamable HTTP:   {http}")
    print(
        f"HTTP/stdio: throughput {http.calls_per_s / stdio.calls_per_s:5.2f}x, "
        f"server CPU per call {http.server_ms_per_call / stdio.server_ms_per_call:5.2f}x "
        f"({os.cpu_count()} CPUs shared by server and clients)"
    )


if __name__ == "__main__":
    asyncio.run(main())
