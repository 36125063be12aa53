"""Originals of masked values, kept in the audit only as a keyed digest or sealed.

`digest`: HMAC-SHA256 of each original under the audit key: an auditor holding the key can check
whether a given value was among those masked, nothing more. `sealed`: the originals as JSON,
encrypted and authenticated with AES-256-GCM under the audit key, the call id bound as associated
data, so a sealed blob moved to another record, or changed by one bit, does not open. The key comes
from the environment and never enters the audit: a record names it only by a fingerprint.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from mcp_guard.errors import GuardError
from mcp_guard.masking import decode_key
from mcp_guard.values import JsonValue

SEAL_VERSION = 1
_NONCE_BYTES = 12


class SealError(GuardError):
    """Sealed originals cannot be opened: the wrong key, or the record was changed."""


def key_id(key: bytes) -> str:
    """A fingerprint that names a key without revealing it."""
    return hmac.new(key, b"mcp-guard audit key id", hashlib.sha256).hexdigest()[:16]


def digest(key: bytes, value: JsonValue) -> str:
    """Keyed digest of one original value (its canonical JSON)."""
    encoded = json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    return hmac.new(key, encoded.encode(), hashlib.sha256).hexdigest()


def seal(key: bytes, call_id: str, originals: JsonValue) -> dict[str, JsonValue]:
    """Encrypt `originals` for the audit record of `call_id`."""
    nonce = os.urandom(_NONCE_BYTES)
    plaintext = json.dumps(originals, ensure_ascii=False, separators=(",", ":")).encode()
    ciphertext = AESGCM(key).encrypt(nonce, plaintext, call_id.encode())
    return {
        "version": SEAL_VERSION,
        "algorithm": "AES-256-GCM",
        "key_id": key_id(key),
        "sealed": base64.b64encode(nonce + ciphertext).decode(),
    }


def unseal(key: bytes, call_id: str, record: JsonValue) -> JsonValue:
    """The originals sealed in `record` for `call_id`; SealError for a wrong key or any change."""
    if not isinstance(record, dict) or record.get("version") != SEAL_VERSION:
        raise SealError("not a sealed record mcp-guard knows (version 1)")
    if record.get("key_id") != key_id(key):
        raise SealError(
            f"sealed under another key (key id {record.get('key_id')}, this key is {key_id(key)})"
        )
    try:
        blob = base64.b64decode(str(record.get("sealed")), validate=True)
        plaintext = AESGCM(key).decrypt(blob[:_NONCE_BYTES], blob[_NONCE_BYTES:], call_id.encode())
    except (InvalidTag, ValueError, binascii.Error):
        raise SealError(
            "the sealed originals do not open: the record was changed or belongs to another call"
        ) from None
    return json.loads(plaintext)  # type: ignore[no-any-return]


def load_key(env: str) -> bytes:
    """The audit key from the environment variable `env` (64 hex digits or base64 of 32 bytes)."""
    text = os.environ.get(env, "").strip()
    if not text:
        raise SealError(f"the environment variable {env} holding the audit key is not set")
    try:
        return decode_key(text)
    except ValueError as error:
        raise SealError(f"${env}: {error}") from None
