"""Held statements: the request lifecycle, what binds a decision to one statement, and the count.

    PENDING ──▶ APPROVED ──▶ EXECUTED
       ├──────▶ DENIED
       └──────▶ EXPIRED ◀── APPROVED

A request is created by the server when policy holds an `execute` call, decided by reviewers in
another process (the review UI, the CLI) through the store, and run at most once by the server.

What the server acts on is only what nobody with write access to the store can forge: its own
configuration (policy, reviewers' public keys), the database, and signatures. The stored request is
a carrier. Each vote is a signature over (request id, binding digest, expiry, reviewer, decision,
reason); the digest is recomputed from the stored connection, statements, parameters and
requester, so a vote does not survive an edit of any of them. The stored state serves the
compare-and-set that makes execution happen once, and the listing; it is never proof of approval.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, Literal

from mcp_guard.errors import ApprovalError, ApprovalExpired
from mcp_guard.policy import Hold, Requirement
from mcp_guard.reviewers import ProofVerifier, Reviewer, Signer, canonical_json
from mcp_guard.store.base import AuditEvent, AuditFilter, EventType, Store, utc_now
from mcp_guard.values import JsonScalar, JsonValue

log = logging.getLogger(__name__)

Verdict = Literal["approve", "deny"]
Progress = Callable[[float, float | None, str], Awaitable[None]]
"""(seconds waited, seconds it may wait, message): how a waiting call tells its client it is alive."""

PROGRESS_EVERY_S = 2.0
_BINDING_DOMAIN = b"mcp-guard/approval-binding/v1\n"


class ApprovalState(StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    DENIED = "denied"
    EXPIRED = "expired"
    EXECUTED = "executed"


_NEXT: dict[ApprovalState, frozenset[ApprovalState]] = {
    ApprovalState.PENDING: frozenset({ApprovalState.APPROVED, ApprovalState.DENIED, ApprovalState.EXPIRED}),
    ApprovalState.APPROVED: frozenset({ApprovalState.EXECUTED, ApprovalState.EXPIRED}),
    ApprovalState.DENIED: frozenset(),
    ApprovalState.EXPIRED: frozenset(),
    ApprovalState.EXECUTED: frozenset(),
}
DECIDED = (ApprovalState.APPROVED, ApprovalState.DENIED, ApprovalState.EXPIRED, ApprovalState.EXECUTED)
"""Every state past waiting: what "recent decisions" list."""
_FINAL_BECAUSE = {
    ApprovalState.PENDING: "",
    ApprovalState.APPROVED: "an approved request can only run or expire",
    ApprovalState.DENIED: "a denial is final",
    ApprovalState.EXPIRED: "an expired request never runs",
    ApprovalState.EXECUTED: "an approval runs once",
}


def check_transition(request_id: str, current: ApprovalState, target: ApprovalState) -> None:
    """Refuse a transition the lifecycle does not have, saying why."""
    if target not in _NEXT[current]:
        because = _FINAL_BECAUSE[current] or "it is still waiting for reviewers"
        raise ApprovalError(f"request {request_id} is {current}; it cannot become {target} ({because})")


@dataclass(frozen=True, slots=True)
class Vote:
    """A reviewer's decision: `payload` is the exact bytes `proof` signs (see `vote_payload`)."""

    request_id: str
    reviewer: str
    decision: Verdict
    reason: str
    ts: str
    payload: bytes
    proof: str


_ROW = (
    "id",
    "call_id",
    "session_id",
    "requester",
    "connection",
    "digest",
    "state",
    "created_at",
    "expires_at",
    "decided_at",
    "executed_at",
    "executed_by",
    "body",
    "outcome",
)
"""A stored request's fields in the order both stores' rows hold them (`ApprovalRequest.from_row`)."""


