"""Reviewers who decide with an OIDC token at a gateway: `mcp-guard approve | deny | pending | review
--server URL`, the gateway's reviewers' API, and the gateway-signed votes every server verifies."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest
from textual.widgets import DataTable

from mcp_guard.approvals import ApprovalState
from mcp_guard.identity import TokenSource
from mcp_guard.review.app import DecisionScreen, ReviewApp
from mcp_guard.review.desk import GatewayDesk
from mcp_guard.reviewers import GatewaySigner, Reviewer
from mcp_guard.store.base import AuditFilter, EventType
from mcp_guard.store.checkpoint import generate_key_file, public_key_text
from tests.approval_support import desk, settled
from tests.client import guard_client, guard_http_client, http_server
from tests.conftest import write_config
from tests.idp import AUDIENCE, LocalIdP
from tests.test_review_ui import type_text, until

REVIEW_AUDIENCE = "mcp-guard-review"
POLICY = """
[policy]
default = "deny"

[[policy.rules]]
name = "reads"
action = "allow"
kinds = ["read"]

[[policy.rules]]
name = "deletes-need-a-dba"
action = "approve"
kinds = ["write"]
approvers = ["dba"]
"""
DELETE = {"sql": "DELETE FROM orders WHERE id = 1", "reason": "duplicate order, customer asked"}


def gateway_config(
    home: Path, idp: LocalIdP, *, wait: float, trusted: list[str] | None = None, approvals: str = ""
) -> Path:
    """A gateway whose reviewers decide with tokens issued for their own audience."""
    from mcp_guard.demo.data import create_demo_database

    create_demo_database(home / "shop.db")
    key = generate_key_file(home / "audit-signing.key")
    keys = trusted if trusted is not None else [public_key_text(key.public_key())]
    return write_config(
        home,
        f'[identity]\nmode = "oidc"\nissuer = "{idp.issuer}"\naudience = "{AUDIENCE}"\n\n'
        f'[connections.shop]\nurl = "sqlite:///{home / "shop.db"}"\n{POLICY}\n'
        f"[approvals]\nwait = {wait}\ntoken_reviewers = true\n"
        f'token_audience = "{REVIEW_AUDIENCE}"\ngateway_keys = {json.dumps(keys)}\n{approvals}',
    )


@pytest.fixture(params=["streamable-http", "sse"])
def gateway(request, tmp_path, local_idp) -> Iterator[tuple[str, str, Path]]:
    """(transport, MCP URL, configuration) of a running gateway with token reviewers."""
    config = gateway_config(tmp_path, local_idp, wait=30)
    with http_server(config, tmp_path, request.param) as url:
        yield request.param, url, config


def reviewer_token(idp: LocalIdP, subject: str, groups: list[str], **changes: object) -> str:
    return idp.token(subject, groups, aud=REVIEW_AUDIENCE, **changes)


def as_reviewer(tmp_path: Path, url: str, token: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`mcp-guard ARGS --server URL --token-file F` on the reviewer's machine: no configuration, no store."""
    token_file = tmp_path / f"token-{abs(hash(token))}"
    token_file.write_text(token + "\n")
    home = tmp_path / "reviewer-home"
    home.mkdir(exist_ok=True)
    return subprocess.run(
        [sys.executable, "-m", "mcp_guard", *args, "--server", url, "--token-file", str(token_file)],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, "MCP_GUARD_HOME": str(home), "MCP_GUARD_CONFIG": "", "COLUMNS": "200"},
    )


def orders_left(config: Path) -> int:
    import sqlite3

    with sqlite3.connect(config.parent / "shop.db") as db:
        return int(db.execute("SELECT count(*) FROM orders WHERE id = 1").fetchone()[0])


async def held_delete(url: str, idp: LocalIdP) -> str:
    """Alice's DELETE, held for a dba: the request id the gateway answers with."""
    async with guard_http_client(url, "streamable-http", idp.token("alice", ["devs"])) as client:
        held = await client.call("execute", **DELETE)
    assert held.structured is not None, held.text
    return str(held.structured["request_id"])


async def next_pending(config: Path) -> str:
    async with desk(config) as reviewers:
        return (await reviewers.next_request()).id


