"""Register the server with an MCP client by merging one entry into the client's JSON configuration.

The entry runs this very interpreter (`python -m mcp_guard serve`), so it works whatever the client's
PATH. Other servers in the file are kept; the previous file is kept beside it as `.bak`.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path
from typing import Any, Literal

from mcp_guard.errors import UsageError

Client = Literal["claude-desktop", "claude-code"]


def default_target(client: Client) -> Path:
    if client == "claude-code":
        return Path.cwd() / ".mcp.json"
    system = platform.system()
    if system == "Darwin":
        return Path.home() / "Library" / "Application Support" / "Claude" / "claude_desktop_config.json"
    if system == "Windows":
        return Path(os.environ.get("APPDATA", Path.home())) / "Claude" / "claude_desktop_config.json"
    return Path.home() / ".config" / "Claude" / "claude_desktop_config.json"


def server_entry(config: Path | None) -> dict[str, Any]:
    args = ["-m", "mcp_guard", "serve"]
    if config is not None:
        args += ["--config", str(config.expanduser().resolve())]
    return {"command": sys.executable, "args": args}


def install(client: Client, *, name: str, config: Path | None, target: Path | None) -> Path:
    """Write the entry; refuse to touch a file that is not a JSON object, rather than lose its content."""
    path = target or default_target(client)
    document: dict[str, Any] = {}
    if path.exists():
        try:
            loaded = json.loads(path.read_text(encoding="utf-8") or "{}")
        except (OSError, ValueError) as error:
            raise UsageError(
                f"{path} is not readable JSON ({error}); fix or move it, then run again"
            ) from None
        if not isinstance(loaded, dict) or not isinstance(loaded.get("mcpServers", {}), dict):
            raise UsageError(f"{path} does not hold a JSON object with an mcpServers object; not touching it")
        document = loaded
        path.with_name(path.name + ".bak").write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    document.setdefault("mcpServers", {})[name] = server_entry(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return path