@dataclass(frozen=True, slots=True)
class ApprovalRequest:
    """One held call: the statements that will run, exactly, if it is approved in time."""

    id: str
    call_id: str
    session_id: str
    requester: str
    connection: str
    statements: tuple[str, ...]
    params: tuple[JsonScalar, ...]
    digest: str
    reason: str
    rule: str
    requirements: tuple[Requirement, ...]
    details: dict[str, JsonValue]
    """What the reviewer is shown besides the SQL: classification, row estimates, the policy's reason."""
    state: ApprovalState
    created_at: str
    expires_at: str
    decided_at: str | None = None
    executed_at: str | None = None
    executed_by: str | None = None
    outcome: dict[str, JsonValue] | None = None
    votes: tuple[Vote, ...] = ()

    def body(self) -> dict[str, JsonValue]:
        """The fields a store keeps as one JSON document."""
        return {
            "statements": list(self.statements),
            "params": list(self.params),
            "reason": self.reason,
            "rule": self.rule,
            "requirements": [r.as_dict() for r in self.requirements],  # type: ignore[misc]
            "details": self.details,
        }

    @staticmethod
    def body_fields(body: dict[str, Any]) -> dict[str, Any]:
        """The dataclass fields a stored `body()` holds."""
        return {
            "statements": tuple(body["statements"]),
            "params": tuple(body["params"]),
            "reason": body["reason"],
            "rule": body["rule"],
            "requirements": tuple(
                Requirement(r["rule"], tuple(r["approvers"]), int(r["approvals"]))
                for r in body["requirements"]
            ),
            "details": body["details"],
        }

    @classmethod
    def from_row(cls, row: Sequence[Any], votes: tuple[Vote, ...]) -> ApprovalRequest:
        """A request as both stores keep it: their row layout, the body as JSON; damage refuses to run."""
        fields = dict(zip(_ROW, row, strict=True))
        try:
            fields["body"] = json.loads(fields["body"])
            fields["outcome"] = json.loads(fields["outcome"]) if fields["outcome"] else None
        except (ValueError, TypeError) as exc:
            raise ApprovalError(
                f"approval request {fields['id']}: its stored record is damaged ({exc}); it will not run"
            ) from exc
        return cls._from_fields(fields, votes)

    @classmethod
    def _from_fields(cls, fields: dict[str, Any], votes: tuple[Vote, ...]) -> ApprovalRequest:
        """The request from its `_ROW` fields, body and outcome already parsed; damage refuses to run."""
        try:
            named = {name: value for name, value in fields.items() if name != "body"}
            named["state"] = ApprovalState(named["state"])
            return cls(**named, votes=votes, **cls.body_fields(fields["body"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise ApprovalError(
                f"approval request {fields.get('id')}: its stored record is damaged ({exc}); it will not run"
            ) from exc

    def to_wire(self) -> dict[str, JsonValue]:
        """Everything about the request, votes and their proofs included, as JSON (a gateway's API)."""
        wire: dict[str, JsonValue] = {name: getattr(self, name) for name in _ROW if name != "body"}
        wire["state"], wire["body"] = str(self.state), self.body()
        wire["votes"] = [
            {
                "reviewer": v.reviewer,
                "decision": v.decision,
                "reason": v.reason,
                "ts": v.ts,
                "payload": v.payload.decode(),
                "proof": v.proof,
            }
            for v in self.votes
        ]
        return wire

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> ApprovalRequest:
        """The request `to_wire` described; ApprovalError when the document is not one."""
        try:
            votes = tuple(
                Vote(
                    wire["id"],
                    v["reviewer"],
                    v["decision"],
                    v["reason"],
                    v["ts"],
                    v["payload"].encode(),
                    v["proof"],
                )
                for v in wire["votes"]
            )
            fields = {name: wire[name] for name in _ROW}
        except (KeyError, TypeError, AttributeError) as exc:
            raise ApprovalError(f"the approval request received is incomplete ({exc})") from None
        return cls._from_fields(fields, votes)

    def expired(self, now: str | None = None) -> bool:
        return (now or utc_now()) >= self.expires_at

    def summary(self) -> dict[str, JsonValue]:
        """The request as the CLI's --json and the tools' structured content show it."""
        return {
            "request_id": self.id,
            "state": str(self.state),
            "requester": self.requester,
            "connection": self.connection,
            "statements": list(self.statements),
            "params": list(self.params),
            "reason": self.reason,
            "rule": self.rule,
            "requirements": [r.as_dict() for r in self.requirements],  # type: ignore[misc]
            "details": self.details,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "decided_at": self.decided_at,
            "executed_at": self.executed_at,
            "outcome": self.outcome,
            "votes": [
                {"reviewer": v.reviewer, "decision": v.decision, "reason": v.reason, "ts": v.ts}
                for v in self.votes
            ],
        }


def json_strings(items: Iterable[str]) -> list[JsonValue]:
    """Strings as a JSON list (lists are invariant: the type has to be said once)."""
    return list(items)


def binding_digest(
    connection: str, statements: Sequence[str], params: Sequence[JsonScalar], requester: str
) -> str:
    """What an approval is for: these exact statement texts, with these parameters, on this
    connection, for this requester. The texts are bound exactly, not normalized: they are what runs."""
    bound = {
        "connection": connection,
        "statements": list(statements),
        "params": list(params),
        "requester": requester,
    }
    return hashlib.sha256(_BINDING_DOMAIN + canonical_json(bound)).hexdigest()


def vote_payload(request: ApprovalRequest, reviewer: str, decision: Verdict, reason: str, ts: str) -> bytes:
    """The bytes a reviewer signs: the request's identity, binding and expiry, and the decision."""
    return canonical_json(
        {
            "request_id": request.id,
            "digest": binding_digest(
                request.connection, request.statements, request.params, request.requester
            ),
            "expires_at": request.expires_at,
            "reviewer": reviewer,
            "decision": decision,
            "reason": reason,
            "ts": ts,
        }
    )


@dataclass(frozen=True, slots=True)
class Tally:
    """What the verified votes prove about a request under given requirements."""

    state: ApprovalState
    counted: tuple[tuple[Requirement, tuple[str, ...]], ...]
    denial: tuple[str, str] | None = None
    """(reviewer subject, reason) of the first verified denial."""
    ignored: tuple[str, ...] = ()
    """Why each vote that does not count was set aside."""

    def describe(self) -> str:
        if self.denial:
            return f"denied by {self.denial[0]}: {self.denial[1]}"
        parts = []
        for requirement, subjects in self.counted:
            who = " or ".join(requirement.approvers)
            parts.append(f"{len(subjects)} of {requirement.approvals} approvals from {who}")
        return "; ".join(parts)

    @property
    def approvers(self) -> list[str]:
        return list(dict.fromkeys(s for _, subjects in self.counted for s in subjects))


def tally(request: ApprovalRequest, requirements: Sequence[Requirement], verifier: ProofVerifier) -> Tally:
    """Count distinct, verified, eligible reviewers per requirement; one verified denial denies.

    A vote counts when its signature verifies against the configured reviewer, it was signed for
    this very request (id, digest recomputed from the stored fields, expiry), its reviewer is not
    the requester and is in an approver group. Each person (subject) counts once, by their first vote.
    """
    groups = {group for requirement in requirements for group in requirement.approvers}
    ignored: list[str] = []
    approving: dict[str, frozenset[str]] = {}
    denial: tuple[str, str] | None = None
    seen: set[str] = set()
    for vote in request.votes:
        try:
            reviewer = verifier.verify(vote.reviewer, vote.payload, vote.proof)
        except ApprovalError as error:
            ignored.append(str(error))
            continue
        if vote.payload != vote_payload(request, vote.reviewer, vote.decision, vote.reason, vote.ts):
            ignored.append(
                f"the vote of {vote.reviewer!r} was signed for another request, statement, parameters, "
                "requester or expiry than the stored one"
            )
            continue
        if reviewer.subject == request.requester:
            ignored.append(
                f"{reviewer.name!r} is the requester ({reviewer.subject}); nobody approves their own"
            )
            continue
        if not reviewer.groups & groups:
            ignored.append(f"{reviewer.name!r} is not in an approver group ({', '.join(sorted(groups))})")
            continue
        if reviewer.subject in seen:
            ignored.append(f"{reviewer.subject} voted more than once; the first vote counts")
            continue
        seen.add(reviewer.subject)
        if vote.decision == "deny":
            denial = denial or (reviewer.subject, vote.reason)
        else:
            approving[reviewer.subject] = reviewer.groups
    counted = tuple(
        (r, tuple(s for s, member_of in approving.items() if member_of & set(r.approvers)))
        for r in requirements
    )
    if denial is not None:
        state = ApprovalState.DENIED
    elif requirements and all(len(subjects) >= r.approvals for r, subjects in counted):
        state = ApprovalState.APPROVED
    else:
        state = ApprovalState.PENDING
    return Tally(state, counted, denial, tuple(ignored))


def unreachable(hold: Hold, requester: str, verifier: ProofVerifier) -> str | None:
    """Why no set of configured reviewers could ever approve `hold`, or None when some could."""
    for requirement in hold.requirements:
        members = verifier.members(requirement.approvers)
        if members is None:
            continue  # reviewers are not known in advance (tokens): wait and see
        able = members - {requester}
        if len(able) < requirement.approvals:
            who = " or ".join(requirement.approvers)
            have = f"only {len(able)} reviewer{'s' if len(able) != 1 else ''}" if able else "no reviewer"
            return (
                f"rule {requirement.rule!r} needs {requirement.describe()}, but {have} other than the "
                f"requester is configured in {who} (see docs/approvals.md); the statement was not executed"
            )
    return None


@dataclass(frozen=True, slots=True)
class Actor:
    """Who records a step of the lifecycle in the audit: the server's caller, or a reviewer."""

    identity: str
    session_id: str


def new_request_id() -> str:
    """Short enough to type (`mcp-guard approve 3f9a2c81d4`); uniqueness is the store's key."""
    return secrets.token_hex(5)


def _later(seconds: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat(timespec="microseconds")


class Approvals:
    """The lifecycle over a store: hold, vote, wait, claim the one execution, record its outcome."""

    def __init__(self, store: Store, verifier: ProofVerifier) -> None:
        self.store = store
        self.verifier = verifier

    # the server's side -------------------------------------------------------------------------

    async def hold(
        self,
        actor: Actor,
        *,
        call_id: str,
        connection: str,
        statements: Sequence[str],
        params: Sequence[JsonScalar],
        reason: str,
        rule: str,
        hold: Hold,
        details: dict[str, JsonValue],
    ) -> ApprovalRequest:
        """Store a pending request bound to exactly these statements, and record that it was made."""
        now = utc_now()
        request = ApprovalRequest(
            id=new_request_id(),
            call_id=call_id,
            session_id=actor.session_id,
            requester=actor.identity,
            connection=connection,
            statements=tuple(statements),
            params=tuple(params),
            digest=binding_digest(connection, statements, params, actor.identity),
            reason=reason,
            rule=rule,
            requirements=hold.requirements,
            details=details,
            state=ApprovalState.PENDING,
            created_at=now,
            expires_at=_later(hold.ttl),
        )
        detail: dict[str, JsonValue] = {
            "request_id": request.id,
            "digest": request.digest,
            "expires_at": request.expires_at,
            **request.body(),
        }
        await self.store.add_approval(
            request, self._event(EventType.APPROVAL_REQUESTED, actor, request, detail)
        )
        return request

    async def wait(
        self,
        request: ApprovalRequest,
        requirements: Sequence[Requirement],
        timeout: float,
        actor: Actor,
        progress: Progress | None = None,
    ) -> tuple[ApprovalRequest, Tally]:
        """Until the request is decided or expires, or `timeout` seconds pass; other processes decide."""
        started = time.monotonic()
        deadline, reported = started + timeout, -PROGRESS_EVERY_S
        async with self.store.watch_approvals() as changes:
            while True:
                request, counted = await self.settle(request.id, requirements, actor)
                now = time.monotonic()
                if request.state is not ApprovalState.PENDING or now >= deadline:
                    return request, counted
                if progress is not None and now - reported >= PROGRESS_EVERY_S:
                    reported = now
                    message = f"waiting for a reviewer to decide request {request.id}: {counted.describe()}"
                    try:
                        await progress(now - started, timeout, message)
                    except Exception as error:  # a client that cannot hear does not stop the wait
                        log.info("progress for request %s not delivered: %s", request.id, error)
                        progress = None
                until_expiry = max(0.0, _seconds_until(request.expires_at)) + 0.01
                await changes.wait(min(deadline - now, PROGRESS_EVERY_S, until_expiry))

    async def settle(
        self, request_id: str, requirements: Sequence[Requirement], actor: Actor
    ) -> tuple[ApprovalRequest, Tally]:
        """Read the request; record its expiry, or the decision its verified votes prove, if not yet."""
        request = await self.get(request_id, actor)
        counted = tally(request, requirements, self.verifier)
        if request.state is ApprovalState.PENDING and counted.state is not ApprovalState.PENDING:
            detail: dict[str, JsonValue] = {
                "tally": counted.describe(),
                "approvers": json_strings(counted.approvers),
            }
            if counted.denial:
                detail["reason"] = counted.denial[1]
            await self._transition(request, counted.state, actor, detail)
            request = await self.get(request_id, actor)
        return request, counted

    async def claim(
        self, request_id: str, requirements: Sequence[Requirement] | None, actor: Actor, call_id: str
    ) -> tuple[ApprovalRequest, Tally | None]:
        """Take the request for its one execution; ApprovalError (precise) when it may not run.

        `requirements`: what the server's policy demands of these statements now, or None when the
        policy now allows them outright. The state moves APPROVED → EXECUTED by compare-and-set, so
        of two callers, in one process or two, exactly one gets the request.
        """
        counted: Tally | None = None
        if requirements is not None:
            request, counted = await self.settle(request_id, requirements, actor)
            if request.state is ApprovalState.PENDING:
                raise ApprovalError(
                    f"request {request.id} is still waiting for reviewers: {counted.describe()}"
                )
            if request.state is ApprovalState.APPROVED and counted.state is not ApprovalState.APPROVED:
                ignored = f" ({'; '.join(counted.ignored)})" if counted.ignored else ""
                raise ApprovalError(
                    f"request {request.id} is marked approved, but its votes do not prove it: "
                    f"{counted.describe()}{ignored}; it was not executed"
                )
        else:
            request = await self.get(request_id, actor)
        self.require_runnable(request)
        ran = await self.store.query(AuditFilter(call_id=request.call_id, type=EventType.APPROVAL_EXECUTED))
        if any(record.event.detail.get("request_id") == request.id for record in ran):
            raise ApprovalError(
                f"request {request.id} already ran (the audit log says so); an approval runs once"
            )
        now = utc_now()
        event = self._event(
            EventType.APPROVAL_EXECUTED,
            actor,
            request,
            {
                "request_id": request.id,
                "by_call": call_id,
                "approvers": json_strings(counted.approvers if counted else []),
            },
        )
        changes: dict[str, JsonValue] = {"executed_at": now, "executed_by": call_id}
        if not await self.store.transition_approval(
            request.id, ApprovalState.APPROVED, ApprovalState.EXECUTED, event, changes, unexpired_at=now
        ):
            self.require_runnable(await self.get(request.id, actor))
            raise ApprovalError(
                f"request {request.id} changed while it was being claimed; it was not executed"
            )
        return replace(request, state=ApprovalState.EXECUTED, executed_at=now, executed_by=call_id), counted

    async def finish(self, request: ApprovalRequest, actor: Actor, outcome: dict[str, JsonValue]) -> None:
        """Record how the one execution went."""
        event = self._event(EventType.APPROVAL_OUTCOME, actor, request, {"request_id": request.id, **outcome})
        await self.store.finish_approval(request.id, outcome, event)

    # the reviewer's side -----------------------------------------------------------------------

    async def vote(
        self, request_id: str, signer: Signer, decision: Verdict, reason: str, session_id: str
    ) -> tuple[ApprovalRequest, Tally]:
        """Record a signed vote; refuse it when the reviewer may not cast it. Returns the new tally."""
        reviewer = signer.reviewer
        actor = Actor(reviewer.subject, session_id)
        request = await self.get(request_id, actor)
        self.check_reviewer(request, reviewer)
        if decision == "deny" and not reason.strip():
            raise ApprovalError("a denial needs a reason: the assistant and the requester are told it")
        ts = utc_now()
        payload = vote_payload(request, reviewer.name, decision, reason, ts)
        vote = Vote(request.id, reviewer.name, decision, reason, ts, payload, signer.sign(payload))
        event = self._event(
            EventType.APPROVAL_VOTE,
            actor,
            request,
            {"request_id": request.id, "reviewer": reviewer.name, "reason": reason, "proof": vote.proof},
            decision=decision,
        )
        if not await self.store.add_vote(vote, event, unexpired_at=ts):
            self.check_reviewer(await self.get(request_id, actor), reviewer)
            raise ApprovalError(f"request {request_id} changed while the vote was cast; look again")
        return await self.settle(request_id, request.requirements, actor)

    def check_reviewer(self, request: ApprovalRequest, reviewer: Reviewer) -> None:
        """Refuse, before a passphrase is asked, a vote this reviewer may not cast on this request."""
        if request.state is not ApprovalState.PENDING:
            raise ApprovalError(
                f"request {request.id} is {request.state}; only a pending request takes votes"
            )
        if reviewer.subject == request.requester:
            raise ApprovalError(
                f"request {request.id} was made by {request.requester}; "
                "nobody approves or denies their own request"
            )
        groups = {g for r in request.requirements for g in r.approvers}
        if not reviewer.groups & groups:
            raise ApprovalError(
                f"{reviewer.name!r} is not in an approver group of request {request.id} "
                f"({', '.join(sorted(groups))})"
            )
        if any(self._voter(vote) == reviewer.subject for vote in request.votes):
            raise ApprovalError(f"{reviewer.subject} has already voted on request {request.id}")

    def _voter(self, vote: Vote) -> str | None:
        """The subject a stored vote proves it came from; None for a vote that proves nothing."""
        try:
            return self.verifier.verify(vote.reviewer, vote.payload, vote.proof).subject
        except ApprovalError:
            return None

    # both ---------------------------------------------------------------------------------------

    async def get(self, request_id: str, actor: Actor) -> ApprovalRequest:
        """The request, its expiry recorded first if it is due; ApprovalError when there is none."""
        request = await self.store.get_approval(request_id)
        if request is None:
            raise ApprovalError(f"there is no approval request {request_id!r}")
        return await self._expire_if_due(request, actor)

    async def listing(
        self, actor: Actor, states: Iterable[ApprovalState] | None = None, limit: int = 100
    ) -> list[ApprovalRequest]:
        """Requests newest first; pending ones past their time are recorded as expired first."""
        requests = await self.store.list_approvals(
            states=None if states is None else list(states), limit=limit
        )
        if any(r.state in (ApprovalState.PENDING, ApprovalState.APPROVED) and r.expired() for r in requests):
            for request in requests:
                await self._expire_if_due(request, actor)
            requests = await self.store.list_approvals(
                states=None if states is None else list(states), limit=limit
            )
        return requests

    async def _expire_if_due(self, request: ApprovalRequest, actor: Actor) -> ApprovalRequest:
        if request.state not in (ApprovalState.PENDING, ApprovalState.APPROVED) or not request.expired():
            return request
        await self._transition(request, ApprovalState.EXPIRED, actor, {"expired_at": request.expires_at})
        fresh = await self.store.get_approval(request.id)
        assert fresh is not None
        return fresh

    def require_runnable(self, request: ApprovalRequest) -> None:
        if request.state is ApprovalState.APPROVED:
            return
        if request.state is ApprovalState.EXPIRED:
            raise ApprovalExpired(
                f"request {request.id} expired at {request.expires_at} without running; it never will. "
                "Send the statement again if it is still wanted"
            )
        if request.state is ApprovalState.EXECUTED:
            raise ApprovalError(
                f"request {request.id} already ran at {request.executed_at} (call {request.executed_by}); "
                "an approval runs once"
            )
        if request.state is ApprovalState.DENIED:
            reason = next((v.reason for v in request.votes if v.decision == "deny"), "")
            raise ApprovalError(f"request {request.id} was denied: {reason}")
        raise ApprovalError(f"request {request.id} is {request.state}")

    async def _transition(
        self,
        request: ApprovalRequest,
        target: ApprovalState,
        actor: Actor,
        detail: dict[str, JsonValue],
    ) -> bool:
        check_transition(request.id, request.state, target)
        event_type = {
            ApprovalState.APPROVED: EventType.APPROVAL_APPROVED,
            ApprovalState.DENIED: EventType.APPROVAL_DENIED,
            ApprovalState.EXPIRED: EventType.APPROVAL_EXPIRED,
        }[target]
        event = self._event(event_type, actor, request, {"request_id": request.id, **detail})
        expiring = target is ApprovalState.EXPIRED
        changes: dict[str, JsonValue] = {} if expiring else {"decided_at": utc_now()}
        unexpired = None if expiring else utc_now()
        return await self.store.transition_approval(
            request.id, request.state, target, event, changes, unexpired_at=unexpired
        )

    @staticmethod
    def _event(
        event_type: EventType,
        actor: Actor,
        request: ApprovalRequest,
        detail: dict[str, JsonValue],
        decision: str | None = None,
    ) -> AuditEvent:
        return AuditEvent(
            type=event_type,
            session_id=actor.session_id,
            identity=actor.identity,
            call_id=request.call_id,
            tool="execute",
            connection=request.connection,
            decision=decision,
            detail=detail,
        )


def _seconds_until(moment: str) -> float:
    return (datetime.fromisoformat(moment) - datetime.now(UTC)).total_seconds()
