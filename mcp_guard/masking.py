"""Masking rules → which columns are masked for a caller, and each strategy as SQL per dialect.

A column is masked by the first rule that matches it (by a column glob or by the semantic type its
name says) and applies to the caller (the connection matches, the caller is in none of the rule's
`except_groups`). Strategies never reveal more than their documented part:

- `redact`  the fixed marker `[masked]`
- `partial` a safe part, by semantic type: the domain of an email, the last 4 digits of a card or an
  SSN, the last 2 of a phone, the country and last 4 of an IBAN, the first two octets of an IPv4
  address, the first 4 characters of a long secret; anything else: the last 4 of 8 or more characters
- `hash`    HMAC-SHA256 under the configured key, first 16 hex digits: equal values hash equal, so
  joins and distinct counts still work, and the value cannot be recovered without the key
- `null`    NULL

NULL stays NULL under every strategy. On PostgreSQL each strategy is a SQL expression (the hash is
HMAC built from the built-in `sha256()`, its padded key halves bound as parameters); on SQLite
`partial` (one function per semantic type) and `hash` are deterministic functions registered on the
read connections.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from functools import lru_cache

import sqlglot
from sqlglot import exp

from mcp_guard.backends.base import Relation, SqlFunction
from mcp_guard.config import MaskingSettings, MaskRule, MaskStrategy, SemanticType
from mcp_guard.errors import ConfigError

MARKER = "[masked]"
FUNCTION_PREFIX = "mcp_guard_"
"""Names of the guard's own SQLite functions; a caller's SQL may never call one."""
HASH_FUNCTION = "mcp_guard_hash"
PARTIAL_FUNCTION = "mcp_guard_partial"
HASH_DIGITS = 16

_NAME_TYPES: tuple[tuple[SemanticType, str], ...] = (
    ("email", r"e_?mail"),
    ("phone", r"phone|mobile|cellphone|telephone|tel|fax|msisdn"),
    ("ssn", r"ssn|social_security"),
    ("national_id", r"national_id|nino|nin|passport|tax_id|tin|id_card"),
    ("card", r"card_number|card_no|cc_number|ccn|credit_card|pan"),
    ("iban", r"iban|bank_account|account_number"),
    ("jwt", r"jwt|id_token"),
    ("secret", r"secret|password|passwd|api_key|apikey|token|access_key|private_key|secret_key"),
    ("ip", r"ip|ip_address|ip_addr|remote_addr"),
)
_SUFFIXES = r"(?:_(?:address|addr|number|num|no|value|text|hash))?"
_TYPE_PATTERNS = tuple(
    (kind, re.compile(rf"(?:[a-z0-9]+_)*(?:{pattern}){_SUFFIXES}")) for kind, pattern in _NAME_TYPES
)


def semantic_type(column: str) -> SemanticType | None:
    """What a column's name says it holds: `contact_email` → email, `card_number` → card."""
    name = column.lower()
    for kind, pattern in _TYPE_PATTERNS:
        if pattern.fullmatch(name):
            return kind
    return None


@dataclass(frozen=True, slots=True)
class ColumnMask:
    """How one column is masked, and by which rule."""

    strategy: MaskStrategy
    rule: str
    semantic_type: SemanticType | None = None


def _glob_matches(glob: str, schema: str, table: str, column: str) -> bool:
    parts = glob.lower().split(".")
    names = [schema.lower(), table.lower(), column.lower()][-len(parts) :]
    return all(fnmatchcase(name, part) for name, part in zip(names, parts, strict=True))


def column_matches(globs: tuple[str, ...], relation: Relation, column: str) -> bool:
    """Whether any of `column`, `table.column`, `schema.table.column` globs names this column, or
    the same column of a table it shares rows with (an ancestor it inherits the column from, a
    partition or child whose rows a read of it includes)."""
    return any(
        _glob_matches(glob, relation.schema, relation.name, column)
        or any(
            column in relative.columns and _glob_matches(glob, relative.schema, relative.name, column)
            for relative in relation.relatives
        )
        for glob in globs
    )


