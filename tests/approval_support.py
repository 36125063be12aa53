"""Reviewers for the approval tests: real keys, the real store, the real lifecycle, another process
than the server's (the tests' own), exactly as `mcp-guard approve` or the review UI would act."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from mcp_guard.approvals import ApprovalRequest, Approvals, ApprovalState, Tally, Verdict
from mcp_guard.config import Config, load_config
from mcp_guard.identity import local_identity
from mcp_guard.reviewers import MIN_COST, Signer, enroll, unlock
from mcp_guard.store import open_store
from mcp_guard.store.base import Store
from tests.conftest import write_config

PASSPHRASES = {
    "dana": "dana-passphrase",
    "dana2": "dana-second-key",
    "omar": "omar-passphrase",
    "eve": "eve-passphrase1",
    "me": "my-own-passphrase",
}
REQUESTER = local_identity().subject
"""Who the server's calls come from: the local user running the tests."""


@functools.cache
def key(name: str) -> str:
    return str(enroll(PASSPHRASES[name], cost=MIN_COST))


def reviewer_toml(name: str, groups: list[str], subject: str | None = None) -> str:
    quoted = ", ".join(f'"{g}"' for g in groups)
    extra = f'subject = "{subject}"\n' if subject else ""
    return f'[approvals.reviewers.{name}]\nkey = "{key(name)}"\ngroups = [{quoted}]\n{extra}'


def approval_config(
    tmp_path: Path,
    connection: str,
    *,
    reviewers: str = "",
    policy: str = "",
    wait: float = 15,
) -> Path:
    """`connection`: the body of [connections.NAME]; reviewers default to dana and omar in `reviewers`."""
    reviewers = reviewers or reviewer_toml("dana", ["reviewers"]) + reviewer_toml("omar", ["reviewers"])
    return write_config(tmp_path, f"{connection}\n[approvals]\nwait = {wait}\n\n{reviewers}\n{policy}")


def sqlite_connection(path: Path) -> str:
    return f'[connections.shop]\nurl = "sqlite:///{path}"\n'


@dataclass
class Desk:
    """A reviewer's desk: the configuration's reviewers over the same store as the server."""

    config: Config
    store: Store
    approvals: Approvals
    signers: dict[str, Signer] = field(default_factory=dict)

    def signer(self, name: str) -> Signer:
        if name not in self.signers:
            reviewer = self.approvals.verifier.reviewer(name)
            assert reviewer is not None, name
            self.signers[name] = unlock(reviewer, PASSPHRASES[name])
        return self.signers[name]

    async def vote(self, request_id: str, name: str, verdict: Verdict = "approve", reason: str = "") -> Tally:
        _, counted = await self.approvals.vote(request_id, self.signer(name), verdict, reason, f"test-{name}")
        return counted

    async def next_request(self, timeout: float = 15) -> ApprovalRequest:
        """The newest pending request, as soon as the server has stored it."""
        deadline = time.monotonic() + timeout
        async with self.store.watch_approvals() as changes:
            while time.monotonic() < deadline:
                pending = await self.store.list_approvals([ApprovalState.PENDING])
                if pending:
                    return pending[0]
                await changes.wait(0.5)
        raise AssertionError("no pending request appeared")

    async def request(self, request_id: str) -> ApprovalRequest:
        found = await self.store.get_approval(request_id)
        assert found is not None
        return found


@asynccontextmanager
async def desk(config_path: Path) -> AsyncIterator[Desk]:
    config = load_config(config_path)
    store = open_store(config.audit_url)
    await store.open()
    try:
        yield Desk(config, store, Approvals(store, config.settings.approvals.verifier()))
    finally:
        await store.close()


async def settled(task: asyncio.Task[object], timeout: float = 15) -> object:
    async with asyncio.timeout(timeout):
        return await task
