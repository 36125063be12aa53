"""OIDC over stdio: the token comes from a file or an environment variable, checked at start and again."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from mcp_guard.config import IdentitySettings
from mcp_guard.identity import OidcVerifier, StdioCaller, TokenSource
from mcp_guard.store.base import EventType
from tests.client import guard_client
from tests.conftest import write_config
from tests.idp import AUDIENCE, LocalIdP
from tests.test_http import audit

POLICY = """
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
PAYMENTS = "SELECT count(*) FROM payments"


def stdio_config(tmp_path: Path, idp: LocalIdP, shop: Path, source: str) -> Path:
    return write_config(
        tmp_path,
        f'[identity]\nmode = "oidc"\nissuer = "{idp.issuer}"\naudience = "{AUDIENCE}"\n{source}\n\n'
        f'[connections.shop]\nurl = "sqlite:///{shop}"\n{POLICY}',
    )


async def test_a_token_file_names_the_caller_and_a_refreshed_file_is_picked_up(
    tmp_path, sqlite_shop, local_idp
):
    token_file = tmp_path / "token"
    token_file.write_text(local_idp.token("alice", ["analysts"]) + "\n")
    config = stdio_config(tmp_path, local_idp, sqlite_shop, f'token_file = "{token_file}"')
    async with guard_client(config, tmp_path) as client:
        as_analyst = await client.call("query", sql=PAYMENTS)
        token_file.write_text(local_idp.token("alice", ["support"]))  # the login helper refreshed it
        as_support = await client.call("query", sql=PAYMENTS)
        token_file.write_text(local_idp.token("mallory", ["analysts"]))
        as_someone_else = await client.call("query", sql=PAYMENTS)
    assert not as_analyst.is_error, as_analyst.text
    assert as_support.is_error and "support-no-payments" in as_support.text
    assert as_someone_else.is_error
    assert "this session belongs to alice; the token now names mallory" in as_someone_else.text

    database = tmp_path / "audit.db"
    [start] = await audit(database, type=EventType.SESSION_START)
    assert start.event.identity == "alice" and start.event.detail["transport"] == "stdio"
    assert start.event.detail["identity"]["groups"] == ["analysts"]
    requests = await audit(database, type=EventType.REQUEST)
    assert [(r.event.identity, r.event.detail["groups"]) for r in requests] == [
        ("alice", ["analysts"]),
        ("alice", ["support"]),
    ]
    [refused] = await audit(database, type=EventType.AUTH_FAILURE)
    assert refused.event.session_id == start.event.session_id and refused.event.tool == "query"


async def test_an_expired_token_refuses_calls_until_the_file_is_refreshed(tmp_path, sqlite_shop, local_idp):
    token_file = tmp_path / "token"
    expired = local_idp.token("alice", ["analysts"], exp=int(time.time()) - 600)
    token_file.write_text(expired)
    config = stdio_config(tmp_path, local_idp, sqlite_shop, f'token_file = "{token_file}"')
    async with guard_client(config, tmp_path) as client:
        refused = await client.call("list_connections")
        token_file.write_text(local_idp.token("alice", ["analysts"]))
        accepted = await client.call("list_connections")
    assert refused.is_error
    assert refused.text.startswith("Not authenticated: the token expired at ")
    assert f"(token from the file {token_file})" in refused.text
    assert not accepted.is_error and accepted.structured["connections"][0]["name"] == "shop"
    assert (
        "calls are refused until the token is replaced: the token expired"
        in (tmp_path / "server.stderr").read_text()
    )

    failures = await audit(tmp_path / "audit.db", type=EventType.AUTH_FAILURE)
    assert [(f.event.tool, f.event.detail["transport"]) for f in failures] == [
        (None, "stdio"),
        ("list_connections", "stdio"),
    ]
    assert all("the token expired at" in f.event.detail["reason"] for f in failures)
    assert expired not in (tmp_path / "audit.db").read_bytes().decode("utf-8", "replace")


async def test_a_token_can_come_from_an_environment_variable(tmp_path, sqlite_shop, local_idp):
    config = stdio_config(tmp_path, local_idp, sqlite_shop, 'token_env = "SHOP_TOKEN"')
    async with guard_client(config, tmp_path, SHOP_TOKEN=local_idp.token("erin", ["support"])) as client:
        reply = await client.call("query", sql=PAYMENTS)
    assert reply.is_error and "support-no-payments" in reply.text


async def test_the_token_is_verified_again_when_it_expires(local_idp):
    settings = IdentitySettings(mode="oidc", issuer=local_idp.issuer, audience=AUDIENCE, token_env="T_TOKEN")
    verifier = OidcVerifier(settings)
    now = [time.time()]
    caller = StdioCaller(verifier, TokenSource.of(settings), clock=lambda: now[0])
    try:
        os.environ["T_TOKEN"] = local_idp.token("alice", ["analysts"], exp=int(now[0]) + 120)
        assert (await caller()).subject == "alice"
        os.environ["T_TOKEN"] = local_idp.token("bob", ["analysts"])
        assert (await caller()).subject == "alice"  # still valid: not read again
        now[0] += 121
        assert (await caller()).subject == "bob"
    finally:
        os.environ.pop("T_TOKEN", None)
        await verifier.aclose()


def run_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mcp_guard", *args],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "MCP_GUARD_HOME": str(tmp_path), "MCP_GUARD_CONFIG": ""},
    )


def test_oidc_over_stdio_without_a_token_source_exits_2(tmp_path, sqlite_shop, local_idp):
    done = run_cli(tmp_path, "serve", "--config", str(stdio_config(tmp_path, local_idp, sqlite_shop, "")))
    assert done.returncode == 2
    assert "name the token with token_env or token_file" in done.stderr


def test_http_transports_refuse_local_mode(tmp_path, sqlite_shop):
    config = write_config(tmp_path, f'[connections.shop]\nurl = "sqlite:///{sqlite_shop}"\n')
    done = run_cli(tmp_path, "serve", "--config", str(config), "--transport", "streamable-http")
    assert done.returncode == 2
    assert 'needs [identity] mode = "oidc"' in done.stderr
