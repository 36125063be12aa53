"""The auditor's commands: `mcp-guard audit ...`, `mcp-guard replay` and `mcp-guard hook claude-code`.

Thin, like cli.py: parse, call the audit modules, print. They read only the [audit] part of the
configuration, so they run on a machine that holds no database credential.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from rich.console import Console
from rich.table import Table
from rich.text import Text

from mcp_guard.audit.render import safe
from mcp_guard.config import (
    AuditSettings,
    audit_locations,
    command_line_count,
    command_line_url,
    config_path_from_env,
    read_settings,
)
from mcp_guard.errors import AuditError, UsageError
from mcp_guard.kinds import StatementKind
from mcp_guard.store.base import CallFilter, Store

EXIT_OK, EXIT_FAILED = 0, 1
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class AuditSetup:
    """The [audit] settings and locations a command works with."""

    settings: AuditSettings
    store_url: str
    signing_key_path: Path
    witness_path: Path | None

    def trusted_keys(self, extra: list[str] | None = None) -> set[str]:
        """Public keys whose checkpoints are accepted: configured, given, and the signing key's own."""
        from mcp_guard.store.checkpoint import load_signing_key, parse_public_key, public_key_text

        keys = {public_key_text(parse_public_key(k, "--key")) for k in (extra or [])}
        keys |= {
            public_key_text(parse_public_key(k, "audit.trusted_keys")) for k in self.settings.trusted_keys
        }
        own = load_signing_key(self.signing_key_path, create=False)
        if own is not None:
            keys.add(public_key_text(own.public_key()))
        return keys

    def signing_key(self) -> Any:
        from mcp_guard.store.checkpoint import KEY_ENV, load_signing_key

        key = load_signing_key(self.signing_key_path, create=False)
        if key is None:
            raise UsageError(
                f"no signing key: set {KEY_ENV} or audit.signing_key_file, or create one at "
                f"{self.signing_key_path} (`mcp-guard audit key --generate`)"
            )
        return key


def setup(args: argparse.Namespace) -> AuditSetup:
    path = config_path_from_env(getattr(args, "config", None))
    settings = read_settings(path).audit if path else AuditSettings()
    where = audit_locations(settings, getattr(args, "store", None), str(path) if path else "(defaults)")
    witness = getattr(args, "witness", None)
    return AuditSetup(
        settings=settings,
        store_url=where.store_url,
        signing_key_path=where.signing_key_path,
        witness_path=Path(witness) if witness else where.witness_path,
    )


@asynccontextmanager
async def opened(audit: AuditSetup, *, create: bool = False) -> AsyncIterator[Store]:
    """The store, opened; one that is not there yet is an error unless `create` (the hook records
    prompts before the server's first call)."""
    from mcp_guard.store import open_store

    store = open_store(audit.store_url)
    missing = None if create else store.missing()
    if missing is not None:
        raise AuditError(missing)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


def run(make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    return asyncio.run(make())


def _filter(args: argparse.Namespace, **fixed: Any) -> CallFilter:
    fields: dict[str, Any] = {
        name: getattr(args, name, None)
        for name in (
            "session",
            "identity",
            "tool",
            "connection",
            "decision",
            "kind",
            "table",
            "text",
            "approver",
            "since",
            "until",
            "limit",
        )
    }
    fields["session_id"] = fields.pop("session")
    fields["writes"] = bool(getattr(args, "writes", False))
    fields.update(fixed)
    return CallFilter(**fields)


def _one_line(text: str, width: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _print_json(data: object) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False))


# list, sessions, show -----------------------------------------------------------------------------


