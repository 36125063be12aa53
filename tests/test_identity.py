"""OIDC tokens: a valid one names its caller and groups; every bad one is refused with its reason."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from jose import jwt

from mcp_guard.config import IdentitySettings, load_config
from mcp_guard.errors import AuthenticationError, ConfigError
from mcp_guard.identity import OidcVerifier
from tests.idp import AUDIENCE, REMOVE, LocalIdP, verify_once


def oidc(idp: LocalIdP, **changes: Any) -> IdentitySettings:
    return IdentitySettings(mode="oidc", issuer=idp.issuer, audience=AUDIENCE, **changes)


class Clock:
    """A monotonic clock the test moves forward, so refresh intervals pass without waiting."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def verifier(local_idp: LocalIdP) -> AsyncIterator[OidcVerifier]:
    verifier = OidcVerifier(oidc(local_idp))
    yield verifier
    await verifier.aclose()


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def _tampered(idp: LocalIdP) -> str:
    header, _, signature = idp.token("alice", ["support"]).split(".")
    return ".".join([header, _b64(idp.claims("alice", ["admins"])), signature])


def _alg_none(idp: LocalIdP) -> str:
    return f"{_b64({'alg': 'none', 'kid': 'rsa-1'})}.{_b64(idp.claims())}."


def _hs256_with_public_key(idp: LocalIdP) -> str:
    """The classic confusion attack: HMAC keyed with the provider's public key, which anyone can fetch."""
    signing_input = f"{_b64({'alg': 'HS256', 'kid': 'rsa-1'})}.{_b64(idp.claims())}"
    mac = hmac.new(idp.public_pem("rsa-1").encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"


def _unknown_kid(idp: LocalIdP) -> str:
    if "rogue" not in idp.private:
        idp.add_key("rogue", "RS256", publish=False)
    return idp.token(kid="rogue")


def _es256_header_on_rsa_key(idp: LocalIdP) -> str:
    _, pem = idp.private["ec-1"]
    return str(jwt.encode(idp.claims(), pem, algorithm="ES256", headers={"kid": "rsa-1"}))


NOW = int(time.time())
BAD_TOKENS: list[tuple[str, Callable[[LocalIdP], str], str]] = [
    ("expired", lambda idp: idp.token(exp=int(time.time()) - 120), "the token expired at"),
    ("not yet valid", lambda idp: idp.token(nbf=int(time.time()) + 600), "the token is not valid before"),
    (
        "wrong issuer",
        lambda idp: idp.token(iss="https://evil.example"),
        "issuer 'https://evil.example' is not",
    ),
    ("wrong audience", lambda idp: idp.token(aud="another-service"), "does not include 'mcp-guard-tests'"),
    ("no audience", lambda idp: idp.token(aud=REMOVE), "the token has no 'aud' claim"),
    ("no expiry", lambda idp: idp.token(exp=REMOVE), "the token has no 'exp' claim"),
    ("unknown kid", _unknown_kid, "key id 'rogue' is not in the identity provider's key set"),
    ("tampered payload", _tampered, "signature does not verify"),
    ("alg none", _alg_none, "unsigned tokens (alg none) are never accepted"),
    ("HS256 with the public key", _hs256_with_public_key, "signed with HS256; accepted: RS256, ES256"),
    ("missing groups", lambda idp: idp.token(groups=REMOVE), "the token has no 'groups' claim"),
    ("issued in the future", lambda idp: idp.token(iat=int(time.time()) + 3600), "issued in the future"),
    ("key of another type", _es256_header_on_rsa_key, "the token says ES256 but key 'rsa-1' is a RSA key"),
    ("not a JWT", lambda idp: "not-a-token", "not a JWT"),
    ("an infinite expiry", lambda idp: idp.token(exp=math.inf), "is not a finite number"),
    ("issued at infinity", lambda idp: idp.token(iat=math.inf), "is not a finite number"),
    ("issued at NaN", lambda idp: idp.token(iat=math.nan), "Issued At claim (iat) must be an integer"),
]


async def test_a_valid_token_names_its_caller_and_groups(verifier, local_idp):
    identity = await verifier.verify(local_idp.token("alice", ["analysts", "oncall"]))
    assert identity.subject == "alice"
    assert identity.groups == {"analysts", "oncall"}
    assert (identity.source, identity.issuer) == ("oidc", local_idp.issuer)
    assert (identity.email, identity.username) == ("alice@example.com", "alice")
    assert identity.expires_at is not None and identity.expires_at > time.time()


async def test_an_es256_token_is_accepted_too(verifier, local_idp):
    identity = await verifier.verify(local_idp.token("bob", ["support"], kid="ec-1"))
    assert (identity.subject, identity.groups) == ("bob", {"support"})


@pytest.mark.parametrize(("case", "make", "reason"), BAD_TOKENS, ids=[case for case, _, _ in BAD_TOKENS])
async def test_a_bad_token_is_refused_with_its_reason(verifier, local_idp, case, make, reason):
    token = make(local_idp)
    with pytest.raises(AuthenticationError) as refused:
        await verifier.verify(token)
    assert reason in str(refused.value)
    assert refused.value.detail["token_sha256"]
    assert token not in str(refused.value) and token not in json.dumps(refused.value.detail)


async def test_keys_come_from_discovery_and_are_cached(fresh_idp):
    verifier = OidcVerifier(oidc(fresh_idp))
    try:
        for _ in range(3):
            await verifier.verify(fresh_idp.token())
    finally:
        await verifier.aclose()
    assert (fresh_idp.discovery_hits, fresh_idp.jwks_hits) == (1, 1)


async def test_a_rotated_key_is_picked_up_and_unknown_kids_refetch_at_most_once_per_interval(fresh_idp):
    clock = Clock()
    verifier = OidcVerifier(oidc(fresh_idp, jwks_refresh_interval=30), clock=clock)
    try:
        await verifier.verify(fresh_idp.token())
        fresh_idp.add_key("rsa-2", "RS256")
        fresh_idp.retire_key("rsa-1")
        rotated = fresh_idp.token("alice", kid="rsa-2")
        clock.now += 5
        with pytest.raises(AuthenticationError, match="'rsa-2' is not in the identity provider's key set"):
            await verifier.verify(rotated)  # fetched 5 s ago: not again yet
        assert fresh_idp.jwks_hits == 1
        clock.now += 30
        assert (await verifier.verify(rotated)).subject == "alice"
        assert fresh_idp.jwks_hits == 2
        for _ in range(5):
            with pytest.raises(AuthenticationError, match="key id 'rogue'"):
                await verifier.verify(_unknown_kid(fresh_idp))
        assert fresh_idp.jwks_hits == 2
        with pytest.raises(AuthenticationError, match="key id 'rsa-1'"):
            await verifier.verify(fresh_idp.token(kid="rsa-1"))  # retired with the rotation
    finally:
        await verifier.aclose()


async def test_the_key_set_is_fetched_again_after_its_max_age(fresh_idp):
    clock = Clock()
    verifier = OidcVerifier(oidc(fresh_idp, jwks_max_age=600), clock=clock)
    try:
        await verifier.verify(fresh_idp.token())
        clock.now += 601
        await verifier.verify(fresh_idp.token())
    finally:
        await verifier.aclose()
    assert fresh_idp.jwks_hits == 2


async def test_an_unreachable_provider_refuses_the_token(local_idp):
    verifier = OidcVerifier(oidc(local_idp, jwks_url="http://127.0.0.1:9/jwks"))
    try:
        with pytest.raises(AuthenticationError, match=r"cannot fetch the identity provider's key set from"):
            await verifier.verify(local_idp.token())
    finally:
        await verifier.aclose()


async def test_a_discovery_document_naming_another_issuer_is_refused(local_idp):
    settings = IdentitySettings(mode="oidc", issuer=local_idp.issuer + "/other", audience=AUDIENCE)
    verifier = OidcVerifier(settings)
    try:
        with pytest.raises(AuthenticationError):
            await verifier.verify(local_idp.token())
    finally:
        await verifier.aclose()


async def test_the_authorized_party_is_checked_when_configured(local_idp):
    verifier = OidcVerifier(oidc(local_idp, authorized_party="mcp-guard-client"))
    try:
        assert (await verifier.verify(local_idp.token(azp="mcp-guard-client"))).authorized_party == (
            "mcp-guard-client"
        )
        with pytest.raises(
            AuthenticationError, match="issued to client 'another-app', not 'mcp-guard-client'"
        ):
            await verifier.verify(local_idp.token(azp="another-app"))
        with pytest.raises(AuthenticationError, match="issued to client 'None'"):
            await verifier.verify(local_idp.token())
    finally:
        await verifier.aclose()


@pytest.mark.parametrize(
    ("claim", "claims", "groups"),
    [
        ("realm_access.roles", {"realm_access": {"roles": ["dba"]}}, {"dba"}),
        ("https://example.com/groups", {"https://example.com/groups": ["finance"]}, {"finance"}),
        ("hd", {"hd": "example.com"}, {"example.com"}),
    ],
    ids=["keycloak-nested", "auth0-namespaced", "google-hosted-domain"],
)
async def test_groups_come_from_the_configured_claim(local_idp, claim, claims, groups):
    verifier = OidcVerifier(oidc(local_idp, groups_claim=claim))
    try:
        assert (await verifier.verify(local_idp.token(groups=REMOVE, **claims))).groups == groups
    finally:
        await verifier.aclose()


async def test_groups_left_out_for_overage_are_refused_with_a_hint(verifier, local_idp):
    token = local_idp.token(groups=REMOVE, _claim_names={"groups": "src1"})
    with pytest.raises(AuthenticationError, match="too many groups"):
        await verifier.verify(token)


async def test_the_user_id_comes_from_the_configured_claim(local_idp):
    verifier = OidcVerifier(oidc(local_idp, user_claim="email"))
    try:
        assert (await verifier.verify(local_idp.token("carol"))).subject == "carol@example.com"
        with pytest.raises(AuthenticationError, match="no 'email' claim"):
            await verifier.verify(local_idp.token(email=REMOVE))
    finally:
        await verifier.aclose()


async def test_keys_can_come_from_a_file(tmp_path, local_idp):
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(local_idp.jwks()))
    identity = await verify_once(oidc(local_idp, jwks_file=path), local_idp.token("dave", ["ops"]))
    assert (identity.subject, identity.groups) == ("dave", {"ops"})


