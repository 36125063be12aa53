"""`mcp-guard demo`: a real MCP client drives a real server over stdio, as an assistant would."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp_types import CallToolResult, Implementation, TextContent
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.syntax import Syntax

STEPS: list[tuple[str, str, dict[str, Any]]] = [
    ("Which databases may I use?", "list_connections", {}),
    ("What tables are there?", "list_tables", {}),
    (
        "A read: revenue by order status",
        "query",
        {
            "sql": "SELECT status, count(*) AS orders, round(sum(total), 2) AS revenue\n"
            "FROM orders GROUP BY status ORDER BY revenue DESC"
        },
    ),
    (
        "A masked read: email and phone in part, the SSN as a keyed hash, the card's last 4 digits",
        "query",
        {"sql": "SELECT id, name, email, phone, ssn, card_number FROM customers ORDER BY id LIMIT 3"},
    ),
    (
        "Renamed and wrapped, the column is still masked: the mask sits in the table the query reads",
        "query",
        {"sql": "SELECT upper(email) AS contact, replace(ssn, '-', '') AS ident FROM customers LIMIT 3"},
    ),
    (
        "A whole row as JSON (SQLite's json_object over every column) is masked too",
        "query",
        {
            "sql": "SELECT json_object('name', c.name, 'email', c.email, 'card', c.card_number) AS row\n"
            "FROM customers AS c LIMIT 2"
        },
    ),
    (
        "An email inside free text: the content detector replaces it in place",
        "query",
        {"sql": "SELECT id, notes FROM customers WHERE notes LIKE '%@%' LIMIT 2"},
    ),
    (
        "An allowed write, with the user's reason",
        "execute",
        {
            "sql": "UPDATE orders SET status = 'shipped' WHERE id = 42",
            "reason": "Customer support asked to mark order 42 as shipped",
        },
    ),
    (
        "A denied DROP: the policy refuses, the assistant is told why",
        "execute",
        {"sql": "DROP TABLE payments", "reason": "Clean up the payments table"},
    ),
    (
        "A write smuggled into a read: refused before it reaches the database",
        "query",
        {"sql": "SELECT 1; DELETE FROM orders"},
    ),
]


def _text(result: CallToolResult) -> str:
    return "\n".join(block.text for block in result.content if isinstance(block, TextContent))


async def run_walkthrough(console: Console) -> int:
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "mcp_guard", "serve"], env={**os.environ, "MCP_GUARD_CONFIG": ""}
    )
    console.rule("[bold]mcp-guard demo")
    console.print(
        "An MCP client (standing in for Claude) talks to [bold]mcp-guard serve[/] over stdio.\n"
        "The server guards a demo shop database (SQLite) and records every call.\n"
    )
    async with (
        stdio_client(params) as (read, write),
        ClientSession(read, write, client_info=Implementation(name="mcp-guard-demo", version="1")) as session,
    ):
        await session.initialize()
        for number, (title, tool, arguments) in enumerate(STEPS, 1):
            console.print(f"[bold cyan]{number}. {escape(title)}[/]")
            shown = {k: v for k, v in arguments.items() if k != "sql"}
            console.print(f"   tool [bold]{tool}[/] {escape(str(shown)) if shown else ''}")
            if "sql" in arguments:
                console.print(Syntax(arguments["sql"], "sql", theme="ansi_dark", padding=(0, 3)))
            result = await session.call_tool(tool, arguments)
            assert isinstance(result, CallToolResult)
            style = "red" if result.is_error else "green"
            label = "refused" if result.is_error else "result"
            console.print(Panel(escape(_text(result)), title=label, border_style=style, expand=False))
    console.rule("[bold]The audit trail of this session")
    env = {**os.environ, "MCP_GUARD_CONFIG": ""}
    listing = subprocess.run(
        [sys.executable, "-m", "mcp_guard", "audit", "list", "--limit", str(len(STEPS))], env=env
    )
    verify = subprocess.run([sys.executable, "-m", "mcp_guard", "audit", "verify"], env=env)
    console.print(
        '\nTry it yourself: [bold]mcp-guard check "DELETE FROM orders"[/], '
        "[bold]mcp-guard audit list[/], and docs/claude.md to register the server in Claude."
    )
    return 0 if listing.returncode == 0 and verify.returncode == 0 else 1
