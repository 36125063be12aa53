"""Content detectors: the second net, on every text value of a result, inside free text too.

Each detector is a regular expression and a validation that keeps false positives down: Luhn for
card numbers, the SSA's rules for SSNs, mod-97 for IBANs, a decodable JSON header for JWTs, the
digit count for phone numbers, well-known prefixes for secrets. A match is replaced in place by
`[masked:<kind>]`, so `"call me at +1-202-555-0143"` becomes `"call me at [masked:phone]"`.

The detectors mean the leftmost-first alternation of their patterns (`_DETECTORS`); `Detectors`
computes exactly that branch by branch (`_BRANCHES`), each branch searched only in a text holding
the literals it needs, with a search that `re` can skip along (one alternation tries every branch at
every position: ~8 ms per 100 KB); each branch's matches come from one `finditer`, and only where
two branches' matches overlap are they merged step by step. A column's distinct values are scanned
as one text joined with NUL, which no pattern can match, so a match never spans two values.
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
from functools import lru_cache
from itertools import accumulate
from operator import add
from typing import NamedTuple

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


_NOT_DIGIT_BYTES = bytes(byte for byte in range(256) if not 0x30 <= byte <= 0x39)


def _phone(text: str) -> bool:
    """8 to 15 digits: a match holds ASCII only, whose non-digit bytes `translate` deletes in C."""
    return 8 <= len(text.encode("utf-8", "surrogatepass").translate(None, _NOT_DIGIT_BYTES)) <= 15


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
_SECRET_PRESENT = re.compile(
    r"_(?:(?<=[sr]k_live_)|(?<=[sr]k_test_)|(?<=gh[pousr]_)|(?<=github_pat_)|(?<=npm_)|(?<=hf_)|(?<=shpat_))"
    r"|-(?:(?<=sk-ant-)|(?<=sk-proj-)|(?<=glpat-)|(?<=xox[abprs]-)|(?<=pypi-))"
    r"|\.(?<=SG\.)|K(?<=AK)(?=IA)|S(?<=AS)(?=IA)|I(?<=AI)(?=za)"
)
"""Whether a text holds a secret prefix: found from the prefix's last (or a rare) character, which
`re` skips to, instead of from its first, which is a common letter."""
_DIGITS = tuple("0123456789")

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
"""The detectors: what each matches, and the validation a match must pass. Their meaning is the
leftmost-first alternation of these patterns in this order (a match that fails validation is left
as it is and still consumes its text); `_BRANCHES` computes exactly that, faster."""

_LOCAL_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._%+-"
_EMAIL_DOMAIN = re.compile(r"@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")


def _local_start(text: str, pos: int, at: int) -> int:
    """Where the run of local-part characters that ends at the `@` at `at` starts (not before `pos`),
    walked back a window at a time with `rstrip`, which drops exactly those characters, in C."""
    start, width = at, 16
    while start > pos:
        window = text[max(pos, start - width) : start]
        run = len(window) - len(window.rstrip(_LOCAL_CHARS))
        start -= run
        if run < len(window):
            break
        width *= 4
    return start


def _find_email(text: str, pos: int) -> tuple[int, int, DetectorName] | None:
    """The leftmost email at or after `pos`, found from its `@` (memchr speed) instead of trying the
    local part's character class at every position. An email holds exactly one `@`; its match starts
    where the run of local-part characters before that `@` starts (not before `pos`)."""
    for domain in _EMAIL_DOMAIN.finditer(text, pos):
        start = _local_start(text, pos, domain.start())
        if start < domain.start():
            return start, domain.end(), "email"
    return None


@dataclass(frozen=True, slots=True)
class _Branch:
    """One alternative of a detector's pattern, rewritten so that `re` can skip along the text to
    where it may start: a literal first, or one character class first (`lead`) with the rest behind
    a lookbehind on that character (`\b[0-9]...` becomes `[0-9](?<=\b[0-9])...`). It matches at the
    same positions the same text as the alternative as written in `_DETECTORS`."""

    name: DetectorName
    pattern: str = ""
    lead: str = ""
    """The class of the first character when `pattern` is what follows it: consecutive such branches
    share one scan (one pattern whose first character is the union of their leads)."""
    needs: tuple[tuple[str, ...], ...] = ()
    """Literals of which the text must hold one from each group, or the branch cannot match there."""
    gate: re.Pattern[str] | None = None
    """A pattern the text must hold, or the branch cannot match there."""


_BRANCHES: tuple[_Branch, ...] = (
    _Branch("jwt", _DETECTORS[0][1], needs=(("eyJ",),)),
    _Branch("secret", _DETECTORS[1][1], gate=_SECRET_PRESENT),
    _Branch("email", needs=(("@",),)),  # found by _find_email
    _Branch(
        "iban",
        r"(?<=\b[A-Z])[A-Z][0-9]{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b",
        "A-Z",
        (_DIGITS,),
    ),
    _Branch("card", r"(?<=\b[0-9])(?:[ -]?[0-9]){12,18}\b", "0-9", (_DIGITS,)),
    _Branch("ssn", r"(?<=\b[0-9])[0-9]{2}-[0-9]{2}-[0-9]{4}\b", "0-9", (("-",), _DIGITS)),
    _Branch("phone", r"(?<=\+)[0-9]{1,3}(?:[ .-]?\(?[0-9]{1,4}\)?){2,5}(?![0-9])", "+", (("+",), _DIGITS)),
    _Branch(
        "phone",
        r"(?<![0-9][(0-9])(?:(?<=\()[0-9]{3}|(?<=[0-9])[0-9]{2})\)?[ .-][0-9]{3}[ .-][0-9]{4}(?![0-9])",
        "(0-9",
        (_DIGITS,),
    ),
    _Branch("ip", r"(?<=\b[0-9])[0-9]{0,2}\.(?:[0-9]{1,3}\.){2}[0-9]{1,3}\b", "0-9", ((".",), _DIGITS)),
    _Branch(
        "ip",
        r"[0-9A-Fa-f](?<=\b[0-9A-Fa-f])[0-9A-Fa-f]{0,3}:(?:[0-9A-Fa-f]{1,4}:){1,6}[0-9A-Fa-f]{1,4}\b",
        needs=((":",),),
    ),
)

_Match = tuple[int, int, DetectorName]


@dataclass(frozen=True, slots=True)
class _Finder:
    """A branch's search (or one run of `lead` branches'): its leftmost match at or after a position,
    and its chain of matches, each searched from the end of the one before (as `find` would give)."""

    find: Callable[[str, int], _Match | None]
    chain: Callable[[str], list[_Match]]


def _email_chain(text: str) -> list[_Match]:
    """`_find_email` from the end of each email found: the domains, `@` first, come from one
    `finditer` (a domain holds no `@`, so none is skipped), each bounded by the last email's end."""
    found: list[_Match] = []
    pos = 0
    for domain in _EMAIL_DOMAIN.finditer(text):
        at = domain.start()
        start = _local_start(text, pos, at)
        if start < at:
            found.append((start, domain.end(), "email"))
            pos = domain.end()
    return found