def cmd_list(args: argparse.Namespace) -> int:
    from mcp_guard.audit.calls import Call, iter_calls

    async def collect() -> list[Call]:
        async with opened(setup(args)) as store:
            return [call async for call in iter_calls(store, _filter(args))]

    calls = run(collect)
    if args.json:
        _print_json([call.listing() for call in calls])
        return EXIT_OK
    # One identity (the common case) goes in the title: the table then fits an 80-column terminal.
    identities = sorted({call.identity for call in calls})
    title = f"{len(calls)} call(s)" + (f" by {identities[0]}" if len(identities) == 1 else "")
    table = Table(title=Text(safe(title)), title_justify="left", expand=False)
    table.add_column("seq", justify="right", no_wrap=True)
    table.add_column("UTC", no_wrap=True)
    if len(identities) > 1:
        table.add_column("identity", no_wrap=True)
    table.add_column("tool", no_wrap=True)
    table.add_column("decision (rule)", overflow="fold")
    table.add_column("sql / reason", ratio=1)
    for call in calls:
        what = Text(safe(_one_line(call.sql or str(call.arguments.get("table") or ""), 72)))
        if call.reason:
            what.append(safe(f"\nreason: {_one_line(call.reason, 64)}"), style="dim")
        tool = Text(safe(call.tool))
        if call.connection:
            tool.append(safe(f" @{call.connection}"), style="dim")
        if call.outcome is None:
            verdict = Text("no outcome recorded", style="yellow")
        else:
            decision = call.decision or call.status
            verdict = Text(safe(decision), style={"allow": "green", "deny": "red"}.get(decision, "yellow"))
            if call.rule:
                verdict.append(safe(f" ({call.rule})"), style="dim")
            if call.status == "error":
                verdict.append(" error", style="yellow")
        if call.trail:
            verdict.append(
                f"\n{len(call.trail)} more entr{'y' if len(call.trail) == 1 else 'ies'}", style="magenta"
            )
        who = [Text(safe(call.identity))] if len(identities) > 1 else []
        table.add_row(str(call.seq), Text(safe(call.ts[5:19].replace("T", " "))), *who, tool, verdict, what)
    Console().print(table)
    return EXIT_OK


def cmd_sessions(args: argparse.Namespace) -> int:
    from mcp_guard.audit.replay import load_session

    async def collect() -> list[dict[str, Any]]:
        async with opened(setup(args)) as store:
            ids = await store.session_ids("", limit=args.limit)
            return [(await load_session(store, sid)).as_dict() for sid in ids]

    sessions = run(collect)
    if args.json:
        _print_json(sessions)
        return EXIT_OK
    table = Table(title=f"the newest {len(sessions)} session(s)", title_justify="left")
    for column in ("session", "started (UTC)", "ended", "identity", "client", "directory"):
        table.add_column(column, no_wrap=column != "directory")
    for session in sessions:
        table.add_row(
            *(
                Text(safe(value))
                for value in (
                    session["session_id"],
                    str(session["started"] or "")[:19].replace("T", " "),
                    str(session["ended"] or "-")[11:19],
                    session["identity"],
                    session["client"] or "-",
                    session["cwd"] or "-",
                )
            )
        )
    Console().print(table)
    return EXIT_OK


async def _links_for(store: Store, session_id: str, window: float, cache: dict[str, Any]) -> Any:
    """The prompt links of every call of a session (cached: `why` and `show` ask per call)."""
    from mcp_guard.audit.replay import load_session, session_calls

    if session_id not in cache:
        session = await load_session(store, session_id)
        cache[session_id] = (session, (await session_calls(store, session, window))[1])
    return cache[session_id]


Unseal = Callable[[dict[str, Any]], dict[str, Any]]
"""A transform of a call's data before it is shown; where `audit show --unseal` plugs in."""


async def show_data(store: Store, ident: str, window: float, unseal: Unseal | None = None) -> dict[str, Any]:
    """Everything about one call as data: the call, its session, its prompt, its entries."""
    from mcp_guard.audit.calls import find_call
    from mcp_guard.audit.replay import call_data

    call = await find_call(store, ident)
    session, links = await _links_for(store, call.session_id, window, {})
    data = {**call_data(call, links.get(call.call_id)), "session": session.as_dict()}
    return unseal(data) if unseal is not None else data


def unsealer(key_env: str) -> Unseal:
    """Adds `originals`: the clear values behind the call's masked cells, opened with the audit key."""
    from mcp_guard.seal import load_key, unseal

    key = load_key(key_env)

    def open_originals(data: dict[str, Any]) -> dict[str, Any]:
        masking = (data.get("result") or {}).get("masking") or {}
        originals = masking.get("originals") if isinstance(masking, dict) else None
        call = data.get("call_id")
        if not originals:
            raise UsageError(
                f"call {call} kept no originals (masking.originals was none, or nothing was masked)"
            )
        if originals.get("mode") != "sealed":
            raise UsageError(f"call {call} kept keyed digests only: they can be checked, not opened")
        return {**data, "originals": unseal(key, str(call), originals)}

    return open_originals


