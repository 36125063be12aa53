"""The hash chain of the audit log: canonical encoding, links, and verification.

Engine-agnostic: every store writes `canonical(event)` as the entry's body and
`link(seq, prev_hash, body)` as its hash, and `Verifier` recomputes the chain from rows read
back in seq order, whatever database they came from.

Editing, deleting, inserting or reordering entries breaks the chain; rewriting the whole chain
from some entry onward does not (anyone can recompute SHA-256), and neither does cutting off the
newest entries. Signed checkpoints of the head hash close that gap.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Collection, Iterable, Sequence
from typing import Any

from mcp_guard.errors import AuditError
from mcp_guard.store.base import AuditEvent, EventType, VerifyReport

GENESIS = bytes(32)
"""The prev_hash of entry 1."""

DOMAIN = b"mcp-guard/audit/v1\n"

INDEXED = ("ts", "type", "session_id", "call_id", "identity", "tool", "connection", "decision")
"""Fields of an event that stores copy into columns for filtering; verification checks the copies."""

ROW = ("seq", "prev_hash", "hash", "body", *INDEXED)
"""The columns `Verifier.feed` expects in each row, in this order. A store that keeps more index
columns derived from the body (statement kind, tables) adds one more value: whether they agree."""

_REQUIRED = frozenset({"ts", "type", "session_id", "identity"})
_FIELDS = frozenset({*INDEXED, "detail"})
_json = json.JSONEncoder(ensure_ascii=False).encode


def canonical(event: AuditEvent) -> bytes:
    """The exact bytes that are hashed and stored for `event`: sorted, compact UTF-8 JSON."""
    fields = event.as_dict()
    for name in INDEXED:
        value = fields[name]
        if not (isinstance(value, str) or (value is None and name not in _REQUIRED)):
            expected = "text" if name in _REQUIRED else "text or None"
            raise AuditError(f"audit event field {name} must be {expected}, not {type(value).__name__}")
        # SQLite's JSON functions cut text at a NUL, and PostgreSQL text cannot hold one
        if value is not None and "\x00" in value:
            raise AuditError(f"audit event field {name} contains a NUL character, which cannot be indexed")
    try:
        text = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        return text.encode("utf-8")
    except (TypeError, ValueError) as exc:
        where, what = _find_unencodable(fields, "", set()) or ("detail", str(exc))
        raise AuditError(f"audit event field {where} {what}; convert it to a JSON value first") from exc


def _find_unencodable(value: object, path: str, seen: set[int]) -> tuple[str, str] | None:
    """Locate what json.dumps refused, to name the field; only called after a failure."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path, "holds text that is not valid Unicode (a lone surrogate)"
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return path, f"holds {value!r}, which JSON cannot represent"
    if value is None or isinstance(value, bool | int | float):
        return None
    if not isinstance(value, dict | list | tuple):
        return path, f"holds a value of type {type(value).__name__}, which is not JSON"
    if id(value) in seen:
        return path, "contains itself"
    seen.add(id(value))
    if isinstance(value, dict):
        items: Iterable[tuple[str, object]] = (
            (f"{path}.{key}" if path else str(key), item) for key, item in value.items()
        )
        if any(not isinstance(key, str) for key in value):
            return path, "has a key that is not text"
    else:
        items = ((f"{path}[{index}]", item) for index, item in enumerate(value))
    for item_path, item in items:
        found = _find_unencodable(item, item_path, seen)
        if found:
            return found
    seen.discard(id(value))
    return None


def link(seq: int, prev: bytes, body: bytes) -> bytes:
    """The hash of entry `seq`: binds its position, its predecessor and its exact bytes."""
    return hashlib.sha256(DOMAIN + seq.to_bytes(8, "big") + prev + body).digest()


def decode(body: bytes) -> AuditEvent:
    """The event a stored body encodes; AuditError when it is not one."""
    try:
        fields = json.loads(body)
        if not isinstance(fields, dict) or fields.keys() != _FIELDS:
            raise ValueError(f"expected an object with the fields {', '.join(sorted(_FIELDS))}")
        return AuditEvent(
            type=EventType(fields["type"]),
            session_id=fields["session_id"],
            identity=fields["identity"],
            call_id=fields["call_id"],
            tool=fields["tool"],
            connection=fields["connection"],
            decision=fields["decision"],
            detail=fields["detail"],
            ts=fields["ts"],
        )
    except ValueError as exc:
        raise AuditError(f"the body is not a valid audit event: {exc}") from exc


