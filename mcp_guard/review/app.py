"""`mcp-guard review`: the reviewer's terminal UI over the shared store.

It lists pending requests live (a watch on the store, or on a gateway's reviewers' API: another
process's new request appears within a fraction of a second), shows the highlighted one in full
(SQL, reason, requester, connection, classification, flags, tables, row estimate, age, votes),
approves (`a`) or denies (`d`, asking for a reason), opens details (`enter`/`v`), and lists recent
decisions. A reviewer with a passphrase is asked it at the first decision and the key derived from
it is kept in memory while the UI runs; a reviewer with a token decides through the gateway.
"""

from __future__ import annotations

import asyncio
from contextlib import suppress
from typing import Any

from rich.console import Group, RenderableType
from rich.markup import escape
from rich.syntax import Syntax
from rich.table import Table
from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.css.query import NoMatches
from textual.screen import ModalScreen, Screen
from textual.widgets import DataTable, Footer, Header, Input, Label, Static

from mcp_guard.approvals import DECIDED, ApprovalRequest, ApprovalState, Verdict
from mcp_guard.errors import GuardError
from mcp_guard.review import describe
from mcp_guard.review.desk import ReviewDesk

RECENT = 10
REFRESH_S = 1.0
"""The list is reloaded on every change the store reports, and at least this often (ages move)."""


def _sql(request: ApprovalRequest) -> Syntax:
    return Syntax(describe.sql(request), "sql", theme="ansi_dark", word_wrap=True)


def _facts(request: ApprovalRequest) -> Table:
    grid = Table.grid(padding=(0, 1))
    grid.add_column(style="bold", justify="right")
    grid.add_column()
    for label, value in describe.facts(request):
        grid.add_row(label, escape(value))
    return grid