def _originals_view(console: Console, originals: list[dict[str, Any]]) -> None:
    for number, statement in enumerate(originals, 1):
        title = f"statement {number}: originals of masked columns (unsealed)"
        table = Table(title=title, title_justify="left")
        for column in statement["columns"]:
            table.add_column(Text(safe(column)))
        for row in statement["rows"]:
            table.add_row(*(Text(safe(json.dumps(value, ensure_ascii=False))) for value in row))
        if statement["columns"]:
            console.print(table)
        for row, column, original in statement.get("detected", []):
            shown = safe(json.dumps(original, ensure_ascii=False))
            console.print(Text(f"row {row + 1}, {safe(column)}: {shown}"))


def cmd_show(args: argparse.Namespace) -> int:
    from mcp_guard.audit.render import call_view, prompt_panel, session_view

    audit = setup(args)
    unseal = unsealer(args.key_env) if args.unseal else None

    async def collect() -> dict[str, Any]:
        async with opened(audit) as store:
            return await show_data(store, args.id, audit.settings.prompt_window, unseal)

    data = run(collect)
    if args.json:
        _print_json(data)
        return EXIT_OK
    console = Console()
    console.print(session_view(data["session"]))
    if data.get("prompt"):
        console.print(prompt_panel(data["prompt"]))
    console.print(call_view(data, detailed=True))
    if data.get("originals"):
        _originals_view(console, data["originals"])
    return EXIT_OK


# export, stats, why -----------------------------------------------------------------------------


def cmd_export(args: argparse.Namespace) -> int:
    from mcp_guard.audit.export import export

    async def write(out: Any) -> int:
        async with opened(setup(args)) as store:
            return await export(store, _filter(args), out, args.format)

    if args.output:
        with open(args.output, "w", encoding="utf-8", newline="") as out:
            count = run(lambda: write(out))
        print(f"exported {count} call(s) to {args.output}", file=sys.stderr)
    else:
        count = run(lambda: write(sys.stdout))
    return EXIT_OK


def cmd_stats(args: argparse.Namespace) -> int:
    async def collect() -> Any:
        async with opened(setup(args)) as store:
            return await store.stats(_filter(args))

    rows = run(collect)
    names = ("calls", "writes", "denied", "errors", "approvals", "masked_cells")
    if args.json:
        _print_json(
            [{"identity": r.identity, "day": r.day, **{n: getattr(r, n) for n in names}} for r in rows]
        )
        return EXIT_OK
    table = Table(title="calls by identity and day (UTC)", title_justify="left")
    table.add_column("day", no_wrap=True)
    table.add_column("identity", no_wrap=True)
    for name in names:
        table.add_column(name.replace("_", " "), justify="right")
    for r in rows:
        table.add_row(Text(safe(r.day)), Text(safe(r.identity)), *(str(getattr(r, n)) for n in names))
    if len(rows) > 1:
        table.add_row("total", "", *(str(sum(getattr(r, n) for r in rows)) for n in names), style="bold")
    Console().print(table)
    return EXIT_OK


def cmd_why(args: argparse.Namespace) -> int:
    from mcp_guard.audit.calls import iter_calls
    from mcp_guard.audit.render import call_view, prompt_panel
    from mcp_guard.audit.replay import call_data

    if not args.table_name.strip():
        raise UsageError("TABLE must name a table, such as orders or public.orders")
    audit = setup(args)

    async def collect() -> list[dict[str, Any]]:
        cache: dict[str, Any] = {}
        found = []
        async with opened(audit) as store:
            async for call in iter_calls(store, _filter(args, table=args.table_name, writes=True)):
                _, links = await _links_for(store, call.session_id, audit.settings.prompt_window, cache)
                found.append(call_data(call, links.get(call.call_id)))
        return found

    calls = run(collect)
    if args.json:
        _print_json(calls)
        return EXIT_OK
    console = Console()
    console.print(
        Text(f"{len(calls)} call(s) that write or change ", style="bold").append(
            args.table_name, style="bold cyan"
        )
    )
    for call in calls:
        console.rule(style="dim")
        console.print(Text(safe(f"session {call['session_id']}"), style="dim"))
        if call.get("prompt"):
            console.print(prompt_panel(call["prompt"]))
        console.print(call_view(call))
    return EXIT_OK


# verify, checkpoints, prune, key ----------------------------------------------------------------