async def test_a_reviewer_approves_with_a_token_and_the_waiting_call_runs(gateway, local_idp, tmp_path):
    transport, url, config = gateway
    alice = local_idp.token("alice", ["devs"])
    bob = reviewer_token(local_idp, "bob", ["dba"])
    async with guard_http_client(url, transport, alice) as client:
        call = asyncio.create_task(client.call("execute", **DELETE))
        request_id = await next_pending(config)
        listed = await asyncio.to_thread(as_reviewer, tmp_path, url, bob, "pending", "--json")
        approved = await asyncio.to_thread(
            as_reviewer, tmp_path, url, bob, "approve", request_id, "--comment", "checked the duplicate"
        )
        done = await settled(call)

    assert listed.returncode == 0, listed.stderr
    [shown] = json.loads(listed.stdout)
    assert shown["request_id"] == request_id and shown["requester"] == "alice"
    assert shown["statements"] == [DELETE["sql"]] and shown["reason"] == DELETE["reason"]
    assert approved.returncode == 0, approved.stderr
    assert (
        f"approved request {request_id}" in approved.stdout and "1 of 1 approvals from dba" in approved.stdout
    )
    assert not done.is_error, done.text  # type: ignore[attr-defined]
    assert orders_left(config) == 0

    async with desk(config) as reviewers:
        request = await reviewers.request(request_id)
        [vote] = await reviewers.store.query(AuditFilter(type=EventType.APPROVAL_VOTE))
    assert request.state is ApprovalState.EXECUTED
    assert [(v.reviewer, v.decision, v.reason) for v in request.votes] == [
        ("bob", "approve", "checked the duplicate")
    ]
    assert vote.event.identity == "bob" and vote.event.detail["proof"].startswith("gateway-ed25519:")
    audit_bytes = (config.parent / "audit.db").read_bytes()
    assert bob.encode() not in audit_bytes and bob.split(".")[2].encode() not in audit_bytes


async def test_a_vote_needs_a_recent_sign_in_when_token_max_age_is_set(tmp_path, local_idp):
    """Deciding is a step up (RFC 9470): a token whose holder signed in longer ago than
    `token_max_age` may still read, not vote; `auth_time` counts when the token carries it."""
    config = gateway_config(tmp_path, local_idp, wait=0.2, approvals="token_max_age = 600\n")
    now = int(time.time())
    stale = reviewer_token(local_idp, "bob", ["dba"], iat=now - 3600, auth_time=now - 3600)
    refreshed = reviewer_token(local_idp, "bob", ["dba"], auth_time=now - 3600)  # new token, old sign-in
    fresh = reviewer_token(local_idp, "bob", ["dba"], auth_time=now - 60)
    with http_server(config, tmp_path, "streamable-http") as url:
        request_id = await held_delete(url, local_idp)
        base = url.removesuffix("/mcp")
        async with httpx2.AsyncClient(base_url=base, timeout=30) as http:
            vote = await http.post(
                f"/approvals/{request_id}/vote",
                headers={"Authorization": f"Bearer {stale}"},
                json={"decision": "approve"},
            )
            listed = await http.get("/approvals", headers={"Authorization": f"Bearer {stale}"})
        again = as_reviewer(tmp_path, url, refreshed, "approve", request_id)
        approved = as_reviewer(tmp_path, url, fresh, "approve", request_id)

    challenge = vote.headers["www-authenticate"]
    assert vote.status_code == 401 and vote.json()["error"] == "insufficient_user_authentication"
    assert 'error="insufficient_user_authentication"' in challenge and 'max_age="600"' in challenge
    assert "this sign-in is 60 min" in vote.json()["error_description"]
    assert listed.status_code == 200 and [r["id"] for r in listed.json()["requests"]] == [request_id]
    assert again.returncode == 1 and "sign in again and retry" in again.stderr
    assert approved.returncode == 0, approved.stderr
    async with desk(config) as reviewers:
        request = await reviewers.request(request_id)
        failures = await reviewers.store.query(AuditFilter(type=EventType.AUTH_FAILURE))
    assert [(v.reviewer, v.decision) for v in request.votes] == [("bob", "approve")]
    assert sum("needs one within 10 min" in str(f.event.detail.get("reason")) for f in failures) == 2


