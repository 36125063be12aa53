"""After the rows come back: which output columns carry masked data, the detectors on text values,
and what the audit keeps of the originals.

The rewrite has already masked every value that comes from a masked column; here lineage says
which output columns those are (for the result's notes, `check` and the audit), and the content
detectors scan every other text value (a column passed through unchanged from a masked one is
skipped: it holds mask output only).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mcp_guard.backends.base import ResultSet
from mcp_guard.detectors import Detectors, Finding
from mcp_guard.lineage import ColumnLineage
from mcp_guard.masking import ColumnMask, column_matches
from mcp_guard.rewrite import MaskPlan
from mcp_guard.seal import digest, key_id, seal
from mcp_guard.values import JsonValue


@dataclass(frozen=True, slots=True)
class ColumnNote:
    """What the assistant is told about one output column."""

    name: str
    mask: ColumnMask | None
    sources: tuple[str, ...]
    unresolved: bool
    detected: tuple[str, ...] = ()
    derived: bool = False
    """Computed from masked columns (not passed through): the mask is applied at the source."""

    @property
    def strategy(self) -> str | None:
        if self.mask is None:
            return None
        return "derived" if self.derived else self.mask.strategy

    def as_dict(self) -> dict[str, JsonValue]:
        return {
            "name": self.name,
            "masked": self.mask is not None,
            "strategy": self.strategy,
            "rule": self.mask.rule if self.mask else None,
            "sources": list(self.sources),
            "unresolved": self.unresolved,
            "detected": list(self.detected),
        }


@dataclass(frozen=True, slots=True)
class Protected:
    """One result set after masking: notes per column and what the detectors replaced."""

    notes: tuple[ColumnNote, ...]
    findings: tuple[Finding, ...]

    @property
    def masked(self) -> list[str]:
        return [note.name for note in self.notes if note.mask is not None or note.detected]


def notes_for(
    names: Sequence[str], outputs: list[ColumnLineage] | None, plan: MaskPlan | None
) -> list[ColumnNote]:
    """Per output column: its mask (from lineage; an unanalysable statement counts as all masked)."""
    if outputs is None or len(outputs) != len(names):
        if plan is None or not plan.active:
            return [ColumnNote(name, None, (), True) for name in names]
        unresolved = ColumnMask("redact", "builtin:unresolved-lineage")
        return [ColumnNote(name, unresolved, (), True) for name in names]
    notes = []
    for name, output in zip(names, outputs, strict=True):
        mask = plan.output_mask(output) if plan is not None and plan.active else None
        sources = tuple(sorted(map(str, output.sources)))
        notes.append(ColumnNote(name, mask, sources, output.unresolved, derived=output.direct is None))
    return notes


def protect(
    result: ResultSet,
    outputs: list[ColumnLineage] | None,
    plan: MaskPlan | None,
    detectors: Detectors,
    excluded: tuple[str, ...],
) -> Protected:
    """Scan the result with the detectors (in place) and note every column's masking."""
    names = [column.name for column in result.columns]
    notes = notes_for(names, outputs, plan)
    scanned = []
    for index, note in enumerate(notes):
        output = outputs[index] if outputs is not None and len(outputs) == len(names) else None
        if note.mask is not None and output is not None and output.direct is not None:
            continue  # mask output only
        if note.mask is None and output is not None and output.direct is not None and plan is not None:
            if plan.governed(output.direct):
                continue  # a rule decided this column, and it lets this caller see it clear
        if excluded and output is not None and not output.unresolved and output.sources:
            if all(column_matches(excluded, source.relation, source.column) for source in output.sources):
                continue
        scanned.append(index)
    findings = detectors.scan(result.rows, scanned)
    kinds: dict[int, dict[str, None]] = {}
    for column, found in dict.fromkeys((finding.column, finding.kinds) for finding in findings):
        kinds.setdefault(column, {}).update(dict.fromkeys(found))
    notes = [
        ColumnNote(n.name, n.mask, n.sources, n.unresolved, tuple(kinds.get(i, {})), n.derived)
        for i, n in enumerate(notes)
    ]
    return Protected(tuple(notes), tuple(findings))


def originals_record(
    mode: str,
    key: bytes,
    call_id: str,
    protected: Sequence[Protected],
    raw: Sequence[ResultSet | None],
) -> dict[str, JsonValue]:
    """What the audit keeps of the originals: per statement, the unmasked values of its masked output
    columns (from the same statement run unmasked in the same snapshot, in that run's row order) and
    the cells the detectors changed. As keyed digests, or sealed; never in clear."""
    statements: list[JsonValue] = []
    for result, unmasked in zip(protected, raw, strict=True):
        columns = [i for i, note in enumerate(result.notes) if note.mask is not None]
        entry: dict[str, JsonValue] = {
            "columns": [result.notes[i].name for i in columns],
            "rows": [[row[i] for i in columns] for row in unmasked.rows]
            if unmasked is not None and columns
            else [],
            "detected": [[f.row, result.notes[f.column].name, f.original] for f in result.findings],
        }
        statements.append(entry)
    if mode == "sealed":
        return {"mode": "sealed", **seal(key, call_id, statements)}
    digested: list[JsonValue] = []
    for entry in statements:
        assert isinstance(entry, dict)
        rows = entry["rows"]
        detected = entry["detected"]
        assert isinstance(rows, list) and isinstance(detected, list)
        digested.append(
            {
                "columns": entry["columns"],
                "rows": [[digest(key, value) for value in row] for row in rows if isinstance(row, list)],
                "detected": [
                    [item[0], item[1], digest(key, item[2])] for item in detected if isinstance(item, list)
                ],
            }
        )
    return {"mode": "digest", "algorithm": "HMAC-SHA256", "key_id": key_id(key), "statements": digested}
