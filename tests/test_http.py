"""SSE and streamable HTTP: each request carries a token; each caller gets its own identity and decisions."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from mcp.client.session import ClientSession
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client

from mcp_guard.identity import token_fingerprint
from mcp_guard.store import open_store
from mcp_guard.store.base import AuditFilter, AuditRecord, EventType
from tests.client import guard_http_client, http_server
from tests.conftest import write_config
from tests.idp import AUDIENCE, LocalIdP
from tests.test_identity import BAD_TOKENS

POLICY = """
[policy]
default = "deny"

[[policy.rules]]
name = "finance-is-for-analysts"
action = "deny"
connections = ["finance"]
groups = ["support"]
message = "finance data is for analysts"

[[policy.rules]]
name = "support-no-payments"
action = "deny"
tables = ["payments"]
groups = ["support"]
message = "support may not read payments"

[[policy.rules]]
name = "team-reads"
action = "allow"
kinds = ["read"]
groups = ["analysts", "support"]
"""


def oidc_config(tmp_path: Path, idp: LocalIdP, shop: Path) -> Path:
    finance = tmp_path / "finance.db"
    shutil.copy(shop, finance)
    return write_config(
        tmp_path,
        f'[identity]\nmode = "oidc"\nissuer = "{idp.issuer}"\naudience = "{AUDIENCE}"\n\n'
        f'[connections.shop]\nurl = "sqlite:///{shop}"\n\n'
        f'[connections.finance]\nurl = "sqlite:///{finance}"\n{POLICY}',
    )


@pytest.fixture(scope="module", params=["streamable-http", "sse"])
def server(request, tmp_path_factory, local_idp) -> Iterator[tuple[str, str, Path]]:
    """One server per transport for the module: (transport, URL, audit database)."""
    from mcp_guard.demo.data import create_demo_database

    home = tmp_path_factory.mktemp(request.param)
    create_demo_database(home / "shop.db")
    with http_server(oidc_config(home, local_idp, home / "shop.db"), home, request.param) as url:
        yield request.param, url, home / "audit.db"


async def audit(database: Path, **fields: Any) -> list[AuditRecord]:
    store = open_store(f"sqlite:///{database}")
    await store.open()
    try:
        return await store.query(AuditFilter(**fields))
    finally:
        await store.close()


async def eventually(database: Path, check: Any, **fields: Any) -> list[AuditRecord]:
    """Audit records written by the server after the client moved on (a session's end)."""
    with anyio.fail_after(10):
        while not check(records := await audit(database, **fields)):
            await asyncio.sleep(0.05)
    return records


async def test_two_identities_get_their_own_decisions_in_one_run(server, local_idp):
    transport, url, database = server
    alice = local_idp.token("alice", ["analysts"])
    bob = local_idp.token("bob", ["support"], kid="ec-1")
    payments = "SELECT count(*) AS n FROM payments"
    async with (
        guard_http_client(url, transport, alice, name="alice-client") as as_alice,
        guard_http_client(url, transport, bob, name="bob-client") as as_bob,
    ):
        alice_sees, bob_sees = await asyncio.gather(
            as_alice.call("list_connections"), as_bob.call("list_connections")
        )
        alice_reads, bob_reads = await asyncio.gather(
            as_alice.call("query", connection="shop", sql=payments),
            as_bob.call("query", connection="shop", sql=payments),
        )
        bob_finance = await as_bob.call("query", connection="finance", sql="SELECT 1")
        bob_orders = await as_bob.call("query", connection="shop", sql="SELECT count(*) FROM orders")

    assert [c["name"] for c in alice_sees.structured["connections"]] == ["shop", "finance"]
    assert [c["name"] for c in bob_sees.structured["connections"]] == ["shop"]
    assert not alice_reads.is_error and alice_reads.structured["rows"][0][0] > 0
    assert bob_reads.is_error and "support-no-payments" in bob_reads.text
    assert bob_finance.is_error and "finance-is-for-analysts" in bob_finance.text
    assert not bob_orders.is_error

    outcomes = await audit(database, type=EventType.OUTCOME)
    by_call = {r.event.detail["response"]["text"]: r.event for r in outcomes}
    assert by_call[alice_reads.text].identity == "alice" and by_call[alice_reads.text].decision == "allow"
    assert by_call[bob_reads.text].identity == "bob" and by_call[bob_reads.text].decision == "deny"


async def test_each_session_is_recorded_with_its_identity_client_and_transport(server, local_idp):
    transport, url, database = server
    token = local_idp.token("carol", ["analysts"], email="carol@corp.example")
    async with guard_http_client(url, transport, token, name="carol-client") as client:
        reply = await client.call("query", connection="shop", sql="SELECT 1 AS one")
    assert not reply.is_error, reply.text
    starts = await audit(database, type=EventType.SESSION_START, identity="carol")
    assert len(starts) == 1
    start = starts[0].event
    assert start.detail["transport"] == transport
    assert start.detail["client"] == "carol-client/1"
    assert start.detail["identity"] == {
        "subject": "carol",
        "groups": ["analysts"],
        "source": "oidc",
        "issuer": local_idp.issuer,
        "email": "carol@corp.example",
        "username": "carol",
        "expires_at": start.detail["identity"]["expires_at"],
        "authenticated_at": start.detail["identity"]["authenticated_at"],
    }
    assert start.detail["identity"]["expires_at"] > start.detail["identity"]["authenticated_at"]
    calls = await audit(database, session_id=start.session_id, type=EventType.REQUEST)
    assert [r.event.identity for r in calls] == ["carol"]
    ends = await eventually(database, bool, session_id=start.session_id, type=EventType.SESSION_END)
    assert ends[0].event.identity == "carol"


async def test_a_request_without_a_token_gets_401_with_the_metadata_header(server, local_idp):
    transport, url, database = server
    async with httpx2.AsyncClient(timeout=10) as http:
        if transport == "sse":
            answer = await http.get(url)
        else:
            answer = await http.post(url, json={"jsonrpc": "2.0", "id": 1, "method": "ping"})
        assert answer.status_code == 401
        challenge = answer.headers["www-authenticate"]
        assert challenge.startswith("Bearer ")
        assert 'error_description="the request carries no bearer token' in challenge
        metadata_url = challenge.split('resource_metadata="')[1].split('"')[0]
        assert metadata_url.endswith("/.well-known/oauth-protected-resource" + url[url.rindex("/") :])
        metadata = (await http.get(metadata_url)).json()
    assert metadata["resource"] == url
    assert [server.rstrip("/") for server in metadata["authorization_servers"]] == [local_idp.issuer]
    failures = await audit(database, type=EventType.AUTH_FAILURE)
    assert any(f.event.detail["reason"].startswith("the request carries no bearer token") for f in failures)


@pytest.mark.parametrize(("case", "make", "reason"), BAD_TOKENS, ids=[case for case, _, _ in BAD_TOKENS])
async def test_a_bad_token_gets_401_with_its_reason_and_is_audited(server, local_idp, case, make, reason):
    transport, url, database = server
    token = make(local_idp)
    async with httpx2.AsyncClient(timeout=10, headers={"Authorization": f"Bearer {token}"}) as http:
        if transport == "sse":
            answer = await http.get(url)
        else:
            answer = await http.post(url, json={"jsonrpc": "2.0", "id": 1, "method": "ping"})
    assert answer.status_code == 401
    assert reason.replace('"', "'") in answer.headers["www-authenticate"]
    assert reason in answer.json()["error_description"]
    failures = await audit(database, type=EventType.AUTH_FAILURE)
    mine = [f for f in failures if f.event.detail.get("token_sha256") == token_fingerprint(token)]
    assert len(mine) == 1
    assert reason in mine[0].event.detail["reason"]
    assert mine[0].event.identity == "unauthenticated" and mine[0].event.decision == "deny"
    assert token not in database.read_bytes().decode("utf-8", "replace")


async def test_stopping_the_server_ends_the_sessions_still_open(tmp_path, local_idp, sqlite_shop):
    opened = asyncio.Event()

    async def hold_a_session_open(url: str) -> None:
        async with guard_http_client(url, "streamable-http", local_idp.token("dana", ["analysts"])) as client:
            await client.call("list_connections")
            opened.set()
            await asyncio.Event().wait()

    with http_server(oidc_config(tmp_path, local_idp, sqlite_shop), tmp_path, "streamable-http") as url:
        holder = asyncio.create_task(hold_a_session_open(url))
        with anyio.fail_after(10):
            await opened.wait()
    holder.cancel()
    with contextlib.suppress(BaseException):
        await holder
    kinds = [r.event.type for r in await audit(tmp_path / "audit.db") if r.event.identity == "dana"]
    assert kinds == [EventType.SESSION_START, EventType.REQUEST, EventType.OUTCOME, EventType.SESSION_END]


async def test_a_request_of_the_sessionless_2026_protocol_is_a_session_of_its_own(server, local_idp):
    transport, url, database = server
    headers = {"Authorization": f"Bearer {local_idp.token('frank', ['analysts'])}"}
    async with httpx2.AsyncClient(headers=headers, timeout=30) as http:
        streams = (
            sse_client(url, headers=headers)
            if transport == "sse"
            else streamable_http_client(url, http_client=http)
        )
        async with streams as (read, write), ClientSession(read, write) as session:
            await session.discover()
            for _ in range(2):
                assert not (
                    await session.call_tool("query", {"connection": "shop", "sql": "SELECT 1"})
                ).is_error
    records = await eventually(database, lambda found: len(found) == 8, identity="frank")
    sessions = [r.event.session_id for r in records]
    assert [r.event.type for r in records] == [
        EventType.SESSION_START,
        EventType.REQUEST,
        EventType.OUTCOME,
        EventType.SESSION_END,
    ] * 2
    assert sessions[0] == sessions[3] != sessions[4] == sessions[7]


async def test_masks_follow_the_groups_in_each_callers_token(tmp_path, local_idp, sqlite_shop):
    """One server, two callers at once: the analyst sees clear emails, support sees them masked."""
    masking = (
        '\n[[masking.rules]]\nname = "emails"\ncolumns = ["customers.email"]\nstrategy = "redact"\n'
        'except_groups = ["analysts"]\n'
    )
    config = oidc_config(tmp_path, local_idp, sqlite_shop)
    config.write_text(config.read_text().replace("\n[policy]", f"{masking}\n[policy]", 1))
    sql = "SELECT email AS contact FROM customers WHERE id = 1"
    with http_server(config, tmp_path, "streamable-http") as url:
        async with (
            guard_http_client(url, "streamable-http", local_idp.token("alice", ["analysts"])) as alice,
            guard_http_client(url, "streamable-http", local_idp.token("bob", ["support"])) as bob,
        ):
            clear, masked = await asyncio.gather(
                alice.call("query", connection="shop", sql=sql), bob.call("query", connection="shop", sql=sql)
            )
    assert not clear.is_error and not masked.is_error, (clear.text, masked.text)
    with sqlite3.connect(sqlite_shop) as db:
        (email,) = db.execute("SELECT email FROM customers WHERE id = 1").fetchone()
    db.close()
    assert clear.structured["rows"] == [[email]]
    assert email not in masked.text and "@" not in masked.structured["rows"][0][0]
    assert masked.structured["masked_columns"] and not clear.structured["masked_columns"]


async def test_connections_the_server_accepts_send_without_delay():
    """Nagle off on each accepted connection: a kept-alive client otherwise waits ~40 ms per answer."""
    import socket

    from mcp_guard.server import listen

    accepted: list[int] = []

    def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        writer.close()

    server = await asyncio.start_server(on_connect, sock=listen("127.0.0.1", 0))
    async with server:
        port = server.sockets[0].getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        with anyio.fail_after(5):
            while not accepted:
                await asyncio.sleep(0.01)
        writer.close()
        await writer.wait_closed()
    assert accepted == [1]
