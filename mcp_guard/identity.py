"""Who is calling: the operating-system user (single-user mode) or the subject of a verified OIDC token.

`OidcVerifier.verify()` turns a bearer token into an `Identity` or raises `AuthenticationError` with a
reason a person can act on ("token expired at ...", "audience ... is not ..."). python-jose checks the
signature and the registered claims; it is told to *require* `iss`, `aud`, `exp`, `iat` and `sub`,
because by default it accepts a token that simply leaves them out. The algorithm comes from our
allow-list, never from the token alone, so `alg: none` and HMAC signed with a public key never verify.
"""

from __future__ import annotations

import copy
import getpass
import hashlib
import math
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from jose import jwt
from jose.exceptions import ExpiredSignatureError, JWTClaimsError, JWTError

from mcp_guard.config import IdentitySettings
from mcp_guard.errors import AuthenticationError, ConfigError
from mcp_guard.jwks import KEY_TYPES, KeySet

MAX_TOKEN_BYTES = 32_768


@dataclass(frozen=True, slots=True)
class Identity:
    subject: str
    groups: frozenset[str]
    source: Literal["local", "oidc"]
    issuer: str | None = None
    email: str | None = None
    username: str | None = None
    authorized_party: str | None = None
    expires_at: int | None = None
    authenticated_at: int | None = None
    """When the person signed in: the token's `auth_time`, else when it was issued (`iat`)."""

    def as_dict(self) -> dict[str, object]:
        found: dict[str, object] = {
            "subject": self.subject,
            "groups": sorted(self.groups),
            "source": self.source,
        }
        if self.source == "local":
            found["verified_by"] = "none: single-user mode, the operating-system user running mcp-guard"
        for name in ("issuer", "email", "username", "authorized_party", "expires_at", "authenticated_at"):
            value = getattr(self, name)
            if value is not None:
                found[name] = value
        return found


def _signed_in_at(claims: Mapping[str, Any]) -> int:
    auth_time = claims.get("auth_time")
    if isinstance(auth_time, int | float) and not isinstance(auth_time, bool) and math.isfinite(auth_time):
        return int(auth_time)
    return int(claims["iat"])


def check_fresh(identity: Identity, max_age: float, skew: float, now: float | None = None) -> None:
    """A step-up check (RFC 9470): the person signed in at most `max_age` seconds ago; else an
    AuthenticationError that asks the client for a new sign-in within that age."""
    if identity.authenticated_at is None:
        age = "of an unknown age"
    else:
        seconds = (time.time() if now is None else now) - identity.authenticated_at
        if -skew <= seconds <= max_age + skew:
            return
        age = f"{_duration(seconds)} old" if seconds > 0 else "dated in the future (check the clocks)"
    raise AuthenticationError(
        f"this sign-in is {age}; deciding a held request needs one within {_duration(max_age)}: sign "
        "in again and retry",
        challenge={"error": "insufficient_user_authentication", "max_age": str(int(max_age))},
    )


def _duration(seconds: float) -> str:
    minutes, rest = divmod(int(seconds), 60)
    return f"{minutes} min {rest} s" if minutes else f"{rest} s"