class Verifier:
    """Recomputes the chain over rows fed in seq order, chunk by chunk, and names the first bad entry.

    Each row holds the values named by `ROW`. Rows are checked in the order an auditor would
    reason: is the entry where it should be (seq), does it follow its predecessor (prev_hash),
    are its bytes the ones that were hashed (hash), and do the indexed columns say what the
    hashed bytes say.
    """

    def __init__(self, base: tuple[int, bytes] | None = None, watch: Collection[int] = ()) -> None:
        """Start after entry `base[0]` whose hash is `base[1]` (a pruned prefix), else at genesis."""
        last, head = base if base is not None else (0, GENESIS)
        self._first = last + 1
        self._next_seq = last + 1
        self._head = head
        self._bad_seq: int | None = None
        self._problem: str | None = None
        self._watch = frozenset(watch)
        self._watched: dict[int, str] = {}

    def feed(self, rows: Iterable[Sequence[Any]]) -> bool:
        """Check more rows; False once a bad entry was found (feeding more changes nothing)."""
        if self._problem is not None:
            return False
        expected, head, watch = self._next_seq, self._head, self._watch
        derived = len(ROW)
        try:
            for row in rows:
                seq, prev, digest, body = row[:4]
                if seq != expected:
                    gap = (
                        "an entry is missing" if seq > expected else "an entry is duplicated or out of order"
                    )
                    return self._fail(expected, f"expected seq {expected} but found {seq} ({gap})")
                if prev != head:
                    if seq == 1:
                        return self._fail(
                            seq, "prev_hash is not the genesis value (edited, or entries before it removed)"
                        )
                    return self._fail(
                        seq, f"prev_hash does not match entry {seq - 1} (inserted or reordered)"
                    )
                if not isinstance(body, bytes) or link(seq, prev, body) != digest:
                    return self._fail(seq, "its body does not match its hash (edited)")
                if not _columns_agree(body, *row[4:derived]):
                    return self._fail(seq, _column_problem(body, row[4:derived]))
                if len(row) > derived and row[derived] != 1:
                    problem = "its index columns kind/tables disagree with the hashed body (index altered)"
                    return self._fail(seq, problem)
                if seq in watch:
                    self._watched[seq] = digest.hex()
                head = digest
                expected += 1
        finally:
            self._next_seq, self._head = expected, head
        return True

    def _fail(self, seq: int, problem: str) -> bool:
        self._bad_seq, self._problem = seq, f"entry {seq}: {problem}"
        return False

    def report(self) -> VerifyReport:
        """ok, or the first bad entry; `entries` and `head_hash` cover the entries that hold."""
        return VerifyReport(
            ok=self._problem is None,
            entries=self._next_seq - 1,
            head_hash=self._head.hex() if self._next_seq > 1 else None,
            first_bad_seq=self._bad_seq,
            problem=self._problem,
            first_seq=self._first,
            watched=dict(self._watched),
        )


def verify(rows: Iterable[Sequence[Any]]) -> VerifyReport:
    """Verify a whole chain given as rows (see `ROW`) in seq order."""
    verifier = Verifier()
    verifier.feed(rows)
    return verifier.report()


def _columns_agree(
    body: bytes,
    ts: object,
    type_: object,
    session_id: object,
    call_id: object,
    identity: object,
    tool: object,
    connection: object,
    decision: object,
) -> bool:
    """Whether the indexed columns hold what the canonical `body` holds, without parsing it.

    In a canonical body the indexed fields (text or null) sit before and after `detail` in key
    order, so the columns re-encoded must be exactly its start and end. A JSON string cannot
    end early or late inside another: its inner quotes are escaped, its outer ones are not.
    """
    try:
        start = b'{"call_id":%b,"connection":%b,"decision":%b,"detail":' % (
            _json(call_id).encode(),
            _encoded(connection),
            _encoded(decision),
        )
        end = b',"identity":%b,"session_id":%b,"tool":%b,"ts":%b,"type":%b}' % (
            _encoded(identity),
            _encoded(session_id),
            _encoded(tool),
            _json(ts).encode(),
            _encoded(type_),
        )
    except TypeError:  # a column holding bytes or a number: the file was edited
        return False
    return body.startswith(start) and body.endswith(end)


_ENCODED: dict[str | None, bytes] = {}


def _encoded(value: object) -> bytes:
    """The JSON bytes of a column value that repeats from entry to entry (session, identity, tool...)."""
    try:
        return _ENCODED[value]  # type: ignore[index]
    except KeyError:
        if value is not None and type(value) is not str:
            raise TypeError(type(value).__name__) from None
        encoded = _json(value).encode()
        if len(_ENCODED) < 10_000:
            _ENCODED[value] = encoded
        return encoded
    except TypeError:  # unhashable: not a column value mcp-guard writes
        raise TypeError(type(value).__name__) from None


def _column_problem(body: bytes, columns: Sequence[Any]) -> str:
    """Say which indexed column disagrees with the hashed body (the slow, exact path)."""
    try:
        fields = json.loads(body)
    except ValueError:
        return "its body is not valid JSON"
    if not isinstance(fields, dict):
        return "its body is not an audit event"
    for name, column in zip(INDEXED, columns, strict=True):
        hashed = fields.get(name)
        if type(column) is not type(hashed) or column != hashed:
            return f"column {name} says {_show(column)} but the hashed body says {_show(hashed)}"
    return "its body is not in canonical form (it was rewritten)"


def _show(value: object) -> str:
    return "NULL" if value is None else repr(value)
