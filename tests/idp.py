"""A local OIDC identity provider for the tests: keys generated per run, discovery and JWKS on 127.0.0.1."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jose import jwk, jwt

from mcp_guard.config import IdentitySettings
from mcp_guard.identity import Identity, OidcVerifier

AUDIENCE = "mcp-guard-tests"
REMOVE = object()
"""Pass as a claim's value to leave the claim out."""


def _private_pem(kind: str) -> str:
    key = (
        rsa.generate_private_key(65537, 2048) if kind == "RS256" else ec.generate_private_key(ec.SECP256R1())
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


class LocalIdP:
    """Serves `/.well-known/openid-configuration` and `/jwks`; mints tokens with its keys."""

    def __init__(self) -> None:
        self.private: dict[str, tuple[str, str]] = {}  # kid -> (alg, private PEM)
        self.published: list[str] = []
        self.jwks_hits = 0
        self.discovery_hits = 0
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.issuer = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self.add_key("rsa-1", "RS256")
        self.add_key("ec-1", "ES256")

    def start(self) -> LocalIdP:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def add_key(self, kid: str, alg: str, *, publish: bool = True) -> None:
        self.private[kid] = (alg, _private_pem(alg))
        if publish:
            self.published.append(kid)

    def retire_key(self, kid: str) -> None:
        self.published.remove(kid)

    def public_jwk(self, kid: str) -> dict[str, Any]:
        alg, pem = self.private[kid]
        public = jwk.construct(pem, alg).public_key().to_dict()
        return {**public, "kid": kid, "use": "sig"}

    def public_pem(self, kid: str) -> str:
        alg, pem = self.private[kid]
        return jwk.construct(pem, alg).public_key().to_pem().decode()

    def jwks(self) -> dict[str, Any]:
        return {"keys": [self.public_jwk(kid) for kid in self.published]}

    def claims(
        self, subject: str = "alice", groups: list[str] | None = None, **changes: Any
    ) -> dict[str, Any]:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": AUDIENCE,
            "sub": subject,
            "iat": now,
            "exp": now + 300,
            "email": f"{subject}@example.com",
            "preferred_username": subject,
            "groups": ["analysts"] if groups is None else groups,
        }
        claims.update(changes)
        return {name: value for name, value in claims.items() if value is not REMOVE}

    def token(
        self,
        subject: str = "alice",
        groups: list[str] | None = None,
        *,
        kid: str = "rsa-1",
        headers: dict[str, Any] | None = None,
        **changes: Any,
    ) -> str:
        alg, pem = self.private[kid]
        return str(
            jwt.encode(
                self.claims(subject, groups, **changes),
                pem,
                algorithm=alg,
                headers={"kid": kid, **(headers or {})},
            )
        )

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        idp = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
                if self.path == "/.well-known/openid-configuration":
                    idp.discovery_hits += 1
                    body = {"issuer": idp.issuer, "jwks_uri": f"{idp.issuer}/jwks"}
                elif self.path == "/jwks":
                    idp.jwks_hits += 1
                    body = idp.jwks()
                else:
                    self.send_error(404)
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler


async def verify_once(settings: IdentitySettings, token: str) -> Identity:
    """One token through a verifier of its own, as a server would check it."""
    verifier = OidcVerifier(settings)
    try:
        return await verifier.verify(token)
    finally:
        await verifier.aclose()
