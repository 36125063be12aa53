"""Signed checkpoints: the chain's head, signed with Ed25519, kept beside it and elsewhere.

The chain alone shows an entry was edited, inserted, removed or reordered, but not that the newest
entries were cut off, nor that the whole chain was rewritten and rehashed from some entry on
(anyone can compute SHA-256). A checkpoint is the server's signed statement "the chain had N
entries and entry N hashed to H". The chain must still hold that hash at N for as long as entry N
is kept, and must never be shorter than N: a store that was cut, rolled back or rewritten fails
against any checkpoint taken before, wherever that checkpoint is kept. So each one is written to
the store, appended to a witness file outside the database, and printed by
`mcp-guard audit checkpoint` for safekeeping.

The text format is stable (version 1); the signature covers the exact bytes of every line before
`signature:`, each ending with a line feed:

    mcp-guard audit checkpoint v1
    entries: 1000
    head: 3f0c...64 hex digits
    time: 2026-11-26T10:00:00.000000+00:00
    reason: every 1000 entries
    key: ed25519:<base64 of the 32-byte public key>
    signature: <base64 of the 64-byte Ed25519 signature>
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import os
import re
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from mcp_guard.errors import AuditError, ConfigError
from mcp_guard.store.base import Store, StoredCheckpoint, utc_now

MAGIC = "mcp-guard audit checkpoint v1"
KEY_ENV = "MCP_GUARD_SIGNING_KEY"
"""The environment variable that may hold the signing key (base64 of the 32-byte seed, or PEM)."""

_FIELDS = ("entries", "head", "time", "reason", "key")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_PUBLIC_PREFIX = "ed25519:"
_PRIVATE_PREFIX = "ed25519-private:"


# keys -------------------------------------------------------------------------------------------


def public_key_text(key: Ed25519PublicKey) -> str:
    """`ed25519:<base64>`: how checkpoints, the configuration and the command line name a public key."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return _PUBLIC_PREFIX + base64.b64encode(raw).decode()