class DecisionScreen(ModalScreen[str | None]):
    """Approve (a comment, optional) or deny (a reason, required); the passphrase if not yet given."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]
    DEFAULT_CSS = """
    DecisionScreen { align: center middle; }
    #dialog { width: 90%; height: auto; max-height: 90%; border: thick $accent; padding: 1 2;
              background: $surface; }
    #error { color: $error; height: auto; }
    """

    def __init__(self, request: ApprovalRequest, verdict: Verdict, desk: ReviewDesk) -> None:
        super().__init__()
        self.request = request
        self.verdict = verdict
        self.desk = desk
        self.locked = desk.locked

    def compose(self) -> ComposeResult:
        title = "Approve" if self.verdict == "approve" else "Deny"
        with Vertical(id="dialog"):
            requester = escape(describe.visible(self.request.requester))
            yield Label(f"[b]{title} request {self.request.id}[/b] by {requester}")
            yield Static(_sql(self.request))
            yield Label("Comment (optional):" if self.verdict == "approve" else "Reason (required):")
            yield Input(id="text", placeholder="recorded with your decision; the requester is told")
            if self.locked:
                yield Label(f"Passphrase of reviewer {escape(self.desk.reviewer.name)}:")
                yield Input(id="passphrase", password=True)
            yield Static(id="error")
            yield Label("[dim]enter: confirm   escape: cancel[/]")

    def on_mount(self) -> None:
        self.query_one("#text", Input).focus()

    @on(Input.Submitted)
    async def submit(self, event: Input.Submitted) -> None:
        text = self.query_one("#text", Input).value.strip()
        if self.verdict == "deny" and not text:
            self._error("a denial needs a reason: the assistant and the requester are told it")
            self.query_one("#text", Input).focus()
            return
        if not self.locked:
            self.dismiss(text)
            return
        passphrase = self.query_one("#passphrase", Input)
        if event.input.id == "text":
            passphrase.focus()
            return
        try:
            await asyncio.to_thread(self.desk.unlock, passphrase.value)
        except GuardError as error:
            self._error(str(error))
            passphrase.value = ""
            return
        self.dismiss(text)

    def _error(self, message: str) -> None:
        self.query_one("#error", Static).update(escape(message))

    def action_cancel(self) -> None:
        self.dismiss(None)


class DetailsScreen(Screen[None]):
    """Everything about one request: all statements, parameters, every vote."""

    BINDINGS = [Binding("escape", "app.pop_screen", "Back"), Binding("q", "app.pop_screen", "Back")]

    def __init__(self, request: ApprovalRequest) -> None:
        super().__init__()
        self.request = request

    def compose(self) -> ComposeResult:
        yield Header()
        with VerticalScroll():
            yield Static(
                Group(_sql(self.request), "", _facts(self.request), "", self._details()), id="details"
            )
        yield Footer()

    def _details(self) -> RenderableType:
        grid = Table.grid(padding=(0, 1))
        grid.add_column(style="bold", justify="right")
        grid.add_column()
        grid.add_row("created", self.request.created_at)
        grid.add_row("expires at", self.request.expires_at)
        grid.add_row("digest", self.request.digest)
        grid.add_row("call", self.request.call_id)
        for vote in self.request.votes:
            said = describe.visible(f"{vote.reviewer} at {vote.ts}: {vote.reason or '-'}")
            grid.add_row(f"{vote.decision} by", escape(said))
        return grid


class ReviewApp(App[None]):
    """The review UI for one reviewer over an `Approvals` (its store is shared with the servers)."""

    TITLE = "mcp-guard review"
    CSS = """
    .title { text-style: bold; padding: 0 1; }
    #pending { height: 1fr; min-height: 4; }
    #detail { height: 2fr; border: round $accent; padding: 0 1; }
    #recent { height: auto; max-height: 12; }
    #status { height: auto; padding: 0 1; }
    """
    BINDINGS = [
        Binding("a", "approve", "Approve"),
        Binding("d", "deny", "Deny"),
        Binding("v", "details", "Details"),
        Binding("q", "quit", "Quit"),
    ]

    def __init__(self, desk: ReviewDesk) -> None:
        super().__init__()
        self.desk = desk
        self.reviewer = desk.reviewer
        self.pending: list[ApprovalRequest] = []
        self.recent: list[ApprovalRequest] = []
        self.checkpoint: int | None = None
        """Entries the newest checkpoint kept by this reviewer vouches for (a store cut or rolled
        back since is reported on screen)."""

    def compose(self) -> ComposeResult:
        yield Header()
        yield Label("Pending requests", classes="title")
        yield DataTable(id="pending", cursor_type="row", zebra_stripes=True)
        with VerticalScroll(id="detail"):
            yield Static("Nothing is waiting for a decision.", id="detail-body")
        yield Label("Recent decisions", classes="title")
        yield DataTable(id="recent", cursor_type="row")
        yield Static(id="status")
        yield Footer()

    def on_mount(self) -> None:
        groups = ", ".join(sorted(self.reviewer.groups)) or "no groups"
        self.reviewer_title = f"reviewer {self.reviewer.name} ({self.reviewer.subject}; {groups})"
        self.sub_title = self.reviewer_title
        pending = self.query_one("#pending", DataTable)
        pending.add_columns("id", "age", "requester", "connection", "kind", "rows", "reason")
        self.query_one("#recent", DataTable).add_columns("id", "state", "by", "age", "reason / outcome")
        self.follow_store()

    @work(exclusive=True, group="store")
    async def follow_store(self) -> None:
        with suppress(NoMatches):  # the app is closing: the widgets a reload fills are gone
            async with self.desk.changes() as changes:
                while True:
                    try:
                        await self.reload()
                    except GuardError as error:
                        self.say(f"[red]{escape(str(error))}[/]")
                    await changes.wait(REFRESH_S)

    async def reload(self) -> None:
        self.checkpoint = await self.desk.checkpoint()
        if self.checkpoint is not None:
            self.sub_title = f"{self.reviewer_title}; audit checkpoint: {self.checkpoint} entries"
        self.pending = await self.desk.listing([ApprovalState.PENDING])
        self.recent = await self.desk.listing(DECIDED, limit=RECENT)
        self._fill(
            "#pending",
            self.pending,
            lambda r: (
                r.id,
                describe.span(describe.seconds_since(r.created_at)),
                describe.visible(r.requester),
                r.connection,
                describe.kind(r),
                describe.estimate(r),
                describe.visible(r.reason[:60]),
            ),
        )
        self._fill(
            "#recent",
            self.recent,
            lambda r: (
                r.id,
                str(r.state),
                describe.decided_by(r),
                describe.span(describe.seconds_since(r.decided_at or r.created_at)),
                describe.visible(_decided_note(r)[:60]),
            ),
        )
        self._show_selected()

    def _fill(self, selector: str, requests: list[ApprovalRequest], row: Any) -> None:
        table = self.query_one(selector, DataTable)
        keep = self._key_at_cursor(table)
        table.clear()
        for request in requests:
            table.add_row(*row(request), key=request.id)
        ids = [r.id for r in requests]
        if keep is not None and keep in ids:
            table.move_cursor(row=ids.index(keep))

    @staticmethod
    def _key_at_cursor(table: DataTable[Any]) -> str | None:
        if table.row_count == 0:
            return None
        key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        return str(key) if key is not None else None

    def selected(self) -> ApprovalRequest | None:
        wanted = self._key_at_cursor(self.query_one("#pending", DataTable))
        return next((r for r in self.pending if r.id == wanted), None)

    @on(DataTable.RowHighlighted, "#pending")
    def _show_selected(self) -> None:
        request = self.selected()
        body = self.query_one("#detail-body", Static)
        if request is None:
            body.update("Nothing is waiting for a decision.")
        else:
            body.update(Group(_sql(request), "", _facts(request)))

    @on(DataTable.RowSelected, "#pending")
    def action_details(self) -> None:
        request = self.selected()
        if request is not None:
            self.push_screen(DetailsScreen(request))

    def action_approve(self) -> None:
        self._decide("approve")

    def action_deny(self) -> None:
        self._decide("deny")

    def _decide(self, verdict: Verdict) -> None:
        request = self.selected()
        if request is None:
            self.say("No pending request is selected.")
            return
        try:
            self.desk.check(request)
        except GuardError as error:
            self.say(f"[red]{escape(str(error))}[/]")
            return

        def decided(text: str | None) -> None:
            if text is not None:
                self.cast(request, verdict, text)

        self.push_screen(DecisionScreen(request, verdict, self.desk), decided)

    @work(group="votes")
    async def cast(self, request: ApprovalRequest, verdict: Verdict, text: str) -> None:
        try:
            decided, tally = await self.desk.vote(request.id, verdict, text)
        except GuardError as error:
            self.say(f"[red]{escape(str(error))}[/]")
        else:
            if decided.state is ApprovalState.PENDING:
                self.say(f"Recorded your {verdict} on {request.id}; so far {escape(tally)}.")
            else:
                self.say(f"Request {request.id} is now [b]{decided.state}[/b].")
        await self.reload()

    def say(self, message: str) -> None:
        self.query_one("#status", Static).update(message)


def _decided_note(request: ApprovalRequest) -> str:
    if request.state is ApprovalState.DENIED:
        return next((v.reason for v in request.votes if v.decision == "deny"), "")
    if request.outcome:
        status = request.outcome.get("status")
        rows = request.outcome.get("rows_affected")
        return f"ran: {status}" + (f", {rows} rows" if rows is not None else "")
    return request.reason
