"""Which prompt of the user led to a call: records a client hook writes, and how calls are linked to them.

Claude Code runs `mcp-guard hook claude-code` with a JSON object on stdin:

- on `UserPromptSubmit` it records a PROMPT entry: the prompt, Claude Code's session id, its
  working and project directories;
- on `PreToolUse` for an MCP tool it records a TOOL_USE entry: the tool, a fingerprint of the
  exact arguments Claude Code is about to send, and Claude Code's session id.

The MCP server never learns Claude Code's session id, so the link is made when the record is
read, from facts all in the chain, by `link_prompts` (an auditor can redo it by hand):

1. by tool call (exact): the request whose tool and arguments have the fingerprint of a TOOL_USE
   record written just before it (within `TOOL_USE_WINDOW`) is the call Claude Code announced;
   its prompt is the latest prompt of that Claude Code session recorded before the announcement;
2. by session: a call of the same MCP session that no announcement matches (the PreToolUse hook
   is not installed for it) takes the Claude Code session of the nearest matched call before it
   (after it, when there is none before), and that session's latest prompt before the call;
3. by project directory and time (weak): when no call of the MCP session was matched at all, the
   latest prompt recorded in the directory the server runs in, within `prompt_window` seconds
   before the call. Two Claude Code sessions in one directory cannot be told apart this way; the
   method is always shown with the link.

Process trees were considered (the server and the hook are both children of the Claude Code
process) and rejected: they need /proc or `ps`, break under wrappers (uvx, docker, a shell
script), and two Claude Code processes started from one shell share ancestors. The fingerprint
needs nothing but the data, and survives `/clear` and `/resume`.
"""

from __future__ import annotations

import bisect
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from mcp_guard.audit.calls import Call
from mcp_guard.errors import UsageError
from mcp_guard.store.base import AuditEvent, AuditFilter, AuditRecord, EventType, Store
from mcp_guard.values import JsonValue

SESSION_PREFIX = "claude-code:"
"""The session_id of the records a Claude Code hook writes: `claude-code:<its session id>`."""

TOOL_USE_WINDOW = 120.0
"""Seconds between Claude Code announcing a tool call and the server receiving it, at most."""

CLOCK_SKEW = 2.0
"""Seconds an announcement may appear to follow the request (clocks of one host, rounding)."""

Method = Literal["tool call", "session", "project directory and time"]


def fingerprint(tool: str, arguments: Mapping[str, Any]) -> str:
    """SHA-256 of the tool and its arguments, absent and empty values left out on both sides.

    The server records every argument of a tool (None or [] for the ones not sent), the client
    only those it sent; both sides reduce to the same object.
    """
    sent = {key: value for key, value in arguments.items() if value is not None and value != []}
    text = json.dumps([tool, sent], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


# the hook ---------------------------------------------------------------------------------------


def _text(payload: Mapping[str, Any], name: str) -> str | None:
    value = payload.get(name)
    return value if isinstance(value, str) and value else None


def hook_event(payload: object, *, identity: str, cap: int, project_dir: str | None) -> AuditEvent | None:
    """The entry a Claude Code hook payload becomes; None for events that say nothing about prompts.

    UsageError names what is wrong with a payload that is not one.
    """
    if not isinstance(payload, dict):
        raise UsageError("the hook input must be a JSON object (Claude Code sends one on stdin)")
    event = _text(payload, "hook_event_name")
    session = _text(payload, "session_id")
    if event is None or session is None:
        raise UsageError("the hook input has no hook_event_name or session_id: is this a Claude Code hook?")
    common: dict[str, JsonValue] = {
        "source": "claude-code",
        "claude_session_id": session,
        "cwd": _text(payload, "cwd"),
        "project_dir": project_dir,
        "prompt_id": _text(payload, "prompt_id"),
    }
    if event == "UserPromptSubmit":
        prompt = payload.get("prompt")
        if not isinstance(prompt, str):
            raise UsageError("a UserPromptSubmit hook input must carry the prompt as text")
        detail = {
            **common,
            "prompt": prompt[:cap],
            "prompt_truncated": len(prompt) > cap,
            "transcript_path": _text(payload, "transcript_path"),
        }
        return AuditEvent(EventType.PROMPT, SESSION_PREFIX + session, identity, detail=detail)
    if event == "PreToolUse":
        name = _text(payload, "tool_name") or ""
        parts = name.split("__")
        if len(parts) < 3 or parts[0] != "mcp":
            return None  # not an MCP tool: nothing the guard will see
        arguments = payload.get("tool_input")
        tool = parts[-1]
        detail = {
            **common,
            "server": "__".join(parts[1:-1]),
            "tool": tool,
            "fingerprint": fingerprint(tool, arguments if isinstance(arguments, dict) else {}),
            "tool_use_id": _text(payload, "tool_use_id"),
        }
        return AuditEvent(EventType.TOOL_USE, SESSION_PREFIX + session, identity, tool=tool, detail=detail)
    return None


# linking ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PromptLink:
    """The prompt a call is attributed to, and how strongly (`method`)."""

    prompt: AuditRecord
    method: Method
    announced: AuditRecord | None = None
    """The TOOL_USE record that matched the call, for the `tool call` method."""

    @property
    def text(self) -> str:
        value = self.prompt.event.detail.get("prompt")
        return value if isinstance(value, str) else ""

    @property
    def claude_session_id(self) -> str:
        return self.prompt.event.session_id.removeprefix(SESSION_PREFIX)

    def as_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "truncated": bool(self.prompt.event.detail.get("prompt_truncated")),
            "time": self.prompt.event.ts,
            "seq": self.prompt.seq,
            "claude_session_id": self.claude_session_id,
            "method": self.method,
            "tool_use_seq": self.announced.seq if self.announced else None,
        }