_EMAIL = _Finder(_find_email, _email_chain)


@lru_cache(maxsize=256)
def _finders(branches: tuple[_Branch, ...]) -> tuple[_Finder, ...]:
    """One search per branch, or per run of consecutive `lead` branches (their order kept inside one
    alternation, so a tie at one position still goes to the branch listed first)."""
    finders: list[_Finder] = []
    index = 0
    while index < len(branches):
        run = [branches[index]]
        while run[0].lead and index + len(run) < len(branches) and branches[index + len(run)].lead:
            run.append(branches[index + len(run)])
        finders.append(_EMAIL if run[0].name == "email" else _search(tuple(run)))
        index += len(run)
    return tuple(finders)


def _search(run: tuple[_Branch, ...]) -> _Finder:
    """The leftmost match of the branches' alternation at or after a position: (start, end, kind).
    Its chain is `finditer`'s, which searches each match from the end of the one before (no pattern
    matches the empty string), in C."""
    lead = "".join(dict.fromkeys(branch.lead for branch in run))
    alternatives = "|".join(f"(?P<b{i}>{branch.pattern})" for i, branch in enumerate(run))
    pattern = re.compile(f"[{lead}](?:{alternatives})" if lead else alternatives)
    search, finditer = pattern.search, pattern.finditer
    names = {f"b{i}": branch.name for i, branch in enumerate(run)}

    def find(text: str, pos: int) -> _Match | None:
        match = search(text, pos)
        return (match.start(), match.end(), names[match.lastgroup or ""]) if match is not None else None

    if len(run) == 1:
        name = run[0].name

        def chain(text: str) -> list[_Match]:
            return [(*match.span(), name) for match in finditer(text)]

    else:

        def chain(text: str) -> list[_Match]:
            return [(*match.span(), names[match.lastgroup or ""]) for match in finditer(text)]

    return _Finder(find, chain)


