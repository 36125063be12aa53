"""Where a reviewer reads held requests and decides them: the shared store with a passphrase
(`StoreDesk`), or a gateway's reviewers' API with an OIDC token (`GatewayDesk`).

The review UI and `mcp-guard pending / approve / deny` act through a desk and do not know which.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Collection, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import httpx2

from mcp_guard.approvals import DECIDED, Actor, ApprovalRequest, Approvals, ApprovalState, Verdict
from mcp_guard.audit.verify import keep_latest_checkpoint
from mcp_guard.config import is_loopback
from mcp_guard.errors import ApprovalError, AuthenticationError, GuardError, UsageError
from mcp_guard.identity import TokenSource
from mcp_guard.reviewers import Reviewer, Signer, unlock
from mcp_guard.store.base import ChangeWatch


class ReviewDesk(ABC):
    """A reviewer's view of the held requests, and their vote."""

    reviewer: Reviewer

    @property
    @abstractmethod
    def locked(self) -> bool:
        """True while a passphrase is needed before a vote can be cast."""

    @abstractmethod
    def unlock(self, passphrase: str) -> None:
        """Derive the reviewer's key; ApprovalError when the passphrase is wrong (slow: run in a thread)."""

    @abstractmethod
    async def listing(
        self, states: Sequence[ApprovalState] | None, limit: int = 100
    ) -> list[ApprovalRequest]:
        """Requests in `states` (None: all) newest first, as far as this reviewer may see them."""

    @abstractmethod
    async def get(self, request_id: str) -> ApprovalRequest:
        """One request; ApprovalError when there is none this reviewer may see."""

    @abstractmethod
    def check(self, request: ApprovalRequest) -> None:
        """ApprovalError saying why this reviewer may not vote on `request`, before anything is asked."""

    @abstractmethod
    async def vote(self, request_id: str, verdict: Verdict, reason: str) -> tuple[ApprovalRequest, str]:
        """Cast the vote; the request as it is now, and what its votes amount to."""

    @abstractmethod
    def changes(self) -> AbstractAsyncContextManager[ChangeWatch]:
        """Wakes a waiting reviewer when requests change."""

    async def checkpoint(self) -> int | None:
        """Entries of the audit log that the newest checkpoint this reviewer kept vouches for."""
        return None


class StoreDesk(ReviewDesk):
    """The shared store, and a configured reviewer's passphrase-derived key."""

    def __init__(
        self,
        approvals: Approvals,
        reviewer: Reviewer,
        session_id: str,
        witness: tuple[Path, Collection[str]] | None = None,
    ) -> None:
        """`witness`: where this reviewer keeps the newest checkpoint it has seen, and the keys trusted
        to sign one; a store cut or rolled back since is then reported."""
        self.approvals = approvals
        self.reviewer = reviewer
        self.actor = Actor(reviewer.subject, session_id)
        self.witness = witness
        self._signer: Signer | None = None

    @property
    def locked(self) -> bool:
        return self._signer is None

    def unlock(self, passphrase: str) -> None:
        self._signer = unlock(self.reviewer, passphrase)

    async def listing(
        self, states: Sequence[ApprovalState] | None, limit: int = 100
    ) -> list[ApprovalRequest]:
        return await self.approvals.listing(self.actor, states, limit=limit)

    async def get(self, request_id: str) -> ApprovalRequest:
        return await self.approvals.get(request_id, self.actor)

    def check(self, request: ApprovalRequest) -> None:
        self.approvals.check_reviewer(request, self.reviewer)

    async def vote(self, request_id: str, verdict: Verdict, reason: str) -> tuple[ApprovalRequest, str]:
        if self._signer is None:
            raise ApprovalError(f"the passphrase of reviewer {self.reviewer.name!r} was not given")
        request, counted = await self.approvals.vote(
            request_id, self._signer, verdict, reason, self.actor.session_id
        )
        return request, counted.describe()

    def changes(self) -> AbstractAsyncContextManager[ChangeWatch]:
        return self.approvals.store.watch_approvals()

    async def checkpoint(self) -> int | None:
        if self.witness is None:
            return None
        kept = await keep_latest_checkpoint(self.approvals.store, *self.witness)
        return kept.entries if kept is not None else None


