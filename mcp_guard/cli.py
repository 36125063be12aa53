"""The command line. Thin: parse, call the domain, print; domain errors become one line and an exit code.

Exit codes: 0 success; 1 a check failed (denied, verification failed); 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import logging
import os
import sys
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mcp_guard.config import (
    Config,
    command_line_count,
    command_line_url,
    config_path_from_env,
    demo_config,
    guard_home,
    load_config,
)
from mcp_guard.errors import ConfigError, GuardError, UsageError
from mcp_guard.kinds import StatementKind

if TYPE_CHECKING:
    from mcp_guard.approvals import Actor, Approvals, Verdict
    from mcp_guard.identity import Identity, TokenSource
    from mcp_guard.review.desk import ReviewDesk

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
REVIEW_TOKEN_ENV = "MCP_GUARD_TOKEN"
"""Where `approve`, `deny`, `review` and `pending --server` find a reviewer's token by default."""


def _config(args: argparse.Namespace) -> Config:
    path = config_path_from_env(getattr(args, "config", None))
    return load_config(path) if path else demo_config()


def _dialect(config: Config, connection: str) -> str:
    return "sqlite" if config.urls[connection].startswith("sqlite:") else "postgres"


def _pick_connection(config: Config, name: str | None) -> str:
    names = list(config.settings.connections)
    if name is None:
        if len(names) == 1:
            return names[0]
        raise UsageError(f"name a connection with --connection: one of {', '.join(names)}")
    if name not in names:
        raise UsageError(f"no connection named {name!r}; known: {', '.join(names)}")
    return name


# serve ------------------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from mcp_guard.devtoken import DEV_ISSUER
    from mcp_guard.identity import OidcVerifier, StdioCaller, TokenSource, local_identity

    config = _config(args)
    identity = config.settings.identity
    if identity.mode == "local" and args.transport != "stdio":
        raise ConfigError(
            f'--transport {args.transport} needs [identity] mode = "oidc": without tokens every caller '
            "on the network would act as the local user",
            file=config.source,
            key="identity.mode",
        )
    if identity.issuer == DEV_ISSUER:
        logging.getLogger("mcp_guard").warning(
            "trusting the development issuer of `mcp-guard token --dev`: never do this in production"
        )
    source = TokenSource.of(identity) if identity.mode == "oidc" and args.transport == "stdio" else None
    # Loaded only now: a configuration mistake is reported without first importing the MCP stack.
    from mcp_guard.guard import Guard
    from mcp_guard.server import serve_http, serve_stdio

    async def run() -> None:
        guard = await Guard.start(config)
        verifier = OidcVerifier(identity) if identity.mode == "oidc" else None
        try:
            signalled = False
            if verifier is None:
                local = local_identity(identity.groups)

                async def caller() -> Identity:
                    return local

                signalled = await serve_stdio(guard, caller)
            elif source is not None:
                signalled = await serve_stdio(guard, StdioCaller(verifier, source))
            else:
                await serve_http(guard, verifier, args.transport, args.host, args.port)
        finally:
            if verifier is not None:
                await verifier.aclose()
            await guard.close()
        if signalled:
            # The session's end is recorded and the audit closed. The transport's stdin reader is a
            # thread blocked in read(), which nothing can interrupt: leave instead of waiting for input.
            os._exit(EXIT_OK)

    asyncio.run(run())
    return EXIT_OK


# token ------------------------------------------------------------------------------------------


def cmd_token(args: argparse.Namespace) -> int:
    from mcp_guard.devtoken import DEV_AUDIENCE, dev_issuer, mint_dev_token
    from mcp_guard.identity import local_identity

    if not args.dev:
        raise UsageError(
            "only development tokens are minted here (--dev); real tokens come from your identity provider"
        )
    audience = args.audience
    if audience is None:
        path = config_path_from_env(args.config)
        configured = load_config(path).settings.identity.audience if path else None
        audience = configured or DEV_AUDIENCE
    subject = args.subject or local_identity().subject.removeprefix("local:")
    issuer = dev_issuer()
    token = mint_dev_token(
        issuer,
        subject=subject,
        groups=tuple(args.group or ()),
        audience=audience,
        minutes=args.minutes,
        email=args.email,
    )
    print(token)
    print(
        f"mcp-guard: development token for {subject} (groups: {', '.join(args.group or []) or 'none'}), "
        f"valid {args.minutes:g} min. DEVELOPMENT ONLY. A server accepts it only when configured with:\n"
        + issuer.config_snippet(audience),
        file=sys.stderr,
        end="",
    )
    return EXIT_OK


