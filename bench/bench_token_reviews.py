"""A reviewer's vote with a token at a gateway, as a ratio against a passphrase vote on the store.

    python bench/bench_token_reviews.py [--n 40]

Starts a gateway (`mcp-guard serve --transport streamable-http`, SQLite store, development issuer),
holds `--n` DELETEs made over MCP by one identity, and decides them in turn two ways, alternating
so that both see the same load:
- through the gateway: `GatewayDesk.vote`, an HTTP request whose token the gateway verifies, whose
  reviewer checks it runs, whose vote it signs with its key and records (what `mcp-guard approve
  --server` does after start-up);
- on the store: `Approvals.vote` with a passphrase reviewer's key already derived, in this process
  (what `mcp-guard approve` does after the passphrase).
Also the reviewer's listing of pending requests both ways. The process start-up and the scrypt
derivation are left out of both: they are per command, not per vote.

Measured here (2 CPUs, a helper's benchmarks beside it): vote 10.8 ms p50 through the gateway against
5.1 ms on the store (2.1x); listing 9.3 against 1.5 ms. Before the listening socket was made as TCP
(server.listen: Nagle was on for accepted connections), every request on the kept-alive connection
waited ~40 ms more: the vote was 49.9 ms (12.8x).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx2  # noqa: E402
from mcp.client.session import ClientSession  # noqa: E402
from mcp.client.streamable_http import streamable_http_client  # noqa: E402

from mcp_guard.approvals import ApprovalState  # noqa: E402
from mcp_guard.config import load_config  # noqa: E402
from mcp_guard.demo.data import create_demo_database  # noqa: E402
from mcp_guard.devtoken import dev_issuer, mint_dev_token  # noqa: E402
from mcp_guard.identity import TokenSource  # noqa: E402
from mcp_guard.review.desk import GatewayDesk  # noqa: E402
from mcp_guard.reviewers import MIN_COST, enroll, unlock  # noqa: E402
from mcp_guard.store import open_store  # noqa: E402
from mcp_guard.store.checkpoint import generate_key_file, public_key_text  # noqa: E402

PASSPHRASE = "rita-bench-passphrase"
POLICY = """
[policy]
default = "deny"

[[policy.rules]]
name = "deletes-need-a-dba"
action = "approve"
kinds = ["write"]
approvers = ["dba"]
ttl = 3600
"""


def write_config(home: Path) -> Path:
    issuer = dev_issuer(home)
    create_demo_database(home / "shop.db")
    key = public_key_text(generate_key_file(home / "audit-signing.key").public_key())
    config = home / "gateway.toml"
    config.write_text(
        f'[audit]\nurl = "sqlite:///{home / "audit.db"}"\n\n{issuer.config_snippet("mcp-guard")}\n'
        f'[connections.shop]\nurl = "sqlite:///{home / "shop.db"}"\n{POLICY}\n'
        f'[approvals]\nwait = 0\ntoken_reviewers = true\ngateway_keys = ["{key}"]\n\n'
        f'[approvals.reviewers.rita]\nkey = "{enroll(PASSPHRASE, MIN_COST)}"\ngroups = ["dba"]\n'
    )
    return config


def start_gateway(config: Path, home: Path) -> tuple[subprocess.Popen[bytes], str]:
    log = home / "gateway.stderr"
    environment = {**os.environ, "MCP_GUARD_HOME": str(home), "MCP_GUARD_CONFIG": ""}
    with open(log, "w") as errors:
        process = subprocess.Popen(
            [sys.executable, "-m", "mcp_guard", "serve", "--config", str(config)]
            + ["--transport", "streamable-http", "--port", "0"],
            env=environment,
            stdin=subprocess.DEVNULL,
            stderr=errors,
        )
    deadline = time.monotonic() + 30
    while not (found := re.search(r"serving \S+ at (\S+),", log.read_text())):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the gateway did not start:\n{log.read_text()}")
        time.sleep(0.05)
    return process, found.group(1)


async def hold(url: str, token: str, n: int) -> list[str]:
    """`n` held DELETEs by alice; their request ids."""
    held = []
    async with (
        httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=30) as http,
        streamable_http_client(url, http_client=http) as (read, write, *_),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        for index in range(n):
            result = await session.call_tool(
                "execute", {"sql": f"DELETE FROM orders WHERE id = {index + 1}", "reason": "bench"}
            )
            assert result.structured_content is not None, result.content
            held.append(str(result.structured_content["request_id"]))
    return held


def p50_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=40)
    n = parser.parse_args().n
    with tempfile.TemporaryDirectory() as folder:
        home = Path(folder)
        config_path = write_config(home)
        process, url = start_gateway(config_path, home)
        try:
            issuer = dev_issuer(home)
            alice = mint_dev_token(issuer, subject="alice", groups=("devs",))
            token_file = home / "bob.token"
            token_file.write_text(mint_dev_token(issuer, subject="bob", groups=("dba",)))
            requests = await hold(url, alice, 2 * n)
            config = load_config(config_path)
            store = open_store(config.audit_url)
            await store.open()
            from mcp_guard.approvals import Approvals

            approvals = Approvals(store, config.settings.approvals.verifier())
            rita = config.settings.approvals.verifier().reviewer("rita")
            assert rita is not None
            signer = unlock(rita, PASSPHRASE)
            gateway_votes: list[float] = []
            store_votes: list[float] = []
            gateway_lists: list[float] = []
            store_lists: list[float] = []
            from mcp_guard.approvals import Actor

            actor = Actor("rita", "bench")
            async with GatewayDesk.open(url, TokenSource(file=token_file)) as desk:
                for index in range(n):
                    started = time.perf_counter()
                    await desk.listing([ApprovalState.PENDING])
                    gateway_lists.append(time.perf_counter() - started)
                    started = time.perf_counter()
                    await approvals.listing(actor, [ApprovalState.PENDING])
                    store_lists.append(time.perf_counter() - started)
                    started = time.perf_counter()
                    decided, _ = await desk.vote(requests[2 * index], "deny", "bench")
                    gateway_votes.append(time.perf_counter() - started)
                    assert decided.state is ApprovalState.DENIED
                    started = time.perf_counter()
                    decided, _ = await approvals.vote(
                        requests[2 * index + 1], signer, "deny", "bench", "bench"
                    )
                    store_votes.append(time.perf_counter() - started)
                    assert decided.state is ApprovalState.DENIED
            await store.close()
        finally:
            process.terminate()
            process.wait(timeout=15)
    print(f"{n} votes each way, alternating")
    show("vote", "gateway with a token", gateway_votes, "store with a key", store_votes)
    show("listing", "gateway with a token", gateway_lists, "store", store_lists)


def show(what: str, name: str, samples: list[float], baseline_name: str, baseline: list[float]) -> None:
    ratio = statistics.median(samples) / statistics.median(baseline)
    print(
        f"{what + ':':9}{name} {p50_ms(samples):7.2f} ms p50, "
        f"{baseline_name} {p50_ms(baseline):7.2f} ms p50: ratio {ratio:.2f}"
    )

if __name__ == "__main__":
    asyncio.run(main())
