"""The audit store: an append-only, hash-chained record of every call.

Each entry is an `AuditEvent` encoded canonically (`chain.canonical`) into the exact bytes that
are hashed and stored; the indexed columns (type, session, identity, ...) are copies of fields of
those bytes, kept for filtering and checked by `verify`.
"""

from __future__ import annotations

import asyncio
import json
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, Awaitable, Callable, Collection, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from mcp_guard.errors import AuditError, UsageError
from mcp_guard.values import JsonValue

if TYPE_CHECKING:
    from mcp_guard.approvals import ApprovalRequest, ApprovalState, Vote


class EventType(StrEnum):
    SESSION_START = "session_start"
    SESSION_END = "session_end"
    REQUEST = "request"
    OUTCOME = "outcome"
    AUTH_FAILURE = "auth_failure"
    PROMPT = "prompt"
    """The user's prompt, recorded by a client hook (`mcp-guard hook claude-code`)."""
    TOOL_USE = "tool_use"
    """The client announcing a tool call it is about to send (a fingerprint of its arguments)."""
    APPROVAL_REQUESTED = "approval_requested"
    APPROVAL_VOTE = "approval_vote"
    APPROVAL_APPROVED = "approval_approved"
    APPROVAL_DENIED = "approval_denied"
    APPROVAL_EXPIRED = "approval_expired"
    APPROVAL_EXECUTED = "approval_executed"
    APPROVAL_OUTCOME = "approval_outcome"


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def utc_bound(name: str, value: str) -> str:
    """An ISO timestamp in the form entries carry (UTC, microseconds), so text order is time order."""
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise UsageError(f"{name}: {value!r} is not an ISO 8601 time (e.g. 2026-11-01T09:30:00Z)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def derived_index(type_: str, detail: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """The index columns derived from an outcome's classification: its riskiest statement kind, and
    the tables it references as a JSON array; (None, None) for other entries."""
    classification = detail.get("classification") if type_ == EventType.OUTCOME else None
    if not isinstance(classification, dict):
        return None, None
    kind, tables = classification.get("kind"), classification.get("tables")
    if kind is not None and not isinstance(kind, str):
        kind = json.dumps(kind)
    return kind, None if tables is None else json.dumps(tables, ensure_ascii=False)


def check_schema_version(where: str, found: int, known: int) -> None:
    """Refuse a store whose schema a newer mcp-guard wrote: this one would misread or damage it."""
    if found > known:
        raise AuditError(
            f"audit store {where}: written by a newer mcp-guard (schema version {found}; "
            f"this one understands up to {known}); upgrade mcp-guard to use this store"
        )


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
    connection: str | None = None
    kind: str | None = None
    """The riskiest statement kind of an outcome's classification (`read`, `write`, `ddl`, ...)."""
    table: str | None = None
    """A table an outcome's statements reference; `orders` also matches `public.orders`."""


@dataclass(frozen=True, slots=True)
class CallFilter:
    """Which calls (a request, its outcome, and any entries between) to read; every set field must match.

    `session_id`, `identity`, `tool`, `since`, `until` and `text` apply to the request; `connection`
    (as resolved), `decision`, `kind`, `writes` and `table` to the outcome; `approver` to the
    entries recorded for the call in between (approvals).
    """

    session_id: str | None = None
    identity: str | None = None
    tool: str | None = None
    connection: str | None = None
    decision: str | None = None
    kind: str | None = None
    writes: bool = False
    """Only calls whose SQL holds something other than reads (writes, DDL, ...), allowed or not."""
    table: str | None = None
    text: str | None = None
    """A piece of the SQL, compared case-insensitively."""
    approver: str | None = None
    since: str | None = None
    until: str | None = None
    limit: int | None = None
    """Only the newest N matching calls (still returned oldest first)."""


@dataclass(frozen=True, slots=True)
class StatsRow:
    """Calls of one identity on one day (UTC)."""

    identity: str
    day: str
    calls: int
    writes: int
    denied: int
    errors: int
    approvals: int
    masked_cells: int


@dataclass(frozen=True, slots=True)
class VerifyReport:
    ok: bool
    entries: int
    """The seq of the last entry that holds: the number of entries ever appended up to it."""
    head_hash: str | None
    first_bad_seq: int | None = None
    problem: str | None = None
    first_seq: int = 1
    """The first entry checked: 1, or the one after a pruned prefix."""
    watched: Mapping[int, str] = field(default_factory=dict)
    """The hashes of the entries asked for (checkpoints to compare), among those that hold."""


@dataclass(frozen=True, slots=True)
class StoredCheckpoint:
    """A signed checkpoint as the store keeps it: its entry count, head hash and exact text."""

    entries: int
    head: str
    text: str


def check_continues(where: str, head: tuple[int, bytes] | None, records: Sequence[AuditRecord]) -> None:
    """Refuse copied entries that do not continue the chain at `head` (or start an empty store)."""
    from mcp_guard.store.chain import link  # chain builds on this module

    expected_seq = head[0] + 1 if head else None
    expected_prev = head[1].hex() if head else None
    for record in records:
        if expected_seq is not None and (record.seq != expected_seq or record.prev_hash != expected_prev):
            raise AuditError(
                f"audit store {where}: copied entry {record.seq} does not continue the chain here (expected "
                f"entry {expected_seq} following {expected_prev}); nothing was copied"
            )
        if link(record.seq, bytes.fromhex(record.prev_hash), record.body).hex() != record.hash:
            raise AuditError(f"audit store {where}: copied entry {record.seq} does not match its hash")
        expected_seq, expected_prev = record.seq + 1, record.hash


class ChangeWatch(ABC):
    """Tells a waiting caller that approvals may have changed, in this process or another."""

    @abstractmethod
    async def wait(self, timeout: float) -> bool:
        """Return within `timeout` seconds: True when something may have changed since the watch
        began or the previous wait returned True."""


class SignalledWatch(ChangeWatch):
    """A watch its store wakes (`signal`) when it sees a change: its own, or another process's."""

    def __init__(self) -> None:
        self._changed = asyncio.Event()

    def signal(self) -> None:
        self._changed.set()

    def reset(self) -> None:
        """Forget signals so far: they came before the watcher's next read."""
        self._changed.clear()

    async def wait(self, timeout: float) -> bool:
        try:
            async with asyncio.timeout(max(timeout, 0.0)):
                await self._changed.wait()
        except TimeoutError:
            return False
        self._changed.clear()
        return True


REQUEST_COLUMNS = (
    "id, call_id, session_id, requester, connection, digest, state, created_at, expires_at, "
    "decided_at, executed_at, executed_by, body, outcome"
)
"""The approval_requests columns both stores read and write, in `ApprovalRequest.from_row`'s order."""

_CHANGEABLE = frozenset({"decided_at", "executed_at", "executed_by"})


def check_changes(changes: Collection[str]) -> None:
    """A transition may set only these fields of a request (each store builds SQL from the names)."""
    unknown = set(changes) - _CHANGEABLE
    if unknown:
        raise AuditError(f"approval requests have no changeable field {', '.join(sorted(unknown))}")


class Store(ABC):
    """Where audit entries are appended, read and verified, and approval requests meet reviewers.

    Every change to an approval request is committed together with its audit entry, or not at all.
    """

    _after_append: Callable[[int], Awaitable[None]] | None = None

    def on_append(self, callback: Callable[[int], Awaitable[None]] | None) -> None:
        """Await `callback(seq)` after each append commits; the checkpointer watches the count this way."""
        self._after_append = callback

    @abstractmethod
    async def open(self) -> None:
        """Create or open the store; AuditError when it cannot be used."""

    def missing(self) -> str | None:
        """Why there is no store to read here yet (a file that does not exist), or None: the audit
        commands must not create an empty store where a mistyped path points, and then report it."""
        return None

    @abstractmethod
    async def migrate(self) -> tuple[int, int]:
        """Create or upgrade the schema without opening the store; (version found, version now).
        Safe to run twice, and from several processes at once."""

    @abstractmethod
    async def restore(self, records: Sequence[AuditRecord]) -> None:
        """Append entries copied from another store exactly as they are (seq, hashes, bytes), in one
        transaction; AuditError unless they continue this store's chain (or start an empty one)."""

    @abstractmethod
    async def close(self) -> None:
        """Flush pending appends and close."""

    @abstractmethod
    async def append(self, event: AuditEvent, *, durable: bool = False) -> int:
        """Append and commit before returning its seq; AuditError when it cannot. `durable` entries
        also survive a power cut (the store syncs them to disk before returning)."""

    @abstractmethod
    async def query(self, flt: AuditFilter) -> list[AuditRecord]:
        """Entries matching every set field, oldest first."""

    @abstractmethod
    async def entries(self, first: int, last: int) -> list[AuditRecord]:
        """The entries whose seq lies between `first` and `last`, both included."""

    @abstractmethod
    async def session_ids(self, prefix: str, limit: int) -> list[str]:
        """Up to `limit` ids of sessions that started with an id beginning with `prefix`, newest first."""

    @abstractmethod
    async def call_ids(self, prefix: str, limit: int) -> list[str]:
        """Up to `limit` distinct call ids that start with `prefix`."""

    @abstractmethod
    def calls(self, flt: CallFilter) -> AsyncGenerator[list[AuditRecord], None]:
        """Every entry of each matching call, call by call in request order, streamed from one snapshot."""

    @abstractmethod
    async def stats(self, flt: CallFilter) -> list[StatsRow]:
        """Matching calls counted by identity and day."""

    @abstractmethod
    async def verify(
        self, *, base: tuple[int, bytes] | None = None, watch: Collection[int] = ()
    ) -> VerifyReport:
        """Recompute the chain from `base` (seq, hash) or from genesis; name the first bad entry.

        The hashes of the entries whose seq is in `watch` are reported, to compare with checkpoints.
        """

    @abstractmethod
    async def head(self) -> tuple[int, str] | None:
        """The newest entry's seq and hash; None when the store holds no entry."""

    @abstractmethod
    async def first_seq(self) -> int | None:
        """The oldest entry kept (1 unless a prefix was pruned); None when the store holds no entry."""

    @abstractmethod
    async def first_at_or_after(self, ts: str) -> int | None:
        """The oldest entry recorded at time `ts` (ISO 8601) or later; None when there is none."""

    @abstractmethod
    async def entry_hash(self, seq: int) -> str | None:
        """The stored hash of entry `seq`, None when it is not there."""

    @abstractmethod
    async def add_checkpoint(self, checkpoint: StoredCheckpoint) -> None:
        """Keep a signed checkpoint beside the chain."""

    @abstractmethod
    async def checkpoints(self) -> list[StoredCheckpoint]:
        """Every checkpoint kept, oldest first."""

    @abstractmethod
    async def prune(self, checkpoint: StoredCheckpoint) -> int:
        """Remove the entries up to and including `checkpoint.entries` in one transaction that keeps
        `checkpoint`, whose head must be that entry's hash; returns how many entries were removed."""

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
