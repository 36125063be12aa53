"""Reviewers, and the proof that a decision on a held statement came from one.

The assistant may have a shell as the same operating-system user as the reviewer (Claude Code
does), so it can run `mcp-guard approve` and read or write every file that user can: the audit
store, key files, the configuration. What it does not have is the reviewer's passphrase.

A reviewer enrols once (`mcp-guard reviewer init`): a passphrase, typed at a terminal, is
stretched with scrypt into an Ed25519 private key. Only the public half, with the scrypt salt and
cost, is kept, as the reviewer's `key` in the server's configuration. No secret is written
anywhere. A vote is signed with the private key, derived again from the passphrase each time
(the review UI derives it once when it starts), and the server verifies the signature with the
public key it was configured with before it counts the vote. Writing the store forges nothing: a
vote needs a signature, and the key that checks it lives in the configuration, not the store.

A reviewer with an OIDC token decides at a gateway instead (`mcp-guard approve --server URL`): the
gateway verifies the token and signs the vote with its own Ed25519 key, vouching for the token's
subject and groups (`GatewaySigner`). The token itself is never stored: anyone who can read the
store could replay a bearer token onto another request within its lifetime. Such a vote counts
where the gateway's public key is trusted (`approvals.gateway_keys`, `GatewayVerifier`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import os
import secrets
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from mcp_guard.errors import ApprovalError, UsageError
from mcp_guard.store.checkpoint import parse_public_key

KEY_SCHEME = "ed25519-scrypt"
MIN_COST, DEFAULT_COST, MAX_COST = 14, 16, 20
"""scrypt work factor as log2(N), r=8, p=1: 2^16 takes about 0.2 s and 64 MiB here."""
MIN_PASSPHRASE = 12
PROOF_SCHEME = "ed25519"
GATEWAY_SCHEME = "gateway-ed25519"
_DOMAIN = b"mcp-guard/approval-vote/v1\n"
_GATEWAY_DOMAIN = b"mcp-guard/gateway-vote/v1\n"
_SALT_BYTES = 16


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True, slots=True)
class ReviewerKey:
    """The public half of a reviewer's passphrase-derived key, and how to derive it again."""

    cost: int
    salt: bytes
    public: bytes

    @classmethod
    def parse(cls, text: str) -> ReviewerKey:
        """`ed25519-scrypt:COST:SALT:PUBLIC` as printed by `mcp-guard reviewer init`; ValueError otherwise."""
        parts = text.strip().split(":")
        if len(parts) != 4 or parts[0] != KEY_SCHEME:
            raise ValueError(
                f"a reviewer key looks like {KEY_SCHEME}:16:SALT:PUBLIC_KEY (from `mcp-guard reviewer init`)"
            )
        try:
            cost = int(parts[1])
            salt, public = _unb64(parts[2]), _unb64(parts[3])
        except (ValueError, binascii.Error):
            raise ValueError(
                "the reviewer key is damaged: its cost, salt or public key is not readable"
            ) from None
        if not MIN_COST <= cost <= MAX_COST:
            raise ValueError(f"the reviewer key's cost {cost} is outside {MIN_COST}..{MAX_COST}")
        if len(salt) < _SALT_BYTES or len(public) != 32:
            raise ValueError("the reviewer key is damaged: its salt or public key has the wrong length")
        return cls(cost, salt, public)

    def __str__(self) -> str:
        return f"{KEY_SCHEME}:{self.cost}:{_b64(self.salt)}:{_b64(self.public)}"

    @property
    def fingerprint(self) -> str:
        """Short, stable name of the public key, for the audit and for humans comparing keys."""
        return hashlib.sha256(self.public).hexdigest()[:16]

    def derive(self, passphrase: str) -> Ed25519PrivateKey:
        """The private key for `passphrase`; ApprovalError when it is not this key's passphrase."""
        private = _derive(passphrase, self.salt, self.cost)
        if _public_bytes(private) != self.public:
            raise ApprovalError("wrong passphrase for this reviewer")
        return private


def _derive(passphrase: str, salt: bytes, cost: int) -> Ed25519PrivateKey:
    seed = hashlib.scrypt(
        passphrase.encode("utf-8"), salt=salt, n=2**cost, r=8, p=1, maxmem=2**31 - 1, dklen=32
    )
    return Ed25519PrivateKey.from_private_bytes(seed)


def _public_bytes(private: Ed25519PrivateKey) -> bytes:
    return private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def enroll(passphrase: str, cost: int = DEFAULT_COST) -> ReviewerKey:
    """A new reviewer key for `passphrase` (random salt); only its public half is ever stored."""
    if len(passphrase) < MIN_PASSPHRASE:
        raise UsageError(f"the passphrase must have at least {MIN_PASSPHRASE} characters")
    if not MIN_COST <= cost <= MAX_COST:
        raise UsageError(f"the cost must be within {MIN_COST}..{MAX_COST}")
    salt = secrets.token_bytes(_SALT_BYTES)
    return ReviewerKey(cost, salt, _public_bytes(_derive(passphrase, salt, cost)))


