"""The pipeline. The only place that orders the steps of a tool call:

    1 audit the request (intent, committed before anything runs)
    2 classify the SQL, statement by statement
    3 decide by policy (and by the tool: `query` runs reads only); writes are estimated first
      when a rule looks at row counts
    4 hold: store a pending request, wait for reviewers (approvals.py), run it only once approved
    5 run each statement alone with the least power that works
    6 mask: before the reads run, every reference to a relation with masked columns is rewritten
      into a masked derived table (what no rewrite can see is refused); after the rows come back,
      lineage notes which columns carry masked data and the content detectors scan text values
    7 audit the decision, the outcome and exactly what the assistant is shown

Nothing here knows MCP: the server hands in a `CallContext` (and, for waits, a progress callback)
and gets a `ToolResult` back, whatever happened.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

import anyio

from mcp_guard.approvals import (
    Actor,
    ApprovalRequest,
    Approvals,
    ApprovalState,
    Progress,
    Tally,
    json_strings,
    unreachable,
)
from mcp_guard.backends import open_backend
from mcp_guard.backends.base import Backend, JsonScalar, WriteResult
from mcp_guard.classify import Classification, Statement, StatementKind, classify
from mcp_guard.config import Config, ConnectionSettings
from mcp_guard.errors import ApprovalError, AuditError, GuardError, PolicyDenied, UsageError
from mcp_guard.failure_budget import FailureBudget
from mcp_guard.identity import Identity
from mcp_guard.masking import Masking
from mcp_guard.masking_step import MaskingStep, Refusal, audit_key
from mcp_guard.policy import Decision, Requirement, decide, decide_statement, needs_estimate
from mcp_guard.redact import redact
from mcp_guard.results import (
    ToolResult,
    error_result,
    execute_result,
    held_result,
    query_result,
    text_table,
)
from mcp_guard.rewrite import MASKING_RULE
from mcp_guard.store import open_store
from mcp_guard.store.base import AuditEvent, EventType, Store
from mcp_guard.store.checkpoint import Checkpointer, load_signing_key
from mcp_guard.values import JsonValue

log = logging.getLogger(__name__)

QUERY_READS_ONLY = "builtin:query-reads-only"
METADATA_RULE = "builtin:metadata"
UNAUTHENTICATED = "unauthenticated"
REQUESTER_RULE = "builtin:approval-requester"
MAX_REQUEST_ID = 64
MAX_PARAMS = 1_000
MAX_RECORDED_ARGUMENTS = 2_000_000
DURABLE_TOOLS = frozenset({"execute", "approval_status"})
"""Calls that change data: their audit entries are synced to disk before the call goes on."""


@dataclass(frozen=True, slots=True)
class CallContext:
    """Who is calling, from which session and client."""

    identity: Identity
    session_id: str
    client: str | None = None


@dataclass(slots=True)
class _Call:
    """What the pipeline learned about one call, for its outcome record."""

    call_id: str
    tool: str
    connection: str | None = None
    classification: Classification | None = None
    decision: Decision | None = None
    summary: dict[str, JsonValue] = field(default_factory=dict)


def _recordable(value: object) -> JsonValue:
    """Arguments as the audit can hold them: hostile values (NaN, huge blobs) become their repr."""
    try:
        encoded = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return {"unrecordable": repr(value)[:MAX_RECORDED_ARGUMENTS]}
    if len(encoded) > MAX_RECORDED_ARGUMENTS:
        return {"truncated": encoded[:MAX_RECORDED_ARGUMENTS]}
    return json.loads(encoded)  # type: ignore[no-any-return]


_ENCODER = json.JSONEncoder(ensure_ascii=False)


def _json_fits(value: JsonValue, cap: int) -> bool:
    """Whether `value` as JSON holds at most `cap` characters, encoding no more of it than that: a
    10,000-row result is not encoded whole to learn that it is over the audit's response cap."""
    size = 0
    for chunk in _ENCODER.iterencode(value):
        size += len(chunk)
        if size > cap:
            return False
    return True


def _dialect(url: str) -> str:
    return "sqlite" if url.startswith("sqlite:") else "postgres"


async def _checkpointer(config: Config, store: Store) -> Checkpointer | None:
    """Signed checkpoints as configured; the key is created on first use when none was given."""
    every = config.settings.audit.checkpoint_every
    if not every:
        return None
    key = load_signing_key(config.signing_key_path, create=True)
    if key is None:
        return None
    checkpointer = Checkpointer(store, key, every, config.witness_path)
    await checkpointer.start()
    return checkpointer