@pytest.mark.parametrize(
    ("identity", "key", "message"),
    [
        ('algorithms = ["HS256"]', "identity.algorithms", "HS256 is never accepted: HMAC"),
        ('algorithms = ["none"]', "identity.algorithms", "unsigned tokens (none) are never accepted"),
        ('algorithms = ["PS256"]', "identity.algorithms", "'PS256' is not one of RS256"),
        ('jwks_url = "http://idp.example.com/jwks"', "identity", "jwks_url must be an https:// URL"),
        (
            'jwks_url = "https://idp/jwks"\njwks_file = "/k.json"',
            "identity",
            "jwks_url or jwks_file, not both",
        ),
        ('groups = ["admins"]', "identity", 'groups apply to mode = "local" only'),
    ],
)
def test_a_bad_oidc_setting_is_refused_naming_its_key(tmp_path, identity, key, message):
    path = tmp_path / "guard.toml"
    path.write_text(
        f'[identity]\nmode = "oidc"\nissuer = "https://idp.example.com"\naudience = "a"\n{identity}\n'
        '[connections.db]\nurl = "sqlite:////tmp/x.db"\n'
    )
    with pytest.raises(ConfigError) as refused:
        load_config(path)
    assert str(refused.value).startswith(f"{path}: {key}: ")
    assert message in str(refused.value)