class Masking:
    """The masking rules with their key: who sees what masked, and the SQL of each mask."""

    def __init__(self, settings: MaskingSettings, hash_key: bytes) -> None:
        self.settings = settings
        self._key = hash_key
        block = hash_key if len(hash_key) <= 64 else hashlib.sha256(hash_key).digest()
        block = block.ljust(64, b"\0")
        self._inner = bytes(b ^ 0x36 for b in block)
        self._outer = bytes(b ^ 0x5C for b in block)
        # HMAC's two hashes with the padded key already absorbed: a copy per value, not a new HMAC.
        self._inner_hash = hashlib.sha256(self._inner)
        self._outer_hash = hashlib.sha256(self._outer)

    @classmethod
    def from_settings(cls, settings: MaskingSettings, source: str = "") -> Masking:
        """The hash key comes from the environment; without one, a random key for this process."""
        text = os.environ.get(settings.hash_key_env, "").strip()
        if not text:
            return cls(settings, secrets.token_bytes(32))
        try:
            return cls(settings, decode_key(text))
        except ValueError as error:
            raise ConfigError(
                f"${settings.hash_key_env}: {error}", file=source or None, key="masking.hash_key_env"
            ) from None

    # who sees what ------------------------------------------------------------------------------

    def rules_for(self, connection: str, groups: frozenset[str]) -> tuple[MaskRule, ...]:
        """The rules that apply to this caller on this connection."""
        return tuple(
            rule
            for rule in self.settings.rules
            if (not rule.connections or any(fnmatchcase(connection, g) for g in rule.connections))
            and not groups.intersection(rule.except_groups)
        )

    def table_masks(self, rules: tuple[MaskRule, ...], relation: Relation) -> dict[str, ColumnMask]:
        """Masked columns of a table, by the first applying rule that matches each column."""
        masks: dict[str, ColumnMask] = {}
        for column, _ in relation.columns:
            kind = semantic_type(column)
            for rule in rules:
                if column_matches(rule.columns, relation, column) or (
                    kind is not None and kind in rule.types
                ):
                    typed = kind or (rule.types[0] if len(rule.types) == 1 else None)
                    masks[column] = ColumnMask(rule.strategy, rule.name, typed)
                    break
        return _with_generated(masks, relation.generated)

    # the masks as SQL ---------------------------------------------------------------------------

    def expression(
        self, mask: ColumnMask, column: exp.Expression, dialect: str, key: tuple[int, int]
    ) -> exp.Expression:
        """The mask applied to `column`; `key` numbers the two HMAC key placeholders (PostgreSQL)."""
        template = _template(mask.strategy, mask.semantic_type, dialect, key)
        return template.transform(lambda node: column.copy() if _is_slot(node) else node, copy=True)

    def key_params(self) -> list[str]:
        """The HMAC key halves bound to PostgreSQL hash masks, as bytea text."""
        return ["\\x" + self._inner.hex(), "\\x" + self._outer.hex()]

    def sqlite_functions(self) -> list[SqlFunction]:
        return [
            SqlFunction(HASH_FUNCTION, 1, self.hash_value),
            *(SqlFunction(_partial_function(kind), 1, _sqlite_partial(kind)) for kind in ("", *_PARTIALS)),
        ]

    def hash_value(self, value: object) -> str | None:
        if value is None:
            return None
        inner = self._inner_hash.copy()
        inner.update((value if type(value) is str else _text(value)).encode())
        outer = self._outer_hash.copy()
        outer.update(inner.digest())
        return outer.hexdigest()[:HASH_DIGITS]

    def mask_value(self, mask: ColumnMask, value: object) -> object:
        """The mask applied in Python: what the SQL gives for the same value (tests and `check`)."""
        if value is None or mask.strategy == "null":
            return None
        if mask.strategy == "redact":
            return MARKER
        if mask.strategy == "hash":
            return self.hash_value(value)
        return partial_value(value, mask.semantic_type or "")


def _with_generated(
    masks: dict[str, ColumnMask], generated: tuple[tuple[str, frozenset[str]], ...]
) -> dict[str, ColumnMask]:
    """A generated column computed from a masked one is redacted, under that column's rule (so the
    rule's excepted groups see it clear too); on SQLite one may read another, hence the fixpoint."""
    changed = True
    while changed:
        changed = False
        for column, sources in generated:
            source = next((masks[name] for name in sorted(sources) if name in masks), None)
            if column not in masks and source is not None:
                masks[column] = ColumnMask("redact", source.rule)
                changed = True
    return masks