async def test_the_tokens_groups_decide_who_may_vote(tmp_path, local_idp):
    config = gateway_config(tmp_path, local_idp, wait=0.2)
    with http_server(config, tmp_path, "streamable-http") as url:
        request_id = await held_delete(url, local_idp)
        carol = reviewer_token(local_idp, "carol", ["devs"])
        alice_dba = reviewer_token(local_idp, "alice", ["dba"])
        expired = reviewer_token(local_idp, "bob", ["dba"], exp=1_000_000, iat=999_000)
        assistant = local_idp.token("bob", ["dba"])  # issued for the MCP audience, not the reviewers'

        carol_sees = as_reviewer(tmp_path, url, carol, "pending", "--json")
        carol_votes = as_reviewer(tmp_path, url, carol, "approve", request_id)
        own = as_reviewer(tmp_path, url, alice_dba, "approve", request_id)
        late = as_reviewer(tmp_path, url, expired, "approve", request_id)
        wrong_audience = as_reviewer(tmp_path, url, assistant, "approve", request_id)
        no_reason = as_reviewer(
            tmp_path, url, reviewer_token(local_idp, "bob", ["dba"]), "deny", request_id, "--reason", " "
        )
        denied = as_reviewer(
            tmp_path,
            url,
            reviewer_token(local_idp, "bob", ["dba"]),
            "deny",
            request_id,
            "--reason",
            "not a duplicate",
        )

    assert carol_sees.returncode == 0 and json.loads(carol_sees.stdout) == []
    assert (
        carol_votes.returncode == 1
        and f"no approval request '{request_id}' you may see" in carol_votes.stderr
    )
    assert own.returncode == 1 and "nobody approves or denies their own request" in own.stderr
    assert late.returncode == 1 and "the gateway refused the token: the token expired" in late.stderr
    assert wrong_audience.returncode == 1 and f"does not include '{REVIEW_AUDIENCE}'" in wrong_audience.stderr
    assert no_reason.returncode == 2 and "--reason must say why" in no_reason.stderr
    assert denied.returncode == 0 and f"denied request {request_id}: not a duplicate" in denied.stdout
    assert orders_left(config) == 1

    async with desk(config) as reviewers:
        request = await reviewers.request(request_id)
        failures = await reviewers.store.query(AuditFilter(type=EventType.AUTH_FAILURE))
    assert request.state is ApprovalState.DENIED
    assert [(v.reviewer, v.decision) for v in request.votes] == [("bob", "deny")]
    reasons = " | ".join(
        str(f.event.detail.get("reason", "")) + f.event.detail.get("path", "") for f in failures
    )
    assert "expired" in reasons and "/approvals" in reasons


async def test_votes_count_only_when_a_trusted_gateway_signed_them(tmp_path, local_idp):
    """Someone who can write the store, with a key of their own or an edited proof, approves nothing."""
    config = gateway_config(tmp_path, local_idp, wait=0.2)
    with http_server(config, tmp_path, "streamable-http") as url:
        async with guard_http_client(url, "streamable-http", local_idp.token("alice", ["devs"])) as client:
            held = await client.call("execute", **DELETE)
            request_id = held.structured["request_id"]
            async with desk(config) as reviewers:
                intruder = generate_key_file(tmp_path / "intruder.key")
                mallory = Reviewer(name="mallory", subject="mallory", groups=frozenset({"dba"}), key=None)
                _, counted = await reviewers.approvals.vote(
                    request_id, GatewaySigner(mallory, intruder, {}), "approve", "", "intruder"
                )
            status = await client.call("approval_status", request_id=request_id)

    assert counted.state is ApprovalState.PENDING
    assert any("not trusted here (approvals.gateway_keys)" in why for why in counted.ignored)
    assert "NOT EXECUTED" in status.text and "0 of 1 approvals from dba" in status.text
    assert orders_left(config) == 1


