"""The MCP face of the guard: tool definitions and transports, nothing else.

Every tool hands its arguments to `Guard` and turns the `ToolResult` into a `CallToolResult`. A
refusal is an error result the model reads; the server keeps serving.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from mcp.server.context import CallNext, HandlerResult, ServerMiddleware, ServerRequestContext
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.session import ServerSession
from mcp_types import CallToolResult, TextContent, ToolAnnotations
from pydantic import Field

from mcp_guard import __version__
from mcp_guard.guard import CallContext, Guard
from mcp_guard.identity import Identity
from mcp_guard.results import ToolResult

INSTRUCTIONS = """\
mcp-guard is the only path to these databases. Every call is classified, decided by policy and
recorded in an audit log. Use `query` for reads (SELECT, WITH, EXPLAIN, SHOW): it runs in a read-only
transaction with a row limit. Use `execute` for writes and always give `reason`: the user's request
this change serves. A refusal names the rule that refused it; do not try to work around it, tell the
user instead. Results are capped; when `truncated` is true, narrow the query.
Some changes (schema changes, writes without WHERE, large deletes) are held for a person's approval:
`execute` then waits, and if nobody decides in time it answers with a request id. Tell the user, and
call `approval_status` with that id when they say it was decided; it runs the held statement once.
You cannot approve anything yourself, and you must not try."""

Param = str | int | float | bool | None

ConnectionArg = Annotated[
    str | None, Field(description="Connection name from list_connections; optional when only one exists.")
]
ParamsArg = Annotated[
    list[Param] | None,
    Field(description="Positional parameters for a single statement ($1, $2 on PostgreSQL; ? on SQLite)."),
]


CALL_META = "mcp-guard/call_id"


def _to_mcp(result: ToolResult) -> CallToolResult:
    return CallToolResult(
        content=[TextContent(type="text", text=result.text)],
        structured_content=result.structured,
        is_error=result.is_error,
        meta={CALL_META: result.call_id},
    )


class _Session:
    """The one session of a stdio server process: recorded when the first call arrives."""

    def __init__(self, guard: Guard, identity: Identity) -> None:
        self.guard = guard
        self.identity = identity
        self.id = str(uuid.uuid4())
        self.context: CallContext | None = None

    async def context_for(self, session: ServerSession) -> CallContext:
        if self.context is None:
            params = session.client_params
            info = params.client_info if params else None
            client = f"{info.name}/{info.version}" if info else None
            self.context = CallContext(identity=self.identity, session_id=self.id, client=client)
            await self.guard.start_session(self.context, {"transport": "stdio", "server": __version__})
        return self.context

    async def end(self) -> None:
        if self.context is not None:
            await self.guard.end_session(self.context)


def _text_of(result: CallToolResult) -> str:
    return "\n".join(block.text for block in result.content if isinstance(block, TextContent))


def _rejections_recorder(guard: Guard, session: _Session) -> ServerMiddleware[Any]:
    """Audit tool calls the SDK refuses before any tool runs (unknown tool, arguments off the schema)."""

    async def record(ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
        result = await call_next(ctx)
        if (
            ctx.method == "tools/call"
            and isinstance(result, CallToolResult)
            and result.is_error
            and CALL_META not in (result.meta or {})
        ):
            params = ctx.params if isinstance(ctx.params, dict) else {}
            await guard.record_rejected(
                await session.context_for(ctx.session),
                tool=str(params.get("name", "?"))[:200],
                arguments=params.get("arguments"),
                message=_text_of(result),
            )
        return result

    return record


def build_server(guard: Guard, identity: Identity) -> tuple[MCPServer, _Session]:
    session = _Session(guard, identity)
    server = MCPServer(
        name="mcp-guard",
        version=__version__,
        instructions=INSTRUCTIONS,
        middleware=[_rejections_recorder(guard, session)],
    )
    read_only = ToolAnnotations(read_only_hint=True, destructive_hint=False, open_world_hint=False)

    @server.tool(annotations=read_only)
    async def list_connections(ctx: Context) -> CallToolResult:
        """List the database connections you may use, their SQL dialect and what each tool may run."""
        return _to_mcp(await guard.list_connections(await session.context_for(ctx.session)))

    @server.tool(annotations=read_only)
    async def list_tables(ctx: Context, connection: ConnectionArg = None) -> CallToolResult:
        """List the tables and views of a connection."""
        return _to_mcp(await guard.list_tables(await session.context_for(ctx.session), connection))

    @server.tool(annotations=read_only)
    async def describe_table(
        ctx: Context,
        table: Annotated[str, Field(description="Table name, optionally schema-qualified (public.orders).")],
        connection: ConnectionArg = None,
    ) -> CallToolResult:
        """Describe a table's columns: name, type, nullability, primary key."""
        return _to_mcp(await guard.describe_table(await session.context_for(ctx.session), connection, table))

    @server.tool(annotations=read_only)
    async def query(
        ctx: Context,
        sql: Annotated[str, Field(description="One or more read statements (SELECT, WITH, EXPLAIN, SHOW).")],
        connection: ConnectionArg = None,
        params: ParamsArg = None,
    ) -> CallToolResult:
        """Run read-only SQL. Returns a text table and structured rows; large results are truncated."""
        return _to_mcp(await guard.query(await session.context_for(ctx.session), connection, sql, params))

    @server.tool(
        annotations=ToolAnnotations(read_only_hint=False, destructive_hint=True, open_world_hint=False)
    )
    async def execute(
        ctx: Context,
        sql: Annotated[
            str, Field(description="Statements that change data or schema; run in one transaction.")
        ],
        reason: Annotated[str, Field(description="The user's request this change serves, in their words.")],
        connection: ConnectionArg = None,
        params: ParamsArg = None,
    ) -> CallToolResult:
        """Run writes under policy in one transaction (all or nothing); reports rows affected. Risky
        changes wait for a reviewer's approval; if none comes in time, the answer is a request id."""
        context = await session.context_for(ctx.session)
        return _to_mcp(await guard.execute(context, connection, sql, reason, params, ctx.report_progress))

    @server.tool(
        annotations=ToolAnnotations(read_only_hint=False, destructive_hint=True, open_world_hint=False)
    )
    async def approval_status(
        ctx: Context,
        request_id: Annotated[str, Field(description="The request id a held execute call answered with.")],
    ) -> CallToolResult:
        """State of a held request. Once a reviewer approved it, runs its stored statement, exactly once;
        never different SQL. Nobody can approve through this tool."""
        return _to_mcp(await guard.approval_status(await session.context_for(ctx.session), request_id))

    return server, session


async def serve_stdio(guard: Guard, identity: Identity) -> None:
    server, session = build_server(guard, identity)
    try:
        await server.run_stdio_async()
    finally:
        await session.end()
