"""`mcp-guard demo`: a real MCP client drives a real server over stdio, as an assistant would, and a
reviewer decides two held statements from the command line, as a second identity.

The walkthrough runs in a directory of its own under MCP_GUARD_HOME (a fresh copy of the shop, its
own audit store and configuration), so it can be replayed and inspected afterwards. Its reviewer,
dana, exists only in that configuration and her passphrase is printed here: the walkthrough types
it into `mcp-guard approve` on a pseudo-terminal, the same way a person would (`terminal.py`).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.shared.dispatcher import ProgressFnT
from mcp_types import CallToolResult, Implementation, TextContent
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.syntax import Syntax

from mcp_guard.config import DEMO_MASKING, guard_home
from mcp_guard.demo.data import create_demo_database
from mcp_guard.demo.terminal import run_in_terminal
from mcp_guard.reviewers import MIN_COST, enroll

REVIEWER = "dana"
PASSPHRASE = "dana-demo-passphrase"
"""Public on purpose: the walkthrough's reviewer exists only in the walkthrough's configuration."""

Decision = tuple[str, str] | None
"""For a held step: ("approve", comment) or ("deny", reason), given by the reviewer."""

STEPS: list[tuple[str, str, dict[str, Any], Decision]] = [
    ("Which databases may I use?", "list_connections", {}, None),
    ("What tables are there?", "list_tables", {}, None),
    (
        "A read: revenue by order status",
        "query",
        {
            "sql": "SELECT status, count(*) AS orders, round(sum(total), 2) AS revenue\n"
            "FROM orders GROUP BY status ORDER BY revenue DESC"
        },
        None,
    ),
    (
        "A masked read: email and phone in part, the SSN as a keyed hash, the card's last 4 digits",
        "query",
        {"sql": "SELECT id, name, email, phone, ssn, card_number FROM customers ORDER BY id LIMIT 3"},
        None,
    ),
    (
        "Renamed and wrapped, the column is still masked: the mask sits in the table the query reads",
        "query",
        {"sql": "SELECT upper(email) AS contact, replace(ssn, '-', '') AS ident FROM customers LIMIT 3"},
        None,
    ),
    (
        "A whole row as JSON (SQLite's json_object over every column) is masked too",
        "query",
        {
            "sql": "SELECT json_object('name', c.name, 'email', c.email, 'card', c.card_number) AS row\n"
            "FROM customers AS c LIMIT 2"
        },
        None,
    ),
    (
        "An email inside free text: the content detector replaces it in place",
        "query",
        {"sql": "SELECT id, notes FROM customers WHERE notes LIKE '%@%' LIMIT 2"},
        None,
    ),
    (
        "An allowed write, with the user's reason",
        "execute",
        {
            "sql": "UPDATE orders SET status = 'shipped' WHERE id = 42",
            "reason": "Customer support asked to mark order 42 as shipped",
        },
        None,
    ),
    (
        "A DROP is held for a reviewer; dana approves it from the command line",
        "execute",
        {"sql": "DROP TABLE api_keys", "reason": "The user says API keys moved to the vault"},
        ("approve", "confirmed with the user: keys live in the vault now"),
    ),
    (
        "A large DELETE is held too (131 rows by the database's count); dana denies it",
        "execute",
        {
            "sql": "DELETE FROM orders WHERE created_at < '2025-07-01'",
            "reason": "Clean up orders from the first half of 2025",
        },
        ("deny", "orders are kept 7 years for accounting; archive them instead"),
    ),
    (
        "A write smuggled into a read: refused before it reaches the database",
        "query",
        {"sql": "SELECT 1; DELETE FROM orders"},
        None,
    ),
]


def _text(result: CallToolResult) -> str:
    return "\n".join(block.text for block in result.content if isinstance(block, TextContent))


def prepare(directory: Path) -> Path:
    """A fresh shop, audit store and configuration with one reviewer; returns the configuration."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    create_demo_database(directory / "shop.db")
    key = enroll(PASSPHRASE, cost=MIN_COST)
    config = directory / "walkthrough.toml"
    config.write_text(
        f'[audit]\nurl = "sqlite:///{directory / "audit.db"}"\n\n'
        f'[connections.shop]\nurl = "sqlite:///{directory / "shop.db"}"\n'
        'description = "Demo shop: customers, orders, payments, api_keys (SQLite, made-up data)"\n\n'
        "[approvals]\nwait = 45\n\n"
        f'[approvals.reviewers.{REVIEWER}]\nkey = "{key}"\ngroups = ["reviewers"]\n\n' + _masking_toml()
    )
    return config