# check ------------------------------------------------------------------------------------------


def cmd_check(args: argparse.Namespace) -> int:
    from mcp_guard.classify import classify  # the SQL parser, loaded by the commands that read SQL
    from mcp_guard.policy import Decision, decide, needs_estimate

    config = _config(args)
    connection = _pick_connection(config, args.connection)
    sql = sys.stdin.read() if args.sql == "-" else args.sql
    classification = classify(sql, _dialect(config, connection))
    if not classification.statements:
        raise UsageError("the SQL holds no statement")
    all_reads = all(s.kind is StatementKind.READ for s in classification.statements)
    tool = args.tool or ("query" if all_reads else "execute")
    groups = frozenset(args.group or config.settings.identity.groups)
    decision = decide(config.settings.policy, classification, tool=tool, connection=connection, groups=groups)
    if tool == "query" and not all_reads:
        from mcp_guard.guard import QUERY_READS_ONLY

        decision = Decision("deny", QUERY_READS_ONLY, "query runs reads only")
    elif tool == "query" and decision.held:
        decision = Decision("deny", decision.rule, "held reads run through execute only")
    masking = _check_masking(config, connection, classification, groups) if decision.allowed else None
    if masking is not None and any(m.get("refused") for m in masking):
        refused = next(m for m in masking if m.get("refused"))
        decision = Decision("deny", "builtin:masking", str(refused["refused"]))
    if args.json:
        print(
            json.dumps(
                {
                    "connection": connection,
                    "tool": tool,
                    "classification": classification.as_dict(),
                    "decision": {
                        "action": decision.action,
                        "rule": decision.rule,
                        "reason": decision.reason,
                        "statement_index": decision.statement_index,
                    },
                    "masking": masking,
                },
                indent=2,
            )
        )
    else:
        console = Console()
        table = Table(title=f"{connection} ({classification.dialect})", title_justify="left")
        for column in ("#", "kind", "operation", "tables", "flags", "statement"):
            table.add_column(column, overflow="fold")
        for index, statement in enumerate(classification.statements, 1):
            table.add_row(
                str(index),
                statement.kind,
                statement.operation,
                ", ".join(statement.tables),
                ", ".join(sorted(statement.flags)),
                escape(statement.text[:200]),
            )
        console.print(table)
        for index, entry in enumerate(masking or [], 1):
            _print_masking(console, index, entry)
        colour = "green" if decision.allowed else "yellow" if decision.held else "red"
        if decision.statement_index is not None and len(classification.statements) > 1:
            console.print(f"statement {decision.statement_index + 1} decides the call")
        console.print(
            f"[{colour}]{tool}: {decision.action}[/] by rule [bold]{escape(decision.rule)}[/]: "
            f"{escape(decision.reason)}"
        )
        if decision.hold is not None:
            needs = "; ".join(r.describe() for r in decision.hold.requirements)
            console.print(f"held for reviewers: {escape(needs)}, within {decision.hold.ttl:g} s")
        if any(
            needs_estimate(config.settings.policy, s, tool=tool, connection=connection, groups=groups)
            for s in classification.statements
        ):
            console.print(
                "[dim]row estimates come from the database, which check does not ask: rules on row "
                "counts were taken to match[/]"
            )
    return EXIT_OK if decision.allowed else EXIT_FAILED


def _check_masking(
    config: Config, connection: str, classification: Any, groups: frozenset[str]
) -> list[dict[str, Any]] | None:
    """Per statement: the masked SQL that would run and each output column's lineage and mask, from
    the server's own masking step over the schema read from the database; None when no masking applies."""
    from mcp_guard.backends import Backend, open_backend
    from mcp_guard.masking import Masking
    from mcp_guard.masking_step import MaskingStep

    async def preview() -> list[dict[str, Any]] | None:
        opened: list[Backend] = []

        async def backend(name: str) -> Backend:
            found = open_backend(config.urls[name], pool_size=1)
            await found.open()
            opened.append(found)
            return found

        step = MaskingStep(config, Masking.from_settings(config.settings.masking, config.source), backend)
        try:
            return await step.preview(connection, groups, classification.statements)
        finally:
            for found in opened:
                await found.close()

    return asyncio.run(preview())