async def test_a_vote_whose_vouched_groups_were_edited_does_not_count(tmp_path, local_idp):
    config = gateway_config(tmp_path, local_idp, wait=0.2)
    with http_server(config, tmp_path, "streamable-http") as url:
        request_id = await held_delete(url, local_idp)
        voted = as_reviewer(tmp_path, url, reviewer_token(local_idp, "bob", ["dba"]), "approve", request_id)
    assert voted.returncode == 0, voted.stderr

    from mcp_guard.reviewers import _b64, _unb64  # the proof's own encoding

    async with desk(config) as reviewers:
        [vote] = (await reviewers.request(request_id)).votes
        scheme, public, vouched, signature = vote.proof.split(":")
        claims = json.loads(_unb64(vouched))
        edited = ":".join(
            (scheme, public, _b64(json.dumps({**claims, "subject": "carol"}).encode()), signature)
        )
        verifier = reviewers.approvals.verifier
        assert verifier.verify("bob", vote.payload, vote.proof).groups == {"dba"}
        with pytest.raises(Exception, match="forged or altered"):
            verifier.verify("bob", vote.payload, edited)
        with pytest.raises(Exception, match="forged or altered"):
            verifier.verify("bob", vote.payload + b" ", vote.proof)


async def test_the_review_ui_decides_through_the_gateway_with_a_token(tmp_path, local_idp):
    config = gateway_config(tmp_path, local_idp, wait=30)
    token_file = tmp_path / "bob.token"
    token_file.write_text(reviewer_token(local_idp, "bob", ["dba"]))
    with http_server(config, tmp_path, "streamable-http") as url:
        async with guard_http_client(url, "streamable-http", local_idp.token("alice", ["devs"])) as client:
            call = asyncio.create_task(client.call("execute", **DELETE))
            request_id = await next_pending(config)
            async with GatewayDesk.open(url, TokenSource(file=token_file)) as gateway_desk:
                app = ReviewApp(gateway_desk)
                async with app.run_test(size=(140, 45)) as pilot:
                    table = app.query_one("#pending", DataTable)
                    await until(pilot, lambda: table.row_count == 1, "the pending request")
                    assert "bob" in app.sub_title and "dba" in app.sub_title
                    await pilot.press("a")
                    await until(pilot, lambda: isinstance(app.screen, DecisionScreen), "the decision dialog")
                    assert not app.query("#passphrase")  # a token needs no passphrase
                    await until(
                        pilot, lambda: getattr(app.focused, "id", None) == "text", "the comment field"
                    )
                    await type_text(pilot, "ok by me")
                    await pilot.press("enter")
                    await until(pilot, lambda: table.row_count == 0, "the request leaving the list")
            done = await settled(call)
    assert not done.is_error, done.text  # type: ignore[attr-defined]
    assert orders_left(config) == 0
    async with desk(config) as reviewers:
        assert (await reviewers.request(request_id)).state is ApprovalState.EXECUTED


async def test_the_reviewers_api_refuses_bad_requests_and_keeps_serving(tmp_path, local_idp):
    config = gateway_config(tmp_path, local_idp, wait=0.2)
    bob = reviewer_token(local_idp, "bob", ["dba"])
    with http_server(config, tmp_path, "streamable-http") as url:
        base = url.removesuffix("/mcp")
        request_id = await held_delete(url, local_idp)
        auth = {"Authorization": f"Bearer {bob}"}
        async with httpx2.AsyncClient(base_url=base, timeout=30) as http:
            anonymous = await http.get("/approvals")
            not_json = await http.post(f"/approvals/{request_id}/vote", headers=auth, content=b"approve!")
            bad_decision = await http.post(
                f"/approvals/{request_id}/vote", headers=auth, json={"decision": "yes"}
            )
            huge = await http.post(
                f"/approvals/{request_id}/vote",
                headers=auth,
                json={"decision": "deny", "reason": "x" * 40_000},
            )
            unknown = await http.get("/approvals/nosuchid", headers=auth)
            bad_state = await http.get("/approvals", headers=auth, params={"state": "everything"})
            changes = await http.get("/approvals/changes", headers=auth, params={"wait": "0.2"})
            still = await http.get("/approvals", headers=auth)

    assert anonymous.status_code == 401 and "Bearer" in anonymous.headers["www-authenticate"]
    assert not_json.status_code == 400 and "a vote is a JSON object" in not_json.json()["error"]
    assert bad_decision.status_code == 400 and '"approve" or "deny"' in bad_decision.json()["error"]
    assert huge.status_code == 400 and "at most 16384 bytes" in huge.json()["error"]
    assert unknown.status_code == 404 and "no approval request 'nosuchid'" in unknown.json()["error"]
    assert bad_state.status_code == 400 and "state must be one of" in bad_state.json()["error"]
    assert changes.status_code == 200 and changes.json() == {"changed": False}
    assert still.status_code == 200 and [r["id"] for r in still.json()["requests"]] == [request_id]
    assert still.json()["requests"][0]["why_not"] is None