@dataclass(frozen=True, slots=True)
class Reviewer:
    """A person who may decide held statements: `subject` is the identity they would have as a requester."""

    name: str
    subject: str
    groups: frozenset[str]
    key: ReviewerKey | None
    """None for a reviewer known from a token a gateway verified, not from the configuration."""


class Signer(ABC):
    """What casts a vote: a reviewer, and the proof that the vote is theirs."""

    reviewer: Reviewer

    @abstractmethod
    def sign(self, payload: bytes) -> str:
        """The proof over `payload` that `ProofVerifier.verify` checks."""


class KeySigner(Signer):
    """A reviewer whose passphrase was given: signs votes as that reviewer."""

    def __init__(self, reviewer: Reviewer, private: Ed25519PrivateKey) -> None:
        self.reviewer = reviewer
        self._private = private

    def sign(self, payload: bytes) -> str:
        return f"{PROOF_SCHEME}:{_b64(self._private.sign(_DOMAIN + payload))}"


def unlock(reviewer: Reviewer, passphrase: str) -> KeySigner:
    """The reviewer's signer; ApprovalError naming the reviewer when the passphrase is wrong."""
    if reviewer.key is None:
        raise ApprovalError(f"reviewer {reviewer.name!r} has no passphrase key; they decide with a token")
    try:
        return KeySigner(reviewer, reviewer.key.derive(passphrase))
    except ApprovalError:
        raise ApprovalError(f"wrong passphrase for reviewer {reviewer.name!r}") from None


def canonical_json(value: object) -> bytes:
    """The one byte form of a JSON value that a signature or a digest covers."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


class GatewaySigner(Signer):
    """A reviewer whose OIDC token this gateway has just verified: the gateway signs their vote with its
    own key, vouching for the subject and groups the token carried. The token is not kept."""

    def __init__(self, reviewer: Reviewer, gateway: Ed25519PrivateKey, vouched: Mapping[str, object]) -> None:
        """`vouched`: what the gateway saw besides subject and groups (issuer, token fingerprint)."""
        self.reviewer = reviewer
        self._gateway = gateway
        self._vouched = canonical_json(
            {**vouched, "subject": reviewer.subject, "groups": sorted(reviewer.groups)}
        )

    def sign(self, payload: bytes) -> str:
        vouched = _b64(self._vouched)
        signature = self._gateway.sign(_gateway_message(vouched, payload))
        return ":".join((GATEWAY_SCHEME, _b64(_public_bytes(self._gateway)), vouched, _b64(signature)))


def _gateway_message(vouched: str, payload: bytes) -> bytes:
    """What a gateway signs for a vote: the vouched claims as they travel in the proof, and the vote."""
    return _GATEWAY_DOMAIN + vouched.encode() + b"\n" + payload


class ProofVerifier(ABC):
    """Who the reviewers are, and whether a vote carries proof that one of them cast it."""

    @abstractmethod
    def reviewer(self, name: str) -> Reviewer | None:
        """The configured reviewer called `name`."""

    @abstractmethod
    def verify(self, name: str, payload: bytes, proof: str) -> Reviewer:
        """The reviewer whose proof `proof` is over `payload`; ApprovalError saying why not."""

    @abstractmethod
    def members(self, groups: Iterable[str]) -> frozenset[str] | None:
        """Subjects of the reviewers in any of `groups`; None when the set cannot be known in advance."""


class KeyVerifier(ProofVerifier):
    """Local reviewers with passphrase-derived keys, from the server's configuration."""

    def __init__(self, reviewers: Mapping[str, Reviewer]) -> None:
        self._reviewers = dict(reviewers)

    def reviewer(self, name: str) -> Reviewer | None:
        return self._reviewers.get(name)

    def verify(self, name: str, payload: bytes, proof: str) -> Reviewer:
        reviewer = self._reviewers.get(name)
        if reviewer is None or reviewer.key is None:
            raise ApprovalError(f"{name!r} is not a reviewer of this server")
        scheme, _, signature = proof.partition(":")
        if scheme != PROOF_SCHEME:
            raise ApprovalError(f"the vote of {name!r} carries no {PROOF_SCHEME} signature")
        try:
            Ed25519PublicKey.from_public_bytes(reviewer.key.public).verify(
                _unb64(signature), _DOMAIN + payload
            )
        except (InvalidSignature, ValueError, binascii.Error):
            raise ApprovalError(
                f"the vote of {name!r} is not signed with that reviewer's key (forged or altered)"
            ) from None
        return reviewer

    def members(self, groups: Iterable[str]) -> frozenset[str] | None:
        wanted = set(groups)
        return frozenset(r.subject for r in self._reviewers.values() if r.groups & wanted)


