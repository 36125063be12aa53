"""`mcp-guard demo` as a user runs it: a held DROP approved by a second identity, a held DELETE denied."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys


def test_the_demo_shows_a_drop_approved_by_dana_and_a_delete_she_denies(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "mcp_guard", "demo"],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, "MCP_GUARD_HOME": str(tmp_path), "COLUMNS": "200", "MCP_GUARD_CONFIG": ""},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = " ".join(done.stdout.split())
    assert "held: waiting for a reviewer to decide request" in out
    assert "mcp-guard approve" in out and "--reviewer dana" in out
    assert "Approved by local:dana (request" in out and "ran once, exactly as requested" in out
    assert "reviewer local:dana denied request" in out
    assert "orders are kept 7 years for accounting; archive them instead" in out
    assert "audit chain intact" in out
    shop = sqlite3.connect(tmp_path / "walkthrough" / "shop.db")
    tables = {row[0] for row in shop.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "api_keys" not in tables
    assert shop.execute("SELECT count(*) FROM orders").fetchone() == (240,)
