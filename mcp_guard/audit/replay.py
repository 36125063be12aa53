"""`mcp-guard replay SESSION`: a session played back as it happened, from the audit log alone.

The replay is built once as data (`load_replay`): the session's start and end, every call in
order with the prompt it is linked to, and optionally the log's verification. The terminal view,
`--json` and `--html` all render that same data.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.rule import Rule

from mcp_guard.audit.calls import Call, iter_calls
from mcp_guard.audit.prompts import PromptLink, link_prompts
from mcp_guard.audit.render import call_view, prompt_panel, session_view, verification_text
from mcp_guard.errors import AuditError
from mcp_guard.store.base import AuditFilter, AuditRecord, CallFilter, EventType, Store


@dataclass(frozen=True, slots=True)
class Session:
    session_id: str
    start: AuditRecord | None
    end: AuditRecord | None

    def as_dict(self) -> dict[str, Any]:
        detail = self.start.event.detail if self.start else {}
        first = self.start or self.end
        return {
            "session_id": self.session_id,
            "identity": first.event.identity if first else None,
            "client": detail.get("client"),
            "transport": detail.get("transport"),
            "server": detail.get("server"),
            "host": detail.get("host"),
            "pid": detail.get("pid"),
            "cwd": detail.get("cwd"),
            "started": self.start.event.ts if self.start else None,
            "ended": self.end.event.ts if self.end else None,
            "ended_how": self.end.event.detail.get("how") if self.end else None,
            "start_seq": self.start.seq if self.start else None,
            "end_seq": self.end.seq if self.end else None,
        }


async def resolve_session(store: Store, ident: str) -> str:
    """A session id from itself, a unique prefix of 8 characters or more, or `latest`."""
    text = ident.strip()
    if text == "latest":
        found = await store.session_ids("", limit=1)
        if not found:
            raise AuditError("the audit log holds no session yet")
        return found[0]
    if len(text) < 8:
        raise AuditError(f"session id {text!r} is too short: give 8 characters or more, or `latest`")
    found = await store.session_ids(text, limit=2)
    if not found:
        raise AuditError(f"no session whose id starts with {text!r} (`mcp-guard audit sessions` lists them)")
    if len(found) > 1:
        raise AuditError(f"{text!r} starts more than one session id ({', '.join(found)}); give more of it")
    return found[0]


async def load_session(store: Store, session_id: str) -> Session:
    records = await store.query(AuditFilter(session_id=session_id, type=EventType.SESSION_START, limit=1))
    ends = await store.query(AuditFilter(session_id=session_id, type=EventType.SESSION_END, limit=1))
    return Session(session_id, records[0] if records else None, ends[0] if ends else None)


async def session_calls(
    store: Store, session: Session, window: float
) -> tuple[list[Call], dict[str, PromptLink]]:
    calls = [call async for call in iter_calls(store, CallFilter(session_id=session.session_id))]
    return calls, await link_prompts(store, calls, start=session.start, window=window)


def call_data(call: Call, link: PromptLink | None) -> dict[str, Any]:
    return {**call.as_dict(), "prompt": link.as_dict() if link else None}


async def load_replay(store: Store, ident: str, *, window: float) -> dict[str, Any]:
    """The replay as data: {"session": ..., "calls": [...]}."""
    session = await load_session(store, await resolve_session(store, ident))
    calls, links = await session_calls(store, session, window)
    if session.start is None and not calls:
        raise AuditError(f"session {session.session_id} has no record in the audit log")
    return {
        "session": session.as_dict(),
        "calls": [call_data(call, links.get(call.call_id)) for call in calls],
    }


def play(
    console: Console,
    replay: Mapping[str, Any],
    *,
    wait: Callable[[int, int], bool] | None = None,
) -> None:
    """Print the session call by call; `wait(shown, total)` between calls pauses, and False stops."""
    calls = replay.get("calls") or []
    console.print(session_view(replay["session"], len(calls)))
    verification = replay.get("verification")
    if isinstance(verification, dict):
        console.print(verification_text(verification))
    shown_prompt = None
    for number, call in enumerate(calls, 1):
        if wait is not None and number > 1 and not wait(number - 1, len(calls)):
            console.print("[dim]replay stopped[/]")
            return
        console.print(Rule(style="dim"))
        prompt = call.get("prompt")
        if isinstance(prompt, dict) and prompt.get("seq") != shown_prompt:
            shown_prompt = prompt.get("seq")
            console.print(prompt_panel(prompt))
        console.print(call_view(call, number))
    ended = replay["session"].get("ended")
    console.print(Rule("session ended" if ended else "no end recorded", style="dim"))