def _masking_toml() -> str:
    """The built-in demo's masking rules, as the walkthrough's configuration writes them."""
    tables = []
    for rule in DEMO_MASKING.rules:
        fields = rule.model_dump(mode="json", exclude_defaults=True)
        tables.append("[[masking.rules]]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in fields.items()))
    return "\n".join(tables)


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mcp_guard", *args], env=env, capture_output=True, text=True)


async def _pending_id(env: dict[str, str]) -> str:
    """The id of the request the held call just made, as a reviewer sees it in `mcp-guard pending`."""
    for _ in range(200):
        listed = await asyncio.to_thread(_cli, env, "pending", "--json")
        requests = json.loads(listed.stdout or "[]")
        if requests:
            return str(requests[0]["request_id"])
        await asyncio.sleep(0.1)
    raise RuntimeError("the held request never appeared in `mcp-guard pending`")


async def _review(console: Console, env: dict[str, str], decision: tuple[str, str]) -> None:
    verdict, text = decision
    request_id = await _pending_id(env)
    console.print(f"   [bold]mcp-guard pending[/] (another terminal) lists request [bold]{request_id}[/]")
    flag = "--comment" if verdict == "approve" else "--reason"
    command = ["mcp-guard", verdict, request_id, "--reviewer", REVIEWER, flag, text]
    console.print(f"   [bold]{escape(' '.join(command[:5]))}[/] {flag} {escape(repr(text))}")
    console.print(f"   [dim](dana types her passphrase at the terminal: {PASSPHRASE})[/]")
    argv = [sys.executable, "-m", "mcp_guard", *command[1:]]
    plain = {**env, "TERM": "dumb"}
    typed = await asyncio.to_thread(run_in_terminal, argv, [PASSPHRASE], plain)
    said = " ".join(typed.output.rpartition(f"{verdict} {request_id}: ")[2].split())
    console.print(f"   reviewer: {escape(said)}")
    if typed.returncode != 0:
        raise RuntimeError(f"mcp-guard {verdict} failed:\n{typed.output}")


def _first_progress(console: Console) -> ProgressFnT:
    """A progress callback that shows the first message of a held call: the client hears it waits."""
    heard: list[str] = []

    async def progress(progress: float, total: float | None, message: str | None) -> None:
        if message and not heard:
            heard.append(message)
            console.print(f"   [yellow]held[/]: {escape(message)}")

    return progress


async def run_walkthrough(console: Console) -> int:
    config = prepare(guard_home() / "walkthrough")
    env = {**os.environ, "MCP_GUARD_CONFIG": str(config)}
    params = StdioServerParameters(command=sys.executable, args=["-m", "mcp_guard", "serve"], env=env)
    console.rule("[bold]mcp-guard demo")
    console.print(
        "An MCP client (standing in for Claude) talks to [bold]mcp-guard serve[/] over stdio.\n"
        "The server guards a demo shop database (SQLite) and records every call. Risky changes\n"
        f"wait for a reviewer: here [bold]{REVIEWER}[/], a second identity, from another terminal.\n"
    )
    async with (
        stdio_client(params) as (read, write),
        ClientSession(read, write, client_info=Implementation(name="mcp-guard-demo", version="1")) as session,
    ):
        await session.initialize()
        for number, (title, tool, arguments, decision) in enumerate(STEPS, 1):
            console.print(f"[bold cyan]{number}. {escape(title)}[/]")
            shown = {k: v for k, v in arguments.items() if k != "sql"}
            console.print(f"   tool [bold]{tool}[/] {escape(str(shown)) if shown else ''}")
            if "sql" in arguments:
                console.print(Syntax(arguments["sql"], "sql", theme="ansi_dark", padding=(0, 3)))
            progress = _first_progress(console)
            call = asyncio.create_task(session.call_tool(tool, arguments, progress_callback=progress))
            if decision is not None:
                await _review(console, env, decision)
            result = await call
            assert isinstance(result, CallToolResult)
            style = "red" if result.is_error else "green"
            label = "refused" if result.is_error else "result"
            console.print(Panel(escape(_text(result)), title=label, border_style=style, expand=False))
    console.rule("[bold]The audit trail of this session")
    listing = subprocess.run([sys.executable, "-m", "mcp_guard", "audit", "list"], env=env)
    verify = subprocess.run([sys.executable, "-m", "mcp_guard", "audit", "verify"], env=env)
    console.print(
        f"\nThe walkthrough's files are in {config.parent}. Try it yourself: "
        f'[bold]mcp-guard check "DELETE FROM orders"[/], [bold]mcp-guard review --config {config} '
        f"--reviewer {REVIEWER}[/] while Claude waits, and docs/approvals.md."
    )
    return 0 if listing.returncode == 0 and verify.returncode == 0 else 1