class GatewayVerifier(ProofVerifier):
    """Votes that a trusted gateway signed for a reviewer whose token it verified.

    Who may review is not known in advance: anyone whose token carries an approver group. The
    reviewer's name in such a vote is the token's subject, and must be the subject the gateway vouched for.
    """

    def __init__(self, trusted: Iterable[str]) -> None:
        """`trusted`: gateway public keys as `ed25519:<base64>` (`approvals.gateway_keys`)."""
        self._trusted = {
            parse_public_key(text, "approvals.gateway_keys").public_bytes(Encoding.Raw, PublicFormat.Raw)
            for text in trusted
        }

    def reviewer(self, name: str) -> Reviewer | None:
        return None

    def verify(self, name: str, payload: bytes, proof: str) -> Reviewer:
        parts = proof.split(":")
        if len(parts) != 4 or parts[0] != GATEWAY_SCHEME:
            raise ApprovalError(f"the vote of {name!r} carries no {GATEWAY_SCHEME} signature")
        try:
            public, vouched, signature = (_unb64(part) for part in parts[1:])
        except (ValueError, binascii.Error):
            raise ApprovalError(f"the vote of {name!r} has a damaged gateway signature") from None
        if public not in self._trusted:
            raise ApprovalError(
                f"the vote of {name!r} was vouched for by a gateway whose key is not trusted here "
                "(approvals.gateway_keys)"
            )
        try:
            Ed25519PublicKey.from_public_bytes(public).verify(
                signature, _gateway_message(parts[2], payload)
            )
            claims = json.loads(vouched)
            subject, groups = claims["subject"], claims["groups"]
        except (InvalidSignature, ValueError, KeyError, TypeError):
            raise ApprovalError(
                f"the vote of {name!r} is not signed by the gateway it names (forged or altered)"
            ) from None
        if subject != name or not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
            raise ApprovalError(f"the vote of {name!r} was vouched for another reviewer ({subject!r})")
        return Reviewer(name=name, subject=subject, groups=frozenset(groups), key=None)

    def members(self, groups: Iterable[str]) -> frozenset[str] | None:
        return None if self._trusted else frozenset()


class AnyProof(ProofVerifier):
    """Passphrase-key votes and gateway-vouched votes together, each checked by its own scheme."""

    def __init__(self, keys: KeyVerifier, gateways: GatewayVerifier) -> None:
        self.keys = keys
        self.gateways = gateways

    def reviewer(self, name: str) -> Reviewer | None:
        return self.keys.reviewer(name)

    def verify(self, name: str, payload: bytes, proof: str) -> Reviewer:
        if proof.startswith(f"{GATEWAY_SCHEME}:"):
            return self.gateways.verify(name, payload, proof)
        return self.keys.verify(name, payload, proof)

    def members(self, groups: Iterable[str]) -> frozenset[str] | None:
        wanted = tuple(groups)
        configured, vouched = self.keys.members(wanted), self.gateways.members(wanted)
        if configured is None or vouched is None:
            return None
        return configured | vouched


def read_passphrase(prompt: str) -> str:
    """Read a passphrase typed at a terminal, without echo: the controlling terminal, or standard
    input when that is a terminal itself. Never a pipe, a file, an argument or the environment: a
    passphrase that can be scripted ends up in a file the assistant can read.
    """
    try:
        import termios
    except ImportError:
        raise UsageError("reviewing needs a POSIX terminal (termios); it is not available here") from None
    try:
        fd = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY)
    except OSError:
        if not os.isatty(0):
            raise UsageError(
                "a reviewer's passphrase is typed at a terminal; this process has none, so it cannot "
                "approve or deny (see docs/approvals.md)"
            ) from None
        fd = os.dup(0)
    with open(fd, "r+b", buffering=0) as tty:
        old = termios.tcgetattr(fd)
        quiet = list(old)
        quiet[3] &= ~termios.ECHO
        termios.tcsetattr(fd, termios.TCSAFLUSH, quiet)  # echo off first: typing starts at the prompt
        tty.write(prompt.encode())
        try:
            line = _read_line(tty)
        finally:
            termios.tcsetattr(fd, termios.TCSAFLUSH, old)
            tty.write(b"\n")
    return line


def _read_line(tty: io.FileIO) -> str:
    data = bytearray()
    while (chunk := tty.read(1)) and chunk not in (b"\n", b"\r"):
        data += chunk
    if not data:
        raise UsageError("no passphrase was typed")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError("the passphrase is not UTF-8 text") from None