def _print_masking(console: Console, index: int, entry: dict[str, Any]) -> None:
    if entry.get("refused"):
        console.print(f"[red]masking refuses statement {index}:[/] {escape(entry['refused'])}")
        return
    console.print(f"[bold]statement {index} as it runs, masked:[/]")
    console.print(escape(entry["rewritten"] or "(as written: it reads no masked column)"))
    table = Table(title=f"output columns ({entry['lineage']})", title_justify="left")
    for column in ("column", "mask", "rule", "sources"):
        table.add_column(column, overflow="fold")
    for column in entry["columns"]:
        table.add_row(
            escape(column["name"]),
            column["strategy"] or "-",
            escape(column["rule"] or ""),
            escape(", ".join(column["sources"]) + (" (unresolved)" if column["unresolved"] else "")),
        )
    console.print(table)


# approvals --------------------------------------------------------------------------------------


@asynccontextmanager
async def _approvals(args: argparse.Namespace) -> AsyncIterator[tuple[Config, Approvals]]:
    """The configuration's reviewers and policy over its store (or --store): what reviewers act on."""
    from mcp_guard.approvals import Approvals
    from mcp_guard.store import open_store

    config = _config(args)
    store = open_store(args.store or config.audit_url)
    await store.open()
    try:
        yield config, Approvals(store, config.settings.approvals.verifier())
    finally:
        await store.close()


def _actor(reviewer: str | None = None) -> Actor:
    """Who records what a reviewer's command notices (an expiry, a vote), in its own session."""
    from mcp_guard.approvals import Actor
    from mcp_guard.identity import local_identity

    return Actor(reviewer or local_identity().subject, f"review-{uuid.uuid4()}")


def _reviewer_name(args: argparse.Namespace) -> str:
    return args.reviewer or getpass.getuser()


@asynccontextmanager
async def _desk(args: argparse.Namespace, *, witness: bool = False) -> AsyncIterator[ReviewDesk]:
    """A gateway's reviewers' API with a token (--server), or the store with a configured reviewer."""
    from mcp_guard.errors import ApprovalError
    from mcp_guard.review.desk import GatewayDesk, StoreDesk

    if args.server:
        if getattr(args, "reviewer", None):
            raise UsageError(
                "--reviewer names a passphrase reviewer; with --server, the token says who you are"
            )
        async with GatewayDesk.open(args.server, _review_token(args)) as desk:
            yield desk
        return
    name = _reviewer_name(args)
    async with _approvals(args) as (_, approvals):
        reviewer = approvals.verifier.reviewer(name)
        if reviewer is None:
            raise ApprovalError(
                f"{name!r} is not a reviewer of this server; enrol with `mcp-guard reviewer init {name}`, "
                "pass --reviewer NAME, or decide with a token at a gateway (--server URL; see "
                "docs/approvals.md)"
            )
        kept = _review_witness(args) if witness else None
        yield StoreDesk(approvals, reviewer, f"review-{uuid.uuid4()}", kept)


def _review_token(args: argparse.Namespace) -> TokenSource:
    """The reviewer's token: --token-file, else $MCP_GUARD_TOKEN; never a command-line argument."""
    from mcp_guard.identity import TokenSource

    if args.token_file:
        return TokenSource(file=Path(args.token_file))
    if not os.environ.get(REVIEW_TOKEN_ENV, "").strip():
        raise UsageError(f"with --server, give --token-file FILE or set {REVIEW_TOKEN_ENV} to your token")
    return TokenSource(env=REVIEW_TOKEN_ENV)


def cmd_pending(args: argparse.Namespace) -> int:
    from mcp_guard.approvals import ApprovalState
    from mcp_guard.review import describe

    async def run() -> list[Any]:
        states = None if args.all else [ApprovalState.PENDING]
        if args.server:
            async with _desk(args) as desk:
                return await desk.listing(states, limit=args.limit)
        async with _approvals(args) as (_, approvals):
            return await approvals.listing(_actor(), states, limit=args.limit)

    requests = asyncio.run(run())
    if args.json:
        print(json.dumps([r.summary() for r in requests], indent=2, ensure_ascii=False))
        return EXIT_OK
    table = Table(title=f"{len(requests)} request(s)", title_justify="left")
    for column in ("id", "state", "age", "requester", "connection", "kind", "rows", "needs", "sql / reason"):
        table.add_column(column, overflow="fold")
    for request in requests:
        table.add_row(
            request.id,
            str(request.state),
            describe.span(describe.seconds_since(request.created_at)),
            describe.visible(request.requester),
            request.connection,
            describe.kind(request),
            describe.estimate(request),
            "; ".join(r.describe() for r in request.requirements),
            escape(describe.one_line(describe.sql(request), 72))
            + f"\n[dim]reason: {escape(describe.one_line(describe.visible(request.reason), 64))}[/]",
        )
    Console().print(table)
    return EXIT_OK