def _verification(args: argparse.Namespace, audit: AuditSetup) -> Any:
    from mcp_guard.audit.verify import verify_audit

    async def check() -> Any:
        async with opened(audit) as store:
            return await verify_audit(
                store,
                trusted=audit.trusted_keys(getattr(args, "key", None)),
                witness=audit.witness_path,
                external=[Path(p) for p in getattr(args, "since_checkpoint", None) or []],
                every=audit.settings.checkpoint_every,
            )

    return run(check)


def cmd_verify(args: argparse.Namespace) -> int:
    report = _verification(args, setup(args))
    if args.json:
        _print_json(report.as_dict())
        return EXIT_OK if report.ok else EXIT_FAILED
    chain = report.chain
    if report.ok:
        print(
            f"audit chain intact: {chain.entries} entries (seq {chain.first_seq}..{chain.entries}), "
            f"head {chain.head_hash}"
        )
        if report.latest is not None:
            print(
                f"checkpoints: {report.checkpoints} checked; the chain extends each, the latest vouches for "
                f"{report.latest.entries} entries ({report.latest.time[:19]} UTC, {report.latest.reason})"
            )
    else:
        print(f"audit chain BROKEN: {len(report.problems)} problem(s)")
        for problem in report.problems:
            print(f"  - {problem}")
    for note in report.notes:
        print(f"note: {note}")
    print(f"checked {report.checked} entries in {report.seconds:.2f} s ({report.rate:,.0f} entries/s)")
    return EXIT_OK if report.ok else EXIT_FAILED


def cmd_checkpoint(args: argparse.Namespace) -> int:
    from mcp_guard.audit.verify import checkpoint_now

    audit = setup(args)

    async def latest() -> str | None:
        async with opened(audit) as store:
            if args.new:
                return (await checkpoint_now(store, audit.signing_key(), audit.witness_path)).text
            stored = await store.checkpoints()
            return stored[-1].text if stored else None

    text = run(latest)
    if text is None:
        print("no checkpoint yet: `mcp-guard audit checkpoint --new` signs the head now", file=sys.stderr)
        return EXIT_FAILED
    sys.stdout.write(text)
    return EXIT_OK


def cmd_prune(args: argparse.Namespace) -> int:
    from mcp_guard.audit.verify import prune

    audit = setup(args)

    async def go() -> Any:
        async with opened(audit) as store:
            return await prune(
                store,
                before=args.before,
                key=audit.signing_key(),
                witness=audit.witness_path,
                trusted=audit.trusted_keys(),
                every=audit.settings.checkpoint_every,
                dry_run=args.dry_run,
            )

    pruned = run(go)
    if pruned.checkpoint is None:
        print(f"nothing recorded before {args.before} to prune (the newest entry is always kept)")
        return EXIT_OK
    verb = "would remove" if args.dry_run else "removed"
    print(
        f"{verb} {pruned.removed} entries (up to entry {pruned.checkpoint.entries}); the chain now starts at "
        f"entry {pruned.first_kept}, vouched for by this checkpoint:"
    )
    sys.stdout.write(pruned.checkpoint.text)
    return EXIT_OK


def cmd_key(args: argparse.Namespace) -> int:
    from mcp_guard.store.checkpoint import generate_key_file, load_signing_key, public_key_text

    audit = setup(args)
    if args.generate:
        key = generate_key_file(Path(args.generate) if args.generate != "-" else audit.signing_key_path)
    else:
        found = load_signing_key(audit.signing_key_path, create=False)
        if found is None:
            raise UsageError(f"no signing key at {audit.signing_key_path} (create one with --generate)")
        key = found
    print(public_key_text(key.public_key()))
    return EXIT_OK


# replay -----------------------------------------------------------------------------------------


def _wait_for_key(shown: int, total: int) -> bool:
    """Pause between calls; a key (Enter when stdin is not a terminal) goes on, q stops."""
    print(f"-- {shown}/{total}: any key for the next call, q to stop --", end="", flush=True)
    try:
        if sys.stdin.isatty():
            import termios
            import tty

            fd = sys.stdin.fileno()
            saved = termios.tcgetattr(fd)
            try:
                tty.setcbreak(fd)
                key = sys.stdin.read(1)
            finally:
                termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        else:
            key = sys.stdin.readline()[:1]
    except (ImportError, OSError):  # no termios (Windows): a line will do
        key = sys.stdin.readline()[:1]
    print()
    return key.lower() != "q"