def test_a_gateway_whose_own_key_is_not_trusted_refuses_to_start(tmp_path, local_idp):
    config = gateway_config(tmp_path, local_idp, wait=1, trusted=[])
    own = public_key_text(generate_key_file(tmp_path / "elsewhere.key").public_key())
    config.write_text(config.read_text().replace("gateway_keys = []", f'gateway_keys = ["{own}"]'))
    started = subprocess.run(
        [
            sys.executable,
            "-m",
            "mcp_guard",
            "serve",
            "--config",
            str(config),
            "--transport",
            "streamable-http",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "MCP_GUARD_HOME": str(tmp_path), "MCP_GUARD_CONFIG": ""},
    )
    key = (tmp_path / "audit-signing.key").read_text().split("public key: ")[1].split()[0]
    assert started.returncode == 2
    assert (
        "which is not in approvals.gateway_keys" in started.stderr
        and f'gateway_keys = ["{key}"]' in started.stderr
    )


def test_token_reviewers_need_oidc(tmp_path):
    config = write_config(
        tmp_path, '[connections.shop]\nurl = "sqlite:///x.db"\n[approvals]\ntoken_reviewers = true\n'
    )
    checked = subprocess.run(
        [sys.executable, "-m", "mcp_guard", "check", "SELECT 1", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert checked.returncode == 2 and 'token_reviewers needs [identity] mode = "oidc"' in checked.stderr


async def test_a_stdio_server_sharing_the_store_runs_what_a_token_reviewer_approved_at_the_gateway(
    tmp_path, local_idp
):
    """The usual team: the assistant's own stdio server (local mode), a gateway where reviewers sign
    in, one store. The stdio server never sees a token; it trusts the gateway's key."""
    gateway_home, laptop_home = tmp_path / "gateway", tmp_path / "laptop"
    gateway_home.mkdir()
    laptop_home.mkdir()
    gateway = gateway_config(gateway_home, local_idp, wait=1)
    [trusted] = json.loads(gateway.read_text().split("gateway_keys = ")[1].splitlines()[0])
    laptop = write_config(
        laptop_home,
        f'[connections.shop]\nurl = "sqlite:///{gateway_home / "shop.db"}"\n{POLICY}\n'
        f'[approvals]\nwait = 30\ngateway_keys = ["{trusted}"]\n',
    )
    laptop.write_text(
        laptop.read_text().replace(str(laptop_home / "audit.db"), str(gateway_home / "audit.db"))
    )
    bob = reviewer_token(local_idp, "bob", ["dba"])
    with http_server(gateway, gateway_home, "streamable-http") as url:
        async with guard_client(laptop, laptop_home) as client:
            call = asyncio.create_task(client.call("execute", **DELETE))
            request_id = await next_pending(gateway)
            approved = await asyncio.to_thread(as_reviewer, tmp_path, url, bob, "approve", request_id)
            done = await settled(call)
    assert approved.returncode == 0, approved.stderr
    assert not done.is_error, done.text  # type: ignore[attr-defined]
    assert orders_left(gateway) == 0


@pytest.mark.parametrize(
    ("server", "token", "message"),
    [
        (
            "http://gw.example.com",
            "x.y.z",
            "would send your token unencrypted: use the gateway's https:// URL",
        ),
        ("ftp://gw.example.com", "x.y.z", "--server must be the gateway's http(s):// URL"),
        ("http://127.0.0.1:9", "", "give --token-file FILE or set MCP_GUARD_TOKEN"),
        ("http://127.0.0.1:9", "x.y.z", "cannot reach the gateway at http://127.0.0.1:9"),
    ],
)
def test_the_reviewers_commands_refuse_a_gateway_they_cannot_use_safely(tmp_path, server, token, message):
    arguments = [sys.executable, "-m", "mcp_guard", "pending", "--server", server]
    if token:
        (tmp_path / "token").write_text(token)
        arguments += ["--token-file", str(tmp_path / "token")]
    done = subprocess.run(
        arguments,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "MCP_GUARD_TOKEN": "", "MCP_GUARD_HOME": str(tmp_path)},
    )
    assert done.returncode == 2 and message in done.stderr
