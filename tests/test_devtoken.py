"""`mcp-guard token --dev`: a short-lived token from a local key, trusted only when configured explicitly."""

from __future__ import annotations

import stat

import pytest
from jose import jwt

from mcp_guard.cli import main
from mcp_guard.config import IdentitySettings
from mcp_guard.devtoken import DEV_ISSUER
from mcp_guard.errors import AuthenticationError
from tests.client import guard_client
from tests.conftest import write_config
from tests.idp import AUDIENCE, verify_once


def mint(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["token", *args])
    out, err = capsys.readouterr()
    return code, out.strip(), err


async def test_a_dev_token_verifies_once_the_dev_issuer_is_trusted(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MCP_GUARD_HOME", str(tmp_path))
    monkeypatch.delenv("MCP_GUARD_CONFIG", raising=False)
    code, token, err = mint(capsys, "--dev", "--subject", "alice", "--group", "analysts", "--group", "oncall")
    assert code == 0
    assert "DEVELOPMENT ONLY" in err and f'issuer = "{DEV_ISSUER}"' in err
    jwks_file = tmp_path / "dev-issuer" / "jwks.json"
    assert f'jwks_file = "{jwks_file}"' in err
    assert stat.S_IMODE((tmp_path / "dev-issuer" / "key.pem").stat().st_mode) == 0o600
    claims = jwt.get_unverified_claims(token)
    assert claims["exp"] - claims["iat"] == 15 * 60

    trusted = IdentitySettings(mode="oidc", issuer=DEV_ISSUER, audience="mcp-guard", jwks_file=jwks_file)
    identity = await verify_once(trusted, token)
    assert (identity.subject, identity.groups, identity.issuer) == (
        "alice",
        {"analysts", "oncall"},
        DEV_ISSUER,
    )


async def test_a_dev_token_is_refused_by_a_server_trusting_a_real_provider(
    tmp_path, monkeypatch, capsys, local_idp
):
    monkeypatch.setenv("MCP_GUARD_HOME", str(tmp_path))
    _, token, _ = mint(capsys, "--dev", "--subject", "alice", "--audience", AUDIENCE)
    settings = IdentitySettings(mode="oidc", issuer=local_idp.issuer, audience=AUDIENCE)
    with pytest.raises(AuthenticationError, match="is not in the identity provider's key set"):
        await verify_once(settings, token)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "only development tokens are minted here (--dev)"),
        (("--dev", "--minutes", "120"), "between 0 and 60"),
    ],
)
def test_token_refuses_what_it_must_not_mint(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.setenv("MCP_GUARD_HOME", str(tmp_path))
    code, out, err = mint(capsys, *args)
    assert (code, out) == (2, "")
    assert message in err


async def test_trying_oidc_mode_without_a_provider(tmp_path, monkeypatch, capsys, sqlite_shop):
    """The documented walk-through: mint a dev token, trust the dev issuer, serve over stdio."""
    monkeypatch.setenv("MCP_GUARD_HOME", str(tmp_path))
    _, token, err = mint(capsys, "--dev", "--subject", "dev-user", "--group", "analysts")
    identity = err[err.index("[identity]") :]
    config = write_config(
        tmp_path,
        f'{identity}token_env = "MCP_GUARD_TOKEN"\n\n[connections.shop]\nurl = "sqlite:///{sqlite_shop}"\n',
    )
    async with guard_client(config, tmp_path, MCP_GUARD_TOKEN=token) as client:
        reply = await client.call("list_connections")
    assert not reply.is_error, reply.text
    assert "trusting the development issuer" in (tmp_path / "server.stderr").read_text()
    assert reply.structured["connections"][0]["name"] == "shop"