def cmd_replay(args: argparse.Namespace) -> int:
    from mcp_guard.audit.render import html_page
    from mcp_guard.audit.replay import load_replay, play

    audit = setup(args)

    async def collect() -> dict[str, Any]:
        async with opened(audit) as store:
            return await load_replay(store, args.session, window=audit.settings.prompt_window)

    replay = run(collect)
    failed = False
    if args.verify:
        verification = _verification(args, audit)
        replay["verification"] = verification.as_dict()
        failed = not verification.ok
    if args.html:
        Path(args.html).write_text(html_page(replay), encoding="utf-8")
        print(f"wrote {args.html} ({len(replay['calls'])} call(s))", file=sys.stderr)
    if args.json:
        _print_json(replay)
    elif not args.html:
        play(Console(), replay, wait=_wait_for_key if args.step else None)
    return EXIT_FAILED if failed else EXIT_OK


# the Claude Code hook ---------------------------------------------------------------------------

MAX_HOOK_INPUT = 16_000_000


def cmd_hook(args: argparse.Namespace) -> int:
    """Record a prompt or an announced tool call. Prints nothing on stdout: Claude Code would add it to
    the conversation. A failure exits 1 (Claude Code shows it and goes on) or, with --require, 2
    (Claude Code blocks the prompt or tool call)."""
    from mcp_guard.audit.prompts import hook_event
    from mcp_guard.identity import local_identity

    try:
        audit = setup(args)
        raw = sys.stdin.buffer.read(MAX_HOOK_INPUT + 1)
        if len(raw) > MAX_HOOK_INPUT:
            raise UsageError(f"the hook input is larger than {MAX_HOOK_INPUT} bytes")
        try:
            payload = json.loads(raw)
        except ValueError as error:
            raise UsageError(f"the hook input is not JSON: {error}") from None
        event = hook_event(
            payload,
            identity=local_identity().subject,
            cap=audit.settings.response_cap,
            project_dir=os.environ.get("CLAUDE_PROJECT_DIR") or None,
        )
        if event is not None:

            async def record() -> None:
                async with opened(audit, create=True) as store:
                    await store.append(event)

            run(record)
    except (UsageError, AuditError, OSError) as error:
        print(f"mcp-guard hook: {error}", file=sys.stderr)
        return 2 if args.require else EXIT_FAILED
    return EXIT_OK


# the parser -------------------------------------------------------------------------------------


def _with_store(parser: argparse.ArgumentParser, *, json_flag: bool = True) -> argparse.ArgumentParser:
    parser.add_argument(
        "--config", help="TOML configuration file (default: $MCP_GUARD_CONFIG); only [audit] is read"
    )
    parser.add_argument(
        "--store", type=command_line_url, help="audit store URL (default: from the configuration)"
    )
    if json_flag:
        parser.add_argument("--json", action="store_true", help="print JSON")
    return parser


def _with_filters(parser: argparse.ArgumentParser, *, limit: bool = True) -> argparse.ArgumentParser:
    group = parser.add_argument_group("filters (every one given must match)")
    group.add_argument("--session", help="MCP session id")
    group.add_argument("--identity", help="who called, e.g. local:alice")
    group.add_argument("--tool", help="query, execute, list_tables, ...")
    group.add_argument("--connection", help="connection name")
    group.add_argument("--table", help="a table the SQL references (orders also matches public.orders)")
    group.add_argument("--kind", choices=[str(kind) for kind in StatementKind], help="statement kind")
    group.add_argument("--writes", action="store_true", help="only calls whose SQL is not only reads")
    group.add_argument("--decision", choices=["allow", "deny", "approve"], help="the policy's decision")
    group.add_argument("--approver", help="who approved (or decided) a held call")
    group.add_argument("--text", help="a piece of the SQL (case-insensitive)")
    group.add_argument("--since", help="ISO time, e.g. 2026-11-26 or 2026-11-26T10:00Z (UTC unless given)")
    group.add_argument("--until", help="ISO time (exclusive)")
    if limit:
        group.add_argument("--limit", type=command_line_count, help="only the newest N calls")
    return parser


