"""Verify an audit log against its signed checkpoints, wherever they are kept; prune it safely.

`verify_audit` checks, and names what is wrong with each:

1. the chain: every entry where it should be, linked to its predecessor, its bytes those hashed,
   its index columns those of its bytes (see `store/chain.py`);
2. every checkpoint found in the store, in the witness file and in files given by the auditor:
   signed by a trusted key over exactly its text;
3. that the chain still extends every checkpoint: it holds at least that many entries, and the
   entry a checkpoint names still has the hash it signed. A cut tail, a file rolled back, or a
   history rewritten and rehashed without the key fails here;
4. when checkpoints are configured, that the newest entries are covered by one (a checkpoint is
   signed every N entries, so a longer uncovered tail means checkpoints were removed);
5. after pruning, that a checkpoint vouches for the entry before the first one kept.

What it cannot see: a store cut or rewritten together with every checkpoint in it AND the witness
file, by someone holding the signing key. Keep the witness where the database's writers cannot
rewrite it, and copies of `mcp-guard audit checkpoint` elsewhere.
"""

from __future__ import annotations

import os
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mcp_guard.errors import AuditError, UsageError
from mcp_guard.store.base import Store, VerifyReport
from mcp_guard.store.checkpoint import (
    Checkpoint,
    Checkpointer,
    Found,
    append_witness,
    parse_checkpoints,
    read_checkpoint_file,
    sign,
)


@dataclass(frozen=True, slots=True)
class AuditVerification:
    chain: VerifyReport
    problems: tuple[str, ...]
    notes: tuple[str, ...]
    checkpoints: int
    """Checkpoints whose signature was checked (the same checkpoint found twice counts twice)."""
    latest: Checkpoint | None
    """The newest valid checkpoint the chain extends: what to keep elsewhere."""
    seconds: float

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def checked(self) -> int:
        """Entries whose chain was recomputed."""
        return max(0, self.chain.entries - self.chain.first_seq + 1)

    @property
    def rate(self) -> float:
        return self.checked / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "entries": self.chain.entries,
            "first_seq": self.chain.first_seq,
            "head_hash": self.chain.head_hash,
            "first_bad_seq": self.chain.first_bad_seq,
            "problem": self.problems[0] if self.problems else None,
            "problems": list(self.problems),
            "notes": list(self.notes),
            "checkpoints_checked": self.checkpoints,
            "latest_checkpoint": self.latest.text if self.latest else None,
            "seconds": round(self.seconds, 3),
            "entries_per_second": round(self.rate),
        }


async def _gather(
    store: Store, witness: Path | None, external: Sequence[Path]
) -> tuple[list[Found], list[str]]:
    found: list[Found] = []
    problems: list[str] = []
    stored = await store.checkpoints()
    for index, kept in enumerate(stored, 1):
        try:
            found += [
                Found(f.checkpoint, f"store checkpoint {index}") for f in parse_checkpoints(kept.text, "")
            ]
        except AuditError as error:
            problems.append(f"store checkpoint {index}: {error}")
    if witness is not None:
        if witness.exists():
            found += _read(witness, "witness file", problems)
        elif stored:
            problems.append(
                f"witness file {witness} is missing, though the store holds {len(stored)} checkpoint(s): "
                "it was removed or moved"
            )
    for path in external:
        found += _read(path, "checkpoint file", problems)
    return found, problems


def _read(path: Path, label: str, problems: list[str]) -> list[Found]:
    try:
        return read_checkpoint_file(path, label)
    except AuditError as error:
        problems.append(str(error))
        return []


async def verify_audit(
    store: Store,
    *,
    trusted: Collection[str],
    witness: Path | None = None,
    external: Sequence[Path] = (),
    every: int = 0,
) -> AuditVerification:
    """Everything `audit verify` checks; see the module docstring."""
    started = time.perf_counter()
    found, problems = await _gather(store, witness, external)
    notes: list[str] = []
    valid: list[Found] = []
    if found and not trusted:
        problems.append(
            f"{len(found)} checkpoint(s) found but no trusted public key to check them with: "
            "give --key or set audit.trusted_keys"
        )
    for item in found if trusted else ():
        wrong = item.checkpoint.check_signature(trusted)
        if wrong is None:
            valid.append(item)
        else:
            problems.append(f"{item.source} (entries {item.checkpoint.entries}): {wrong}")

    first = await store.first_seq()
    base: tuple[int, bytes] | None = None
    if first is not None and first > 1:
        vouching = [v for v in valid if v.checkpoint.entries == first - 1]
        if vouching:
            base = (first - 1, bytes.fromhex(vouching[0].checkpoint.head))
        else:
            problems.append(
                f"entries 1..{first - 1} are not in the store and no signed checkpoint vouches for entry "
                f"{first - 1}: they were removed without `mcp-guard audit prune`"
            )
    floor = base[0] if base else 0
    chain = await store.verify(
        base=base, watch={v.checkpoint.entries for v in valid if v.checkpoint.entries > floor}
    )
    if chain.problem:
        problems.insert(0, chain.problem)
    latest: Checkpoint | None = None
    for item in valid:
        cp = item.checkpoint
        where = f"{item.source} (entries {cp.entries})"
        if cp.entries < floor:
            notes.append(f"{where}: precedes the pruned prefix; only its signature was checked")
            continue
        if cp.entries == floor:
            latest = _newer(latest, cp)
            continue
        if cp.entries > chain.entries:
            if chain.ok:
                problems.append(
                    f"{where}: the chain ends at entry {chain.entries}, but this checkpoint vouches for "
                    f"{cp.entries} entries: entries {chain.entries + 1}..{cp.entries} were removed "
                    "(the tail was cut or the file rolled back)"
                )
            continue
        if chain.watched.get(cp.entries) != cp.head:
            problems.append(
                f"{where}: entry {cp.entries} hashes to {str(chain.watched.get(cp.entries))[:16]}…, but the "
                f"checkpoint signed {cp.head[:16]}…: the history up to entry {cp.entries} was rewritten"
            )
            continue
        latest = _newer(latest, cp)
    if every and chain.ok and chain.entries - (latest.entries if latest else 0) >= 2 * every:
        covered = latest.entries if latest else 0
        problems.append(
            f"entries {covered + 1}..{chain.entries} are covered by no signed checkpoint, though one is "
            f"signed every {every} entries: checkpoints were removed, or none was written yet "
            "(`mcp-guard audit checkpoint --new` signs the head)"
        )
    if not found:
        notes.append("no checkpoint found: a cut tail or a rewritten history cannot be detected")
    return AuditVerification(
        chain=chain,
        problems=tuple(problems),
        notes=tuple(notes),
        checkpoints=len(found),
        latest=latest,
        seconds=time.perf_counter() - started,
    )