def _disjoint(chains: list[list[_Match]]) -> list[_Match] | None:
    """The branches' chains as one, in order, when no two matches overlap (else None). Then each step
    of the alternation takes the leftmost of the branches' next matches, which ends before any other
    starts, and that branch's next match is its chain's next: the chains are the alternation's steps."""
    chains = [chain for chain in chains if chain]
    if len(chains) < 2:
        return chains[0] if chains else []
    matches = sorted(match for chain in chains for match in chain)  # timsort: merges the sorted runs
    starts, ends, _ = zip(*matches, strict=True)
    return None if any(map(int.__gt__, ends[:-1], starts[1:])) else matches


def _merged(text: str, finders: tuple[_Finder, ...]) -> list[_Match]:
    """The alternation's matches, step by step: each branch keeps its next match until the scan passes
    its start; the leftmost wins (on a tie, the branch listed first), validated or not it is consumed."""
    live = [(match, finder.find) for finder in finders if (match := finder.find(text, 0)) is not None]
    found: list[_Match] = []
    while live:
        best = live[0][0]
        for match, _ in live:  # the leftmost; on a tie, the branch listed first
            if match[0] < best[0]:
                best = match
        found.append(best)
        pos = best[1]
        kept = []
        for match, find in live:
            if match[0] < pos:  # passed: this branch's next match from here on
                if (again := find(text, pos)) is None:
                    continue
                match = again
            kept.append((match, find))
        live = kept
    return found


class Finding(NamedTuple):
    """What the detectors replaced in one cell (one per replaced cell: a NamedTuple, built in a third
    of a frozen dataclass's time)."""

    row: int
    column: int
    kinds: tuple[str, ...]
    original: JsonValue


