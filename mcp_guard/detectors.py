"""Content detectors: the second net, on every text value of a result, inside free text too.

Each detector is a regular expression and a validation that keeps false positives down: Luhn for
card numbers, the SSA's rules for SSNs, mod-97 for IBANs, a decodable JSON header for JWTs, the
digit count for phone numbers, well-known prefixes for secrets. A match is replaced in place by
`[masked:<kind>]`, so `"call me at +1-202-555-0143"` becomes `"call me at [masked:phone]"`.

A column is scanned as one joined string first (one regular expression pass in C for the whole
column); only values in which something was found are scanned again one by one. No pattern can
match the NUL separator, so a match never spans two values.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import re
from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mcp_guard.config import DetectorName
from mcp_guard.values import JsonValue

_SEPARATOR = "\0"


def _luhn(digits: str) -> bool:
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = int(char)
        if index % 2:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def _card(text: str) -> bool:
    digits = re.sub(r"[ -]", "", text)
    return 13 <= len(digits) <= 19 and _luhn(digits)


def _ssn(text: str) -> bool:
    area, group, serial = text[:3], text[4:6], text[7:]
    return area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000"


def _iban(text: str) -> bool:
    compact = re.sub(r" ", "", text).upper()
    if not 15 <= len(compact) <= 34:
        return False
    rearranged = compact[4:] + compact[:4]
    number = "".join(str(int(char, 36)) for char in rearranged)
    return int(number) % 97 == 1


def _phone(text: str) -> bool:
    return 8 <= len(re.sub(r"[^0-9]", "", text)) <= 15


def _jwt(text: str) -> bool:
    header = text.split(".", 1)[0]
    try:
        decoded = json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        return False
    return isinstance(decoded, dict) and "alg" in decoded


def _ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _always(_text: str) -> bool:
    return True


_SECRET_PREFIXES = (
    r"sk_live_|sk_test_|rk_live_|rk_test_|sk-ant-|sk-proj-|ghp_|gho_|ghu_|ghs_|ghr_|github_pat_|"
    r"glpat-|xox[abprs]-|npm_|hf_|AKIA|ASIA|AIza|SG\.|shpat_|pypi-"
)

_LITERALS = (
    *"0123456789@",
    "eyJ",
    *("sk_", "rk_", "sk-", "gh", "github_pat_", "glpat-", "xox", "npm_", "hf_", "AKIA", "ASIA", "AIza"),
    *("SG.", "shpat_", "pypi-"),
)
"""A superset of what any match contains: a digit or `@` (every detector but two), a JWT's `eyJ`, or
the start of a secret prefix. A column holding none of them (names, statuses, most labels) is
skipped with a few memchr-speed `in` tests instead of a regular expression pass, which costs
about 1 ms per 80 KB per detector here."""

_DETECTORS: tuple[tuple[DetectorName, str, Callable[[str], bool]], ...] = (
    ("jwt", r"eyJ[A-Za-z0-9_-]{5,}\.eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*", _jwt),
    ("secret", rf"(?:{_SECRET_PREFIXES})[A-Za-z0-9_\-.]{{8,}}", _always),
    ("email", r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}", _always),
    ("iban", r"\b[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b", _iban),
    ("card", r"\b[0-9](?:[ -]?[0-9]){12,18}\b", _card),
    ("ssn", r"\b[0-9]{3}-[0-9]{2}-[0-9]{4}\b", _ssn),
    (
        "phone",
        r"\+[0-9]{1,3}(?:[ .-]?\(?[0-9]{1,4}\)?){2,5}(?![0-9])"
        r"|(?<![0-9])\(?[0-9]{3}\)?[ .-][0-9]{3}[ .-][0-9]{4}(?![0-9])",
        _phone,
    ),
    ("ip", r"\b(?:[0-9]{1,3}\.){3}[0-9]{1,3}\b|\b(?:[0-9A-Fa-f]{1,4}:){2,7}[0-9A-Fa-f]{1,4}\b", _ip),
)


@dataclass(frozen=True, slots=True)
class Finding:
    """What the detectors replaced in one cell."""

    row: int
    column: int
    kinds: tuple[str, ...]
    original: JsonValue


class Detectors:
    """The enabled detectors as one alternation: one pass per column, validation per match."""

    def __init__(self, enabled: Sequence[DetectorName]) -> None:
        chosen = [d for d in _DETECTORS if d[0] in enabled]
        self.enabled = tuple(name for name, _, _ in chosen)
        self._checks = {f"d{index}": (name, check) for index, (name, _, check) in enumerate(chosen)}
        pattern = "|".join(f"(?P<d{index}>{regex})" for index, (_, regex, _) in enumerate(chosen))
        self._pattern = re.compile(pattern) if chosen else None

    def replace(self, text: str) -> tuple[str, tuple[str, ...]]:
        """`text` with every validated match replaced, and the kinds found."""
        if self._pattern is None:
            return text, ()
        found: list[str] = []

        def substitute(match: re.Match[str]) -> str:
            group = match.lastgroup or ""
            name, check = self._checks[group]
            if not check(match.group()):
                return match.group()
            found.append(name)
            return f"[masked:{name}]"

        replaced = self._pattern.sub(substitute, text)
        return replaced, tuple(dict.fromkeys(found))

    def scan(self, rows: list[list[JsonValue]], columns: Sequence[int]) -> list[Finding]:
        """Replace findings in place in `rows` (only the given columns); return what was replaced."""
        if self._pattern is None:
            return []
        findings: list[Finding] = []
        for column in columns:
            texts = [row[column] for row in rows]
            for index in self._candidates(texts):
                value = texts[index]
                if isinstance(value, int):
                    value = str(value)
                masked, kinds = self._value(value)
                if kinds:
                    findings.append(Finding(index, column, kinds, rows[index][column]))
                    rows[index][column] = masked
        return findings

    def _candidates(self, values: list[JsonValue]) -> list[int]:
        """Rows whose value may hold a finding: one pass over the column's strings joined, then the
        row of each match found by its offset; JSON values and long integers always."""
        assert self._pattern is not None
        strings: list[str] = []
        starts: list[int] = []
        always: list[int] = []
        offset = 0
        for index, value in enumerate(values):
            if isinstance(value, str):
                starts.append(offset)
                strings.append(value)
                offset += len(value) + 1
            elif isinstance(value, dict | list) or (
                isinstance(value, int) and not isinstance(value, bool) and value >= 10**12
            ):
                always.append(index)
        joined = _SEPARATOR.join(strings)
        if not any(literal in joined for literal in _LITERALS):
            return always
        rows = [index for index, value in enumerate(values) if isinstance(value, str)]
        hits = {rows[bisect_right(starts, match.start()) - 1] for match in self._pattern.finditer(joined)}
        return sorted(hits.union(always))

    def _value(self, value: JsonValue) -> tuple[JsonValue, tuple[str, ...]]:
        """Strings, and the strings (keys too) inside JSON values."""
        if isinstance(value, str):
            return self.replace(value)
        if isinstance(value, list):
            kinds: list[str] = []
            items = []
            for item in value:
                masked, found = self._value(item)
                items.append(masked)
                kinds.extend(found)
            return items, tuple(dict.fromkeys(kinds))
        if isinstance(value, dict):
            kinds = []
            entries: dict[str, JsonValue] = {}
            for key, item in value.items():
                masked_key, found_key = self.replace(key)
                masked, found = self._value(item)
                entries[masked_key] = masked
                kinds.extend(found_key + found)
            return entries, tuple(dict.fromkeys(kinds))
        return value, ()

    def text(self, text: str) -> str:
        """An error message or any other text, with findings replaced."""
        return self.replace(text)[0]