def local_identity(groups: tuple[str, ...] = ()) -> Identity:
    """The OS user running the server; recorded as such, so the audit says no token vouched for it."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown-local-user"
    return Identity(subject=f"local:{user}", groups=frozenset(groups), source="local")


def token_fingerprint(token: str) -> str:
    """Enough to tell two tokens apart in the audit, nothing to replay."""
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()[:16]


def _shown(value: object) -> str:
    """A claim value as it may appear in a message or a header: short, printable ASCII, no quotes."""
    text = value if isinstance(value, str) else repr(value)
    text = re.sub(r"[^\x20-\x7e]|[\"\\]", "?", text)
    return text if len(text) <= 120 else text[:119] + "~"


def _when(epoch: object) -> str:
    if not isinstance(epoch, int | float):
        return _shown(epoch)
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _claim(claims: Mapping[str, Any], name: str) -> Any:
    """The exact claim name first (Auth0 names claims by URL), then a dotted path (realm_access.roles)."""
    if name in claims:
        return claims[name]
    value: Any = claims
    for part in name.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def _unverified(token: str) -> dict[str, str]:
    """Who the token claims to be, for the audit of a refusal; labelled unverified and never the token."""
    detail = {"token_sha256": token_fingerprint(token)}
    try:
        claims = jwt.get_unverified_claims(token)
    except JWTError:
        return detail
    for name in ("sub", "iss"):
        if name in claims:
            detail[f"unverified_{name}"] = _shown(claims[name])
    return detail


_MISSING = re.compile(r'missing required key "([^"]+)"')


class OidcVerifier:
    """Verifies bearer tokens from one issuer against its key set."""

    def __init__(self, settings: IdentitySettings, *, clock: Callable[[], float] = time.monotonic) -> None:
        if settings.mode != "oidc":
            raise ConfigError('tokens are verified only with [identity] mode = "oidc"', key="identity.mode")
        self.settings = settings
        self.keys = KeySet(settings, clock=clock)
        self._options = {
            "require_iss": True,
            "require_aud": True,
            "require_exp": True,
            "require_iat": True,
            "require_sub": True,
            "verify_at_hash": False,  # binds an ID token to an access token we are never given
            "leeway": settings.clock_skew,
        }

    async def aclose(self) -> None:
        await self.keys.aclose()

    def for_audience(self, audience: str) -> OidcVerifier:
        """The same issuer and the same cached key set, for tokens issued to another audience (the
        reviewers' client): one key fetch and one rotation serve both; closing either closes the set."""
        other = copy.copy(self)
        other.settings = self.settings.model_copy(update={"audience": audience})
        return other

    async def verify(self, token: str) -> Identity:
        """The identity a token vouches for; AuthenticationError with the reason otherwise."""
        token = token.strip()
        if len(token) > MAX_TOKEN_BYTES:
            raise AuthenticationError(f"the token is {len(token)} bytes; the limit is {MAX_TOKEN_BYTES}")
        try:
            return await self._verify(token)
        except AuthenticationError as error:
            raise AuthenticationError(str(error), detail={**_unverified(token), **error.detail}) from None

    async def _verify(self, token: str) -> Identity:
        settings = self.settings
        try:
            header = jwt.get_unverified_header(token)
        except JWTError:
            raise AuthenticationError(
                "the token is not a JWT (three base64url parts separated by dots)"
            ) from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg.lower() == "none":
            raise AuthenticationError("unsigned tokens (alg none) are never accepted")
        if alg not in settings.algorithms or alg not in KEY_TYPES:
            raise AuthenticationError(
                f"the token is signed with {_shown(alg)}; accepted: {', '.join(settings.algorithms)}"
            )
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise AuthenticationError("the token header has no key id (kid)")
        key = await self.keys.key(kid, alg)
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=settings.audience,
                issuer=settings.issuer,
                options=self._options,
            )
        except ExpiredSignatureError:
            exp = jwt.get_unverified_claims(token).get("exp")
            raise AuthenticationError(
                f"the token expired at {_when(exp)} (clock skew allowed: {settings.clock_skew:g} s)"
            ) from None
        except JWTClaimsError as error:
            raise AuthenticationError(self._explain(str(error), jwt.get_unverified_claims(token))) from None
        except JWTError as error:
            missing = _MISSING.search(str(error))
            if missing:
                raise AuthenticationError(f"the token has no {missing.group(1)!r} claim") from None
            raise AuthenticationError(
                f"the token's signature does not verify with key {_shown(kid)!r}"
            ) from None
        except OverflowError:  # python-jose turns exp, nbf and iat into integers, and Infinity is none
            raise AuthenticationError(
                "the token's claims are refused: a time claim (exp, nbf, iat) is not a finite number"
            ) from None
        return self._identity(claims)

    def _explain(self, message: str, claims: Mapping[str, Any]) -> str:
        settings = self.settings
        if message == "Invalid audience":
            return f"the token's audience {_shown(claims.get('aud'))} does not include {settings.audience!r}"
        if message == "Invalid issuer":
            return f"the token's issuer {_shown(claims.get('iss'))!r} is not {settings.issuer!r}"
        if message.startswith("The token is not yet valid"):
            return f"the token is not valid before {_when(claims.get('nbf'))}"
        return f"the token's claims are refused: {message}"

    def _identity(self, claims: Mapping[str, Any]) -> Identity:
        settings = self.settings
        iat = claims["iat"]
        if iat > time.time() + settings.clock_skew:
            raise AuthenticationError(f"the token was issued in the future ({_when(iat)}): check the clocks")
        azp = claims.get("azp")
        if settings.authorized_party is not None and azp != settings.authorized_party:
            raise AuthenticationError(
                f"the token was issued to client {_shown(azp)!r}, not {settings.authorized_party!r} (azp)"
            )
        subject = _claim(claims, settings.user_claim)
        if not isinstance(subject, str) or not subject.strip():
            raise AuthenticationError(f"the token has no {settings.user_claim!r} claim (identity.user_claim)")
        return Identity(
            subject=subject,
            groups=self._groups(claims),
            source="oidc",
            issuer=claims["iss"],
            email=claims.get("email") if isinstance(claims.get("email"), str) else None,
            username=claims.get("preferred_username")
            if isinstance(claims.get("preferred_username"), str)
            else None,
            authorized_party=azp if isinstance(azp, str) else None,
            expires_at=int(claims["exp"]),
            authenticated_at=_signed_in_at(claims),
        )

    def _groups(self, claims: Mapping[str, Any]) -> frozenset[str]:
        name = self.settings.groups_claim
        value = _claim(claims, name)
        if value is None:
            overage = claims.get("_claim_names")
            if isinstance(overage, Mapping) and name in overage:
                raise AuthenticationError(
                    f"the provider left {name!r} out of the token (too many groups): limit the groups it "
                    'sends, or use app roles (groups_claim = "roles")'
                )
            raise AuthenticationError(
                f"the token has no {name!r} claim (identity.groups_claim): the provider must send the "
                "caller's groups"
            )
        if isinstance(value, str):
            return frozenset({value})
        if isinstance(value, list) and all(isinstance(group, str) for group in value):
            return frozenset(value)
        raise AuthenticationError(f"the token's {name!r} claim must be a list of strings")


