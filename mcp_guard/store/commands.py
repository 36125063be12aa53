"""`mcp-guard store migrate` and `mcp-guard store copy`: the audit store's schema and its moves.

`migrate` creates or upgrades the schema of the configured store (or `--store`), for SQLite and
PostgreSQL alike; run it as the store's owner before the gateways start (a gateway's role may not
create tables). `copy` moves a history into another store entry by entry, exactly as it is (seq,
hashes, bytes and signed checkpoints), so the chain and every checkpoint still verify on the target;
an interrupted copy resumes where the target's chain ends.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from mcp_guard.config import command_line_url
from mcp_guard.errors import AuditError, UsageError
from mcp_guard.store import open_store
from mcp_guard.store.base import Store, VerifyReport

EXIT_OK = 0
_COPY_CHUNK = 5000


def _where(url: str) -> str:
    from mcp_guard.store.postgres import display_url

    return display_url(url) if url.startswith(("postgresql://", "postgres://")) else url


def cmd_migrate(args: argparse.Namespace) -> int:
    from mcp_guard.audit.commands import setup

    url = setup(args).store_url
    found, now = asyncio.run(open_store(url).migrate())
    if found == now:
        print(f"audit store {_where(url)}: schema version {now}, up to date")
    elif found == 0:
        print(f"audit store {_where(url)}: schema version {now} created")
    else:
        print(f"audit store {_where(url)}: schema upgraded from version {found} to {now}")
    return EXIT_OK


async def _chain(store: Store) -> VerifyReport:
    """The store's chain checked from its first entry kept (a pruned prefix is vouched for elsewhere)."""
    first = await store.first_seq()
    base = None
    if first is not None and first > 1:
        entry = (await store.entries(first, first))[0]
        base = (first - 1, bytes.fromhex(entry.prev_hash))
    return await store.verify(base=base)


async def copy_store(source: Store, target: Store) -> tuple[int, VerifyReport]:
    """Copy what `target` lacks of `source`'s chain and checkpoints; (entries copied, target's chain)."""
    checked = await _chain(source)
    if not checked.ok:
        raise AuditError(f"the source does not verify ({checked.problem}); nothing was copied")
    first, head = await source.first_seq(), await target.head()
    start = first or 1
    if head is not None:
        if await source.entry_hash(head[0]) != head[1]:
            raise UsageError(
                f"the target already holds another chain (its entry {head[0]} is not the source's); "
                "copy into an empty store"
            )
        start = head[0] + 1
    copied = 0
    for lo in range(start, checked.entries + 1, _COPY_CHUNK):
        records = await source.entries(lo, min(lo + _COPY_CHUNK - 1, checked.entries))
        await target.restore(records)
        copied += len(records)
    kept = {cp.text for cp in await target.checkpoints()}
    for checkpoint in await source.checkpoints():
        if checkpoint.text not in kept:
            await target.add_checkpoint(checkpoint)
    result = await _chain(target)
    if result.ok and result.head_hash != checked.head_hash:
        raise AuditError(
            f"the target's chain ends at {result.head_hash}, not at the source's {checked.head_hash}"
        )
    return copied, result


def cmd_copy(args: argparse.Namespace) -> int:
    from mcp_guard.audit.commands import setup

    target_url = args.to or setup(args).store_url
    if args.source == target_url:
        raise UsageError("--from and --to name the same store")

    async def run() -> tuple[int, VerifyReport]:
        source, target = open_store(args.source), open_store(target_url)
        await target.migrate()
        await source.open()
        try:
            await target.open()
            try:
                return await copy_store(source, target)
            finally:
                await target.close()
        finally:
            await source.close()

    copied, report = asyncio.run(run())
    if not report.ok:
        raise AuditError(f"the copy does not verify on the target: {report.problem}")
    print(
        f"copied {copied} entries to {_where(target_url)}; its chain verifies: entries "
        f"{report.first_seq}..{report.entries}, head {report.head_hash}"
    )
    return EXIT_OK


def register(commands: Any) -> None:
    """Add `store migrate` and `store copy` to the top-level subcommands of mcp-guard."""
    store = commands.add_parser("store", help="create, upgrade or copy the audit store")
    actions = store.add_subparsers(dest="store_command", required=True, metavar="ACTION")

    migrate = actions.add_parser("migrate", help="create or upgrade the audit store's schema (safe to rerun)")
    migrate.add_argument("--config", help="TOML configuration file (default: $MCP_GUARD_CONFIG)")
    migrate.add_argument(
        "--store", type=command_line_url, help="audit store URL (default: from the configuration)"
    )
    migrate.set_defaults(handler=cmd_migrate)

    copy = actions.add_parser("copy", help="copy an audit history into another store, chain intact")
    copy.add_argument(
        "--from", dest="source", type=command_line_url, required=True, help="the store to copy (a URL)"
    )
    copy.add_argument("--to", type=command_line_url, help="the store to fill (default: the configured one)")
    copy.add_argument("--config", help="TOML configuration file (default: $MCP_GUARD_CONFIG)")
    copy.set_defaults(handler=cmd_copy)
