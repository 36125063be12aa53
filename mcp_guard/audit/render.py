"""How calls look to an auditor: in the terminal (rich) and as a self-contained HTML page.

Everything is rendered from the data form (`Call.as_dict()` plus `prompt`), never from live
objects, so what a page shows is exactly what `--json` prints, and a transform of that data (such
as unsealing masked originals) changes every rendering at once. Recorded text is always shown as
text: nothing from the log is interpreted as markup.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import SqlLexer
from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.syntax import Syntax
from rich.table import Table
from rich.text import Text

COLOURS = {"allow": "green", "deny": "red", "approve": "yellow"}

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def safe(value: object) -> str:
    """Recorded text as the terminal may print it: control characters (ESC sequences could clear or
    rewrite the auditor's screen) are shown as \\xNN; line feeds and tabs stay."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(value))


def _t(value: object, style: str = "") -> Text:
    return Text(safe(value), style=style)


def when(ts: object) -> str:
    """2026-11-26 18:28:18.785 (UTC) from an ISO timestamp."""
    return str(ts or "")[:23].replace("T", " ")


def _decision_text(call: Mapping[str, Any]) -> Text:
    decision = call.get("decision") or "-"
    text = _t(decision, COLOURS.get(str(decision), "yellow"))
    if call.get("rule"):
        text.append(" by rule ").append(safe(call["rule"]), style="bold")
    if call.get("decision_reason"):
        text.append(f": {safe(call['decision_reason'])}")
    return text


def _classification_text(call: Mapping[str, Any]) -> Text | None:
    classification = call.get("classification")
    if not isinstance(classification, dict):
        return None
    text = _t(classification.get("kind", "?"), "bold")
    tables = ", ".join(map(str, classification.get("tables") or [])) or "-"
    flags = ", ".join(map(str, classification.get("flags") or [])) or "-"
    text.append(safe(f" · tables {tables} · flags {flags}"))
    return text


def _status_text(call: Mapping[str, Any]) -> Text:
    status = str(call.get("status"))
    text = _t(status, "green" if status == "ok" else "yellow")
    if call.get("duration_ms") is not None:
        text.append(safe(f" in {call['duration_ms']} ms"))
    result = call.get("result") or {}
    if result:
        text.append(safe(" · " + ", ".join(f"{k} {json.dumps(v)}" for k, v in result.items())))
    return text


def prompt_panel(prompt: Mapping[str, Any]) -> Panel:
    title = _t(f"prompt {when(prompt.get('time'))} · linked by {prompt.get('method')}")
    body = _t(prompt.get("text", ""))
    if prompt.get("truncated"):
        body.append("\n(cut at the response cap)", style="dim")
    return Panel(body, title=title, title_align="left", border_style="cyan")


def response_panel(response: Mapping[str, Any]) -> Panel:
    body = _t(response.get("text", ""))
    notes = []
    if response.get("text_truncated"):
        notes.append("the record keeps the first characters only (audit.response_cap)")
    if "structured" in response:
        notes.append("structured content also recorded: see --json")
    if response.get("structured_omitted"):
        notes.append("structured content was larger than the cap and is not recorded")
    if notes:
        body.append("\n(" + "; ".join(notes) + ")", style="dim")
    style = "red" if response.get("is_error") else "blue"
    return Panel(body, title="response as the model saw it", title_align="left", border_style=style)


def call_view(call: Mapping[str, Any], number: int | None = None, *, detailed: bool = False) -> Group:
    """One call: who, when, what SQL and why, how it was classified and decided, the trail, the answer."""
    head = Text()
    if number is not None:
        head.append(f"#{number} ", style="bold")
    head.append(safe(when(call.get("time"))) + "  ")
    head.append(safe(call.get("tool")), style="bold")
    if call.get("connection"):
        head.append(safe(f" @{call['connection']}"))
    head.append(safe(f"  {call.get('identity')}  call {call.get('call_id')}"), style="dim")
    parts: list[RenderableType] = [head]
    if call.get("sql"):
        parts.append(Syntax(safe(call["sql"]), "sql", theme="ansi_dark", word_wrap=True, padding=(0, 2)))
    elif call.get("arguments"):
        parts.append(Text("  arguments: " + json.dumps(call["arguments"], ensure_ascii=False)))
    if call.get("params"):
        parts.append(Text("  params: " + json.dumps(call["params"], ensure_ascii=False)))
    if call.get("reason"):
        parts.append(Text("  reason: ", style="bold").append(safe(call["reason"]), style="italic"))
    classification = _classification_text(call)
    if classification is not None:
        parts.append(Text("  classified: ").append(classification))
    parts.append(Text("  decision: ").append(_decision_text(call)))
    for entry in call.get("trail") or []:
        line = _t(f"  {entry.get('type')} ", "magenta")
        line.append(safe(f"{when(entry.get('time'))} by {entry.get('identity')}"))
        if entry.get("decision"):
            line.append(safe(f" · {entry['decision']}"))
        line.append(" " + json.dumps(entry.get("detail"), ensure_ascii=False), style="dim")
        parts.append(line)
    parts.append(Text("  outcome: ").append(_status_text(call)))
    if detailed:
        parts.extend(_details(call))
    parts.append(response_panel(call.get("response") or {}))
    return Group(*parts)


def _details(call: Mapping[str, Any]) -> list[RenderableType]:
    shown: list[RenderableType] = []
    classification = call.get("classification")
    statements = classification.get("statements") if isinstance(classification, dict) else None
    if statements:
        table = Table(title="statements", title_justify="left", expand=False)
        for column in ("#", "kind", "operation", "tables", "written", "flags"):
            table.add_column(column)
        for index, statement in enumerate(statements, 1):
            table.add_row(
                str(index),
                _t(statement.get("kind")),
                _t(statement.get("operation")),
                _t(", ".join(map(str, statement.get("tables") or []))),
                _t(", ".join(map(str, statement.get("written_tables") or []))),
                _t(", ".join(map(str, statement.get("flags") or []))),
            )
        shown.append(table)
    entries = Table(title="entries in the chain", title_justify="left", expand=False)
    entries.add_column("seq")
    entries.add_column("type")
    entries.add_column("hash", overflow="fold")
    for entry in call.get("entries") or []:
        entries.add_row(str(entry["seq"]), _t(entry["type"]), _t(entry["hash"]))
    shown.append(entries)
    return shown


def session_view(session: Mapping[str, Any], calls: int | None = None) -> Panel:
    body = Text()
    body.append("identity ").append(safe(session.get("identity")), style="bold")
    body.append(safe(f" · client {session.get('client') or 'unknown'} · {session.get('transport') or '?'}"))
    if session.get("host"):
        body.append(safe(f" · host {session['host']} pid {session.get('pid')}"))
    if session.get("cwd"):
        body.append(safe(f"\nworking directory {session['cwd']}"))
    body.append(f"\nstarted {when(session.get('started')) or 'not recorded'}")
    body.append(
        f" · ended {when(session.get('ended')) or 'not recorded (still running, or stopped abruptly)'}"
    )
    if calls is not None:
        body.append(f" · {calls} call(s)")
    title = _t(f"session {session.get('session_id')}")
    return Panel(body, title=title, title_align="left", border_style="bold")


def verification_text(verification: Mapping[str, Any]) -> Text:
    if verification.get("ok"):
        text = Text("audit log verified: ", style="green")
        text.append(safe(f"{verification['entries']} entries, head {verification['head_hash']}"))
        if verification.get("latest_checkpoint"):
            text.append(" · extends its latest signed checkpoint")
        return text
    text = Text("AUDIT LOG DOES NOT VERIFY: ", style="bold red")
    return text.append(safe("; ".join(map(str, verification.get("problems") or []))))


# HTML -------------------------------------------------------------------------------------------

_CSS = """
body{font:15px/1.45 system-ui,sans-serif;max-width:70em;margin:2em auto;padding:0 1em;color:#1d1d1f}
h1{font-size:1.4em}.meta{color:#555}
.call{border:1px solid #ccc;border-radius:6px;margin:1.2em 0;padding:.8em 1em}
.head{font-weight:600}.dim{color:#777;font-weight:400}.allow{color:#137333}.deny{color:#b3261e}
.approve,.other{color:#9a6700}pre{white-space:pre-wrap;word-break:break-word;background:#f6f8fa;padding:.6em;
border-radius:4px;margin:.4em 0}.prompt{border-left:4px solid #0a7ea4;padding:.3em .8em;background:#eef7fb}
.error pre.response{background:#fdecea}.trail{color:#6f42c1}.ok{color:#137333}
.bad{color:#b3261e;font-weight:600}
table{border-collapse:collapse}td{padding:.1em .6em .1em 0;vertical-align:top}
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _sql_html(sql: str) -> str:
    return highlight(sql, SqlLexer(), HtmlFormatter(noclasses=True, nobackground=True, style="friendly"))


def _call_html(call: Mapping[str, Any], number: int) -> str:
    decision = str(call.get("decision") or "-")
    rows = []
    if call.get("reason"):
        rows.append(("reason", f"<em>{_e(call['reason'])}</em>"))
    if call.get("params"):
        rows.append(("params", _e(json.dumps(call["params"], ensure_ascii=False))))
    classification = call.get("classification")
    if isinstance(classification, dict):
        rows.append(
            (
                "classified",
                f"<b>{_e(classification.get('kind'))}</b> · tables "
                f"{_e(', '.join(map(str, classification.get('tables') or [])) or '-')} · flags "
                f"{_e(', '.join(map(str, classification.get('flags') or [])) or '-')}",
            )
        )
    verdict = f'<span class="{_e(decision if decision in COLOURS else "other")}">{_e(decision)}</span>'
    if call.get("rule"):
        verdict += f" by rule <b>{_e(call['rule'])}</b>"
    if call.get("decision_reason"):
        verdict += f": {_e(call['decision_reason'])}"
    rows.append(("decision", verdict))
    for entry in call.get("trail") or []:
        rows.append(
            (
                f'<span class="trail">{_e(entry.get("type"))}</span>',
                f"{_e(when(entry.get('time')))} by {_e(entry.get('identity'))} "
                f"<code>{_e(json.dumps(entry.get('detail'), ensure_ascii=False))}</code>",
            )
        )
    duration = f" in {_e(call['duration_ms'])} ms" if call.get("duration_ms") is not None else ""
    result = ", ".join(f"{k} {json.dumps(v)}" for k, v in (call.get("result") or {}).items())
    rows.append(("outcome", f"{_e(call.get('status'))}{duration}" + (f" · {_e(result)}" if result else "")))
    response = call.get("response") or {}
    structured = ""
    if "structured" in response:
        body = json.dumps(response["structured"], indent=2, ensure_ascii=False)
        structured = f"<details><summary>structured content</summary><pre>{_e(body)}</pre></details>"
    if call.get("sql"):
        what = _sql_html(str(call["sql"]))
    else:
        what = f"<pre>{_e(json.dumps(call.get('arguments') or {}, ensure_ascii=False))}</pre>"
    table = "".join(f"<tr><td>{label}</td><td>{value}</td></tr>" for label, value in rows)
    error = " error" if response.get("is_error") else ""
    cut = " (cut at the cap)" if response.get("text_truncated") else ""
    return (
        f'<section class="call{error}" id="call-{_e(call.get("call_id"))}">'
        f'<div class="head">#{number} {_e(when(call.get("time")))} {_e(call.get("tool"))}'
        f"{' @' + _e(call['connection']) if call.get('connection') else ''} "
        f'<span class="dim">{_e(call.get("identity"))} · call {_e(call.get("call_id"))}</span></div>'
        f"{what}<table>{table}</table>"
        f"<div>response as the model saw it{cut}:</div>"
        f'<pre class="response">{_e(response.get("text", ""))}</pre>{structured}</section>'
    )


def html_page(replay: Mapping[str, Any]) -> str:
    """A self-contained page (inline styles, no scripts or links out) with the replay's data embedded."""
    session = replay.get("session") or {}
    calls: Sequence[Mapping[str, Any]] = replay.get("calls") or []
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        f"<title>mcp-guard session {_e(session.get('session_id'))}</title><style>{_CSS}</style></head><body>",
        f"<h1>mcp-guard session {_e(session.get('session_id'))}</h1>",
        f'<p class="meta">identity <b>{_e(session.get("identity"))}</b> · client '
        f"{_e(session.get('client') or 'unknown')} · started {_e(when(session.get('started')) or '-')} · "
        f"ended {_e(when(session.get('ended')) or 'not recorded')} · {len(calls)} call(s) · "
        f"working directory {_e(session.get('cwd') or '-')}</p>",
    ]
    verification = replay.get("verification")
    if isinstance(verification, dict):
        if verification.get("ok"):
            parts.append(
                f'<p class="ok">Audit log verified: {_e(verification["entries"])} entries, head '
                f"<code>{_e(verification['head_hash'])}</code>.</p>"
            )
            if verification.get("latest_checkpoint"):
                parts.append(f"<pre>{_e(verification['latest_checkpoint'])}</pre>")
        else:
            problems = "".join(f"<li>{_e(p)}</li>" for p in verification.get("problems") or [])
            parts.append(f'<p class="bad">The audit log does not verify:</p><ul>{problems}</ul>')
    else:
        parts.append(
            '<p class="meta">Not verified in this report: run <code>mcp-guard audit verify</code>.</p>'
        )
    shown_prompt = None
    for number, call in enumerate(calls, 1):
        prompt = call.get("prompt")
        if isinstance(prompt, dict) and prompt.get("seq") != shown_prompt:
            shown_prompt = prompt.get("seq")
            parts.append(
                f'<div class="prompt"><div class="dim">prompt {_e(when(prompt.get("time")))} · linked by '
                f"{_e(prompt.get('method'))}</div><pre>{_e(prompt.get('text'))}</pre></div>"
            )
        parts.append(_call_html(call, number))
    # inside <script>, only JSON's own escapes: no "<" can end the element or open a comment
    data = json.dumps(replay, ensure_ascii=False).replace("<", "\\u003c").replace(">", "\\u003e")
    parts.append(f'<script type="application/json" id="replay-data">{data}</script></body></html>')
    return "".join(parts)
