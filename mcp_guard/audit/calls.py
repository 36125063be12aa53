"""One call as the audit recorded it: its request, its outcome, and anything recorded in between.

Entries of other types that carry the call's id (approval requests and decisions, for example)
form the call's trail; they are shown by their type and detail, whatever they are.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from mcp_guard.errors import AuditError
from mcp_guard.store.base import AuditFilter, AuditRecord, CallFilter, EventType, Store


def _dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


@dataclass(frozen=True, slots=True)
class Call:
    request: AuditRecord
    outcome: AuditRecord | None
    trail: tuple[AuditRecord, ...] = ()

    @classmethod
    def from_records(cls, records: Sequence[AuditRecord]) -> Call:
        """Assemble a call from every entry with its id, in seq order."""
        requests = [r for r in records if r.event.type == EventType.REQUEST]
        if not requests:
            raise AuditError(f"call {records[0].event.call_id}: no request was recorded for it")
        outcomes = [r for r in records if r.event.type == EventType.OUTCOME]
        trail = tuple(r for r in records if r is not requests[0] and r not in outcomes[-1:])
        return cls(requests[0], outcomes[-1] if outcomes else None, trail)

    # what was asked -----------------------------------------------------------------------------

    @property
    def call_id(self) -> str:
        return str(self.request.event.call_id)

    @property
    def seq(self) -> int:
        return self.request.seq

    @property
    def ts(self) -> str:
        return self.request.event.ts

    @property
    def session_id(self) -> str:
        return self.request.event.session_id

    @property
    def identity(self) -> str:
        return self.request.event.identity

    @property
    def tool(self) -> str:
        return str(self.request.event.tool)

    @property
    def arguments(self) -> dict[str, Any]:
        return _dict(self.request.event.detail.get("arguments"))

    @property
    def client(self) -> str | None:
        client = self.request.event.detail.get("client")
        return client if isinstance(client, str) else None

    @property
    def sql(self) -> str | None:
        sql = self.arguments.get("sql")
        return sql if isinstance(sql, str) else None

    @property
    def reason(self) -> str | None:
        reason = self.arguments.get("reason")
        return reason if isinstance(reason, str) else None

    @property
    def connection(self) -> str | None:
        if self.outcome is not None and self.outcome.event.connection:
            return self.outcome.event.connection
        return self.request.event.connection

    # what was decided and shown -----------------------------------------------------------------

    @property
    def detail(self) -> dict[str, Any]:
        return self.outcome.event.detail if self.outcome is not None else {}

    @property
    def classification(self) -> dict[str, Any] | None:
        found = self.detail.get("classification")
        return found if isinstance(found, dict) else None

    @property
    def decision(self) -> str | None:
        return self.outcome.event.decision if self.outcome is not None else None

    @property
    def rule(self) -> str | None:
        rule = _dict(self.detail.get("decision")).get("rule")
        return rule if isinstance(rule, str) else None

    @property
    def status(self) -> str:
        """ok, denied, error, rejected; `no outcome` when none was recorded (the server stopped mid-call)."""
        status = self.detail.get("status")
        return status if isinstance(status, str) else "no outcome"

    @property
    def response(self) -> dict[str, Any]:
        return _dict(self.detail.get("response"))

    @property
    def records(self) -> tuple[AuditRecord, ...]:
        entries = (self.request, *self.trail, *([self.outcome] if self.outcome else []))
        return tuple(sorted(entries, key=lambda r: r.seq))

    def as_dict(self) -> dict[str, Any]:
        """The call as data: what was asked, decided, run and shown (exports and replays)."""
        classification = self.classification
        decision = _dict(self.detail.get("decision"))
        summary = {
            key: value
            for key, value in self.detail.items()
            if key not in ("status", "duration_ms", "response", "classification", "decision")
        }
        return {
            "call_id": self.call_id,
            "seq": self.seq,
            "time": self.ts,
            "session_id": self.session_id,
            "identity": self.identity,
            "client": self.client,
            "tool": self.tool,
            "connection": self.connection,
            "sql": self.sql,
            "reason": self.reason,
            "params": self.arguments.get("params"),
            "arguments": self.arguments,
            "kind": classification.get("kind") if classification else None,
            "tables": classification.get("tables") if classification else None,
            "classification": classification,
            "decision": self.decision,
            "rule": self.rule,
            "decision_reason": decision.get("reason"),
            "status": self.status,
            "duration_ms": self.detail.get("duration_ms"),
            "result": summary,
            "trail": [trail_entry(record) for record in self.trail],
            "response": self.response,
            "entries": [{"seq": r.seq, "type": str(r.event.type), "hash": r.hash} for r in self.records],
        }

    def listing(self) -> dict[str, Any]:
        """The form `audit list --json` prints: the request and outcome entries as recorded."""
        return {
            "call_id": self.call_id,
            "request": {"seq": self.request.seq, **self.request.event.as_dict()},
            "outcome": {"seq": self.outcome.seq, **self.outcome.event.as_dict()} if self.outcome else None,
            "trail": [trail_entry(record) for record in self.trail],
        }


def trail_entry(record: AuditRecord) -> dict[str, Any]:
    """An entry between request and outcome, shown generically: what it is, when, by whom, its detail."""
    event = record.event
    return {
        "seq": record.seq,
        "type": str(event.type),
        "time": event.ts,
        "identity": event.identity,
        "decision": event.decision,
        "detail": event.detail,
    }


async def iter_calls(store: Store, flt: CallFilter) -> AsyncIterator[Call]:
    """Matching calls, oldest first, streamed from the store without holding them all."""
    async with aclosing(store.calls(flt)) as calls:
        async for records in calls:
            yield Call.from_records(records)


async def find_call(store: Store, ident: str) -> Call:
    """The call named by its id, a unique prefix of it (8 characters or more), or the seq of one of its
    entries."""
    text = ident.strip().lstrip("#")
    if text.isdigit():
        entries = await store.entries(int(text), int(text))
        if not entries:
            raise AuditError(f"entry {text} is not in the audit log")
        if entries[0].event.call_id is None:
            raise AuditError(f"entry {text} is a {entries[0].event.type} entry, not part of a call")
        call_id = entries[0].event.call_id
    elif len(text) < 8:
        raise AuditError(f"call id {text!r} is too short: give 8 characters or more, or an entry's seq")
    else:
        matches = await store.call_ids(text, limit=2)
        if not matches:
            raise AuditError(f"no call whose id starts with {text!r}")
        if len(matches) > 1:
            raise AuditError(f"{text!r} starts more than one call id ({', '.join(matches)}); give more of it")
        call_id = matches[0]
    return Call.from_records(await store.query(AuditFilter(call_id=call_id)))