def parse_public_key(text: str, where: str) -> Ed25519PublicKey:
    """A public key written as `ed25519:<base64>`; ConfigError naming `where` otherwise."""
    body = text.strip().removeprefix(_PUBLIC_PREFIX)
    try:
        raw = base64.b64decode(body, validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except (binascii.Error, ValueError):
        raise ConfigError(
            f"{where}: {text.strip()[:60]!r} is not an Ed25519 public key "
            "(expected ed25519:<base64 of 32 bytes>)"
        ) from None


def parse_private_key(text: str, where: str) -> Ed25519PrivateKey:
    """A private key as PEM (PKCS#8, as `openssl genpkey -algorithm ed25519` writes) or the base64 seed."""
    stripped = text.strip()
    try:
        if stripped.startswith("-----BEGIN"):
            key = serialization.load_pem_private_key(stripped.encode(), password=None)
            if not isinstance(key, Ed25519PrivateKey):
                raise ValueError("not an Ed25519 key")
            return key
        line = next((ln for ln in stripped.splitlines() if ln and not ln.startswith("#")), "")
        return Ed25519PrivateKey.from_private_bytes(
            base64.b64decode(line.removeprefix(_PRIVATE_PREFIX), validate=True)
        )
    except (binascii.Error, ValueError, TypeError):
        raise ConfigError(
            f"{where}: not an Ed25519 private key "
            "(expected PEM or ed25519-private:<base64 of the 32-byte seed>)"
        ) from None


class KeyExists(ConfigError):
    """A signing key is already at the path: it is never overwritten."""


def generate_key_file(path: Path) -> Ed25519PrivateKey:
    """Create a new signing key at `path` (mode 0600), refusing to overwrite one.

    Written to a temporary file first and linked into place, so a server starting at the same
    moment never reads a half-written key: it either finds none or a whole one.
    """
    key = Ed25519PrivateKey.generate()
    seed = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    text = (
        "# mcp-guard audit signing key: keep it secret; it signs checkpoints of the audit log.\n"
        f"# public key: {public_key_text(key.public_key())}\n"
        f"{_PRIVATE_PREFIX}{base64.b64encode(seed).decode()}\n"
    )
    temporary: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mode 0600
        temporary = Path(name)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.link(temporary, path)
    except FileExistsError:
        raise KeyExists(f"{path}: a key is already there; not overwriting it") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot create the signing key: {exc.strerror}") from None
    finally:
        if temporary is not None:
            temporary.unlink(missing_ok=True)
    return key


def load_signing_key(path: Path | None, *, create: bool) -> Ed25519PrivateKey | None:
    """The key from $MCP_GUARD_SIGNING_KEY, else from `path` (created there when `create`), else None."""
    from_env = os.environ.get(KEY_ENV, "").strip()
    if from_env:
        return parse_private_key(from_env, f"environment variable {KEY_ENV}")
    if path is None:
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if not create:
            return None
        try:
            return generate_key_file(path)
        except KeyExists:  # another process created it first: use that one
            text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the signing key: {exc}") from None
    return parse_private_key(text, str(path))


# the checkpoint ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Checkpoint:
    entries: int
    head: str
    time: str
    reason: str
    key: str
    signature: str

    @property
    def signed_text(self) -> str:
        values = (str(self.entries), self.head, self.time, self.reason, self.key)
        return (
            MAGIC + "\n" + "".join(f"{name}: {value}\n" for name, value in zip(_FIELDS, values, strict=True))
        )

    @property
    def text(self) -> str:
        return f"{self.signed_text}signature: {self.signature}\n"

    def stored(self) -> StoredCheckpoint:
        return StoredCheckpoint(self.entries, self.head, self.text)

    def check_signature(self, trusted: Iterable[str]) -> str | None:
        """None when a trusted key signed exactly this text; otherwise what is wrong."""
        if self.key not in set(trusted):
            return f"it is signed by {self.key}, which is not a trusted key"
        try:
            public = parse_public_key(self.key, "checkpoint key")
            public.verify(base64.b64decode(self.signature, validate=True), self.signed_text.encode())
        except (ConfigError, binascii.Error, ValueError, InvalidSignature):
            return "its signature does not verify (the checkpoint was altered)"
        return None


def sign(key: Ed25519PrivateKey, entries: int, head: str, reason: str) -> Checkpoint:
    unsigned = Checkpoint(
        entries=entries,
        head=head,
        time=utc_now(),
        reason=" ".join(reason.split())[:200],
        key=public_key_text(key.public_key()),
        signature="",
    )
    signature = base64.b64encode(key.sign(unsigned.signed_text.encode())).decode()
    return dataclasses.replace(unsigned, signature=signature)


@dataclass(frozen=True, slots=True)
class Found:
    """A checkpoint read from somewhere, and where, for messages (`witness file W, line 12`)."""

    checkpoint: Checkpoint
    source: str


def parse_checkpoints(text: str, source: str) -> list[Found]:
    """Every checkpoint in `text` (one, or a witness file of many); AuditError naming the line at fault."""
    found: list[Found] = []
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        line = lines[index].strip()
        if not line or line.startswith("#"):
            index += 1
            continue
        where = f"{source}, line {index + 1}"
        if line != MAGIC:
            raise AuditError(f"{where}: expected {MAGIC!r} to start a checkpoint, found {line[:60]!r}")
        values: dict[str, str] = {}
        for offset, name in enumerate((*_FIELDS, "signature"), 1):
            row = lines[index + offset] if index + offset < len(lines) else ""
            prefix = f"{name}: "
            if not row.startswith(prefix):
                raise AuditError(
                    f"{source}, line {index + offset + 1}: expected '{name}: ...' in the checkpoint"
                )
            values[name] = row[len(prefix) :]
        if not values["entries"].isdigit() or not _HEX64.fullmatch(values["head"]):
            raise AuditError(f"{where}: the checkpoint's entries or head is malformed")
        checkpoint = Checkpoint(
            entries=int(values["entries"]),
            head=values["head"],
            time=values["time"],
            reason=values["reason"],
            key=values["key"],
            signature=values["signature"],
        )
        found.append(Found(checkpoint, where))
        index += len(_FIELDS) + 2
    return found


def read_checkpoint_file(path: Path, label: str) -> list[Found]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise AuditError(f"{label} {path}: cannot read it: {exc}") from None
    return parse_checkpoints(text, f"{label} {path}")


def append_witness(path: Path, checkpoint: Checkpoint) -> None:
    """Append one checkpoint with a single write and sync it; AuditError naming the file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (checkpoint.text + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise AuditError(f"witness file {path}: cannot append the checkpoint: {exc.strerror}") from None


# writing them as the server runs ----------------------------------------------------------------


class Checkpointer:
    """Signs the head every `every` entries and on demand (session end), into the store and the witness.

    It watches the seq each append returns: crossing a multiple of `every` signs the head. A failure
    to checkpoint is an audit failure: the call that crossed the line is refused, and the next
    append tries again.
    """

    def __init__(self, store: Store, key: Ed25519PrivateKey, every: int, witness: Path | None) -> None:
        self.store = store
        self.key = key
        self.every = every
        self.witness = witness
        self._due = every
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        """Learn where the last checkpoint stands and watch the store's appends from now on."""
        stored = await self.store.checkpoints()
        last = stored[-1].entries if stored else 0
        self._due = (last // self.every + 1) * self.every if self.every else 0
        if self.every:
            self.store.on_append(self.after_append)

    async def after_append(self, seq: int) -> None:
        if seq < self._due:
            return
        async with self._lock:
            if seq >= self._due:
                await self.checkpoint(f"every {self.every} entries")

    async def checkpoint(self, reason: str) -> Checkpoint | None:
        """Sign the current head now; None when the store holds no entry yet."""
        head = await self.store.head()
        if head is None:
            return None
        checkpoint = sign(self.key, head[0], head[1], reason)
        await self.keep(checkpoint)
        if self.every:
            self._due = max(self._due, (head[0] // self.every + 1) * self.every)
        return checkpoint

    async def keep(self, checkpoint: Checkpoint) -> None:
        """The witness first: if the store write fails, the checkpoint is still kept outside."""
        if self.witness is not None:
            await asyncio.to_thread(append_witness, self.witness, checkpoint)
        await self.store.add_checkpoint(checkpoint.stored())
