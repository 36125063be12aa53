"""Drive mcp-guard as a client does: the `mcp` SDK's client over stdio or HTTP, against a real server."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
from mcp.client.session import ClientSession
from mcp.client.sse import sse_client
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.dispatcher import ProgressFnT
from mcp_types import CallToolResult, Implementation, TextContent

ROOT = Path(__file__).resolve().parent.parent


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
async def guard_client(
    config: Path | None, home: Path, cwd: Path | None = None, **env: str
) -> AsyncIterator[GuardClient]:
    args = ["-m", "mcp_guard", "serve"] + (["--config", str(config)] if config else [])
    environment = {**os.environ, "MCP_GUARD_HOME": str(home), "MCP_GUARD_CONFIG": "", **env}
    if cwd is not None:  # the server must still import this checkout's mcp_guard
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    params = StdioServerParameters(command=sys.executable, args=args, env=environment, cwd=cwd)
    with open(home / "server.stderr", "a") as errlog:
        async with (
            stdio_client(params, errlog=errlog) as (read, write),
            ClientSession(
                read, write, client_info=Implementation(name="mcp-guard-tests", version="1")
            ) as session,
        ):
            await session.initialize()
            yield GuardClient(session)


@contextmanager
def http_server(config: Path, home: Path, transport: str) -> Iterator[str]:
    """`mcp-guard serve --transport ... --port 0` as a process; yields the URL it announces."""
    log = home / f"server-{transport}.stderr"
    command = [sys.executable, "-m", "mcp_guard", "serve", "--config", str(config), "--transport", transport]
    environment = {**os.environ, "MCP_GUARD_HOME": str(home), "MCP_GUARD_CONFIG": ""}
    with open(log, "w") as errors:
        process = subprocess.Popen(
            [*command, "--port", "0"], env=environment, stdin=subprocess.DEVNULL, stderr=errors
        )
    try:
        deadline = time.monotonic() + 30
        while not (found := re.search(r"serving \S+ at (\S+),", log.read_text())):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start:\n{log.read_text()}")
            time.sleep(0.05)
        yield found.group(1)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise AssertionError("the server did not stop within 15 s of SIGINT") from None


@asynccontextmanager
async def guard_http_client(
    url: str, transport: str, token: str, name: str = "mcp-guard-tests"
) -> AsyncIterator[GuardClient]:
    """The `mcp` SDK's client over SSE or streamable HTTP, sending `Authorization: Bearer <token>`."""
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30, read=300)) as http:
        if transport == "sse":
            streams = sse_client(url, headers=headers)
        else:
            streams = streamable_http_client(url, http_client=http)
        async with (
            streams as (read, write),
            ClientSession(read, write, client_info=Implementation(name=name, version="1")) as session,
        ):
            await session.initialize()
            yield GuardClient(session)
