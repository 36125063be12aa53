"""Configuration: a bad file fails at start naming the file, the key and what is wrong."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from mcp_guard.config import (
    ApprovalSettings,
    AuditSettings,
    ConnectionSettings,
    IdentitySettings,
    MaskingSettings,
    MaskRule,
    PolicyRule,
    PolicySettings,
    ReviewerSettings,
    load_config,
)
from mcp_guard.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "guard.toml"
    path.write_text(text)
    return path


def test_a_connection_url_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SHOP_URL", "postgresql://reader:s3cret-pw@db:5432/shop")
    config = load_config(write(tmp_path, '[connections.shop]\nurl_env = "SHOP_URL"\n'))
    assert config.urls["shop"] == "postgresql://reader:s3cret-pw@db:5432/shop"
    assert "s3cret-pw" in config.secrets


def test_a_connection_url_comes_from_a_file(tmp_path):
    secret = tmp_path / "url"
    secret.write_text("sqlite:////tmp/x.db\n")
    config = load_config(write(tmp_path, f'[connections.local]\nurl_file = "{secret}"\n'))
    assert config.urls["local"] == "sqlite:////tmp/x.db"


def test_limits_have_documented_defaults(tmp_path):
    config = load_config(write(tmp_path, '[connections.local]\nurl = "sqlite:////tmp/x.db"\n'))
    limits = config.settings.connections["local"].limits
    assert (limits.row_limit, limits.byte_limit, limits.timeout_s) == (500, 1_000_000, 5.0)


@pytest.mark.parametrize(
    ("text", "key", "message"),
    [
        ('[connections.shop]\nurl = "postgresql://u:pw@h/db"\n', "connections.shop", "only sqlite:///"),
        (
            '[connections.shop]\nurl_env = "NOPE_NOT_SET"\n',
            "connections.shop.url_env",
            "NOPE_NOT_SET is not set",
        ),
        (
            '[connections.shop]\nurl = "sqlite:////x"\nrow_limit = 0\n',
            "connections.shop.row_limit",
            "greater than 0",
        ),
        (
            '[connections.shop]\nurl = "sqlite:////x"\nrow_limt = 5\n',
            "connections.shop.row_limt",
            "Extra inputs",
        ),
        (
            '[connections.shop]\nurl = "sqlite:////x"\ntimeout = "soon"\n',
            "connections.shop.timeout",
            "number",
        ),
        ("[connections]\n", "connections", "at least 1"),
        (
            '[connections.shop]\nurl = "sqlite:////x"\n[[policy.rules]]\nname = "r"\naction = "maybe"\n',
            "policy.rules.0.action",
            "'allow', 'deny' or 'approve'",
        ),
        (
            '[connections.shop]\nurl = "sqlite:////x"\n[[policy.rules]]\nname = "r"\naction = "deny"\n'
            'kinds = ["reads"]\n',
            "policy.rules.0.kinds.0",
            "'read'",
        ),
        (
            '[connections.shop]\nurl = "sqlite:////x"\n[[policy.rules]]\nname = "r"\naction = "deny"\n'
            '[[policy.rules]]\nname = "r"\naction = "allow"\n',
            "policy.rules",
            "used twice",
        ),
        ('[connections.shop]\nurl_env = "A"\nurl_file = "/b"\n', "connections.shop", "exactly one"),
        ('[connections."bad name!"]\nurl = "sqlite:////x"\n', "connections", "letters, digits"),
    ],
)
def test_a_bad_value_is_refused_naming_file_and_key(tmp_path, text, key, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert str(raised.value).startswith(f"{path}: {key}: ")
    assert message in str(raised.value)


def test_broken_toml_is_refused_with_its_position(tmp_path):
    path = write(tmp_path, "[connections.shop\nurl = 1\n")
    with pytest.raises(ConfigError, match=re.escape(str(path)) + r": not valid TOML: .*line 1"):
        load_config(path)


@pytest.mark.parametrize(
    "text, message",
    [
        ("a = " + "[" * 5000 + "]" * 5000, "not valid TOML: its arrays or tables are nested too deeply"),
        (
            f'[connections.shop]\nurl = "sqlite:///x.db"\ndescription = "{"x" * 1_000_000}"\n',
            "the configuration is larger than 1,000,000 bytes",
        ),
    ],
    ids=["nested-too-deep", "too-large"],
)
def test_a_hostile_file_is_refused_not_crashed_on(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=re.escape(f"{path}: {message}")):
        load_config(path)


def test_a_missing_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the configuration"):
        load_config(tmp_path / "absent.toml")


def test_serve_with_a_bad_config_exits_2_with_one_line(tmp_path):
    path = write(tmp_path, '[connections.shop]\nurl = "postgresql://u:hunter22@h/db"\n')
    done = subprocess.run(
        [sys.executable, "-m", "mcp_guard", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 2
    assert done.stderr.startswith(f"mcp-guard: {path}: connections.shop: only sqlite:///")
    assert "hunter22" not in done.stderr
    assert "Traceback" not in done.stderr


def test_the_full_example_is_valid(tmp_path, monkeypatch):
    monkeypatch.setenv("SHOP_DATABASE_URL", "postgresql://reader:pw@db.internal:5432/shop")
    url_file = tmp_path / "analytics_url"
    url_file.write_text("postgresql://reader:pw@analytics:5432/warehouse\n")
    text = (
        (ROOT / "examples" / "mcp-guard.toml")
        .read_text()
        .replace("/run/secrets/analytics_url", str(url_file))
    )
    config = load_config(write(tmp_path, text))
    assert set(config.settings.connections) == {"shop", "analytics", "local"}
    assert [r.name for r in config.settings.policy.rules][0] == "deny-risky-kinds"


def test_every_setting_is_documented():
    doc = (ROOT / "docs" / "configuration.md").read_text()
    models = (
        ConnectionSettings,
        PolicyRule,
        PolicySettings,
        IdentitySettings,
        MaskingSettings,
        MaskRule,
        AuditSettings,
        ApprovalSettings,
        ReviewerSettings,
    )
    for model in models:
        for name in model.model_fields:
            assert f"`{name}`" in doc, f"{model.__name__}.{name} is missing from docs/configuration.md"
    assert "`response_cap`" in doc and "`url`" in doc
