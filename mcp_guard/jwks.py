"""The identity provider's signing keys: discovered, fetched, cached, refreshed on an unknown key id.

The key set comes from `jwks_url`, from `jwks_file`, or from the `jwks_uri` of the issuer's
`/.well-known/openid-configuration`. It is kept for `jwks_max_age` seconds. A token signed with a key
id the set does not hold makes it fetch again, but at most once per `jwks_refresh_interval`, so a
stream of made-up key ids cannot turn the gateway into a load generator against the provider. A fetch
that fails refuses the token (fail closed); it is retried no sooner than the refresh interval.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx2
from jose import jwk
from jose.backends.base import Key
from jose.exceptions import JWKError

from mcp_guard.config import IdentitySettings, check_fetch_url
from mcp_guard.errors import AuthenticationError

log = logging.getLogger(__name__)

MAX_DOCUMENT_BYTES = 1_000_000
FETCH_TIMEOUT_S = 5.0
KEY_TYPES: dict[str, tuple[str, str | None]] = {
    "RS256": ("RSA", None),
    "RS384": ("RSA", None),
    "RS512": ("RSA", None),
    "ES256": ("EC", "P-256"),
    "ES384": ("EC", "P-384"),
    "ES512": ("EC", "P-521"),
}


class KeySet:
    """The provider's public keys by key id, as jose key objects ready to verify with."""

    def __init__(self, settings: IdentitySettings, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._settings = settings
        self._clock = clock
        self._jwks_url = settings.jwks_url
        self._keys: dict[str, dict[str, Any]] = {}
        self._built: dict[tuple[str, str], Key] = {}
        self._fetched_at: float | None = None
        self._attempted_at: float | None = None
        self._failure: str | None = None
        self._lock = asyncio.Lock()
        self._http: httpx2.AsyncClient | None = None

    @property
    def source(self) -> str:
        if self._settings.jwks_file is not None:
            return str(self._settings.jwks_file)
        return self._jwks_url or f"discovery at {self._settings.issuer}"

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def key(self, kid: str, alg: str) -> Key:
        """The verification key for a token header; AuthenticationError naming why there is none."""
        if self._stale() or kid not in self._keys:
            async with self._lock:  # one fetch for many waiting callers; each re-checks after it
                if self._stale() or (kid not in self._keys and self._may_fetch()):
                    await self._fetch_now()
        jwk_dict = self._keys.get(kid)
        if jwk_dict is None:
            age = self._clock() - (self._fetched_at or 0.0)
            raise AuthenticationError(
                f"the token's key id {kid[:80]!r} is not in the identity provider's key set "
                f"({self.source}, fetched {age:.0f} s ago; fetched again for an unknown key id at most "
                f"every {self._settings.jwks_refresh_interval:g} s)"
            )
        return self._build(kid, alg, jwk_dict)

    def _stale(self) -> bool:
        return self._fetched_at is None or self._clock() - self._fetched_at > self._settings.jwks_max_age

    def _may_fetch(self) -> bool:
        return self._attempted_at is None or (
            self._clock() - self._attempted_at >= self._settings.jwks_refresh_interval
        )

    async def _fetch_now(self) -> None:
        if not self._may_fetch():
            raise AuthenticationError(
                self._failure or f"the key set from {self.source} is older than jwks_max_age"
            )
        self._attempted_at = self._clock()
        try:
            keys = await self._fetch()
        except AuthenticationError as error:
            self._failure = str(error)
            log.warning("%s", error)
            raise
        self._failure = None
        self._keys = keys
        self._built.clear()
        self._fetched_at = self._attempted_at

    async def _fetch(self) -> dict[str, dict[str, Any]]:
        if self._settings.jwks_file is not None:
            document = self._read_file(self._settings.jwks_file)
        else:
            if self._jwks_url is None:
                self._jwks_url = await self._discover()
            document = await self._get_json(self._jwks_url, "key set")
        return _parse_key_set(document, self.source)

    def _read_file(self, path: Path) -> Any:
        try:
            return json.loads(path.expanduser().read_text(encoding="utf-8"))
        except OSError as error:
            raise AuthenticationError(f"cannot read the key set file {path}: {error.strerror}") from None
        except ValueError:
            raise AuthenticationError(f"the key set file {path} is not JSON") from None

    async def _discover(self) -> str:
        issuer = self._settings.issuer or ""
        url = issuer.rstrip("/") + "/.well-known/openid-configuration"
        document = await self._get_json(url, "discovery document")
        if not isinstance(document, dict) or document.get("issuer") != issuer:
            found = document.get("issuer") if isinstance(document, dict) else None
            raise AuthenticationError(
                f"the discovery document at {url} names issuer {str(found)[:200]!r}, not {issuer!r}"
            )
        jwks_uri = document.get("jwks_uri")
        if not isinstance(jwks_uri, str):
            raise AuthenticationError(f"the discovery document at {url} has no jwks_uri")
        try:
            check_fetch_url(jwks_uri, "jwks_uri")
        except ValueError as error:
            raise AuthenticationError(f"the discovery document at {url}: {error}") from None
        return jwks_uri

    async def _get_json(self, url: str, what: str) -> Any:
        if self._http is None:
            self._http = httpx2.AsyncClient(timeout=FETCH_TIMEOUT_S, follow_redirects=False)
        try:
            response = await self._http.get(url, headers={"Accept": "application/json"})
        except httpx2.HTTPError as error:
            raise AuthenticationError(
                f"cannot fetch the identity provider's {what} from {url}: {error.__class__.__name__}"
            ) from None
        if response.status_code != 200:
            raise AuthenticationError(
                f"cannot fetch the identity provider's {what} from {url}: HTTP {response.status_code}"
            )
        if len(response.content) > MAX_DOCUMENT_BYTES:
            raise AuthenticationError(f"the identity provider's {what} at {url} is larger than 1 MB")
        try:
            return response.json()
        except ValueError:
            raise AuthenticationError(f"the identity provider's {what} at {url} is not JSON") from None

    def _build(self, kid: str, alg: str, jwk_dict: dict[str, Any]) -> Key:
        cached = self._built.get((kid, alg))
        if cached is not None:
            return cached
        kty, curve = KEY_TYPES[alg]
        if jwk_dict.get("kty") != kty or (curve is not None and jwk_dict.get("crv") != curve):
            raise AuthenticationError(
                f"the token says {alg} but key {kid[:80]!r} is a {jwk_dict.get('kty')} "
                f"{jwk_dict.get('crv') or ''} key".replace("  ", " ")
            )
        if "alg" in jwk_dict and jwk_dict["alg"] != alg:
            raise AuthenticationError(f"key {kid[:80]!r} is for {jwk_dict['alg']}, the token says {alg}")
        try:
            key = jwk.construct(jwk_dict, alg)
        except (JWKError, ValueError, TypeError) as error:
            raise AuthenticationError(f"key {kid[:80]!r} of the key set is unusable: {error}") from None
        self._built[(kid, alg)] = key
        return key


def _parse_key_set(document: Any, source: str) -> dict[str, dict[str, Any]]:
    """Signing keys with a key id; encryption keys and symmetric keys are ignored."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise AuthenticationError(f"the key set from {source} is not a JWKS (an object with a keys list)")
    keys: dict[str, dict[str, Any]] = {}
    for entry in document["keys"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("kid"), str):
            continue
        if entry.get("kty") not in ("RSA", "EC") or entry.get("use", "sig") != "sig":
            continue
        keys[entry["kid"]] = entry
    if not keys:
        raise AuthenticationError(f"the key set from {source} holds no signing keys with a key id")
    return keys