def _newer(current: Checkpoint | None, candidate: Checkpoint) -> Checkpoint:
    return candidate if current is None or candidate.entries > current.entries else current


# for a watcher such as the review UI ------------------------------------------------------------


async def keep_latest_checkpoint(store: Store, kept: Path, trusted: Collection[str]) -> Checkpoint | None:
    """Check that the store still extends the checkpoint kept at `kept`, then keep the store's newest valid
    one there (replacing the file atomically). Returns what is kept.

    For a process that watches the store over time (the review UI): a store cut or rolled back since
    it last looked raises AuditError, even if every checkpoint in the store was removed with the tail.
    """
    previous = read_checkpoint_file(kept, "kept checkpoint")[-1].checkpoint if kept.exists() else None
    if previous is not None:
        wrong = previous.check_signature(trusted)
        if wrong:
            raise AuditError(f"kept checkpoint {kept}: {wrong}")
        await _require_extends(store, previous, f"the checkpoint kept at {kept}")
    newest: Checkpoint | None = None
    for stored in reversed(await store.checkpoints()):
        candidate = parse_checkpoints(stored.text, "store checkpoint")[0].checkpoint
        if (
            candidate.check_signature(trusted) is None
            and await store.entry_hash(candidate.entries) == candidate.head
        ):
            newest = candidate
            break
    if newest is None or (previous is not None and newest.entries <= previous.entries):
        return previous
    temporary = kept.with_name(kept.name + ".tmp")
    temporary.write_text(newest.text, encoding="utf-8")
    os.replace(temporary, kept)
    return newest


async def _require_extends(store: Store, checkpoint: Checkpoint, what: str) -> None:
    head = await store.head()
    if head is None or head[0] < checkpoint.entries:
        raise AuditError(
            f"the audit store holds {head[0] if head else 0} entries, fewer than the {checkpoint.entries} "
            f"{what} vouches for: it was cut or rolled back"
        )
    first = await store.first_seq() or 1
    if checkpoint.entries >= first and await store.entry_hash(checkpoint.entries) != checkpoint.head:
        raise AuditError(
            f"entry {checkpoint.entries} no longer has the hash {what} signed: the history was rewritten"
        )


# retention --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Pruned:
    removed: int
    checkpoint: Checkpoint | None
    """The checkpoint that vouches for the last entry removed; None when nothing was removed."""
    first_kept: int | None


async def prune(
    store: Store,
    *,
    before: str,
    key: Ed25519PrivateKey,
    witness: Path | None,
    trusted: Collection[str],
    every: int,
    dry_run: bool = False,
) -> Pruned:
    """Remove the entries recorded before `before`, after signing the hash of the last one removed.

    Refuses a log that does not verify: pruning would erase the evidence of what is wrong with it.
    Only a prefix is removed (never an entry after one that is kept), and never the newest entry.
    """
    report = await verify_audit(store, trusted=trusted, witness=witness, every=every)
    if not report.ok:
        raise AuditError(
            "the audit log does not verify, so nothing was pruned (pruning would erase the evidence): "
            + report.problems[0]
        )
    head = await store.head()
    first = await store.first_seq()
    if head is None or first is None:
        return Pruned(0, None, None)
    newer = await store.first_at_or_after(before)
    last = min((newer - 1) if newer is not None else head[0], head[0] - 1)
    if last < first:
        return Pruned(0, None, first)
    digest = await store.entry_hash(last)
    if digest is None:
        raise AuditError(f"entry {last} vanished while pruning; nothing was removed")
    checkpoint = sign(key, last, digest, f"prune before {before}")
    if dry_run:
        return Pruned(last - first + 1, checkpoint, last + 1)
    if witness is not None:
        append_witness(witness, checkpoint)
    removed = await store.prune(checkpoint.stored())
    return Pruned(removed, checkpoint, last + 1)


async def checkpoint_now(store: Store, key: Ed25519PrivateKey, witness: Path | None) -> Checkpoint:
    """Sign the head now (`audit checkpoint --new`), into the store and the witness."""
    checkpoint = await Checkpointer(store, key, 0, witness).checkpoint("manual")
    if checkpoint is None:
        raise UsageError("the audit store holds no entry yet: there is nothing to sign")
    return checkpoint