class Detectors:
    """The enabled detectors over a text: the leftmost-first alternation of their patterns, computed
    branch by branch. Each branch runs only on a text holding the literals it needs and finds its
    matches with its own fast search; at each step the leftmost of the branches' next matches wins
    (on a tie, the branch listed first), as in one alternation, so the result is the alternation's to
    the character (`_disjoint` when no two matches overlap, else `_merged`)."""

    def __init__(self, enabled: Sequence[DetectorName]) -> None:
        self.enabled = tuple(name for name, _, _ in _DETECTORS if name in enabled)
        self._branches = tuple(b for b in _BRANCHES if b.name in self.enabled)
        self._checks = {name: check for name, _, check in _DETECTORS if check is not _always}

    def _matches(self, text: str) -> list[_Match]:
        """The validated matches in `text`, in order: (start, end, kind)."""
        present: dict[tuple[str, ...], bool] = {}

        def holds(group: tuple[str, ...]) -> bool:
            found = present.get(group)
            if found is None:
                found = present[group] = any(literal in text for literal in group)
            return found

        finders = _finders(
            tuple(
                branch
                for branch in self._branches
                if all(holds(group) for group in branch.needs)
                and (branch.gate is None or branch.gate.search(text) is not None)
            )
        )
        if not finders:
            return []
        matches = _disjoint([finder.chain(text) for finder in finders])
        if matches is None:
            matches = _merged(text, finders)
        checks = self._checks
        return [m for m in matches if m[2] not in checks or checks[m[2]](text[m[0] : m[1]])]

    def replace(self, text: str) -> tuple[str, tuple[str, ...]]:
        """`text` with every validated match replaced, and the kinds found."""
        matches = self._matches(text) if self._branches else []
        return _replaced(text, matches, 0), tuple(dict.fromkeys(name for _, _, name in matches))

    def scan(self, rows: list[list[JsonValue]], columns: Sequence[int]) -> list[Finding]:
        """Replace findings in place in `rows` (only the given columns); return what was replaced.

        A column's strings are scanned together (`_replaced_texts`); JSON values and long integers
        one by one."""
        if not self._branches:
            return []
        findings: list[Finding] = []
        for column in columns:
            found: list[Finding] = []
            values = [row[column] for row in rows]
            types = set(map(type, values))  # in C: most columns hold one type, and need no loop
            rows_of: Sequence[int] = range(len(values))
            if types != {str}:
                texts = any(issubclass(kind, str) for kind in types)
                rows_of = [i for i, value in enumerate(values) if isinstance(value, str)] if texts else []
            if len(rows_of) < len(values) and not _scalars_only(types, values):
                for index, value in enumerate(values):
                    if isinstance(value, dict | list) or (
                        isinstance(value, int) and not isinstance(value, bool) and value >= 10**12
                    ):
                        masked, kinds = self._value(str(value) if isinstance(value, int) else value)
                        if kinds:
                            found.append(Finding(index, column, kinds, value))
                            rows[index][column] = masked
            if len(rows_of) < len(values):
                strings: list[str] = [values[index] for index in rows_of]  # type: ignore[misc]
            else:
                strings = values  # type: ignore[assignment]
            in_column: list[Finding] = []
            for position, kinds, masked in self._replaced_texts(strings):
                index = rows_of[position]
                in_column.append(Finding(index, column, kinds, strings[position]))
                rows[index][column] = masked
            findings.extend(
                sorted(found + in_column, key=lambda finding: finding.row) if found else in_column
            )
        return findings

    def _replaced_texts(self, strings: list[str]) -> list[tuple[int, tuple[str, ...], str]]:
        """(position, kinds found, replaced text) of each of `strings` with findings, in order.

        Equal values are scanned once (a value's matches do not depend on its neighbours), the
        distinct ones as one text joined with NUL: no pattern can match NUL, and NUL is to every
        lookaround what the start or end of a string is, so each value's matches are the ones it
        would have alone."""
        unique = list(dict.fromkeys(strings))
        text = _SEPARATOR.join(unique)
        matches = self._matches(text)
        if not matches:
            return []
        starts = list(map(add, accumulate(map(len, unique), initial=0), range(len(unique) + 1)))
        kinds_at: dict[int, tuple[str, ...]] = {}  # the position of each value with matches, in order
        for match in matches:
            position = bisect_right(starts, match[0]) - 1
            kinds = kinds_at.get(position)
            if kinds is None:
                kinds_at[position] = (match[2],)
            elif match[2] not in kinds:
                kinds_at[position] = (*kinds, match[2])
        replaced: list[str] | dict[int, str]
        if text.count(_SEPARATOR) == len(unique) - 1:  # the values, replaced in one pass
            replaced = _replaced(text, matches, 0).split(_SEPARATOR)
        else:  # a value holds NUL itself: alone, it has the same matches
            replaced = {position: self.replace(unique[position])[0] for position in kinds_at}
        if len(unique) == len(strings):
            return [(position, kinds, replaced[position]) for position, kinds in kinds_at.items()]
        hits = {unique[position]: (kinds, replaced[position]) for position, kinds in kinds_at.items()}
        return [(position, *hits[value]) for position, value in enumerate(strings) if value in hits]

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


_SCALARS = frozenset({str, type(None), bool, float})


def _scalars_only(types: set[type], values: list[JsonValue]) -> bool:
    """Whether a column holds no value to scan one by one (a JSON value, an integer of 13 digits or
    more), told from the set of its types and, for ints, their largest: no loop over the values."""
    if types <= _SCALARS:
        return True
    if not types <= _SCALARS | {int}:
        return False
    ints = values if types == {int} else [value for value in values if type(value) is int]
    return max(ints) < 10**12  # type: ignore[type-var]


def _replaced(text: str, matches: list[tuple[int, int, DetectorName]], offset: int) -> str:
    """`text` with each match (offsets into a text where `text` starts at `offset`) replaced."""
    if len(matches) == 1:
        start, end, name = matches[0]
        return f"{text[: start - offset]}[masked:{name}]{text[end - offset :]}"
    parts = []
    last = 0
    for start, end, name in matches:
        parts.append(text[last : start - offset])
        parts.append(f"[masked:{name}]")
        last = end - offset
    parts.append(text[last:])
    return "".join(parts)