class Guard:
    """Holds the configuration, the audit store and one backend per connection."""

    def __init__(
        self,
        config: Config,
        store: Store,
        backends: Mapping[str, Backend],
        masking: Masking | None = None,
        checkpointer: Checkpointer | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.checkpointer = checkpointer
        self._backends = dict(backends)
        self._opened: set[str] = set()
        self._opening: dict[str, asyncio.Lock] = {}
        self.masking = MaskingStep(
            config, masking or Masking.from_settings(config.settings.masking, config.source), self._backend
        )
        self.approvals = Approvals(store, config.settings.approvals.verifier())
        self.failures = FailureBudget()

    @classmethod
    async def start(cls, config: Config) -> Guard:
        masking = Masking.from_settings(config.settings.masking, config.source)
        audit_key(config)  # a missing audit key stops the start, before anything is opened
        store = open_store(config.audit_url, durability=config.settings.audit.durability)
        await store.open()
        try:
            checkpointer = await _checkpointer(config, store)
        except BaseException:
            await store.close()
            raise
        backends = {
            name: open_backend(
                config.urls[name],
                pool_size=conn.pool_size,
                read_timeout_s=conn.timeout,
                functions=masking.sqlite_functions(),
            )
            for name, conn in config.settings.connections.items()
        }
        return cls(config, store, backends, masking, checkpointer)

    async def close(self) -> None:
        for name in list(self._opened):
            await self._backends[name].close()
        self._opened.clear()
        await self.store.close()

    # sessions -----------------------------------------------------------------------------------

    async def start_session(self, ctx: CallContext, detail: dict[str, JsonValue] | None = None) -> None:
        await self.store.append(
            AuditEvent(
                type=EventType.SESSION_START,
                session_id=ctx.session_id,
                identity=ctx.identity.subject,
                detail={"identity": ctx.identity.as_dict(), "client": ctx.client, **(detail or {})},
            )
        )

    async def end_session(self, ctx: CallContext, detail: dict[str, JsonValue] | None = None) -> None:
        """Record the end, then sign the head: a session's record is vouched for as soon as it closes."""
        await self.store.append(
            AuditEvent(
                type=EventType.SESSION_END,
                session_id=ctx.session_id,
                identity=ctx.identity.subject,
                detail=detail or {},
            )
        )
        if self.checkpointer is not None:
            await self.checkpointer.checkpoint(f"session end {ctx.session_id}")

    async def record_auth_failure(
        self,
        reason: str,
        *,
        transport: str,
        session_id: str,
        detail: Mapping[str, str],
        call_id: str | None = None,
        tool: str | None = None,
    ) -> None:
        """A caller refused for its token: the reason and the token's fingerprint, never the token.
        A flood from one source is condensed (failure_budget.py): one entry per interval, with a count."""
        unrecorded = self.failures.admit(detail.get("client_address") or transport)
        if unrecorded is None:
            return
        extra: dict[str, JsonValue] = {"unrecorded_before": unrecorded} if unrecorded else {}
        await self.store.append(
            AuditEvent(
                type=EventType.AUTH_FAILURE,
                session_id=session_id,
                identity=UNAUTHENTICATED,
                call_id=call_id,
                tool=tool,
                decision="deny",
                detail={"reason": reason, "transport": transport, **detail, **extra},
            )
        )

    # tools --------------------------------------------------------------------------------------

    async def list_connections(self, ctx: CallContext) -> ToolResult:
        return await self._run(ctx, "list_connections", {}, self._list_connections)

    async def list_tables(self, ctx: CallContext, connection: str | None) -> ToolResult:
        return await self._run(ctx, "list_tables", {"connection": connection}, self._list_tables)

    async def describe_table(self, ctx: CallContext, connection: str | None, table: str) -> ToolResult:
        args = {"connection": connection, "table": table}
        return await self._run(ctx, "describe_table", args, self._describe_table)

    async def query(
        self, ctx: CallContext, connection: str | None, sql: str, params: Sequence[JsonScalar] | None
    ) -> ToolResult:
        args = {"connection": connection, "sql": sql, "params": list(params or [])}
        return await self._run(ctx, "query", args, self._query)

    async def execute(
        self,
        ctx: CallContext,
        connection: str | None,
        sql: str,
        reason: str,
        params: Sequence[JsonScalar] | None,
        progress: Progress | None = None,
    ) -> ToolResult:
        """`progress` hears from a call held for approval while it waits."""
        args = {"connection": connection, "sql": sql, "reason": reason, "params": list(params or [])}

        async def step(ctx: CallContext, call: _Call, args: dict[str, Any]) -> ToolResult:
            return await self._execute(ctx, call, args, progress)

        return await self._run(ctx, "execute", args, step)

    async def approval_status(self, ctx: CallContext, request_id: str) -> ToolResult:
        return await self._run(ctx, "approval_status", {"request_id": request_id}, self._approval_status)

    async def record_rejected(self, ctx: CallContext, tool: str, arguments: object, message: str) -> None:
        """A call refused before any tool ran (unknown tool, arguments off the schema) is recorded too."""
        call_id = str(uuid.uuid4())
        shown = arguments if isinstance(arguments, dict) else {"raw": repr(arguments)[:1000]}
        base = {
            "session_id": ctx.session_id,
            "identity": ctx.identity.subject,
            "call_id": call_id,
            "tool": tool,
        }
        await self.store.append(
            AuditEvent(
                type=EventType.REQUEST, detail={"arguments": _recordable(shown), "client": ctx.client}, **base
            )
        )
        await self.store.append(
            AuditEvent(
                type=EventType.OUTCOME,
                detail={
                    "status": "rejected",
                    "response": {
                        "text": message[: self.config.settings.audit.response_cap],
                        "is_error": True,
                    },
                },
                **base,
            )
        )

    # the pipeline -------------------------------------------------------------------------------

    async def _run(self, ctx: CallContext, tool: str, args: dict[str, Any], step: Any) -> ToolResult:
        call = _Call(call_id=str(uuid.uuid4()), tool=tool, connection=args.get("connection"))
        await self.store.append(
            AuditEvent(
                type=EventType.REQUEST,
                session_id=ctx.session_id,
                identity=ctx.identity.subject,
                call_id=call.call_id,
                tool=tool,
                connection=call.connection,
                detail={
                    "arguments": _recordable(args),
                    "client": ctx.client,
                    "groups": sorted(ctx.identity.groups),
                },
            ),
            durable=tool in DURABLE_TOOLS,
        )
        started = time.perf_counter()
        status = "ok"
        try:
            result: ToolResult = await step(ctx, call, args)
        except PolicyDenied as denied:
            status = "denied"
            result = error_result(f"Denied: {denied}", call.call_id)
        except AuditError:
            raise
        except asyncio.CancelledError:  # the client gave up (a held call, say): its outcome is recorded
            with anyio.CancelScope(shield=True):
                result = error_result("Cancelled by the client.", call.call_id)
                await self._record_outcome(ctx, call, "cancelled", result, time.perf_counter() - started)
            raise
        except GuardError as error:
            status = "error"
            shown = self.masking.detectors.text(redact(str(error), self.config.secrets))
            result = error_result(shown, call.call_id)
        except Exception:
            log.exception("unexpected failure in %s (call %s)", tool, call.call_id)
            status = "error"
            result = error_result(
                "Internal error in mcp-guard; the operator can find it in the logs.", call.call_id
            )
        await self._record_outcome(ctx, call, status, result, time.perf_counter() - started)
        return result

    async def _record_outcome(
        self, ctx: CallContext, call: _Call, status: str, result: ToolResult, seconds: float
    ) -> None:
        cap = self.config.settings.audit.response_cap
        response: dict[str, JsonValue] = {
            "text": result.text[:cap],
            "text_truncated": len(result.text) > cap,
            "is_error": result.is_error,
        }
        if result.structured is not None:
            # the structured content the model was sent too, whole or not at all (a cut JSON is no record)
            if _json_fits(result.structured, cap):
                response["structured"] = result.structured
            else:
                response["structured_omitted"] = True
        detail: dict[str, JsonValue] = {
            "status": status,
            "duration_ms": round(seconds * 1000, 3),
            "response": response,
            **call.summary,
        }
        if call.classification is not None:
            detail["classification"] = call.classification.as_dict()
        if call.decision is not None:
            detail["decision"] = {
                "action": call.decision.action,
                "rule": call.decision.rule,
                "reason": call.decision.reason,
                "statement_index": call.decision.statement_index,
            }
        decision = call.decision.action if call.decision else ("deny" if status == "denied" else None)
        await self.store.append(
            AuditEvent(
                type=EventType.OUTCOME,
                session_id=ctx.session_id,
                identity=ctx.identity.subject,
                call_id=call.call_id,
                tool=call.tool,
                connection=call.connection,
                decision=decision,
                detail=detail,
            ),
            durable=call.tool in DURABLE_TOOLS,
        )

    def _connection(self, name: str | None) -> tuple[str, ConnectionSettings]:
        connections = self.config.settings.connections
        if name is None or name == "":
            if len(connections) == 1:
                name = next(iter(connections))
            else:
                raise UsageError(f"name a connection: one of {', '.join(sorted(connections))}")
        if name not in connections:
            raise UsageError(f"no connection named {name!r}; known: {', '.join(sorted(connections))}")
        return name, connections[name]

    async def _backend(self, name: str) -> Backend:
        """The connection's backend, opened on first use; concurrent first calls open it once (a second
        open would leak the first's pool, whose threads then kept the process from exiting)."""
        backend = self._backends[name]
        if name not in self._opened:
            async with self._opening.setdefault(name, asyncio.Lock()):
                if name not in self._opened:
                    await backend.open()
                    self._opened.add(name)
        return backend

    def _visible_kinds(self, ctx: CallContext, name: str, tool: str, action: str = "allow") -> list[str]:
        """The statement kinds this identity may run on a connection through a tool, by policy
        (`action="approve"`: the kinds it may run once a reviewer approves)."""
        allowed = []
        for kind in StatementKind:
            probe = Statement(text="", kind=kind, operation=str(kind).upper())
            decision = decide_statement(
                self.config.settings.policy, probe, tool=tool, connection=name, groups=ctx.identity.groups
            )
            if decision.action == action and (tool == "execute" or kind is StatementKind.READ):
                allowed.append(str(kind))
        return allowed

    async def _list_connections(self, ctx: CallContext, call: _Call, args: dict[str, Any]) -> ToolResult:
        entries: list[JsonValue] = []
        for name, conn in self.config.settings.connections.items():
            query_kinds = self._visible_kinds(ctx, name, "query")
            execute_kinds = self._visible_kinds(ctx, name, "execute")
            held_kinds = self._visible_kinds(ctx, name, "execute", "approve")
            if not query_kinds and not execute_kinds and not held_kinds:
                continue
            entries.append(
                {
                    "name": name,
                    "dialect": _dialect(self.config.urls[name]),
                    "description": conn.description,
                    "query": query_kinds,
                    "execute": execute_kinds,
                    "execute_with_approval": held_kinds,
                    "row_limit": conn.row_limit,
                    "timeout_s": conn.timeout,
                }
            )
        rows = [
            [
                e["name"],
                e["dialect"],
                ", ".join(e["query"]) or "-",
                ", ".join(e["execute"]) or "-",
                e["description"],
            ]
            for e in entries
            if isinstance(e, dict)
        ]
        text = text_table(["connection", "dialect", "query", "execute", "description"], rows)
        call.decision = Decision("allow", METADATA_RULE, "metadata")
        return ToolResult(call.call_id, text, {"connections": entries})

    async def _list_tables(self, ctx: CallContext, call: _Call, args: dict[str, Any]) -> ToolResult:
        name, _ = self._connection(args["connection"])
        call.connection = name
        self._require_visible(ctx, name)
        tables = await (await self._backend(name)).list_tables()
        call.decision = Decision("allow", METADATA_RULE, "metadata")
        rows = [[t.qualified_name, t.kind] for t in tables]
        structured: dict[str, JsonValue] = {
            "connection": name,
            "tables": [{"schema": t.schema, "name": t.name, "kind": t.kind} for t in tables],
        }
        return ToolResult(call.call_id, text_table(["table", "kind"], rows), structured)

    async def _describe_table(self, ctx: CallContext, call: _Call, args: dict[str, Any]) -> ToolResult:
        name, _ = self._connection(args["connection"])
        call.connection = name
        self._require_visible(ctx, name)
        table = args["table"]
        if not isinstance(table, str) or not table.strip() or len(table) > 300:
            raise UsageError("table must be a table name such as 'orders' or 'public.orders'")
        columns = await (await self._backend(name)).describe_table(table.strip())
        call.decision = Decision("allow", METADATA_RULE, "metadata")
        masks = await self.masking.described(name, ctx.identity.groups, table.strip())
        rows = [
            [
                c.name,
                c.type,
                "yes" if c.nullable else "no",
                "yes" if c.primary_key else "",
                masks[c.name].strategy if c.name in masks else "",
            ]
            for c in columns
        ]
        structured: dict[str, JsonValue] = {
            "connection": name,
            "table": table,
            "columns": [
                {
                    "name": c.name,
                    "type": c.type,
                    "nullable": c.nullable,
                    "primary_key": c.primary_key,
                    "masked": masks[c.name].strategy if c.name in masks else None,
                }
                for c in columns
            ],
        }
        return ToolResult(
            call.call_id,
            text_table(["column", "type", "nullable", "primary key", "masked"], rows),
            structured,
        )

    def _require_visible(self, ctx: CallContext, name: str) -> None:
        if not any(
            self._visible_kinds(ctx, name, tool, action)
            for tool, action in (("query", "allow"), ("execute", "allow"), ("execute", "approve"))
        ):
            raise PolicyDenied(
                f"identity {ctx.identity.subject} may not use connection {name!r}", rule=METADATA_RULE
            )

    def _classify(self, call: _Call, name: str, sql: object, params: object) -> Classification:
        if not isinstance(sql, str) or not sql.strip():
            raise UsageError("sql must be a non-empty string of SQL")
        limit = self.config.settings.connections[name].sql_limit
        if len(sql) > limit:
            raise UsageError(
                f"sql is {len(sql):,} characters; connection {name!r} takes at most {limit:,} "
                "(its sql_limit): send the work in smaller statements"
            )
        if not isinstance(params, list) or len(params) > MAX_PARAMS:
            raise UsageError(f"params must be a list of at most {MAX_PARAMS} values")
        for index, value in enumerate(params):
            if not isinstance(value, str | int | float | bool | None) or (
                isinstance(value, float) and not math.isfinite(value)
            ):
                raise UsageError(f"params[{index}] must be a string, a finite number, true/false or null")
        classification = classify(sql, _dialect(self.config.urls[name]))
        call.classification = classification
        if not classification.statements:
            raise UsageError("sql holds no statement (only whitespace or comments)")
        if params and len(classification.statements) > 1:
            raise UsageError("params can be bound to a single statement only; send one statement per call")
        return classification

    def _decide(
        self,
        ctx: CallContext,
        call: _Call,
        name: str,
        classification: Classification,
        estimates: Sequence[int | None] | None = None,
    ) -> Decision:
        decision = decide(
            self.config.settings.policy,
            classification,
            tool=call.tool if call.tool != "approval_status" else "execute",
            connection=name,
            groups=ctx.identity.groups,
            estimates=estimates,
        )
        call.decision = decision
        where = ""
        if len(classification.statements) > 1 and decision.statement_index is not None:
            where = f" (statement {decision.statement_index + 1})"
        if decision.hold is not None:
            why_not = unreachable(decision.hold, ctx.identity.subject, self.approvals.verifier)
            if why_not is not None:
                call.decision = Decision("deny", decision.rule, why_not, decision.statement_index)
                raise PolicyDenied(f"{decision.reason}{where}, but {why_not}", rule=decision.rule)
        elif not decision.allowed:
            raise PolicyDenied(f"rule {decision.rule!r}{where}: {decision.reason}", rule=decision.rule)
        return decision

    async def _estimates(
        self,
        ctx: CallContext,
        call: _Call,
        name: str,
        conn: ConnectionSettings,
        classification: Classification,
        params: Any,
        known: Sequence[int | None] | None = None,
    ) -> list[int | None] | None:
        """Rows each write would change, by the database's own estimate, where a rule that looks at
        row counts could match; None where the database cannot say (those rules then fail closed).
        With `known` (a held call, for its reviewers): every write not estimated yet."""
        wanted = [
            statement.kind is StatementKind.WRITE
            and (
                known[index] is None
                if known is not None
                else needs_estimate(
                    self.config.settings.policy,
                    statement,
                    tool="execute",
                    connection=name,
                    groups=ctx.identity.groups,
                )
            )
            for index, statement in enumerate(classification.statements)
        ]
        if not any(wanted):
            return list(known) if known is not None else None
        backend = await self._backend(name)
        estimates: list[int | None] = []
        for index, (statement, asked) in enumerate(zip(classification.statements, wanted, strict=True)):
            estimate = known[index] if known is not None else None
            if asked:
                try:
                    estimate = await backend.estimate_rows(statement, params, conn.limits)
                except GuardError as error:
                    shown = redact(str(error), self.config.secrets)
                    log.info("no row estimate for call %s: %s", call.call_id, shown)
            estimates.append(estimate)
        call.summary["estimated_rows"] = list(estimates)
        return estimates

    async def _query(self, ctx: CallContext, call: _Call, args: dict[str, Any]) -> ToolResult:
        name, conn = self._connection(args["connection"])
        call.connection = name
        classification = self._classify(call, name, args["sql"], args["params"])
        for index, statement in enumerate(classification.statements):
            if statement.kind is not StatementKind.READ:
                call.decision = Decision(
                    "deny",
                    QUERY_READS_ONLY,
                    f"query runs reads only; statement {index + 1} is {statement.operation} "
                    f"({statement.kind})",
                    index,
                )
                hint = "" if statement.kind is StatementKind.UNKNOWN else "; use execute for writes"
                raise PolicyDenied(f"{call.decision.reason}{hint}", rule=QUERY_READS_ONLY)
        decision = self._decide(ctx, call, name, classification)
        if decision.held:  # only execute can wait for a reviewer: fail closed
            call.decision = Decision("deny", decision.rule, "held reads run through execute only")
            raise PolicyDenied(
                f"rule {decision.rule!r} holds this for a reviewer's approval ({decision.reason}); only "
                "`execute` can wait for one",
                rule=decision.rule,
            )
        params = list(args["params"])
        statements = classification.statements
        reads = await self.masking.before_reads(name, ctx.identity.groups, statements, len(params))
        if isinstance(reads, Refusal):
            self._deny_masking(call, classification, reads)
        backend = await self._backend(name)
        texts = [rw.sql if rw else s.text for s, rw in zip(statements, reads.rewritten, strict=True)]
        keep_raw = self.masking.audit_key is not None and any(reads.rewritten)
        if keep_raw:  # the same statements unmasked, in the same snapshot, for the sealed originals
            texts += [s.text for s in statements]
        bound = [params + list(rw.bound if rw else ()) for rw in reads.rewritten]
        if any(reads.rewritten) or keep_raw:
            results = await backend.read(texts, [], conn.limits, bound + [params] * (len(texts) - len(bound)))
        else:
            results = await backend.read(texts, params, conn.limits)
        results, raw = results[: len(statements)], results[len(statements) :]
        protected = [
            self.masking.protect(reads, statement, result)
            for statement, result in zip(statements, results, strict=True)
        ]
        call.summary = {
            "rows": [r.row_count for r in results],
            "truncated": any(r.truncated for r in results),
        }
        masking_summary = self.masking.summary(call.call_id, reads, protected, raw)
        if masking_summary:
            call.summary["masking"] = masking_summary
            # What `audit stats` counts: every cell the assistant was shown masked or redacted.
            call.summary["masked_cells"] = sum(
                sum(note.mask is not None for note in p.notes) * result.row_count + len(p.findings)
                for p, result in zip(protected, results, strict=True)
            )
        return query_result(call.call_id, name, results, conn.limits, protected)

    # step 6: masking ----------------------------------------------------------------------------

    async def _execute(
        self, ctx: CallContext, call: _Call, args: dict[str, Any], progress: Progress | None
    ) -> ToolResult:
        name, conn = self._connection(args["connection"])
        call.connection = name
        reason = args["reason"]
        if not isinstance(reason, str) or not reason.strip():
            raise UsageError("reason is required: say which request of the user this change serves")
        classification = self._classify(call, name, args["sql"], args["params"])
        estimates = await self._estimates(ctx, call, name, conn, classification, args["params"])
        decision = self._decide(ctx, call, name, classification, estimates)
        await self._check_write_masking(ctx, call, name, classification, len(args["params"]))
        statements = [s.text for s in classification.statements]
        if decision.hold is not None:
            held = (decision, classification, estimates, statements)
            return await self._hold(ctx, call, *held, args, progress)
        backend = await self._backend(name)
        results = await backend.write(statements, args["params"], conn.limits)
        return self._wrote(call, name, conn, classification, results)

    def _wrote(
        self,
        call: _Call,
        name: str,
        conn: ConnectionSettings,
        classification: Classification,
        results: list[WriteResult],
    ) -> ToolResult:
        """After a write: the schema cache after DDL, detectors over returned rows, the summary."""
        kinds = {s.kind for s in classification.statements}
        if kinds - {StatementKind.READ, StatementKind.WRITE}:
            self.masking.forget(name)  # DDL may have changed what masking must know
        detections = self.masking.scan_returned(results)
        call.summary["rows_affected"] = sum(r.rows_affected or 0 for r in results)
        if detections:
            call.summary["masking"] = {"detections": detections}
        return execute_result(call.call_id, name, results, conn.limits)

    async def _check_write_masking(
        self, ctx: CallContext, call: _Call, name: str, classification: Classification, params: int
    ) -> None:
        refusal = await self.masking.check_write(name, ctx.identity.groups, classification.statements, params)
        if refusal is not None:
            self._deny_masking(call, classification, refusal)

    def _deny_masking(self, call: _Call, classification: Classification, refusal: Refusal) -> NoReturn:
        call.decision = Decision("deny", MASKING_RULE, refusal.reason, refusal.index)
        where = f" (statement {refusal.index + 1})" if len(classification.statements) > 1 else ""
        raise PolicyDenied(f"masking{where}: {refusal.reason}", rule=MASKING_RULE)

    # step 4: approvals --------------------------------------------------------------------------

    async def _hold(
        self,
        ctx: CallContext,
        call: _Call,
        decision: Decision,
        classification: Classification,
        estimates: Sequence[int | None] | None,
        statements: Sequence[str],
        args: dict[str, Any],
        progress: Progress | None,
    ) -> ToolResult:
        """Store the held call as a request bound to exactly these statements; wait for its decision."""
        assert decision.hold is not None and call.connection is not None
        actor = Actor(ctx.identity.subject, ctx.session_id)
        _, conn = self._connection(call.connection)
        unknown = estimates if estimates is not None else [None] * len(classification.statements)
        estimates = await self._estimates(
            ctx, call, call.connection, conn, classification, args["params"], known=unknown
        )
        details: dict[str, JsonValue] = {
            "classification": classification.as_dict(),
            "estimated_rows": list(estimates) if estimates is not None else None,
            "policy": decision.reason,
            "groups": json_strings(sorted(ctx.identity.groups)),
        }
        request = await self.approvals.hold(
            actor,
            call_id=call.call_id,
            connection=call.connection,
            statements=statements,
            params=args["params"],
            reason=args["reason"],
            rule=decision.rule,
            hold=decision.hold,
            details=details,
        )
        request, counted = await self.approvals.wait(
            request, decision.hold.requirements, self.config.settings.approvals.wait, actor, progress
        )
        return await self._resolve(ctx, call, request, decision.hold.requirements, counted, waited=True)

    async def _approval_status(self, ctx: CallContext, call: _Call, args: dict[str, Any]) -> ToolResult:
        request_id = args["request_id"]
        if not isinstance(request_id, str) or not 0 < len(request_id.strip()) <= MAX_REQUEST_ID:
            raise UsageError("request_id must be the id an execute call returned, such as '3f9a2c81d4'")
        actor = Actor(ctx.identity.subject, ctx.session_id)
        request = await self.approvals.get(request_id.strip(), actor)
        call.connection = request.connection
        call.summary["approval"] = {"request_id": request.id, "state": str(request.state)}
        if request.requester != ctx.identity.subject:
            call.decision = Decision("deny", REQUESTER_RULE, "not the requester")
            raise PolicyDenied(
                f"request {request.id} was made by {request.requester}; only the requester's own calls "
                "may ask for it or run it",
                rule=REQUESTER_RULE,
            )
        requirements: tuple[Requirement, ...] | None = ()
        counted = None
        if request.state in (ApprovalState.PENDING, ApprovalState.APPROVED):
            requirements = await self._requirements_now(ctx, call, request)
            if requirements is not None:
                request, counted = await self.approvals.settle(request.id, requirements, actor)
        return await self._resolve(ctx, call, request, requirements, counted, waited=False)

    async def _requirements_now(
        self, ctx: CallContext, call: _Call, request: ApprovalRequest
    ) -> tuple[Requirement, ...] | None:
        """What the policy demands of the stored statements today: decided again from the statements
        themselves, not from anything the store says. None: the policy now allows them outright."""
        name, conn = self._connection(request.connection)
        dialect = _dialect(self.config.urls[name])
        parts = [classify(text, dialect).statements for text in request.statements]
        if not parts or any(len(part) != 1 for part in parts):
            raise ApprovalError(f"request {request.id}: its stored statements are damaged; it will not run")
        classification = Classification(
            sql=";\n".join(request.statements), dialect=dialect, statements=tuple(p[0] for p in parts)
        )
        call.classification = classification
        estimates = await self._estimates(ctx, call, name, conn, classification, list(request.params))
        decision = self._decide(ctx, call, name, classification, estimates)
        await self._check_write_masking(ctx, call, name, classification, len(request.params))
        return decision.hold.requirements if decision.hold is not None else None

    async def _resolve(
        self,
        ctx: CallContext,
        call: _Call,
        request: ApprovalRequest,
        requirements: Sequence[Requirement] | None,
        counted: Tally | None,
        *,
        waited: bool,
    ) -> ToolResult:
        """What the assistant hears about a request in its current state; an approved one runs."""
        call.summary["approval"] = {"request_id": request.id, "state": str(request.state)}
        if request.state is ApprovalState.APPROVED:
            return await self._run_approved(ctx, call, request, requirements)
        if request.state is ApprovalState.PENDING:
            wait = self.config.settings.approvals.wait
            return held_result(
                call.call_id,
                request_id=request.id,
                connection=request.connection,
                rule=request.rule,
                needs=[r.describe() for r in request.requirements],
                progress=counted.describe() if counted else "",
                expires_at=request.expires_at,
                waited_s=wait if waited else None,
            )
        if request.state is ApprovalState.DENIED:
            subject, reason = _denial(request, counted)
            call.decision = Decision("deny", request.rule, f"denied by reviewer {subject}: {reason}")
            raise PolicyDenied(
                f"reviewer {subject} denied request {request.id}: {reason}. The statement was not executed.",
                rule=request.rule,
            )
        self.approvals.require_runnable(request)  # expired or already executed: says which
        raise ApprovalError(f"request {request.id} is {request.state}")

    async def _run_approved(
        self,
        ctx: CallContext,
        call: _Call,
        request: ApprovalRequest,
        requirements: Sequence[Requirement] | None,
    ) -> ToolResult:
        """Claim the one execution, run exactly the stored statements, record how it went."""
        actor = Actor(ctx.identity.subject, ctx.session_id)
        name, conn = self._connection(request.connection)
        request, counted = await self.approvals.claim(request.id, requirements, actor, call.call_id)
        approvers = counted.approvers if counted else []
        call.summary["approval"] = {
            "request_id": request.id,
            "state": "executed",
            "approvers": json_strings(approvers),
        }
        try:
            backend = await self._backend(name)
            results = await backend.write(list(request.statements), list(request.params), conn.limits)
        except Exception as error:
            shown = "internal error"
            if isinstance(error, GuardError):
                shown = self.masking.detectors.text(redact(str(error), self.config.secrets))
            outcome: dict[str, JsonValue] = {"status": "error", "error": shown, "by_call": call.call_id}
            await self.approvals.finish(request, actor, outcome)
            raise
        assert call.classification is not None  # set by the decision that let the request run
        result = self._wrote(call, name, conn, call.classification, results)
        affected = sum(r.rows_affected or 0 for r in results)
        await self.approvals.finish(
            request, actor, {"status": "ok", "rows_affected": affected, "by_call": call.call_id}
        )
        who = ", ".join(approvers) or "policy"
        structured = dict(result.structured or {})
        structured["approval"] = {
            "request_id": request.id,
            "state": "executed",
            "approved_by": json_strings(approvers),
        }
        text = f"Approved by {who} (request {request.id}); ran once, exactly as requested.\n{result.text}"
        return ToolResult(call.call_id, text, structured)


def _denial(request: ApprovalRequest, counted: Tally | None) -> tuple[str, str]:
    """Who denied the request and why: the verified denial when known, else the stored one."""
    if counted is not None and counted.denial is not None:
        return counted.denial
    for vote in request.votes:
        if vote.decision == "deny":
            return vote.reviewer, vote.reason
    return "a reviewer", "no reason recorded"