class TokenSource:
    """A caller's token: an environment variable, or a file a login helper keeps fresh."""

    def __init__(self, *, env: str | None = None, file: Path | None = None) -> None:
        self.env = env
        self.file = file.expanduser() if file is not None else None

    @classmethod
    def of(cls, settings: IdentitySettings) -> TokenSource:
        """The stdio caller's token as the configuration names it."""
        if settings.token_env is None and settings.token_file is None:
            raise ConfigError(
                'with mode = "oidc" over stdio, name the token with token_env or token_file',
                key="identity",
            )
        return cls(env=settings.token_env, file=settings.token_file)

    @property
    def where(self) -> str:
        return f"the file {self.file}" if self.file is not None else f"the environment variable {self.env}"

    def version(self) -> tuple[int, int, int] | None:
        """Changes when the file is replaced or rewritten; None for an environment variable."""
        if self.file is None:
            return None
        try:
            stat = self.file.stat()
        except OSError:
            return (0, 0, 0)
        return (stat.st_ino, stat.st_mtime_ns, stat.st_size)

    def read(self) -> str:
        if self.file is None:
            token = os.environ.get(self.env or "", "")
        else:
            try:
                token = self.file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as error:
                reason = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
                raise AuthenticationError(f"cannot read the token from {self.file}: {reason}") from None
        token = token.strip()
        if token.lower().startswith("bearer "):
            token = token[7:].strip()
        if not token:
            raise AuthenticationError(f"no token in {self.where}")
        return token


class StdioCaller:
    """Who calls over stdio: the token's identity, verified again when it expires or the file changes."""

    def __init__(
        self, verifier: OidcVerifier, source: TokenSource, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.verifier = verifier
        self.source = source
        self._clock = clock
        self._identity: Identity | None = None
        self._version: tuple[int, int, int] | None = None

    async def __call__(self) -> Identity:
        version = self.source.version()
        cached = self._identity
        if cached is not None and version == self._version and self._clock() < (cached.expires_at or 0):
            return cached
        self._identity = None
        try:
            identity = await self.verifier.verify(self.source.read())
        except AuthenticationError as error:
            raise AuthenticationError(
                f"{error} (token from {self.source.where})", detail=error.detail
            ) from None
        self._identity, self._version = identity, version
        return identity
