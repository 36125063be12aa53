"""The server's heap after start: start-up's objects out of the collector's sight, cycles still freed.

Each check runs in a fresh interpreter: settling changes the collector for the whole process."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from typing import Any


def run(code: str) -> Any:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_a_large_result_after_settling_triggers_no_full_collection() -> None:
    """A full collection walks every object alive, most of them start-up's (the mcp SDK, pydantic,
    sqlglot); after `settle` those are frozen, and building a 10,000-row result triggers no full
    collection and a handful of young ones, where it triggered dozens before."""
    found = run(
        """
        import gc, json
        import mcp_guard.server  # the whole stack the server loads
        from mcp_guard import heap
        from mcp_guard.backends.base import Column, ResultSet
        from mcp_guard.config import Limits
        from mcp_guard.results import query_result

        counts = [0, 0, 0]

        def count(phase, info):
            if phase == "stop":
                counts[info["generation"]] += 1

        gc.callbacks.append(count)

        def build():
            counts[:] = [0, 0, 0]
            columns = tuple(Column(f"c{i}", "text") for i in range(8))
            rows = [[f"value {r} {c}" for c in range(8)] for r in range(10_000)]
            limits = Limits(row_limit=10_000, byte_limit=10**9, timeout_s=5)
            query_result("call", "db", [ResultSet.capped(columns, rows, limits)], limits)
            return list(counts)

        before = build()
        heap.settle()
        print(json.dumps({"before": before, "after": build(), "frozen": gc.get_freeze_count()}))
        """
    )
    assert found["frozen"] > 50_000, found
    assert found["after"][2] == 0 and found["after"][0] <= 5, found
    assert found["before"][0] > 20, found


def test_reference_cycles_are_still_collected_after_settling() -> None:
    """Settling makes collections rarer, never absent: a cycle made later is freed without anyone
    calling gc.collect()."""
    found = run(
        """
        import json, weakref
        from mcp_guard import heap

        heap.settle()

        class Node:
            pass

        first = Node()
        first.me = first
        gone = weakref.ref(first)
        del first
        for _ in range(100_000):  # allocations, some in cycles, as a long-running server makes
            node = Node()
            node.me = node
        print(json.dumps({"freed": gone() is None}))
        """
    )
    assert found == {"freed": True}
