"""The pipeline. The only place that orders the steps of a tool call:

    1 audit the request (intent, committed before anything runs)
    2 classify the SQL, statement by statement
    3 decide by policy (and by the tool: `query` runs reads only)
    5 run each statement alone with the least power that works
    7 audit the decision, the outcome and exactly what the assistant is shown

Steps 4 (approvals) and 6 (masking) slot in between as they land. Nothing here knows MCP: the
server hands in a `CallContext` and gets a `ToolResult` back, whatever happened.
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mcp_guard.backends import open_backend
from mcp_guard.backends.base import Backend, JsonScalar
from mcp_guard.classify import Classification, Statement, StatementKind, classify
from mcp_guard.config import Config, ConnectionSettings
from mcp_guard.errors import AuditError, GuardError, PolicyDenied, UsageError
from mcp_guard.identity import Identity
from mcp_guard.policy import Decision, decide, decide_statement
from mcp_guard.redact import redact
from mcp_guard.results import ToolResult, error_result, execute_result, query_result, text_table
from mcp_guard.store import open_store
from mcp_guard.store.base import AuditEvent, EventType, Store
from mcp_guard.store.checkpoint import Checkpointer, load_signing_key
from mcp_guard.values import JsonValue

log = logging.getLogger(__name__)

QUERY_READS_ONLY = "builtin:query-reads-only"
METADATA_RULE = "builtin:metadata"
MAX_SQL_CHARS = 1_000_000
MAX_PARAMS = 1_000
MAX_RECORDED_ARGUMENTS = 2_000_000


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
        checkpointer: Checkpointer | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.checkpointer = checkpointer
        self._backends = dict(backends)
        self._opened: set[str] = set()

    @classmethod
    async def start(cls, config: Config) -> Guard:
        store = open_store(config.audit_url)
        await store.open()
        try:
            checkpointer = await _checkpointer(config, store)
        except BaseException:
            await store.close()
            raise
        backends = {
            name: open_backend(config.urls[name], pool_size=conn.pool_size)
            for name, conn in config.settings.connections.items()
        }
        return cls(config, store, backends, checkpointer)

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
    ) -> ToolResult:
        args = {"connection": connection, "sql": sql, "reason": reason, "params": list(params or [])}
        return await self._run(ctx, "execute", args, self._execute)

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
            )
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
        except GuardError as error:
            status = "error"
            result = error_result(redact(str(error), self.config.secrets), call.call_id)
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
            if len(json.dumps(result.structured, ensure_ascii=False)) <= cap:
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
            )
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
        backend = self._backends[name]
        if name not in self._opened:
            await backend.open()
            self._opened.add(name)
        return backend

    def _visible_kinds(self, ctx: CallContext, name: str, tool: str) -> list[str]:
        """The statement kinds this identity may run on a connection through a tool, by policy."""
        allowed = []
        for kind in StatementKind:
            probe = Statement(text="", kind=kind, operation=str(kind).upper())
            decision = decide_statement(
                self.config.settings.policy, probe, tool=tool, connection=name, groups=ctx.identity.groups
            )
            if decision.allowed and (tool == "execute" or kind is StatementKind.READ):
                allowed.append(str(kind))
        return allowed

    async def _list_connections(self, ctx: CallContext, call: _Call, args: dict[str, Any]) -> ToolResult:
        entries: list[JsonValue] = []
        for name, conn in self.config.settings.connections.items():
            query_kinds = self._visible_kinds(ctx, name, "query")
            execute_kinds = self._visible_kinds(ctx, name, "execute")
            if not query_kinds and not execute_kinds:
                continue
            entries.append(
                {
                    "name": name,
                    "dialect": _dialect(self.config.urls[name]),
                    "description": conn.description,
                    "query": query_kinds,
                    "execute": execute_kinds,
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
        rows = [
            [c.name, c.type, "yes" if c.nullable else "no", "yes" if c.primary_key else ""] for c in columns
        ]
        structured: dict[str, JsonValue] = {
            "connection": name,
            "table": table,
            "columns": [
                {"name": c.name, "type": c.type, "nullable": c.nullable, "primary_key": c.primary_key}
                for c in columns
            ],
        }
        return ToolResult(
            call.call_id, text_table(["column", "type", "nullable", "primary key"], rows), structured
        )

    def _require_visible(self, ctx: CallContext, name: str) -> None:
        if not self._visible_kinds(ctx, name, "query") and not self._visible_kinds(ctx, name, "execute"):
            raise PolicyDenied(
                f"identity {ctx.identity.subject} may not use connection {name!r}", rule=METADATA_RULE
            )

    def _classify(self, call: _Call, name: str, sql: object, params: object) -> Classification:
        if not isinstance(sql, str) or not sql.strip():
            raise UsageError("sql must be a non-empty string of SQL")
        if len(sql) > MAX_SQL_CHARS:
            raise UsageError(f"sql is {len(sql)} characters; the limit is {MAX_SQL_CHARS}")
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

    def _decide(self, ctx: CallContext, call: _Call, name: str, classification: Classification) -> None:
        decision = decide(
            self.config.settings.policy,
            classification,
            tool=call.tool,
            connection=name,
            groups=ctx.identity.groups,
        )
        call.decision = decision
        if not decision.allowed:
            where = ""
            if len(classification.statements) > 1 and decision.statement_index is not None:
                where = f" (statement {decision.statement_index + 1})"
            raise PolicyDenied(f"rule {decision.rule!r}{where}: {decision.reason}", rule=decision.rule)

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
        self._decide(ctx, call, name, classification)
        backend = await self._backend(name)
        results = await backend.read([s.text for s in classification.statements], args["params"], conn.limits)
        call.summary = {
            "rows": [r.row_count for r in results],
            "truncated": any(r.truncated for r in results),
        }
        return query_result(call.call_id, name, results, conn.limits)

    async def _execute(self, ctx: CallContext, call: _Call, args: dict[str, Any]) -> ToolResult:
        name, conn = self._connection(args["connection"])
        call.connection = name
        reason = args["reason"]
        if not isinstance(reason, str) or not reason.strip():
            raise UsageError("reason is required: say which request of the user this change serves")
        classification = self._classify(call, name, args["sql"], args["params"])
        self._decide(ctx, call, name, classification)
        backend = await self._backend(name)
        results = await backend.write(
            [s.text for s in classification.statements], args["params"], conn.limits
        )
        call.summary = {"rows_affected": sum(r.rows_affected or 0 for r in results)}
        return execute_result(call.call_id, name, results, conn.limits)
