"""The MCP face of the guard: tool definitions and transports, nothing else.

Every tool hands its arguments to `Guard` and turns the `ToolResult` into a `CallToolResult`. A
refusal is an error result the model reads; the server keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import socket
import sys
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import uvicorn
from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings
from mcp.server.connection import Connection
from mcp.server.context import CallNext, HandlerResult, ServerMiddleware, ServerRequestContext
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.session import ServerSession
from mcp.server.stdio import stdio_server
from mcp_types import CallToolResult, TextContent, ToolAnnotations
from pydantic import ConfigDict, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mcp_guard import __version__, heap, stdio
from mcp_guard.config import is_loopback
from mcp_guard.errors import AuditError, AuthenticationError, UsageError
from mcp_guard.guard import CallContext, Guard
from mcp_guard.identity import Identity, OidcVerifier, check_fresh
from mcp_guard.results import ToolResult, error_result
from mcp_guard.review_api import ReviewApi, gateway_key

log = logging.getLogger(__name__)

Transport = Literal["stdio", "sse", "streamable-http"]
Caller = Callable[[], Awaitable[Identity]]
"""Who makes the current request; raises AuthenticationError when no one verifiable does."""

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


SESSION_STATE = "mcp-guard/session"
NO_SESSION = "-"


def _connection_of(session: ServerSession) -> Connection:
    """The SDK's per-client connection behind a request: one per MCP session.

    mcp 2.3 keeps it private on `ServerSession` (its public `Context.connection` is not yet handed to
    tools). Read here, once, it gives each session the SDK's own per-connection `state` and the
    `exit_stack` that is unwound when the connection closes.
    """
    connection = getattr(session, "_connection", None)
    if not isinstance(connection, Connection):
        raise RuntimeError("this mcp SDK no longer leads from a request to its connection")
    return connection


class Sessions:
    """Every MCP session of this server and who opened it: the one place recording SESSION_START/END.

    A session is the process on stdio, one SSE stream, or one streamable-HTTP session (a 2026-07-28
    request, which has no session, is a session of one request). It starts when the client
    initializes (or, failing that, at its first tool call), under that request's identity; each later
    call runs with its own verified identity (a refreshed token's groups) and is refused if that names
    someone else. The start record names the process (host, pid, working directory) so that records
    a client hook writes (`mcp-guard hook claude-code`) can be linked to the session; see
    mcp_guard/audit/prompts.py.
    """

    def __init__(self, guard: Guard, caller: Caller, transport: Transport) -> None:
        self.guard = guard
        self.caller = caller
        self.transport = transport
        self._open: dict[str, CallContext] = {}
        self._lock = asyncio.Lock()
        self._process_id = str(uuid.uuid4()) if transport == "stdio" else None

    async def context_for(self, session: ServerSession) -> CallContext:
        identity = await self.caller()
        started = self._started(session)
        if started is None:
            async with self._lock:
                started = self._started(session) or await self._start(session, identity)
        if (identity.subject, identity.issuer) != (started.identity.subject, started.identity.issuer):
            raise AuthenticationError(
                f"this session belongs to {started.identity.subject}; the token now names "
                f"{identity.subject}: start a new session to change user"
            )
        return CallContext(identity=identity, session_id=started.session_id, client=started.client)

    async def run(
        self, session: ServerSession, tool: str, step: Callable[[CallContext], Awaitable[ToolResult]]
    ) -> CallToolResult:
        """One tool call: its caller identified first; refused with the reason when that fails."""
        try:
            context = await self.context_for(session)
        except AuthenticationError as error:
            return await self.refuse(session, tool, error)
        return _to_mcp(await step(context))

    async def refuse(self, session: ServerSession, tool: str, error: AuthenticationError) -> CallToolResult:
        """A call without a verifiable caller, recorded as an authentication failure."""
        call_id = str(uuid.uuid4())
        await self.guard.record_auth_failure(
            str(error),
            transport=self.transport,
            session_id=self._session_id(session),
            detail=error.detail,
            call_id=call_id,
            tool=tool,
        )
        return _to_mcp(error_result(f"Not authenticated: {error}", call_id))

    async def check_caller(self) -> None:
        """stdio: verify the token at start, so a bad one is reported before the first call needs it."""
        try:
            identity = await self.caller()
        except AuthenticationError as error:
            log.warning("calls are refused until the token is replaced: %s", error)
            await self.guard.record_auth_failure(
                str(error), transport=self.transport, session_id=self._session_id(None), detail=error.detail
            )
        else:
            log.info("calls run as %s (groups: %s)", identity.subject, ", ".join(sorted(identity.groups)))

    async def close(self, how: str) -> None:
        """End the sessions still open (server shutdown), saying how."""
        for session_id in list(self._open):
            await self._end(session_id, how)

    def _started(self, session: ServerSession) -> CallContext | None:
        if self._process_id is not None:
            return self._open.get(self._process_id)
        started = _connection_of(session).state.get(SESSION_STATE)
        return started if isinstance(started, CallContext) else None

    def _session_id(self, session: ServerSession | None) -> str:
        started = self._started(session) if session is not None else None
        return started.session_id if started else (self._process_id or NO_SESSION)

    async def _start(self, session: ServerSession, identity: Identity) -> CallContext:
        params = session.client_params
        info = params.client_info if params else None
        client = f"{info.name}/{info.version}" if info else None
        session_id = self._process_id or str(uuid.uuid4())
        context = CallContext(identity=identity, session_id=session_id, client=client)
        detail: dict[str, Any] = {
            "transport": self.transport,
            "server": __version__,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "cwd": os.getcwd(),
        }
        connection = None if self._process_id is not None else _connection_of(session)
        if connection is not None and connection.session_id:
            detail["transport_session"] = connection.session_id
        await self.guard.start_session(context, detail)
        self._open[context.session_id] = context
        if connection is not None:
            connection.state[SESSION_STATE] = context
            connection.exit_stack.push_async_callback(self._end, context.session_id, "the client closed it")
        return context

    async def _end(self, session_id: str, how: str) -> None:
        context = self._open.pop(session_id, None)
        if context is not None:
            await self.guard.end_session(context, {"how": how})


def _text_of(result: CallToolResult) -> str:
    return "\n".join(block.text for block in result.content if isinstance(block, TextContent))


def _rejections_recorder(guard: Guard, sessions: Sessions) -> ServerMiddleware[Any]:
    """Start the session's record when the client initializes, and audit tool calls the SDK refuses
    before any tool runs (unknown tool, arguments off the schema)."""

    async def record(ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
        result = await call_next(ctx)
        if ctx.method == "notifications/initialized":  # the client's name and version are known by now
            # A caller that cannot be verified yet starts its session at its first call, refused there.
            with contextlib.suppress(AuthenticationError):
                await sessions.context_for(ctx.session)
        elif (
            ctx.method == "tools/call"
            and isinstance(result, CallToolResult)
            and result.is_error
            and CALL_META not in (result.meta or {})
        ):
            params = ctx.params if isinstance(ctx.params, dict) else {}
            tool = str(params.get("name", "?"))[:200]
            try:
                context = await sessions.context_for(ctx.session)
            except AuthenticationError as error:
                await sessions.refuse(ctx.session, tool, error)
                return result
            await guard.record_rejected(
                context, tool=tool, arguments=params.get("arguments"), message=_text_of(result)
            )
        return result

    return record


def build_server(
    guard: Guard,
    caller: Caller,
    transport: Transport,
    *,
    token_verifier: BearerVerifier | None = None,
    auth: AuthSettings | None = None,
) -> tuple[MCPServer, Sessions]:
    sessions = Sessions(guard, caller, transport)
    server = MCPServer(
        name="mcp-guard",
        version=__version__,
        instructions=INSTRUCTIONS,
        middleware=[_rejections_recorder(guard, sessions)],
        token_verifier=token_verifier,
        auth=auth,
    )
    read_only = ToolAnnotations(read_only_hint=True, destructive_hint=False, open_world_hint=False)

    @server.tool(annotations=read_only)
    async def list_connections(ctx: Context) -> CallToolResult:
        """List the database connections you may use, their SQL dialect and what each tool may run."""
        return await sessions.run(ctx.session, "list_connections", guard.list_connections)

    @server.tool(annotations=read_only)
    async def list_tables(ctx: Context, connection: ConnectionArg = None) -> CallToolResult:
        """List the tables and views of a connection."""
        return await sessions.run(ctx.session, "list_tables", lambda c: guard.list_tables(c, connection))

    @server.tool(annotations=read_only)
    async def describe_table(
        ctx: Context,
        table: Annotated[str, Field(description="Table name, optionally schema-qualified (public.orders).")],
        connection: ConnectionArg = None,
    ) -> CallToolResult:
        """Describe a table's columns: name, type, nullability, primary key."""
        return await sessions.run(
            ctx.session, "describe_table", lambda c: guard.describe_table(c, connection, table)
        )

    @server.tool(annotations=read_only)
    async def query(
        ctx: Context,
        sql: Annotated[str, Field(description="One or more read statements (SELECT, WITH, EXPLAIN, SHOW).")],
        connection: ConnectionArg = None,
        params: ParamsArg = None,
    ) -> CallToolResult:
        """Run read-only SQL. Returns a text table and structured rows; large results are truncated."""
        return await sessions.run(ctx.session, "query", lambda c: guard.query(c, connection, sql, params))

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
        return await sessions.run(
            ctx.session,
            "execute",
            lambda c: guard.execute(c, connection, sql, reason, params, ctx.report_progress),
        )

    @server.tool(
        annotations=ToolAnnotations(read_only_hint=False, destructive_hint=True, open_world_hint=False)
    )
    async def approval_status(
        ctx: Context,
        request_id: Annotated[str, Field(description="The request id a held execute call answered with.")],
    ) -> CallToolResult:
        """State of a held request. Once a reviewer approved it, runs its stored statement, exactly once;
        never different SQL. Nobody can approve through this tool."""
        return await sessions.run(
            ctx.session, "approval_status", lambda c: guard.approval_status(c, request_id)
        )

    return server, sessions


async def serve_stdio(guard: Guard, caller: Caller) -> bool:
    """Serve until the client closes stdin (False) or SIGTERM or SIGINT arrives (True); the session's
    end is recorded either way. After True the SDK's transport may still hold a reader thread blocked
    on stdin, which nothing can interrupt: the caller should leave the process."""
    server, sessions = build_server(guard, caller, "stdio")
    await sessions.check_caller()
    heap.settle()
    serving = asyncio.ensure_future(_run_stdio(server))
    signalled = asyncio.Event()
    loop = asyncio.get_running_loop()
    for number in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # Windows: no loop signal handlers
            loop.add_signal_handler(number, signalled.set)
    waiting = asyncio.ensure_future(signalled.wait())
    try:
        await asyncio.wait({serving, waiting}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiting.cancel()
        await sessions.close("signal" if signalled.is_set() else "the client closed the connection")
    if serving.done():
        serving.result()
        return False
    serving.cancel()
    return True


async def _run_stdio(server: MCPServer) -> None:
    if not stdio.usable():
        await server.run_stdio_async()
        return
    # What MCPServer.run_stdio_async does, over event-loop pipes instead of thread-wrapped files.
    lowlevel = server._lowlevel_server
    async with stdio.pipe_stdio() as (lines, out), stdio_server(lines, out) as (read, write):  # type: ignore[arg-type]
        await lowlevel.run(read, write, lowlevel.create_initialization_options())


# HTTP: an OAuth protected resource ----------------------------------------------------------------


class VerifiedToken(AccessToken):
    """The SDK's access token, carrying the identity our verification found in it."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    identity: Identity


@dataclass(slots=True)
class _Refusal:
    error: AuthenticationError | None = None


_refusal: ContextVar[_Refusal | None] = ContextVar("mcp_guard_refusal", default=None)


class BearerVerifier:
    """The SDK's token verifier: our OIDC checks; a refusal's reason is kept for the 401 it causes."""

    def __init__(self, verifier: OidcVerifier) -> None:
        self.verifier = verifier

    async def verify_token(self, token: str) -> AccessToken | None:
        identity = await self.identity(token)
        if identity is None:
            return None
        return VerifiedToken(
            token=token,
            client_id=identity.authorized_party or identity.subject,
            scopes=[],
            expires_at=identity.expires_at,
            subject=identity.subject,
            claims={"iss": identity.issuer},
            identity=identity,
        )

    async def identity(self, token: str, max_age: float | None = None) -> Identity | None:
        """The token's identity, or None when refused (the refusal is kept for the 401, as above);
        with `max_age`, refused too when its holder signed in longer ago than that."""
        try:
            identity = await self.verifier.verify(token)
            if max_age is not None:
                check_fresh(identity, max_age, self.verifier.settings.clock_skew)
        except AuthenticationError as error:
            pending = _refusal.get()
            if pending is not None:
                pending.error = error
            return None
        return identity


async def bearer_identity() -> Identity:
    """The identity of the verified token on the HTTP request being served."""
    token = get_access_token()
    if not isinstance(token, VerifiedToken):
        raise AuthenticationError("this request carries no verified token")
    return token.identity


def _challenge(original: bytes, error: AuthenticationError) -> bytes:
    """The SDK's WWW-Authenticate header (with its resource_metadata) with our error and reason."""
    params = {**error.challenge, "error_description": str(error)}
    value = original.decode("latin-1") or "Bearer"
    for name, text in params.items():
        # no quote or backslash left: the parameter is literal in the header and in the substitution
        safe = text.encode("ascii", "replace").decode().replace('"', "'").replace("\\", "/")
        param = f'{name}="{safe}"'
        value, replaced = re.subn(rf'\b{name}="[^"]*"', param, value)
        if not replaced:
            value += f"{',' if value != 'Bearer' else ''} {param}"
    return value.encode("latin-1", "replace")


def _unexplained(scope: Scope) -> AuthenticationError:
    """Why a 401 the verifier did not explain happened: no bearer token, or the SDK's own checks."""
    sent = dict(scope.get("headers", [])).get(b"authorization", b"")
    if sent[:7].lower() == b"bearer ":
        return AuthenticationError("the bearer token was refused (expired, or not issued for this resource)")
    return AuthenticationError("the request carries no bearer token (Authorization: Bearer <token>)")


class RecordRefusals:
    """Every 401 is recorded as an authentication failure and tells the client why (RFC 6750)."""

    def __init__(self, app: ASGIApp, guard: Guard, transport: Transport) -> None:
        self.app = app
        self.guard = guard
        self.transport = transport

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = _Refusal()
        reset = _refusal.set(refusal)
        replaced = False

        async def explain(message: Message) -> None:
            nonlocal replaced
            if message["type"] == "http.response.start" and message["status"] == 401:
                replaced = True
                error = refusal.error or _unexplained(scope)
                await self._record(scope, error)
                body = json.dumps({**error.challenge, "error_description": str(error)}).encode()
                original = dict(message.get("headers", [])).get(b"www-authenticate", b"")
                headers = [
                    (name, value)
                    for name, value in message.get("headers", [])
                    if name.lower() not in (b"content-length", b"www-authenticate")
                ]
                headers += [
                    (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", _challenge(original, error)),
                ]
                await send({"type": "http.response.start", "status": 401, "headers": headers})
                await send({"type": "http.response.body", "body": body})
            elif not replaced:
                await send(message)

        try:
            await self.app(scope, receive, explain)
        finally:
            _refusal.reset(reset)

    async def _record(self, scope: Scope, error: AuthenticationError) -> None:
        client = scope.get("client")
        detail = {**error.detail, "path": str(scope.get("path", ""))[:200]}
        if client:
            detail["client_address"] = str(client[0])
        try:
            await self.guard.record_auth_failure(
                str(error), transport=self.transport, session_id=NO_SESSION, detail=detail
            )
        except AuditError:
            log.exception("could not record an authentication failure (the request was refused)")


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, made with protocol IPPROTO_TCP: asyncio turns Nagle's algorithm off only
    on sockets that say they are TCP, and without that every response on a kept-alive connection
    waited ~40 ms for the client's delayed ACK (measured: 44 ms per request instead of 0.7 ms)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(socket.SOMAXCONN)
    except OSError as error:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {error.strerror}") from None
    return sock


async def serve_http(
    guard: Guard, verifier: OidcVerifier, transport: Literal["sse", "streamable-http"], host: str, port: int
) -> None:
    """Serve SSE or streamable HTTP; every request must carry a bearer token from the configured issuer."""
    listener = listen(host, port)
    port = listener.getsockname()[1]
    path = "/mcp" if transport == "streamable-http" else "/sse"
    base = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    settings = verifier.settings
    resource = settings.resource_url or f"{base}{path}"
    if not is_loopback(host) and not resource.startswith("https://"):
        log.warning(
            "listening on %s, beyond this machine: bearer tokens need TLS; put mcp-guard behind a TLS "
            "proxy and set identity.resource_url to the https:// URL clients use",
            host,
        )
    auth = AuthSettings(
        issuer_url=settings.issuer,  # type: ignore[arg-type]  # pydantic validates the string
        resource_server_url=resource,  # type: ignore[arg-type]
        validate_token_resource=False,  # the verifier checks `aud` itself
    )
    server, sessions = build_server(
        guard, bearer_identity, transport, token_verifier=BearerVerifier(verifier), auth=auth
    )
    reviewers = _reviewers_verifier(guard, verifier)
    if reviewers is not None:
        api = ReviewApi(
            guard.approvals,
            BearerVerifier(reviewers).identity,
            gateway_key(guard.config),
            max_age=guard.config.settings.approvals.token_max_age,
        )
        for route, methods, handler in api.routes():
            server.custom_route(route, methods)(handler)
    app = server.sse_app(host=host) if transport == "sse" else server.streamable_http_app(host=host)
    config = uvicorn.Config(
        RecordRefusals(app, guard, transport), log_level="warning", timeout_graceful_shutdown=5
    )
    http = _HttpServer(config)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, http.stop)
    heap.settle()
    print(f"mcp-guard: serving {transport} at {base}{path}, resource {resource}", file=sys.stderr, flush=True)
    try:
        await http.serve(sockets=[listener])
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        await sessions.close("the server stopped")


def _reviewers_verifier(guard: Guard, verifier: OidcVerifier) -> OidcVerifier | None:
    """What checks reviewers' tokens: the callers' verifier, or one for the reviewers' own audience."""
    settings = guard.config.settings.approvals
    if not settings.token_reviewers:
        return None
    return verifier if settings.token_audience is None else verifier.for_audience(settings.token_audience)


class _HttpServer(uvicorn.Server):
    """uvicorn without its signal capture, which re-raises the signal after shutting down and so kills
    the process before the open sessions are ended and the audit store is closed."""

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    def stop(self) -> None:
        # Through handle_exit: sse-starlette hooks it to end open event streams instead of waiting for them.
        self.handle_exit(signal.SIGTERM, None)
