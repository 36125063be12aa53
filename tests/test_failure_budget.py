"""A flood of refused tokens is refused call by call and recorded condensed, never dropped unseen."""

from __future__ import annotations

import asyncio

import httpx2

from mcp_guard.failure_budget import FailureBudget
from mcp_guard.store.base import EventType
from tests.client import http_server
from tests.test_http import audit, oidc_config


def test_a_burst_is_recorded_one_by_one_then_one_entry_per_interval_with_a_count():
    now = [0.0]
    budget = FailureBudget(burst=3, interval=2.0, clock=lambda: now[0])
    first = [budget.admit("10.0.0.1") for _ in range(10)]
    other = budget.admit("10.0.0.2")
    now[0] += 2.0
    after_interval = budget.admit("10.0.0.1")
    again = budget.admit("10.0.0.1")
    now[0] += 60.0
    rested = [budget.admit("10.0.0.1") for _ in range(3)]

    assert first == [0, 0, 0, None, None, None, None, None, None, None]
    assert other == 0  # each source has its own budget
    assert after_interval == 7 and again is None  # the seven not recorded are counted in the next entry
    assert rested == [1, 0, 0]  # the one refused after the interval is owed to the next entry


def test_sources_beyond_the_cap_are_forgotten_without_losing_what_they_owe():
    now = [0.0]
    budget = FailureBudget(burst=1, interval=1.0, clock=lambda: now[0], max_sources=2)
    budget.admit("a")
    budget.admit("a")  # not recorded: "a" owes one
    budget.admit("b")
    now[0] += 10
    budget.admit("c")  # "b" rested and owes nothing: forgotten first
    now[0] += 10
    assert budget.admit("a") == 1


async def test_a_flood_of_requests_without_a_token_writes_a_bounded_record(tmp_path, local_idp, sqlite_shop):
    config = oidc_config(tmp_path, local_idp, sqlite_shop)
    with http_server(config, tmp_path, "streamable-http") as url:
        async with httpx2.AsyncClient(timeout=30) as http:
            answers = await asyncio.gather(
                *(http.post(url, json={"jsonrpc": "2.0", "id": 1, "method": "ping"}) for _ in range(150))
            )
            await asyncio.sleep(1.2)
            later = await http.post(url, json={"jsonrpc": "2.0", "id": 1, "method": "ping"})
    failures = await audit(tmp_path / "audit.db", type=EventType.AUTH_FAILURE)
    assert all(answer.status_code == 401 for answer in answers) and later.status_code == 401
    assert 60 < len(failures) < 100  # the burst, then about one a second
    counted = sum(int(f.event.detail.get("unrecorded_before", 0)) for f in failures)
    assert len(failures) + counted >= 150  # every refusal is an entry or counted in one
    assert failures[-1].event.detail.get("unrecorded_before", 0) > 0
