"""How a held request reads to a reviewer, in the review UI and in `mcp-guard pending`.

Everything shown comes from the assistant (the SQL, its comments, the reason), so nothing may act
on the reviewer's terminal: control characters (an escape sequence could erase or rewrite a line),
bidirectional overrides (which reorder what is displayed) and zero-width characters are shown as
escapes, such as `\x1b` or `\u202e`.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

from mcp_guard.approvals import ApprovalRequest

_HIDDEN = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\xad\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")


def visible(text: str) -> str:
    """`text` with nothing that could act on a terminal or hide itself; line breaks and tabs stay."""

    def shown(match: re.Match[str]) -> str:
        code = ord(match.group())
        return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"

    return _HIDDEN.sub(shown, text.replace("\r\n", "\n"))


def one_line(text: str, width: int) -> str:
    """`text` flattened onto one line of at most `width` characters."""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def seconds_since(moment: str, now: datetime | None = None) -> float:
    return ((now or datetime.now(UTC)) - datetime.fromisoformat(moment)).total_seconds()


def span(seconds: float) -> str:
    """A short human duration: 42s, 3m, 2h05m."""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def classification(request: ApprovalRequest) -> dict[str, Any]:
    found = request.details.get("classification")
    return found if isinstance(found, dict) else {}


def kind(request: ApprovalRequest) -> str:
    return str(classification(request).get("kind", "?"))


def flags(request: ApprovalRequest) -> list[str]:
    return [str(flag) for flag in classification(request).get("flags", [])]


def tables(request: ApprovalRequest) -> list[str]:
    return [str(table) for table in classification(request).get("tables", [])]


def estimate(request: ApprovalRequest) -> str:
    """Rows each write is estimated to change; '-' for statements that are no writes."""
    estimates = request.details.get("estimated_rows")
    statements = classification(request).get("statements", [])
    if not isinstance(estimates, list):
        return "-"
    shown = []
    for index, value in enumerate(estimates):
        write = index < len(statements) and statements[index].get("kind") == "write"
        shown.append(str(value) if value is not None else ("unknown" if write else "-"))
    return shown[0] if len(shown) == 1 else ", ".join(shown)


def sql(request: ApprovalRequest) -> str:
    return visible(";\n".join(text.strip() for text in request.statements))


def votes(request: ApprovalRequest) -> str:
    if not request.votes:
        return "none yet"
    return "; ".join(
        f"{v.reviewer} {'approved' if v.decision == 'approve' else 'denied'}"
        + (f" ({v.reason})" if v.reason else "")
        for v in request.votes
    )


def decided_by(request: ApprovalRequest) -> str:
    """Who decided: the voters, or 'expired' when nobody did."""
    voters = [v.reviewer for v in request.votes if (v.decision == "deny") == (request.state == "denied")]
    return ", ".join(voters) or "-"


def facts(request: ApprovalRequest) -> list[tuple[str, str]]:
    """(label, value) lines of everything a reviewer weighs besides the SQL."""
    expires = -seconds_since(request.expires_at)
    facts = [
        ("request", request.id),
        ("state", str(request.state)),
        ("requester", request.requester),
        ("connection", request.connection),
        ("reason", request.reason),
        ("rule", f"{request.rule}: {request.details.get('policy', '')}"),
        ("needs", "; ".join(r.describe() for r in request.requirements)),
        ("kind", kind(request)),
        ("flags", ", ".join(flags(request)) or "-"),
        ("tables", ", ".join(tables(request)) or "-"),
        ("row estimate", estimate(request)),
        ("params", ", ".join(repr(p) for p in request.params) or "-"),
        ("age", span(seconds_since(request.created_at))),
        ("expires", f"in {span(expires)}" if expires > 0 else "expired"),
        ("votes", votes(request)),
    ]
    return [(label, visible(value)) for label, value in facts]
