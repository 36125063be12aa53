"""The stdio transport: event-loop pipes when stdin/stdout are pipes, the SDK's files otherwise."""

from __future__ import annotations

import json
import os
import subprocess
import sys

INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "t", "version": "1"},
    },
}
LIST_TOOLS = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}


def serve_with_stdin(tmp_path, stdin) -> list[dict]:
    done = subprocess.run(
        [sys.executable, "-m", "mcp_guard", "serve"],
        stdin=stdin,
        capture_output=True,
        timeout=60,
        env={**os.environ, "MCP_GUARD_HOME": str(tmp_path), "MCP_GUARD_CONFIG": ""},
    )
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def requests(tmp_path):
    path = tmp_path / "requests.jsonl"
    initialized = {"jsonrpc": "2.0", "method": "notifications/initialized"}
    path.write_text("\n".join(json.dumps(m) for m in (INITIALIZE, initialized, LIST_TOOLS)) + "\n")
    return path


def test_a_server_reading_a_regular_file_answers_through_the_sdk_transport(tmp_path):
    """At the end of the file the server stops; the initialize, answered inline, always gets its reply."""
    with requests(tmp_path).open("rb") as stdin:
        replies = serve_with_stdin(tmp_path, stdin)
    assert replies[0]["id"] == 1 and replies[0]["result"]["serverInfo"]["name"] == "mcp-guard"


def test_a_server_reading_a_pipe_answers_through_event_loop_pipes(tmp_path):
    server = subprocess.Popen(
        [sys.executable, "-m", "mcp_guard", "serve"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "MCP_GUARD_HOME": str(tmp_path), "MCP_GUARD_CONFIG": ""},
    )
    assert server.stdin is not None and server.stdout is not None
    try:
        server.stdin.write(requests(tmp_path).read_bytes())
        server.stdin.flush()
        replies = [json.loads(server.stdout.readline()) for _ in range(2)]
    finally:
        server.stdin.close()
        returncode = server.wait(timeout=30)
        server.stdout.close()
    assert returncode == 0
    assert [r["id"] for r in replies] == [1, 2]
    assert {t["name"] for t in replies[1]["result"]["tools"]} >= {"query", "execute"}