@pytest.mark.parametrize(
    ("identity", "message"),
    [
        ('mode = "oidc"\naudience = "a"', 'issuer is required with mode = "oidc"'),
        ('mode = "oidc"\nissuer = "https://idp.example.com"', 'audience is required with mode = "oidc"'),
        ('issuer = "https://idp.example.com"', 'issuer applies to mode = "oidc" only'),
        (
            'mode = "oidc"\nissuer = "http://idp.example.com"\naudience = "a"',
            "issuer must be an https:// URL",
        ),
    ],
)
def test_oidc_keys_belong_to_oidc_mode(tmp_path, identity, message):
    path = tmp_path / "guard.toml"
    path.write_text(f'[identity]\n{identity}\n[connections.db]\nurl = "sqlite:////tmp/x.db"\n')
    with pytest.raises(ConfigError, match=message):
        load_config(path)


async def test_a_verifier_for_another_audience_shares_the_key_set(local_idp):
    callers = OidcVerifier(oidc(local_idp))
    reviewers = callers.for_audience("mcp-guard-review")
    try:
        await callers.verify(local_idp.token("alice"))
        hits = local_idp.jwks_hits
        reviewer = await reviewers.verify(local_idp.token("bob", ["dba"], aud="mcp-guard-review"))
        with pytest.raises(AuthenticationError, match="does not include 'mcp-guard-review'"):
            await reviewers.verify(local_idp.token("alice"))
        assert (await callers.verify(local_idp.token("alice"))).subject == "alice"
    finally:
        await callers.aclose()
    assert reviewer.subject == "bob" and reviewers.keys is callers.keys
    assert local_idp.jwks_hits == hits  # the key set fetched for the callers served the reviewers


def test_a_sign_in_counts_as_recent_only_within_max_age_and_never_from_the_future() -> None:
    from mcp_guard.identity import Identity, check_fresh

    def signed_in(at: int | None) -> Identity:
        return Identity("bob", frozenset({"dba"}), "oidc", authenticated_at=at)

    now = 1_800_000_000
    check_fresh(signed_in(now - 900), 900, 30, now=now)
    check_fresh(signed_in(now - 929), 900, 30, now=now)  # within the clock skew
    check_fresh(signed_in(now + 29), 900, 30, now=now)
    refusals = []
    for at in (now - 931, now + 3600, None):
        with pytest.raises(AuthenticationError) as refused:
            check_fresh(signed_in(at), 900, 30, now=now)
        refusals.append(str(refused.value))
        assert refused.value.challenge == {"error": "insufficient_user_authentication", "max_age": "900"}
    assert refusals[0].startswith("this sign-in is 15 min 31 s old; deciding a held request needs one")
    assert "dated in the future" in refusals[1] and "of an unknown age" in refusals[2]
