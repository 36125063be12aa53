"""Helpers for the auditor's tests: record a real session through the MCP client, run audit commands."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mcp_types import CallToolResult, TextContent

from mcp_guard.cli import main
from mcp_guard.server import CALL_META
from tests.client import guard_client
from tests.conftest import write_config


@dataclass
class Received:
    """Exactly what the client received for one call."""

    tool: str
    arguments: dict[str, Any]
    text: str
    structured: dict[str, Any] | None
    is_error: bool
    call_id: str


def shop_config(tmp_path: Path, shop: Path, audit: str = "", extra: str = "") -> Path:
    """A configuration for the SQLite shop; `audit` adds keys to [audit]."""
    path = write_config(tmp_path, f'[connections.shop]\nurl = "sqlite:///{shop}"\n{extra}')
    if audit:
        text = path.read_text().replace("[audit]\n", f"[audit]\n{audit}\n", 1)
        path.write_text(text)
    return path


async def record_session(
    config: Path, home: Path, calls: list[tuple[str, dict[str, Any]]], **kwargs: Any
) -> list[Received]:
    """Drive a real server over stdio and keep what the client got back, call by call."""
    received = []
    async with guard_client(config, home, **kwargs) as client:
        for tool, arguments in calls:
            result = await client.session.call_tool(tool, arguments)
            assert isinstance(result, CallToolResult)
            received.append(
                Received(
                    tool=tool,
                    arguments=arguments,
                    text="\n".join(b.text for b in result.content if isinstance(b, TextContent)),
                    structured=result.structured_content,
                    is_error=bool(result.is_error),
                    call_id=str((result.meta or {}).get(CALL_META)),
                )
            )
    return received


def record(
    config: Path, home: Path, calls: list[tuple[str, dict[str, Any]]], **kwargs: Any
) -> list[Received]:
    return asyncio.run(record_session(config, home, calls, **kwargs))


def audit_cli(capsys: Any, *args: str) -> tuple[int, str, str]:
    """Run `mcp-guard ARGS` in this process, as a user would type it; (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def audit_json(capsys: Any, *args: str) -> Any:
    code, out, err = audit_cli(capsys, *args, "--json")
    assert code == 0, err
    return json.loads(out)


def run_hook(
    home: Path, config: Path, payload: object, *extra: str, **env: str
) -> subprocess.CompletedProcess[str]:
    """The hook as Claude Code runs it: a process reading the hook JSON on stdin."""
    return subprocess.run(
        [sys.executable, "-m", "mcp_guard", "hook", "claude-code", "--config", str(config), *extra],
        input=payload if isinstance(payload, str) else json.dumps(payload),
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "MCP_GUARD_HOME": str(home), "MCP_GUARD_CONFIG": "", **env},
    )
