"""Drive mcp-guard as a client does: the `mcp` SDK's client over stdio, against a real server process."""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.shared.dispatcher import ProgressFnT
from mcp_types import CallToolResult, Implementation, TextContent


@dataclass
class Reply:
    text: str
    structured: dict[str, Any] | None
    is_error: bool


class GuardClient:
    def __init__(self, session: ClientSession) -> None:
        self.session = session

    async def call(self, tool: str, *, progress: ProgressFnT | None = None, **arguments: Any) -> Reply:
        result = await self.session.call_tool(tool, arguments, progress_callback=progress)
        assert isinstance(result, CallToolResult)
        text = "\n".join(b.text for b in result.content if isinstance(b, TextContent))
        return Reply(text=text, structured=result.structured_content, is_error=bool(result.is_error))


@asynccontextmanager
async def guard_client(config: Path | None, home: Path, **env: str) -> AsyncIterator[GuardClient]:
    args = ["-m", "mcp_guard", "serve"] + (["--config", str(config)] if config else [])
    environment = {**os.environ, "MCP_GUARD_HOME": str(home), "MCP_GUARD_CONFIG": "", **env}
    params = StdioServerParameters(command=sys.executable, args=args, env=environment)
    with open(home / "server.stderr", "a") as errlog:
        async with (
            stdio_client(params, errlog=errlog) as (read, write),
            ClientSession(
                read, write, client_info=Implementation(name="mcp-guard-tests", version="1")
            ) as session,
        ):
            await session.initialize()
            yield GuardClient(session)
