"""The audit store: an append-only, hash-chained record of every call.

Each entry is an `AuditEvent` encoded canonically (`chain.canonical`) into the exact bytes that
are hashed and stored; the indexed columns (type, session, identity, ...) are copies of fields of
those bytes, kept for filtering and checked by `verify`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from mcp_guard.values import JsonValue

if TYPE_CHECKING:
    from mcp_guard.approvals import ApprovalRequest, ApprovalState, Vote


class EventType(StrEnum):
    SESSION_START = "session_start"
    SESSION_END = "session_end"
    REQUEST = "request"
    OUTCOME = "outcome"
    AUTH_FAILURE = "auth_failure"
    APPROVAL_REQUESTED = "approval_requested"
    APPROVAL_VOTE = "approval_vote"
    APPROVAL_APPROVED = "approval_approved"
    APPROVAL_DENIED = "approval_denied"
    APPROVAL_EXPIRED = "approval_expired"
    APPROVAL_EXECUTED = "approval_executed"
    APPROVAL_OUTCOME = "approval_outcome"


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One thing that happened; `detail` holds everything not indexed."""

    type: EventType
    session_id: str
    identity: str
    call_id: str | None = None
    tool: str | None = None
    connection: str | None = None
    decision: str | None = None
    detail: dict[str, JsonValue] = field(default_factory=dict)
    ts: str = field(default_factory=utc_now)

    def as_dict(self) -> dict[str, Any]:
        return {
            "type": str(self.type),
            "ts": self.ts,
            "session_id": self.session_id,
            "identity": self.identity,
            "call_id": self.call_id,
            "tool": self.tool,
            "connection": self.connection,
            "decision": self.decision,
            "detail": self.detail,
        }


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """A stored entry: its position in the chain, its hashes and the exact bytes hashed."""

    seq: int
    prev_hash: str
    hash: str
    body: bytes
    event: AuditEvent


@dataclass(frozen=True, slots=True)
class AuditFilter:
    session_id: str | None = None
    identity: str | None = None
    tool: str | None = None
    decision: str | None = None
    call_id: str | None = None
    type: EventType | None = None
    since: str | None = None
    until: str | None = None
    limit: int | None = None


@dataclass(frozen=True, slots=True)
class VerifyReport:
    ok: bool
    entries: int
    head_hash: str | None
    first_bad_seq: int | None = None
    problem: str | None = None


class ChangeWatch(ABC):
    """Tells a waiting caller that approvals may have changed, in this process or another."""

    @abstractmethod
    async def wait(self, timeout: float) -> bool:
        """Return within `timeout` seconds: True when something may have changed since the watch
        began or the previous wait returned True."""


class Store(ABC):
    """Where audit entries are appended, read and verified, and approval requests meet reviewers.

    Every change to an approval request is committed together with its audit entry, or not at all.
    """

    @abstractmethod
    async def open(self) -> None:
        """Create or open the store; AuditError when it cannot be used."""

    @abstractmethod
    async def close(self) -> None:
        """Flush pending appends and close."""

    @abstractmethod
    async def append(self, event: AuditEvent, *, durable: bool = False) -> None:
        """Append and commit before returning; AuditError when it cannot. `durable` entries also
        survive a power cut (the store syncs them to disk before returning)."""

    @abstractmethod
    async def query(self, flt: AuditFilter) -> list[AuditRecord]:
        """Entries matching every set field, oldest first."""

    @abstractmethod
    async def verify(self) -> VerifyReport:
        """Recompute the whole chain; name the first entry that does not hold."""

    # approvals ----------------------------------------------------------------------------------

    @abstractmethod
    async def add_approval(self, request: ApprovalRequest, event: AuditEvent) -> None:
        """Store a new pending request and append `event`, atomically."""

    @abstractmethod
    async def get_approval(self, request_id: str) -> ApprovalRequest | None:
        """The request with its votes (oldest first), or None."""

    @abstractmethod
    async def list_approvals(
        self, states: Collection[ApprovalState] | None = None, limit: int = 100
    ) -> list[ApprovalRequest]:
        """Requests in any of `states` (all when None), newest first, with their votes."""

    @abstractmethod
    async def add_vote(self, vote: Vote, event: AuditEvent, *, unexpired_at: str) -> bool:
        """Record `vote` and append `event` atomically, if the request is pending, expires after
        `unexpired_at` and has no vote from this reviewer; False (nothing written) otherwise."""

    @abstractmethod
    async def transition_approval(
        self,
        request_id: str,
        expected: ApprovalState,
        target: ApprovalState,
        event: AuditEvent,
        changes: Mapping[str, JsonValue],
        *,
        unexpired_at: str | None = None,
    ) -> bool:
        """Compare-and-set: move the request from `expected` to `target`, set `changes` (decided_at,
        executed_at, executed_by) and append `event`, atomically, across processes. With
        `unexpired_at`, only if the request expires after it. False (nothing written) otherwise."""

    @abstractmethod
    async def finish_approval(
        self, request_id: str, outcome: Mapping[str, JsonValue], event: AuditEvent
    ) -> None:
        """Record the outcome of an executed request and append `event`, atomically."""

    @abstractmethod
    def watch_approvals(self) -> AbstractAsyncContextManager[ChangeWatch]:
        """A watch on approval changes, from before the caller's next read."""