def decode_key(text: str) -> bytes:
    """A key given as 64 hex digits or as base64 of 32 bytes."""
    text = text.strip()
    try:
        key = (
            bytes.fromhex(text)
            if re.fullmatch(r"[0-9a-fA-F]{64}", text)
            else base64.b64decode(text, validate=True)
        )
    except (ValueError, binascii.Error):
        raise ValueError("the key must be 32 bytes as 64 hex digits or as base64") from None
    if len(key) != 32:
        raise ValueError(f"the key must be 32 bytes (64 hex digits or base64); it is {len(key)} bytes")
    return key


def _text(value: object) -> str:
    if type(value) is str:  # most values: one type check, not an isinstance of three types
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return "\\x" + bytes(value).hex()
    return str(value)


_NOT_ALNUM = re.compile(r"[^0-9A-Za-z]")
_NOT_DIGIT_BYTES = bytes(byte for byte in range(256) if not 0x30 <= byte <= 0x39)


def _digits(text: str) -> str:
    """The ASCII digits of `text`: its UTF-8 bytes less every byte that is not a digit (a character
    beyond ASCII encodes to bytes >= 0x80 only), in C, a quarter of a regex substitution's time."""
    return text.encode("utf-8", "surrogatepass").translate(None, _NOT_DIGIT_BYTES).decode("ascii")


_IPV4_START = re.compile(r"\d+\.\d+\.\d+\.\d+")


def _partial_email(text: str) -> str:
    """The domain after the last `@`: a value holding several addresses (an array, JSON, a list)
    shows the last one's domain, never a local part that follows an earlier `@`."""
    return "***@" + text.rsplit("@", 1)[1] if "@" in text else MARKER


def _partial_card(text: str) -> str:
    digits = _digits(text)
    return "**** " + digits[-4:] if len(digits) >= 12 else MARKER


def _partial_phone(text: str) -> str:
    digits = _digits(text)
    return "***" + digits[-2:] if len(digits) >= 7 else MARKER


def _partial_id(text: str) -> str:
    digits = _digits(text)
    return "***-**-" + digits[-4:] if len(digits) >= 8 else MARKER


def _partial_iban(text: str) -> str:
    compact = _NOT_ALNUM.sub("", text).upper()
    return compact[:2] + "** **** " + compact[-4:] if len(compact) >= 15 else MARKER


def _partial_ip(text: str) -> str:
    if _IPV4_START.match(text):
        first, second = text.split(".")[:2]
        return f"{first}.{second}.x.x"
    return MARKER


def _partial_secret(text: str) -> str:
    return text[:4] + "***" if len(text) >= 12 else MARKER


def _partial_other(text: str) -> str:
    return "***" + text[-4:] if len(text) >= 8 else MARKER


_PARTIALS: dict[str, Callable[[str], str]] = {
    "email": _partial_email,
    "card": _partial_card,
    "phone": _partial_phone,
    "ssn": _partial_id,
    "national_id": _partial_id,
    "iban": _partial_iban,
    "ip": _partial_ip,
    "secret": _partial_secret,
    "jwt": _partial_secret,
}


def partial_value(value: object, kind: str) -> str | None:
    """`partial` in Python, kept identical to the PostgreSQL templates below."""
    if value is None:
        return None
    return _PARTIALS.get(kind, _partial_other)(_text(value))


def _sqlite_partial(kind: str) -> Callable[[object], str | None]:
    """`partial` for one semantic type, as the one-argument function SQLite calls per row."""
    mask = _PARTIALS.get(kind, _partial_other)

    def partial(value: object) -> str | None:
        if type(value) is str:  # most values: no call to _text (one call less per row)
            return mask(value)
        return None if value is None else mask(_text(value))

    return partial


def _partial_function(kind: str) -> str:
    return f"{PARTIAL_FUNCTION}_{kind or 'other'}"


