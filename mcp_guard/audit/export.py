"""`mcp-guard audit export`: matching calls as JSON lines or CSV, streamed from the store.

Calls are written one by one as the store yields them, so the memory used does not grow with the
log. JSON lines carry everything (`Call.as_dict()`), exactly; CSV carries one row per call with the
columns an auditor filters on in a spreadsheet, and the response text as the model saw it (a cell
that a spreadsheet would run as a formula is prefixed with an apostrophe).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from typing import Any, Literal, TextIO

from mcp_guard.audit.calls import Call, iter_calls
from mcp_guard.store.base import CallFilter, Store

Format = Literal["jsonl", "csv"]

CSV_COLUMNS = (
    "seq",
    "time",
    "call_id",
    "session_id",
    "identity",
    "client",
    "tool",
    "connection",
    "kind",
    "tables",
    "decision",
    "rule",
    "status",
    "duration_ms",
    "sql",
    "reason",
    "params",
    "approval_trail",
    "response_is_error",
    "response_text",
)


_FORMULA = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: object) -> object:
    """A spreadsheet runs a cell that starts like a formula: such text gets a leading apostrophe.

    SQL, reasons and responses come from the assistant, which may be prompt-injected; the JSON lines
    export keeps them exact.
    """
    if isinstance(value, str) and value.startswith(_FORMULA):
        return "'" + value
    return value


def csv_row(data: dict[str, Any]) -> list[Any]:
    response = data.get("response") or {}
    values = {
        **data,
        "tables": " ".join(data.get("tables") or []),
        "params": json.dumps(data["params"], ensure_ascii=False) if data.get("params") else "",
        "approval_trail": json.dumps(data["trail"], ensure_ascii=False) if data.get("trail") else "",
        "response_is_error": bool(response.get("is_error")),
        "response_text": response.get("text", ""),
    }
    return ["" if values.get(column) is None else _cell(values[column]) for column in CSV_COLUMNS]


async def export(
    store: Store,
    flt: CallFilter,
    out: TextIO,
    fmt: Format,
    transform: Callable[[Call], dict[str, Any]] = Call.as_dict,
) -> int:
    """Write every matching call to `out`; returns how many."""
    count = 0
    writer = csv.writer(out) if fmt == "csv" else None
    if writer is not None:
        writer.writerow(CSV_COLUMNS)
    async for call in iter_calls(store, flt):
        data = transform(call)
        if writer is not None:
            writer.writerow(csv_row(data))
        else:
            out.write(json.dumps(data, ensure_ascii=False) + "\n")
        count += 1
    return count