def _shift(ts: str, seconds: float) -> str:
    return (datetime.fromisoformat(ts) + timedelta(seconds=seconds)).isoformat(timespec="microseconds")


def _seconds(later: str, earlier: str) -> float:
    return (datetime.fromisoformat(later) - datetime.fromisoformat(earlier)).total_seconds()


def _latest_before(prompts: Sequence[AuditRecord], ts: str) -> AuditRecord | None:
    """The newest of `prompts` (oldest first) recorded at or before `ts`."""
    index = bisect.bisect_right([p.event.ts for p in prompts], ts)
    return prompts[index - 1] if index else None


class _Prompts:
    """Prompts read from the store once per Claude Code session."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._by_session: dict[str, list[AuditRecord]] = {}

    async def of(self, claude_session: str) -> list[AuditRecord]:
        if claude_session not in self._by_session:
            flt = AuditFilter(session_id=SESSION_PREFIX + claude_session, type=EventType.PROMPT)
            self._by_session[claude_session] = await self.store.query(flt)
        return self._by_session[claude_session]

    async def for_announcement(self, announced: AuditRecord) -> AuditRecord | None:
        prompts = await self.of(announced.event.session_id.removeprefix(SESSION_PREFIX))
        prompt_id = announced.event.detail.get("prompt_id")
        if prompt_id:
            same = [p for p in prompts if p.event.detail.get("prompt_id") == prompt_id]
            if same:
                return same[-1]
        return _latest_before(prompts, announced.event.ts)


async def link_prompts(
    store: Store, calls: Sequence[Call], *, start: AuditRecord | None, window: float
) -> dict[str, PromptLink]:
    """The prompt each call of ONE MCP session is attributed to, by call id; calls with none are left out."""
    if not calls:
        return {}
    first, last = calls[0].ts, calls[-1].ts
    announced = await store.query(
        AuditFilter(
            type=EventType.TOOL_USE, since=_shift(first, -TOOL_USE_WINDOW), until=_shift(last, CLOCK_SKEW)
        )
    )
    matched = _match_announcements(calls, announced)
    prompts = _Prompts(store)
    links: dict[str, PromptLink] = {}
    for call in calls:
        record = matched.get(call.call_id)
        if record is not None:
            prompt = await prompts.for_announcement(record)
            if prompt is not None:
                links[call.call_id] = PromptLink(prompt, "tool call", record)
    if matched:
        await _link_by_session(calls, matched, prompts, links)
    elif start is not None:
        await _link_by_project(store, calls, start, window, links)
    return links


def _match_announcements(calls: Sequence[Call], announced: Iterable[AuditRecord]) -> dict[str, AuditRecord]:
    """Each call to the announcement with its fingerprint nearest before it (each used once)."""
    by_print: dict[str, list[AuditRecord]] = {}
    for record in announced:
        print_ = record.event.detail.get("fingerprint")
        if isinstance(print_, str):
            by_print.setdefault(print_, []).append(record)
    used: set[int] = set()
    matched: dict[str, AuditRecord] = {}
    for call in calls:
        candidates = [
            record
            for record in by_print.get(fingerprint(call.tool, call.arguments), [])
            if record.seq not in used and -CLOCK_SKEW <= _seconds(call.ts, record.event.ts) <= TOOL_USE_WINDOW
        ]
        if not candidates:
            continue
        before = [r for r in candidates if r.seq < call.seq]
        chosen = before[-1] if before else candidates[0]
        used.add(chosen.seq)
        matched[call.call_id] = chosen
    return matched


async def _link_by_session(
    calls: Sequence[Call], matched: Mapping[str, AuditRecord], prompts: _Prompts, links: dict[str, PromptLink]
) -> None:
    anchors = [(index, matched[call.call_id]) for index, call in enumerate(calls) if call.call_id in matched]
    for index, call in enumerate(calls):
        if call.call_id in links:
            continue
        before = [record for position, record in anchors if position < index]
        anchor = before[-1] if before else anchors[0][1]
        claude_session = anchor.event.session_id.removeprefix(SESSION_PREFIX)
        prompt = _latest_before(await prompts.of(claude_session), call.ts)
        if prompt is not None:
            links[call.call_id] = PromptLink(prompt, "session")


async def _link_by_project(
    store: Store, calls: Sequence[Call], start: AuditRecord, window: float, links: dict[str, PromptLink]
) -> None:
    directory = start.event.detail.get("cwd")
    if not isinstance(directory, str):
        return
    nearby = await store.query(
        AuditFilter(
            type=EventType.PROMPT, since=_shift(calls[0].ts, -window), until=_shift(calls[-1].ts, 1e-6)
        )
    )
    here = [p for p in nearby if directory in (p.event.detail.get("project_dir"), p.event.detail.get("cwd"))]
    for call in calls:
        prompt = _latest_before(here, call.ts)
        if prompt is not None and _seconds(call.ts, prompt.event.ts) <= window:
            links[call.call_id] = PromptLink(prompt, "project directory and time")