# PostgreSQL: {c} is the column, {t} the column as text, {n} how many digits it holds (counted with
# translate(), several times cheaper per row than regexp_replace), {d2} and {d4} its last 2 and 4
# digits; the key halves are {ki}, {ko}.
_PG_PARTIAL = {
    "email": "CASE WHEN {c} IS NULL THEN NULL WHEN strpos({t}, '@') > 0 "
    "THEN '***@' || split_part({t}, '@', -1) ELSE '{m}' END",
    "card": "CASE WHEN {c} IS NULL THEN NULL WHEN {n} >= 12 THEN '**** ' || {d4} ELSE '{m}' END",
    "phone": "CASE WHEN {c} IS NULL THEN NULL WHEN {n} >= 7 THEN '***' || {d2} ELSE '{m}' END",
    "ssn": "CASE WHEN {c} IS NULL THEN NULL WHEN {n} >= 8 THEN '***-**-' || {d4} ELSE '{m}' END",
    "iban": "CASE WHEN {c} IS NULL THEN NULL WHEN length({x}) >= 15 "
    "THEN left({x}, 2) || '** **** ' || right({x}, 4) ELSE '{m}' END",
    "ip": "CASE WHEN {c} IS NULL THEN NULL WHEN {t} ~ '^[0-9]+\\.[0-9]+\\.[0-9]+\\.[0-9]+' "
    "THEN split_part({t}, '.', 1) || '.' || split_part({t}, '.', 2) || '.x.x' ELSE '{m}' END",
    "secret": "CASE WHEN {c} IS NULL THEN NULL WHEN length({t}) >= 12 "
    "THEN left({t}, 4) || '***' ELSE '{m}' END",
    "": "CASE WHEN {c} IS NULL THEN NULL WHEN length({t}) >= 8 THEN '***' || right({t}, 4) ELSE '{m}' END",
}
_PG_PARTIAL["national_id"] = _PG_PARTIAL["ssn"]
_PG_PARTIAL["jwt"] = _PG_PARTIAL["secret"]

_PG_HASH = (
    "CASE WHEN {c} IS NULL THEN NULL ELSE encode(substr(sha256({ko} || sha256({ki} || "
    "convert_to({t}, 'UTF8'))), 1, " + str(HASH_DIGITS // 2) + "), 'hex') END"
)
_REDACT = "CASE WHEN {c} IS NULL THEN NULL ELSE '{m}' END"
_SLOT = "mcp_guard_slot"


def _is_slot(node: exp.Expression) -> bool:
    return isinstance(node, exp.Column) and node.name == _SLOT and not node.table


def _pg_last_digits(text: str, count: int) -> str:
    """The last `count` digits of `text`, for a text holding at least that many: its last characters
    when they are all digits (most values), else taken from its digits, which a translate() that
    deletes the text's own non-digits gives without a regexp_replace (several times slower)."""
    tail = f"right({text}, {count})"
    digits = f"translate({text}, translate({text}, '0123456789', ''), '')"
    return f"CASE WHEN translate({tail}, '0123456789', '') = '' THEN {tail} ELSE right({digits}, {count}) END"


@lru_cache(maxsize=256)
def _template(
    strategy: MaskStrategy, kind: SemanticType | None, dialect: str, key: tuple[int, int]
) -> exp.Expression:
    """A mask as a parsed expression over the placeholder column `mcp_guard_slot`."""
    slot = _SLOT
    if dialect == "postgres":
        parts = {
            "c": slot,
            "t": f"CAST({slot} AS TEXT)",
            "n": f"length(CAST({slot} AS TEXT)) - length(translate(CAST({slot} AS TEXT), '0123456789', ''))",
            "d2": _pg_last_digits(f"CAST({slot} AS TEXT)", 2),
            "d4": _pg_last_digits(f"CAST({slot} AS TEXT)", 4),
            "x": f"upper(regexp_replace(CAST({slot} AS TEXT), '[^0-9A-Za-z]', '', 'g'))",
            "m": MARKER,
            "ki": f"CAST(${key[0]} AS BYTEA)",
            "ko": f"CAST(${key[1]} AS BYTEA)",
        }
        text = {
            "redact": _REDACT,
            "null": "CAST(NULL AS TEXT)",
            "hash": _PG_HASH,
            "partial": _PG_PARTIAL[kind or ""],
        }[strategy]
    else:
        parts = {"c": slot, "m": MARKER}
        text = {
            "redact": _REDACT,
            "null": "NULL",
            "hash": f"{HASH_FUNCTION}({{c}})",
            "partial": f"{_partial_function(kind or '')}({{c}})",
        }[strategy]
    return sqlglot.parse_one(text.format(**parts), read=dialect)
