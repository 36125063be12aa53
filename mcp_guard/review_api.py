"""The reviewers' API on an HTTP gateway: deciding held requests with an OIDC token.

    GET  /approvals/me                       who the token says the reviewer is
    GET  /approvals?state=pending&limit=N    requests the reviewer may see, newest first
    GET  /approvals/changes?wait=S           answers when requests change, or after S seconds
    GET  /approvals/{id}                     one request
    POST /approvals/{id}/vote                {"decision": "approve" | "deny", "reason": "..."}

Each request carries `Authorization: Bearer <token>`, checked like an MCP client's token (signature,
issuer, expiry, groups) but for the reviewers' audience (`approvals.token_audience`). A reviewer sees
the requests whose approver groups they are in, and their own. The gateway signs each vote with its
key, vouching for the token's subject and groups (`reviewers.GatewaySigner`); the token is not kept.
These are plain HTTP routes, not MCP tools: an assistant using the gateway's tools never sees them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from mcp_guard.approvals import DECIDED, Actor, ApprovalRequest, Approvals, ApprovalState, json_strings
from mcp_guard.config import Config
from mcp_guard.errors import ApprovalError, AuditError, ConfigError, UsageError
from mcp_guard.identity import Identity, token_fingerprint
from mcp_guard.reviewers import GatewaySigner, Reviewer
from mcp_guard.store.checkpoint import load_signing_key, parse_public_key, public_key_text
from mcp_guard.values import JsonValue

log = logging.getLogger(__name__)

Authenticate = Callable[[str, float | None], Awaitable[Identity | None]]
"""A bearer token's identity, or None when it is refused (the refusal is recorded and explained);
the second argument, when set, is how long ago its holder may have signed in at most."""

MAX_BODY = 16_384
MAX_REASON = 2_000
MAX_WAIT_S = 30.0
MAX_LIMIT = 500
_STATES = {
    "pending": [ApprovalState.PENDING],
    "decided": DECIDED,
    "all": None,
}


class _NotFound(Exception):
    pass


def gateway_key(config: Config) -> Ed25519PrivateKey:
    """The key this gateway signs reviewers' votes with: its audit signing key, which must be among
    `approvals.gateway_keys`, so that trusting it is written down in the configuration, not implied."""
    key = load_signing_key(config.signing_key_path, create=True)
    if key is None:
        raise ConfigError(
            "approvals.token_reviewers needs the gateway's signing key", key="audit.signing_key_file"
        )
    own = public_key_text(key.public_key())
    listed = {
        public_key_text(parse_public_key(text, "approvals.gateway_keys"))
        for text in config.settings.approvals.gateway_keys
    }
    if own not in listed:
        raise ConfigError(
            f"approvals.token_reviewers: this gateway signs reviewers' votes with the key {own}, which is "
            f'not in approvals.gateway_keys, so its votes would not count; add it: gateway_keys = ["{own}"]',
            file=config.source,
            key="approvals.gateway_keys",
        )
    return key


def _reviewer(identity: Identity) -> Reviewer:
    return Reviewer(name=identity.subject, subject=identity.subject, groups=identity.groups, key=None)


def _visible(request: ApprovalRequest, identity: Identity) -> bool:
    approvers = {group for requirement in request.requirements for group in requirement.approvers}
    return request.requester == identity.subject or bool(approvers & identity.groups)


class ReviewApi:
    """The routes, over the gateway's own approval lifecycle and store."""

    def __init__(
        self,
        approvals: Approvals,
        authenticate: Authenticate,
        key: Ed25519PrivateKey,
        *,
        max_age: float | None = None,
    ) -> None:
        self.approvals = approvals
        self.authenticate = authenticate
        self.key = key
        self.max_age = max_age
        """How recent a sign-in a vote needs (`approvals.token_max_age`); listing and reading do not."""

    def routes(self) -> list[tuple[str, list[str], Callable[[Request], Awaitable[Response]]]]:
        """(path, methods, handler), most specific first."""
        return [
            ("/approvals/me", ["GET"], self.me),
            ("/approvals/changes", ["GET"], self.changes),
            ("/approvals/{request_id}/vote", ["POST"], self.vote),
            ("/approvals/{request_id}", ["GET"], self.one),
            ("/approvals", ["GET"], self.listing),
        ]

    async def me(self, request: Request) -> Response:
        async def act(identity: Identity, _token: str) -> JsonValue:
            return {"reviewer": self._whoami(identity)}

        return await self._answer(request, act)

    async def listing(self, request: Request) -> Response:
        async def act(identity: Identity, token: str) -> JsonValue:
            state = request.query_params.get("state", "pending")
            if state not in _STATES:
                raise UsageError(f"state must be one of {', '.join(_STATES)}, not {state[:40]!r}")
            limit = _number(request.query_params.get("limit", "100"), "limit", 1, MAX_LIMIT)
            actor = self._actor(identity, token)
            found = await self.approvals.listing(actor, _STATES[state], limit=MAX_LIMIT)
            visible = [r for r in found if _visible(r, identity)][: int(limit)]
            shown: list[JsonValue] = [self._shown(r, identity) for r in visible]
            return {"reviewer": self._whoami(identity), "requests": shown}

        return await self._answer(request, act)

    async def one(self, request: Request) -> Response:
        async def act(identity: Identity, token: str) -> JsonValue:
            found = await self._get(request, identity, self._actor(identity, token))
            return {"request": self._shown(found, identity)}

        return await self._answer(request, act)

    async def changes(self, request: Request) -> Response:
        async def act(_identity: Identity, _token: str) -> JsonValue:
            wait = _number(request.query_params.get("wait", "10"), "wait", 0, MAX_WAIT_S)
            async with self.approvals.store.watch_approvals() as watch:
                return {"changed": await watch.wait(wait)}

        return await self._answer(request, act)

    async def vote(self, request: Request) -> Response:
        async def act(identity: Identity, token: str) -> JsonValue:
            decision, reason = await _ballot(request)
            actor = self._actor(identity, token)
            held = await self._get(request, identity, actor)
            signer = GatewaySigner(
                _reviewer(identity),
                self.key,
                {
                    "issuer": identity.issuer,
                    "email": identity.email,
                    "username": identity.username,
                    "token_sha256": token_fingerprint(token),
                },
            )
            decided, counted = await self.approvals.vote(held.id, signer, decision, reason, actor.session_id)
            return {"request": self._shown(decided, identity), "tally": counted.describe()}

        return await self._answer(request, act, self.max_age)

    async def _get(self, request: Request, identity: Identity, actor: Actor) -> ApprovalRequest:
        request_id = request.path_params["request_id"]
        try:
            found = await self.approvals.get(request_id, actor)
        except ApprovalError:
            raise _NotFound(f"there is no approval request {request_id[:40]!r} you may see") from None
        if not _visible(found, identity):
            raise _NotFound(f"there is no approval request {request_id[:40]!r} you may see")
        return found

    def _shown(self, request: ApprovalRequest, identity: Identity) -> dict[str, JsonValue]:
        why_not: str | None = None
        try:
            self.approvals.check_reviewer(request, _reviewer(identity))
        except ApprovalError as error:
            why_not = str(error)
        return {**request.to_wire(), "why_not": why_not}

    @staticmethod
    def _whoami(identity: Identity) -> dict[str, JsonValue]:
        return {
            "subject": identity.subject,
            "groups": json_strings(sorted(identity.groups)),
            "email": identity.email,
        }

    @staticmethod
    def _actor(identity: Identity, token: str) -> Actor:
        return Actor(identity.subject, f"review-{token_fingerprint(token)}")

    async def _answer(
        self,
        request: Request,
        act: Callable[[Identity, str], Awaitable[JsonValue]],
        max_age: float | None = None,
    ) -> Response:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        bearer = scheme.lower() == "bearer" and token
        identity = await self.authenticate(token.strip(), max_age) if bearer else None
        if identity is None:
            return Response(status_code=401)  # explained and recorded by the server's refusal middleware
        try:
            return JSONResponse(await act(identity, token.strip()))
        except _NotFound as error:
            return _error(404, str(error))
        except UsageError as error:
            return _error(400, str(error))
        except ApprovalError as error:
            return _error(409, str(error))
        except AuditError as error:
            log.error("a reviewer's request could not be recorded: %s", error)
            return _error(503, f"not recorded, so not done: {error}")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _number(text: str, name: str, low: float, high: float) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"{name} must be a number, not {text[:40]!r}") from None
    if not low <= value <= high:
        raise UsageError(f"{name} must be within {low:g}..{high:g}")
    return value


async def _ballot(request: Request) -> tuple[Any, str]:
    """The decision and reason of a vote's body; UsageError naming what is wrong."""
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY:
            raise UsageError(f"a vote is a JSON object of at most {MAX_BODY} bytes")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        body = None
    if not isinstance(body, dict):
        raise UsageError('a vote is a JSON object: {"decision": "approve" | "deny", "reason": "..."}')
    decision, reason = body.get("decision"), body.get("reason", "")
    if decision not in ("approve", "deny"):
        raise UsageError('"decision" must be "approve" or "deny"')
    if not isinstance(reason, str) or len(reason) > MAX_REASON:
        raise UsageError(f'"reason" must be text of at most {MAX_REASON} characters')
    return decision, reason
