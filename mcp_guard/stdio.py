"""Standard input and output as asyncio pipes, for the MCP stdio transport.

The `mcp` SDK reads and writes stdio through `anyio.wrap_file`: every line read, every write and
every flush is a trip to a worker thread. Here the same bytes go through the event loop's own pipe
transports. As in the SDK, the real descriptors are taken over while serving: fd 0 reads the null
device and fd 1 writes to stderr, so a stray print can never corrupt the wire. When stdin or stdout
is not a pipe, socket or terminal (a regular file, say), the SDK's own transport is used instead.
"""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

_MAX_LINE = 64 * 1024 * 1024
"""One JSON-RPC message per line; a larger line is refused by the reader, not buffered forever."""


class PipeLines:
    """`async for line in stdin`: lines of text as the SDK's reader expects them."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self._reader = reader

    def __aiter__(self) -> PipeLines:
        return self

    async def __anext__(self) -> str:
        line = await self._reader.readline()
        if not line:
            raise StopAsyncIteration
        return line.decode("utf-8", errors="replace")


class PipeWriter:
    """`await stdout.write(text)` and `await stdout.flush()`, as the SDK's writer calls them."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer

    async def write(self, text: str) -> None:
        self._writer.write(text.encode("utf-8"))

    async def flush(self) -> None:
        await self._writer.drain()


def _pipe_like(fd: int) -> bool:
    mode = os.fstat(fd).st_mode
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISCHR(mode)


def usable() -> bool:
    """Whether both descriptors are something the event loop can watch."""
    try:
        return _pipe_like(0) and _pipe_like(1)
    except OSError:
        return False


@asynccontextmanager
async def pipe_stdio() -> AsyncIterator[tuple[PipeLines, PipeWriter]]:
    loop = asyncio.get_running_loop()
    saved_in, saved_out = os.dup(0), os.dup(1)
    wire_in, wire_out = os.dup(0), os.dup(1)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)
    transports: list[asyncio.BaseTransport] = []
    try:
        reader = asyncio.StreamReader(limit=_MAX_LINE)
        read_transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(wire_in, "rb", buffering=0)
        )
        transports.append(read_transport)
        write_transport, protocol = await loop.connect_write_pipe(
            asyncio.streams.FlowControlMixin, os.fdopen(wire_out, "wb", buffering=0)
        )
        transports.append(write_transport)
        writer = asyncio.StreamWriter(write_transport, protocol, reader, loop)
        yield PipeLines(reader), PipeWriter(writer)
    finally:
        for transport in transports:
            transport.close()
        os.dup2(saved_in, 0)
        os.dup2(saved_out, 1)
        os.close(saved_in)
        os.close(saved_out)
