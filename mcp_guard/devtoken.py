"""`mcp-guard token --dev`: short-lived tokens from a local key, for trying OIDC mode without a provider.

Development only. The key lives under MCP_GUARD_HOME/dev-issuer; its public half is written as a JWKS
file there. Nothing trusts it by default: a server accepts these tokens only when its configuration
names the development issuer and that JWKS file explicitly, and it warns at start when it does.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jose import jwk, jwt

from mcp_guard.config import guard_home
from mcp_guard.errors import UsageError

DEV_ISSUER = "https://dev.mcp-guard.invalid"
"""Under the reserved `.invalid` domain: it can never be a real provider's issuer."""
DEV_AUDIENCE = "mcp-guard"
MAX_MINUTES = 60
_ALG = "ES256"


@dataclass(frozen=True, slots=True)
class DevIssuer:
    key_file: Path
    jwks_file: Path
    kid: str

    def config_snippet(self, audience: str) -> str:
        return (
            "[identity]\n"
            'mode = "oidc"\n'
            f'issuer = "{DEV_ISSUER}"\n'
            f'audience = "{audience}"\n'
            f'jwks_file = "{self.jwks_file}"\n'
        )


def dev_issuer(home: Path | None = None) -> DevIssuer:
    """The local development issuer, its key made on first use (readable by this user only)."""
    folder = (home or guard_home()) / "dev-issuer"
    key_file, jwks_file = folder / "key.pem", folder / "jwks.json"
    if not key_file.exists():
        folder.mkdir(parents=True, exist_ok=True)
        pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        descriptor = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as out:
            out.write(pem)
    pem_text = key_file.read_text(encoding="utf-8")
    public = jwk.construct(pem_text, _ALG).public_key().to_dict()
    thumbprint = {name: public[name] for name in ("crv", "kty", "x", "y")}  # RFC 7638 members
    kid = "dev-" + hashlib.sha256(json.dumps(thumbprint, sort_keys=True).encode()).hexdigest()[:16]
    jwks_file.write_text(json.dumps({"keys": [{**public, "kid": kid, "use": "sig"}]}, indent=2) + "\n")
    return DevIssuer(key_file=key_file, jwks_file=jwks_file, kid=kid)


def mint_dev_token(
    issuer: DevIssuer,
    *,
    subject: str,
    groups: tuple[str, ...],
    audience: str = DEV_AUDIENCE,
    minutes: float = 15,
    email: str | None = None,
) -> str:
    if not 0 < minutes <= MAX_MINUTES:
        raise UsageError(f"--minutes must be between 0 and {MAX_MINUTES}: development tokens are short-lived")
    if not subject.strip():
        raise UsageError("--subject must not be empty")
    now = int(time.time())
    claims: dict[str, object] = {
        "iss": DEV_ISSUER,
        "aud": audience,
        "sub": subject,
        "groups": list(groups),
        "iat": now,
        "nbf": now,
        "exp": now + int(minutes * 60),
        "jti": str(uuid.uuid4()),
        "preferred_username": subject,
    }
    if email:
        claims["email"] = email
    pem = issuer.key_file.read_text(encoding="utf-8")
    return str(jwt.encode(claims, pem, algorithm=_ALG, headers={"kid": issuer.kid}))
