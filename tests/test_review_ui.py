"""The review UI headless (Textual's run_test and Pilot), over the store a real server process writes."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Callable

from rich.console import Console
from textual.pilot import Pilot
from textual.widgets import DataTable, Static

from mcp_guard.approvals import ApprovalState
from mcp_guard.review.app import DecisionScreen, DetailsScreen, ReviewApp
from mcp_guard.review.desk import StoreDesk
from tests.approval_support import (
    PASSPHRASES,
    REQUESTER,
    Desk,
    approval_config,
    desk,
    settled,
    sqlite_connection,
)
from tests.client import guard_client

DELETE = {
    "sql": "DELETE FROM orders WHERE created_at < '2025-07-01'",
    "reason": "drop the first half of 2025",
}


def shown(widget: Static) -> str:
    console = Console(width=160, file=io.StringIO(), record=True)
    console.print(widget.content)
    return console.export_text()


def app_for(reviewers: Desk, name: str) -> ReviewApp:
    reviewer = reviewers.approvals.verifier.reviewer(name)
    assert reviewer is not None
    return ReviewApp(StoreDesk(reviewers.approvals, reviewer, f"review-test-{name}"))


async def until(pilot: Pilot[None], condition: Callable[[], bool], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"the UI never showed {what}"
        await pilot.pause(0.05)


async def rows_appear(pilot: Pilot[None], table: DataTable[object]) -> None:
    await until(pilot, lambda: table.row_count > 0, f"a row in #{table.id}")


async def type_text(pilot: Pilot[None], text: str) -> None:
    await pilot.press(*("space" if ch == " " else ch for ch in text))


async def test_the_ui_shows_a_request_another_process_made_and_approving_finishes_the_waiting_call(
    tmp_path, sqlite_shop
):
    config = approval_config(tmp_path, sqlite_connection(sqlite_shop))
    async with guard_client(config, tmp_path) as client, desk(config) as reviewers:
        app = app_for(reviewers, "dana")
        async with app.run_test(size=(140, 45)) as pilot:
            pending = app.query_one("#pending", DataTable)
            await pilot.pause()
            assert pending.row_count == 0
            call = asyncio.create_task(client.call("execute", **DELETE))
            await rows_appear(pilot, pending)  # live: no restart, no key pressed
            request = (await reviewers.store.list_approvals())[0]
            row = [str(cell) for cell in pending.get_row_at(0)]
            assert row[0] == request.id and row[2] == REQUESTER and row[3] == "shop"
            assert row[4] == "write" and row[5] == "131" and row[6] == DELETE["reason"]
            detail = shown(app.query_one("#detail-body", Static))
            for fact in (
                "DELETE FROM orders WHERE created_at < '2025-07-01'",
                f"requester {REQUESTER}",
                "connection shop",
                "reason drop the first half of 2025",
                "hold-large-delete",
                "kind write",
                "tables orders",
                "row estimate 131",
                "age ",
                "votes none yet",
            ):
                assert fact in detail, fact
            await pilot.press("a")
            assert isinstance(app.screen, DecisionScreen)
            await type_text(pilot, "ok archived")
            await pilot.press("enter")
            await type_text(pilot, PASSPHRASES["dana"])
            await pilot.press("enter")
            reply = await settled(call)
            recent = app.query_one("#recent", DataTable)
            expected = [request.id, "executed", "dana"]
            await until(
                pilot,
                lambda: recent.row_count > 0 and [str(c) for c in recent.get_row_at(0)][:3] == expected,
                "the executed request among recent decisions",
            )
            assert pending.row_count == 0
    assert not reply.is_error and reply.text.startswith(f"Approved by local:dana (request {request.id})")
    assert reply.structured["rows_affected"] == 131


async def test_denying_from_the_ui_asks_for_a_reason_and_a_wrong_passphrase_records_nothing(
    tmp_path, sqlite_shop
):
    config = approval_config(tmp_path, sqlite_connection(sqlite_shop))
    async with guard_client(config, tmp_path) as client, desk(config) as reviewers:
        app = app_for(reviewers, "omar")
        async with app.run_test(size=(140, 45)) as pilot:
            call = asyncio.create_task(client.call("execute", **DELETE))
            await rows_appear(pilot, app.query_one("#pending", DataTable))
            request = (await reviewers.store.list_approvals())[0]
            await pilot.press("d")
            await pilot.press("enter")
            assert "a denial needs a reason" in shown(app.screen.query_one("#error", Static))
            await type_text(pilot, "archive instead")
            await pilot.press("enter")
            await type_text(pilot, "not omars passphrase")
            await pilot.press("enter")
            await pilot.pause(0.5)
            assert "wrong passphrase for reviewer 'omar'" in shown(app.screen.query_one("#error", Static))
            assert (await reviewers.request(request.id)).votes == ()
            await type_text(pilot, PASSPHRASES["omar"])
            await pilot.press("enter")
            reply = await settled(call)
    assert reply.is_error and "local:omar denied" in reply.text and "archive instead" in reply.text


async def test_details_show_everything_and_the_ui_refuses_a_vote_its_reviewer_may_not_cast(
    tmp_path, sqlite_shop
):
    policy = (
        '[[policy.rules]]\nname = "two"\naction = "approve"\nkinds = ["write"]\n'
        'approvers = ["reviewers"]\napprovals = 2\n'
    )
    config = approval_config(tmp_path, sqlite_connection(sqlite_shop), policy=policy, wait=0.2)
    async with guard_client(config, tmp_path) as client, desk(config) as reviewers:
        held = await client.call("execute", **DELETE)
        await reviewers.vote(held.structured["request_id"], "dana", reason="looks right")
        app = app_for(reviewers, "dana")
        async with app.run_test(size=(140, 45)) as pilot:
            await rows_appear(pilot, app.query_one("#pending", DataTable))
            await pilot.press("v")
            assert isinstance(app.screen, DetailsScreen)
            details = shown(app.screen.query_one("#details", Static))
            assert "approve by dana at" in details and "looks right" in details
            assert (await reviewers.request(held.structured["request_id"])).digest in details
            await pilot.press("escape")
            await pilot.press("a")
            assert not isinstance(app.screen, DecisionScreen)
            assert "local:dana has already voted" in shown(app.query_one("#status", Static))
        assert (await reviewers.request(held.structured["request_id"])).state is ApprovalState.PENDING


async def test_the_ui_keeps_the_newest_checkpoint_and_reports_a_store_cut_behind_it(tmp_path, sqlite_shop):
    import sqlite3

    from mcp_guard.store.checkpoint import load_signing_key, public_key_text

    config = approval_config(tmp_path, sqlite_connection(sqlite_shop))
    async with guard_client(config, tmp_path) as client:  # its session end signs a checkpoint
        await client.call("query", sql="SELECT count(*) FROM orders")
    key = load_signing_key(tmp_path / "audit-signing.key", create=False)
    assert key is not None
    kept = tmp_path / "reviewer" / "review-checkpoint.txt"
    kept.parent.mkdir()
    async with desk(config) as reviewers:
        reviewer = reviewers.approvals.verifier.reviewer("dana")
        assert reviewer is not None
        trusted = {public_key_text(key.public_key())}
        app = ReviewApp(StoreDesk(reviewers.approvals, reviewer, "review-test", (kept, trusted)))
        async with app.run_test(size=(140, 45)) as pilot:
            await until(pilot, lambda: app.checkpoint is not None, "the kept checkpoint")
            assert kept.exists() and f"audit checkpoint: {app.checkpoint} entries" in app.sub_title
            vouched = app.checkpoint
            with sqlite3.connect(tmp_path / "audit.db") as db:  # the tail cut, its checkpoints with it
                db.execute("DELETE FROM audit WHERE seq >= ?", (vouched - 1,))
                db.execute("DELETE FROM checkpoint")
            db.close()
            status = app.query_one("#status", Static)
            await until(pilot, lambda: "cut or rolled back" in shown(status), "the cut store", timeout=15)


async def test_a_change_arriving_while_the_ui_closes_ends_its_watch_quietly(tmp_path, sqlite_shop):
    """Closing the UI removes its tables; a change that arrives meanwhile ends the watch quietly
    instead of failing the app (a reload looking for a table that is gone)."""
    config = approval_config(tmp_path, sqlite_connection(sqlite_shop))
    async with guard_client(config, tmp_path) as client, desk(config) as reviewers:
        app = app_for(reviewers, "dana")
        async with app.run_test(size=(140, 45)) as pilot:
            await pilot.pause()
            await app.query_one("#pending", DataTable).remove()  # as when the app is torn down
            call = asyncio.create_task(client.call("execute", **DELETE))
            request = await reviewers.next_request()
            watching = [worker for worker in app.workers if worker.name == "follow_store"]
            await until(pilot, lambda: all(w.is_finished for w in watching), "the watch ending")
            assert [w.error for w in watching] == [None]
        await reviewers.vote(request.id, "dana", "deny", "not now")
        reply = await settled(call)
    assert reply.is_error and "not now" in reply.text
