"""The audit store: an append-only, hash-chained record of every call.

Each entry is an `AuditEvent` encoded canonically (`chain.canonical`) into the exact bytes that
are hashed and stored; the indexed columns (type, session, identity, ...) are copies of fields of
those bytes, kept for filtering and checked by `verify`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from mcp_guard.values import JsonValue


class EventType(StrEnum):
    SESSION_START = "session_start"
    SESSION_END = "session_end"
    REQUEST = "request"
    OUTCOME = "outcome"
    AUTH_FAILURE = "auth_failure"


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


class Store(ABC):
    """Where audit entries are appended, read and verified."""

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