def gateway_base(url: str) -> str:
    """The gateway's base URL from what a reviewer may paste: the base, or its /mcp or /sse endpoint."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"--server must be the gateway's http(s):// URL, not {url[:80]!r}")
    if parts.scheme == "http" and not is_loopback(parts.hostname):
        raise UsageError(
            f"--server {url[:80]!r} would send your token unencrypted: use the gateway's https:// URL "
            "(plain http only to 127.0.0.1 or localhost)"
        )
    path = parts.path.rstrip("/")
    for endpoint in ("/mcp", "/sse"):
        path = path.removesuffix(endpoint)
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


class GatewayDesk(ReviewDesk):
    """A gateway's reviewers' API, with the reviewer's OIDC token (re-read for every request, so a
    login helper may refresh the file while the UI runs). Nothing to unlock: the token is the proof."""

    def __init__(self, gateway: Gateway, reviewer: Reviewer) -> None:
        self.gateway = gateway
        self.reviewer = reviewer
        self._why_not: dict[str, str | None] = {}

    @classmethod
    @asynccontextmanager
    async def open(cls, url: str, token: TokenSource) -> AsyncIterator[GatewayDesk]:
        async with httpx2.AsyncClient(timeout=httpx2.Timeout(15, read=45)) as client:
            gateway = Gateway(gateway_base(url), token, client)
            me = (await gateway.fetch("GET", "/approvals/me"))["reviewer"]
            groups = frozenset(me["groups"])
            yield cls(gateway, Reviewer(name=me["subject"], subject=me["subject"], groups=groups, key=None))

    @property
    def locked(self) -> bool:
        return False

    def unlock(self, passphrase: str) -> None:
        raise ApprovalError("a reviewer with a token has no passphrase to give")

    async def listing(
        self, states: Sequence[ApprovalState] | None, limit: int = 100
    ) -> list[ApprovalRequest]:
        if states is None:
            wanted = ["all"]
        else:
            wanted = ["pending"] if ApprovalState.PENDING in states else []
            wanted += ["decided"] if set(states) & set(DECIDED) else []
        found: list[ApprovalRequest] = []
        for state in wanted:
            params = {"state": state, "limit": str(limit)}
            answer = await self.gateway.fetch("GET", "/approvals", params=params)
            found += [self._remember(wire) for wire in answer["requests"]]
        kept = [r for r in found if states is None or r.state in states]
        return sorted(kept, key=lambda r: r.created_at, reverse=True)[:limit]

    async def get(self, request_id: str) -> ApprovalRequest:
        answer = await self.gateway.fetch("GET", f"/approvals/{quote(request_id, safe='')}")
        return self._remember(answer["request"])

    def check(self, request: ApprovalRequest) -> None:
        why_not = self._why_not.get(request.id)
        if why_not:
            raise ApprovalError(why_not)

    async def vote(self, request_id: str, verdict: Verdict, reason: str) -> tuple[ApprovalRequest, str]:
        answer = await self.gateway.fetch(
            "POST",
            f"/approvals/{quote(request_id, safe='')}/vote",
            json={"decision": verdict, "reason": reason},
        )
        return self._remember(answer["request"]), str(answer["tally"])

    @asynccontextmanager
    async def changes(self) -> AsyncIterator[ChangeWatch]:
        yield _GatewayWatch(self.gateway)

    def _remember(self, wire: dict[str, Any]) -> ApprovalRequest:
        """The request, and whether the gateway said this reviewer may vote on it."""
        request = ApprovalRequest.from_wire(wire)
        self._why_not[request.id] = wire.get("why_not")
        return request


class Gateway:
    """The reviewers' API over HTTP: each answer a JSON object, each refusal an error that says why."""

    def __init__(self, base: str, token: TokenSource, client: httpx2.AsyncClient) -> None:
        self.base = base
        self.token = token
        self.client = client

    async def fetch(self, method: str, path: str, **kwargs: Any) -> Any:
        token = self.token.read()
        try:
            response = await self.client.request(
                method, self.base + path, headers={"Authorization": f"Bearer {token}"}, **kwargs
            )
        except httpx2.HTTPError as error:
            raise UsageError(f"cannot reach the gateway at {self.base}: {error}") from None
        try:
            answer = response.json()
        except ValueError:
            answer = None
        message = answer.get("error_description") or answer.get("error") if isinstance(answer, dict) else None
        if response.status_code == 401:
            raise AuthenticationError(f"the gateway refused the token: {message or 'no reason given'}")
        if response.status_code == 404 and message is None:
            raise UsageError(
                f"{self.base} has no reviewers' API: is it an mcp-guard gateway serving HTTP with "
                "approvals.token_reviewers = true?"
            )
        if response.status_code >= 400 or not isinstance(answer, dict):
            raise ApprovalError(message or f"the gateway answered {response.status_code} without a reason")
        return answer


class _GatewayWatch(ChangeWatch):
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def wait(self, timeout: float) -> bool:
        if timeout <= 0:
            return False
        params = {"wait": f"{min(timeout, 30):g}"}
        try:
            answer = await self.gateway.fetch("GET", "/approvals/changes", params=params)
        except GuardError:
            await asyncio.sleep(min(timeout, 1.0))  # gateway away, token expired: the reload says which
            return True
        return bool(answer.get("changed"))