def _decide(args: argparse.Namespace, verdict: Verdict, reason: str) -> int:
    from rich.syntax import Syntax

    from mcp_guard.approvals import ApprovalState
    from mcp_guard.review import describe
    from mcp_guard.reviewers import read_passphrase

    console = Console()

    async def run() -> tuple[Any, str]:
        async with _desk(args) as desk:
            request = await desk.get(args.request_id)
            desk.check(request)  # before the passphrase is asked
            console.print(Syntax(describe.sql(request), "sql", theme="ansi_dark", word_wrap=True))
            for label, value in describe.facts(request):
                console.print(f"[bold]{label:>12}[/] {escape(value)}")
            if desk.locked:
                name = desk.reviewer.name
                passphrase = read_passphrase(f"Passphrase of reviewer {name} to {verdict} {request.id}: ")
                await asyncio.to_thread(desk.unlock, passphrase)
            return await desk.vote(request.id, verdict, reason)

    request, tally = asyncio.run(run())
    if request.state is ApprovalState.APPROVED:
        console.print(
            f"[green]approved[/] request {request.id} ({escape(tally)}); the waiting call runs "
            "it now, or the assistant's approval_status call will, once"
        )
    elif request.state is ApprovalState.DENIED:
        console.print(f"[red]denied[/] request {request.id}: {escape(reason)}")
    else:
        console.print(f"recorded your {verdict} on request {request.id}; so far {escape(tally)}")
    return EXIT_OK


def cmd_approve(args: argparse.Namespace) -> int:
    return _decide(args, "approve", args.comment or "")


def cmd_deny(args: argparse.Namespace) -> int:
    if not args.reason.strip():
        raise UsageError("--reason must say why: the assistant and the requester are told it")
    return _decide(args, "deny", args.reason)


def _review_witness(args: argparse.Namespace) -> tuple[Path, set[str]]:
    """Where the review UI keeps the newest checkpoint it has seen (beside the reviewer, outside the
    store), and the keys it trusts: a store cut or rolled back while a reviewer watched is reported."""
    from mcp_guard.audit.commands import setup

    audit = setup(args)
    return guard_home() / "review-checkpoint.txt", audit.trusted_keys()


def cmd_review(args: argparse.Namespace) -> int:
    from mcp_guard.review.app import ReviewApp

    async def run() -> None:
        async with _desk(args, witness=True) as desk:
            await ReviewApp(desk).run_async()

    asyncio.run(run())
    return EXIT_OK


def cmd_reviewer_init(args: argparse.Namespace) -> int:
    from mcp_guard.reviewers import enroll, read_passphrase

    passphrase = read_passphrase(f"New passphrase for reviewer {args.name} (at least 12 characters): ")
    if read_passphrase("The same passphrase again: ") != passphrase:
        raise UsageError("the two passphrases differ; nothing was created")
    key = enroll(passphrase, args.cost)
    groups = ", ".join(json.dumps(group) for group in (args.group or ["reviewers"]))
    print(
        f"# Add to the server's configuration; the key holds no secret (docs/approvals.md).\n"
        f"[approvals.reviewers.{args.name}]\nkey = \"{key}\"\ngroups = [{groups}]"
    )
    return EXIT_OK


# demo -------------------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    from mcp_guard.demo.walkthrough import run_walkthrough

    return asyncio.run(run_walkthrough(Console()))


# install ----------------------------------------------------------------------------------------


def cmd_install(args: argparse.Namespace) -> int:
    from mcp_guard.install import install

    config = Path(args.config) if args.config else None
    if config is not None:
        load_config(config)
    path = install(args.client, name=args.name, config=config, target=Path(args.file) if args.file else None)
    print(f"registered {args.name!r} in {path}")
    if args.client == "claude-desktop":
        print("restart Claude Desktop to load it")
    return EXIT_OK