def register(commands: Any) -> None:
    """Add `audit`, `replay` and `hook` to the top-level subcommands of mcp-guard."""
    audit = commands.add_parser("audit", help="read, search, export and verify the audit log")
    actions = audit.add_subparsers(dest="audit_command", required=True, metavar="ACTION")

    listing = _with_filters(_with_store(actions.add_parser("list", help="list recorded calls")))
    listing.set_defaults(handler=cmd_list)

    sessions = _with_store(actions.add_parser("sessions", help="list the newest sessions"))
    sessions.add_argument("--limit", type=command_line_count, default=20, help="how many (default 20)")
    sessions.set_defaults(handler=cmd_sessions)

    show = _with_store(actions.add_parser("show", help="everything about one call"))
    show.add_argument("id", help="call id (or its first 8+ characters), or the seq of one of its entries")
    show.add_argument("--unseal", action="store_true", help="open the sealed originals of masked values")
    show.add_argument(
        "--key-env",
        default="MCP_GUARD_AUDIT_KEY",
        help="variable holding the audit key, with --unseal (default: %(default)s)",
    )
    show.set_defaults(handler=cmd_show)

    export = _with_filters(
        _with_store(actions.add_parser("export", help="export calls as JSON lines or CSV"), json_flag=False)
    )
    export.add_argument("--format", choices=["jsonl", "csv"], default="jsonl")
    export.add_argument("--output", help="file to write (default: standard output)")
    export.set_defaults(handler=cmd_export)

    stats = _with_filters(
        _with_store(
            actions.add_parser("stats", help="calls, denials, approvals, masked cells by identity and day")
        ),
        limit=False,
    )
    stats.set_defaults(handler=cmd_stats)

    why = _with_filters(
        _with_store(
            actions.add_parser("why", help="the writes that touched a table, with who, why and which prompt")
        )
    )
    why.add_argument("table_name", metavar="TABLE")
    why.set_defaults(handler=cmd_why)

    verify = _with_store(actions.add_parser("verify", help="check the chain and every signed checkpoint"))
    verify.add_argument(
        "--since-checkpoint",
        action="append",
        metavar="FILE",
        help="a checkpoint kept elsewhere (from `audit checkpoint`); the chain must extend it (repeatable)",
    )
    verify.add_argument("--key", action="append", help="a trusted public key, ed25519:<base64> (repeatable)")
    verify.add_argument("--witness", help="witness file (default: from the configuration)")
    verify.set_defaults(handler=cmd_verify)

    checkpoint = _with_store(
        actions.add_parser("checkpoint", help="print the latest signed checkpoint, for safekeeping"),
        json_flag=False,
    )
    checkpoint.add_argument(
        "--new", action="store_true", help="sign the current head now (needs the signing key)"
    )
    checkpoint.add_argument("--witness", help="witness file (default: from the configuration)")
    checkpoint.set_defaults(handler=cmd_checkpoint)

    prune = _with_store(
        actions.add_parser("prune", help="remove old entries, keeping the chain verifiable"), json_flag=False
    )
    prune.add_argument("--before", required=True, help="remove entries recorded before this ISO time")
    prune.add_argument("--dry-run", action="store_true", help="say what would be removed, remove nothing")
    prune.add_argument("--witness", help="witness file (default: from the configuration)")
    prune.set_defaults(handler=cmd_prune)

    key = _with_store(actions.add_parser("key", help="print the signing key's public key"), json_flag=False)
    key.add_argument(
        "--generate", metavar="FILE", help="create a new signing key in FILE (- for the configured location)"
    )
    key.set_defaults(handler=cmd_key)

    replay = _with_store(commands.add_parser("replay", help="play a session back as it happened"))
    replay.add_argument("session", help="session id (or its first 8+ characters), or `latest`")
    replay.add_argument("--step", action="store_true", help="wait for a key between calls")
    replay.add_argument("--html", metavar="FILE", help="write a self-contained HTML page")
    replay.add_argument(
        "--verify", action="store_true", help="verify the whole log first and include the result"
    )
    replay.add_argument("--key", action="append", help="a trusted public key for --verify (repeatable)")
    replay.add_argument("--witness", help="witness file for --verify (default: from the configuration)")
    replay.set_defaults(handler=cmd_replay)

    hook = commands.add_parser("hook", help="record what a client hook reports (Claude Code prompts)")
    hook.add_argument("client", choices=["claude-code"])
    hook.add_argument("--config", help="TOML configuration file (default: $MCP_GUARD_CONFIG)")
    hook.add_argument(
        "--store", type=command_line_url, help="audit store URL (default: from the configuration)"
    )
    hook.add_argument(
        "--require",
        action="store_true",
        help="exit 2 when the record fails, so Claude Code blocks the prompt",
    )
    hook.set_defaults(handler=cmd_hook)
