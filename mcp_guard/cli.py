"""The command line. Thin: parse, call the domain, print; domain errors become one line and an exit code.

Exit codes: 0 success; 1 a check failed (denied, verification failed); 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mcp_guard.classify import StatementKind, classify
from mcp_guard.config import Config, config_path_from_env, demo_config, load_config
from mcp_guard.errors import ConfigError, GuardError, UsageError
from mcp_guard.policy import decide

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


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
    from mcp_guard.guard import Guard
    from mcp_guard.identity import local_identity
    from mcp_guard.server import serve_stdio

    config = _config(args)
    identity = local_identity(config.settings.identity.groups)

    async def run() -> None:
        guard = await Guard.start(config)
        try:
            signalled = await serve_stdio(guard, identity)
        finally:
            await guard.close()
        if signalled:
            # The session's end is recorded and the audit closed. The transport's stdin reader is a
            # thread blocked in read(), which nothing can interrupt: leave instead of waiting for input.
            os._exit(EXIT_OK)

    asyncio.run(run())
    return EXIT_OK


# check ------------------------------------------------------------------------------------------


def cmd_check(args: argparse.Namespace) -> int:
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
        from mcp_guard.policy import Decision

        decision = Decision("deny", QUERY_READS_ONLY, "query runs reads only")
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
        colour = "green" if decision.allowed else "red"
        console.print(
            f"[{colour}]{tool}: {decision.action}[/] by rule [bold]{escape(decision.rule)}[/]: "
            f"{escape(decision.reason)}"
        )
    return EXIT_OK if decision.allowed else EXIT_FAILED


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

    serve = with_config(commands.add_parser("serve", help="serve the MCP tools (stdio)"))
    serve.add_argument("--transport", choices=["stdio"], default="stdio")
    serve.set_defaults(handler=cmd_serve)

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

    from mcp_guard.audit.commands import register

    register(commands)
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