# parser -----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mcp-guard", description="A guarded MCP gateway to your databases.")
    parser.add_argument(
        "--version", action="version", version=f"mcp-guard {__import__('mcp_guard').__version__}"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", help="TOML configuration file (default: $MCP_GUARD_CONFIG, else the demo)")
        return p

    serve = with_config(commands.add_parser("serve", help="serve the MCP tools (stdio, SSE, HTTP)"))
    serve.add_argument("--transport", choices=["stdio", "sse", "streamable-http"], default="stdio")
    serve.add_argument("--host", default="127.0.0.1", help="HTTP transports: address to listen on")
    serve.add_argument("--port", type=int, default=8000, help="HTTP transports: port (0: any free port)")
    serve.set_defaults(handler=cmd_serve)

    token = with_config(commands.add_parser("token", help="mint a development token (--dev only)"))
    token.add_argument("--dev", action="store_true", help="sign with the local development key")
    token.add_argument("--subject", help="user id (default: the OS user)")
    token.add_argument("--group", action="append", help="a group of the token (repeatable)")
    token.add_argument("--email", help="email claim")
    token.add_argument("--audience", help="audience (default: [identity] audience, else mcp-guard)")
    token.add_argument("--minutes", type=float, default=15, help="lifetime, at most 60 (default 15)")
    token.set_defaults(handler=cmd_token)

    demo = commands.add_parser("demo", help="play a short guarded session against the built-in demo")
    demo.set_defaults(handler=cmd_demo)

    check = with_config(commands.add_parser("check", help="classify and decide SQL without running it"))
    check.add_argument("sql", help="the SQL, or - to read it from standard input")
    check.add_argument("--connection", help="connection name (optional with one connection)")
    check.add_argument("--tool", choices=["query", "execute"], help="decide as this tool (default: by kind)")
    check.add_argument("--group", action="append", help="decide as a member of this group (repeatable)")
    check.add_argument("--json", action="store_true", help="print JSON")
    check.set_defaults(handler=cmd_check)

    installer = commands.add_parser("install", help="register the server in Claude Desktop or Claude Code")
    installer.add_argument("client", choices=["claude-desktop", "claude-code"])
    installer.add_argument("--config", help="configuration file the server will use (default: the demo)")
    installer.add_argument(
        "--name", default="mcp-guard", help="server name in the client (default: mcp-guard)"
    )
    installer.add_argument("--file", help="client configuration file to edit (default: the client's own)")
    installer.set_defaults(handler=cmd_install)

    def with_store_url(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        with_config(p)
        p.add_argument(
            "--store", type=command_line_url, help="audit store URL (default: from the configuration)"
        )
        return p

    def at_gateway(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--server", help="a gateway's URL: decide there with your OIDC token instead")
        p.add_argument(
            "--token-file", help=f"with --server: file holding your token (default: ${REVIEW_TOKEN_ENV})"
        )
        return p

    def as_reviewer(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        at_gateway(with_store_url(p))
        p.add_argument("--reviewer", help="reviewer name in the configuration (default: the local user name)")
        return p

    pending = commands.add_parser("pending", help="list requests held for approval")
    at_gateway(with_store_url(pending))
    pending.add_argument("--all", action="store_true", help="recent requests in any state")
    pending.add_argument(
        "--limit", type=command_line_count, default=100, help="at most this many, newest first"
    )
    pending.add_argument("--json", action="store_true", help="print JSON")
    pending.set_defaults(handler=cmd_pending)
    approve = as_reviewer(commands.add_parser("approve", help="approve a held request (asks a passphrase)"))
    approve.add_argument("request_id")
    approve.add_argument("--comment", help="recorded with the approval")
    approve.set_defaults(handler=cmd_approve)
    deny = as_reviewer(commands.add_parser("deny", help="deny a held request (asks your passphrase)"))
    deny.add_argument("request_id")
    deny.add_argument("--reason", required=True, help="why; the assistant and the requester are told")
    deny.set_defaults(handler=cmd_deny)
    review = as_reviewer(commands.add_parser("review", help="the reviewer's terminal UI, live"))
    review.set_defaults(handler=cmd_review)
    reviewer = commands.add_parser("reviewer", help="enrol a reviewer")
    reviewer_commands = reviewer.add_subparsers(dest="reviewer_command", required=True, metavar="ACTION")
    init = reviewer_commands.add_parser("init", help="choose a passphrase; print the key to configure")
    init.add_argument("name", help="the reviewer's name (default for --reviewer: the local user name)")
    init.add_argument("--group", action="append", help="approver group (repeatable; default: reviewers)")
    init.add_argument("--cost", type=int, default=16, help="scrypt work factor, log2 N (14..20; default 16)")
    init.set_defaults(handler=cmd_reviewer_init)

    from mcp_guard.audit.commands import register
    from mcp_guard.store.commands import register as register_store

    register(commands)
    register_store(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="mcp-guard: %(levelname)s %(message)s"
    )
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args))
    except (ConfigError, UsageError) as error:
        print(f"mcp-guard: {error}", file=sys.stderr)
        return EXIT_USAGE
    except GuardError as error:
        print(f"mcp-guard: {error}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_FAILED
