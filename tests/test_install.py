"""`mcp-guard install`: one line registers the server in a Claude client's configuration."""

from __future__ import annotations

import json
import sys

from mcp_guard.cli import main


def test_install_adds_an_entry_and_keeps_other_servers(tmp_path, capsys):
    target = tmp_path / "claude_desktop_config.json"
    target.write_text(json.dumps({"mcpServers": {"other": {"command": "x"}}, "theme": "dark"}))
    assert main(["install", "claude-desktop", "--file", str(target)]) == 0
    document = json.loads(target.read_text())
    assert document["theme"] == "dark" and document["mcpServers"]["other"] == {"command": "x"}
    assert document["mcpServers"]["mcp-guard"] == {
        "command": sys.executable,
        "args": ["-m", "mcp_guard", "serve"],
    }
    assert json.loads((tmp_path / "claude_desktop_config.json.bak").read_text())["theme"] == "dark"
    assert "restart Claude Desktop" in capsys.readouterr().out


def test_install_for_claude_code_names_the_config_file_absolutely(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "guard.toml"
    config.write_text(f'[connections.shop]\nurl = "sqlite:///{tmp_path}/shop.db"\n')
    assert main(["install", "claude-code", "--config", "guard.toml", "--name", "shop-db"]) == 0
    entry = json.loads((tmp_path / ".mcp.json").read_text())["mcpServers"]["shop-db"]
    assert entry["args"] == ["-m", "mcp_guard", "serve", "--config", str(config)]


def test_install_refuses_to_overwrite_a_file_it_cannot_read(tmp_path, capsys):
    target = tmp_path / "claude_desktop_config.json"
    target.write_text("{ not json")
    assert main(["install", "claude-desktop", "--file", str(target)]) == 2
    assert target.read_text() == "{ not json"
    assert "is not readable JSON" in capsys.readouterr().err


def test_install_checks_the_config_first(tmp_path, capsys):
    config = tmp_path / "guard.toml"
    config.write_text("[connections]\n")
    assert main(["install", "claude-code", "--config", str(config), "--file", str(tmp_path / "m.json")]) == 2
    assert not (tmp_path / "m.json").exists()
