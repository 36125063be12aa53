"""What the assistant is shown: a compact text table for the model to read, the same data as structure.

The guard records exactly this in the audit, so what an auditor replays is what the model saw.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mcp_guard.backends.base import Limits, ResultSet, WriteResult
from mcp_guard.values import JsonValue

if TYPE_CHECKING:
    from mcp_guard.protect import Protected

_CELL_WIDTH = 80


@dataclass(frozen=True, slots=True)
class ToolResult:
    call_id: str
    text: str
    structured: dict[str, JsonValue] | None = None
    is_error: bool = False


def error_result(message: str, call_id: str) -> ToolResult:
    return ToolResult(call_id, f"{message}\n(call {call_id} was recorded in the audit log)", is_error=True)


_ESCAPES = str.maketrans({"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"})


def _cell(value: JsonValue) -> str:
    """One value as the text table shows it: on one line, at most _CELL_WIDTH characters."""
    kind = type(value)
    if kind is str:
        text: str = value  # type: ignore[assignment]
        if "\\" in text or "\n" in text or "\r" in text or "\t" in text:
            text = text.translate(_ESCAPES)
    elif kind is int or kind is float:
        text = repr(value)
    elif value is None:
        text = "NULL"
    elif kind is bool:
        text = "true" if value else "false"
    else:
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return text if len(text) <= _CELL_WIDTH else text[: _CELL_WIDTH - 1] + "…"


def text_table(names: Sequence[str], rows: Sequence[Sequence[JsonValue]]) -> str:
    """A compact table: a header, a rule, one line per row, columns padded to their widest cell."""
    columns = (
        [list(map(_cell, column)) for column in zip(*rows, strict=True)] if rows else [[] for _ in names]
    )
    widths = [
        max(len(name), max(map(len, column), default=0)) for name, column in zip(names, columns, strict=True)
    ]
    # One format call per line: padding and joining happen in C, not once per cell in Python.
    line = " | ".join(f"{{:<{width}}}" for width in widths)
    lines = [line.format(*names).rstrip(), "-+-".join("-" * width for width in widths)]
    lines.extend(line.format(*cells).rstrip() for cells in zip(*columns, strict=True))
    return "\n".join(lines)


def _footer(result: ResultSet, limits: Limits) -> str:
    count = f"({_plural(result.row_count, 'row')}"
    if result.truncated_by == "rows":
        return f"{count}; truncated at the row limit of {limits.row_limit}: narrow the query for the rest)"
    if result.truncated_by == "bytes":
        return f"{count}; truncated at the result size limit of {limits.byte_limit} bytes)"
    return count + ")"


def result_set_data(
    result: ResultSet, limits: Limits, masking: Protected | None = None
) -> dict[str, JsonValue]:
    columns: list[JsonValue] = [{"name": c.name, "type": c.type} for c in result.columns]
    data: dict[str, JsonValue] = {
        "columns": columns,
        "rows": result.rows,
        "row_count": result.row_count,
        "truncated": result.truncated,
        "truncated_by": result.truncated_by,
        "row_limit": limits.row_limit,
    }
    if masking is not None:
        for column, note in zip(columns, masking.notes, strict=False):
            assert isinstance(column, dict)
            column["masked"] = note.strategy
            column["detected"] = list(note.detected)
        data["masked_columns"] = list(masking.masked)
    return data


def _masking_line(masking: Protected | None) -> str:
    """One line telling the model which columns it sees masked, so it does not mistake them for data."""
    if masking is None or not masking.masked:
        return ""
    parts = []
    for note in masking.notes:
        if note.mask is not None:
            parts.append(f"{note.name} ({note.strategy})")
        elif note.detected:
            parts.append(f"{note.name} (detected: {', '.join(note.detected)})")
    return "\nmasked: " + ", ".join(parts)


def query_result(
    call_id: str,
    connection: str,
    results: Sequence[ResultSet],
    limits: Limits,
    masking: Sequence[Protected] | None = None,
) -> ToolResult:
    """The last statement's rows at the top level; every statement's under `results` when several ran."""
    protected: Sequence[Protected | None] = masking if masking is not None else [None] * len(results)
    blocks = []
    for index, (result, notes) in enumerate(zip(results, protected, strict=True)):
        head = f"-- statement {index + 1} of {len(results)}\n" if len(results) > 1 else ""
        table = (
            text_table([c.name for c in result.columns], result.rows) if result.columns else "(no columns)"
        )
        blocks.append(f"{head}{table}\n{_footer(result, limits)}{_masking_line(notes)}")
    structured: dict[str, JsonValue] = {"call_id": call_id, "connection": connection}
    structured.update(result_set_data(results[-1], limits, protected[-1]))
    if len(results) > 1:
        structured["results"] = [
            result_set_data(r, limits, p) for r, p in zip(results, protected, strict=True)
        ]
    return ToolResult(call_id, "\n\n".join(blocks), structured)


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def execute_result(
    call_id: str, connection: str, results: Sequence[WriteResult], limits: Limits
) -> ToolResult:
    affected = sum(r.rows_affected or 0 for r in results)
    text = "\n".join(r.status for r in results)
    text += f"\nCommitted: {_plural(len(results), 'statement')}, {_plural(affected, 'row')} affected."
    statements: list[JsonValue] = []
    for r in results:
        entry: dict[str, JsonValue] = {"status": r.status, "rows_affected": r.rows_affected}
        if r.returned is not None:
            entry["returned"] = result_set_data(r.returned, limits)
            text += "\n\n" + text_table([c.name for c in r.returned.columns], r.returned.rows)
            text += "\n" + _footer(r.returned, limits)
        statements.append(entry)
    structured: dict[str, JsonValue] = {
        "call_id": call_id,
        "connection": connection,
        "rows_affected": affected,
        "statements": statements,
    }
    return ToolResult(call_id, text, structured)


def held_result(
    call_id: str,
    *,
    request_id: str,
    connection: str,
    rule: str,
    needs: Sequence[str],
    progress: str,
    expires_at: str,
    waited_s: float | None,
) -> ToolResult:
    """A held statement still waiting for reviewers: not an error, and plainly not executed."""
    waited = f"Waited {waited_s:g} s without a decision. " if waited_s is not None else ""
    text = (
        f"HELD FOR APPROVAL, NOT EXECUTED. Request {request_id} on {connection} needs "
        f"{'; '.join(needs)} (rule {rule!r}); so far: {progress or 'no votes'}. {waited}"
        f"It expires at {expires_at}.\n"
        f"Tell the user: the statement waits for a reviewer's decision as request {request_id}; a reviewer "
        f"decides it in `mcp-guard review` or with `mcp-guard approve {request_id}` / "
        f"`mcp-guard deny {request_id} --reason ...`. You cannot approve it yourself.\n"
        f'When the user says it is decided, call approval_status(request_id="{request_id}"): once approved, '
        "it runs the stored statement exactly once. Do not send the statement again."
    )
    structured: dict[str, JsonValue] = {
        "call_id": call_id,
        "connection": connection,
        "request_id": request_id,
        "state": "pending",
        "executed": False,
        "needs": list(needs),
        "progress": progress,
        "expires_at": expires_at,
    }
    return ToolResult(call_id, text, structured)
