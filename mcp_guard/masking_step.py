"""Step 6 of the pipeline: what masking asks of a call before its reads run, and does to what comes back.

guard.py decides when each of these runs; this module keeps masking's state for one server (the
schema read from each connection, the mask plan per connection and caller groups, the detectors,
the key of the audit's originals) and answers for one call. A refusal comes back as a `Refusal`
naming the statement; the guard turns it into a recorded denial.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from sqlglot import exp

from mcp_guard.backends.base import Backend, ResultSet, WriteResult
from mcp_guard.blind_spots import blind_spot
from mcp_guard.catalog import Catalog
from mcp_guard.classify import Statement
from mcp_guard.config import Config
from mcp_guard.detectors import Detectors
from mcp_guard.errors import ConfigError
from mcp_guard.lineage import statement_lineage
from mcp_guard.masking import Masking
from mcp_guard.protect import Protected, notes_for, originals_record, protect
from mcp_guard.rewrite import MaskPlan, Rewritten, rewrite
from mcp_guard.seal import SealError, load_key
from mcp_guard.values import JsonValue
from mcp_guard.writes import masked_read_in_write


def audit_key(config: Config) -> bytes | None:
    """The key that digests or seals originals in the audit; a ConfigError when it is needed and missing."""
    settings = config.settings.masking
    if settings.originals == "none":
        return None
    try:
        return load_key(settings.originals_key_env)
    except SealError as error:
        raise ConfigError(
            f"originals = {settings.originals!r} needs the audit key: {error}",
            file=config.source,
            key="masking.originals_key_env",
        ) from None


def _dialect(url: str) -> str:
    return "sqlite" if url.startswith("sqlite:") else "postgres"


def _table_of(text: str, dialect: str) -> exp.Table:
    """A table name the way describe_table is given it, as a sqlglot table (quoted parts kept)."""
    try:
        return exp.to_table(text, dialect=dialect)
    except Exception:  # not a name sqlglot can read: nothing to mark
        return exp.Table(this=exp.to_identifier(text))


@dataclass(frozen=True, slots=True)
class MaskedReads:
    """Before execution: what runs for each statement, and what the masking needs afterwards."""

    plan: MaskPlan | None
    catalog: Catalog | None
    rewritten: tuple[Rewritten | None, ...]


@dataclass(frozen=True, slots=True)
class Refusal:
    """Masking cannot vouch for statement `index`: why."""

    index: int
    reason: str


class MaskingStep:
    """Masking's state for one server, shared by every call."""

    def __init__(
        self, config: Config, masking: Masking, backend: Callable[[str], Awaitable[Backend]]
    ) -> None:
        self.config = config
        self.masking = masking
        self.detectors = Detectors(config.settings.masking.detectors)
        self._backend = backend
        self._catalogs: dict[str, Catalog] = {}
        self._plans: dict[tuple[str, frozenset[str]], MaskPlan] = {}

    @cached_property
    def audit_key(self) -> bytes | None:
        """Read when first needed: `mcp-guard check` previews masks without the sealing key."""
        return audit_key(self.config)

    def applies(self, name: str, groups: frozenset[str]) -> bool:
        return bool(self.masking.rules_for(name, groups))

    async def catalog(self, name: str, *, refresh: bool = False) -> Catalog:
        """The connection's schema, read once and cached; read again after DDL or on an unknown name."""
        if refresh or name not in self._catalogs:
            schema = await (await self._backend(name)).schema()
            self._catalogs[name] = Catalog(schema, _dialect(self.config.urls[name]))
            self._plans = {key: plan for key, plan in self._plans.items() if key[0] != name}
        return self._catalogs[name]

    def forget(self, name: str) -> None:
        """A write changed the schema (DDL): read it again before the next masked call."""
        self._catalogs.pop(name, None)

    async def plan(self, name: str, groups: frozenset[str], *, refresh: bool = False) -> MaskPlan:
        catalog = await self.catalog(name, refresh=refresh)
        key = (name, groups)
        plan = self._plans.get(key)
        if plan is None or plan.catalog is not catalog:
            rules = self.masking.rules_for(name, groups)
            plan = MaskPlan(self.masking, rules, catalog, self.masking.rules_for(name, frozenset()))
            self._plans[key] = plan
        return plan

    async def before_reads(
        self, name: str, groups: frozenset[str], statements: Sequence[Statement], params: int
    ) -> MaskedReads | Refusal:
        """Refuse what masking cannot vouch for, then rewrite each read over masked relations."""
        if not self.applies(name, groups):
            # Lineage still serves the detectors: excluded columns, columns a rule lets this caller see.
            needs_lineage = self.config.settings.masking.detector_exclude or self.masking.rules_for(
                name, frozenset()
            )
            plan = await self.plan(name, groups) if needs_lineage else None
            return MaskedReads(plan, plan.catalog if plan else None, (None,) * len(statements))
        plan = await self.plan(name, groups)
        for index, statement in enumerate(statements):
            reason = self._blind_spot(plan, statement, params)
            if reason is not None and "not in the schema" in reason:
                plan = await self.plan(
                    name, groups, refresh=True
                )  # a table created since the schema was read
                reason = self._blind_spot(plan, statement, params)
            if reason is not None:
                return Refusal(index, reason)
        return MaskedReads(
            plan, plan.catalog, tuple(rewrite(statement, plan, params) for statement in statements)
        )

    async def check_write(
        self, name: str, groups: frozenset[str], statements: Sequence[Statement], params: int
    ) -> Refusal | None:
        """A write is not rewritten (it would store masked values): one that reads masked data is refused."""
        if not self.applies(name, groups):
            return None
        plan = await self.plan(name, groups)
        for index, statement in enumerate(statements):
            reason = self._blind_spot(plan, statement, params) or masked_read_in_write(statement, plan)
            if reason is not None:
                return Refusal(index, reason)
        return None

    async def preview(
        self, name: str, groups: frozenset[str], statements: Sequence[Statement]
    ) -> list[dict[str, Any]] | None:
        """`mcp-guard check`: per statement, why masking would refuse it, or the SQL that would run and
        each output column's lineage and mask; every statement, not only up to the first refusal.
        None when no rule applies to these groups on this connection."""
        if not self.applies(name, groups):
            return None
        plan = await self.plan(name, groups)
        entries: list[dict[str, Any]] = []
        for statement in statements:
            reason = self._blind_spot(plan, statement, 0)
            if reason is not None:
                entries.append({"refused": reason})
                continue
            done = rewrite(statement, plan, 0)
            outputs = statement_lineage(statement, plan.catalog)
            names = [o.name for o in outputs] if outputs is not None else []
            resolved = "resolved" if outputs is not None else "unresolved: every column counts as masked"
            entries.append(
                {
                    "rewritten": done.sql if done else None,
                    "columns": [note.as_dict() for note in notes_for(names, outputs, plan)],
                    "lineage": resolved,
                }
            )
        return entries

    def _blind_spot(self, plan: MaskPlan, statement: Statement, params: int) -> str | None:
        allowed = frozenset(f.lower() for f in self.config.settings.masking.allowed_functions)
        return blind_spot(statement, plan.catalog, plan.masks, allowed, params)  # type: ignore[arg-type]

    def protect(self, reads: MaskedReads, statement: Statement, result: ResultSet) -> Protected:
        """After the rows: lineage notes for every column, detectors over the text values."""
        outputs = statement_lineage(statement, reads.catalog) if reads.catalog is not None else None
        return protect(
            result, outputs, reads.plan, self.detectors, self.config.settings.masking.detector_exclude
        )

    def summary(
        self, call_id: str, reads: MaskedReads, protected: list[Protected], raw: list[ResultSet]
    ) -> dict[str, JsonValue]:
        """What the audit records of step 6: the SQL that ran, per column its mask, the originals."""
        if reads.plan is None and not any(p.findings for p in protected):
            return {}
        summary: dict[str, JsonValue] = {
            "rewritten": [rw.sql if rw else None for rw in reads.rewritten],
            "statements": [
                {
                    "columns": [note.as_dict() for note in p.notes if note.mask is not None or note.detected],
                    "detections": len(p.findings),
                }
                for p in protected
            ],
        }
        mode = self.config.settings.masking.originals
        if self.audit_key is not None and mode != "none":
            unmasked: list[ResultSet | None] = list(raw) if raw else [None] * len(protected)
            if any(p.masked for p in protected):
                summary["originals"] = originals_record(mode, self.audit_key, call_id, protected, unmasked)
        return summary

    def scan_returned(self, results: Sequence[WriteResult]) -> int:
        """Detectors over the rows a write returned (RETURNING); how many values they replaced."""
        found = 0
        for result in results:
            if result.returned is not None:
                found += len(self.detectors.scan(result.returned.rows, range(len(result.returned.columns))))
        return found

    async def described(self, name: str, groups: frozenset[str], table: str) -> dict[str, Any]:
        """The masked columns of a described relation, for this caller."""
        if not self.applies(name, groups):
            return {}
        plan = await self.plan(name, groups)
        relation = plan.catalog.resolve(_table_of(table, plan.catalog.dialect))
        if relation is None:
            plan = await self.plan(name, groups, refresh=True)
            relation = plan.catalog.resolve(_table_of(table, plan.catalog.dialect))
        return dict(plan.masks(relation)) if relation is not None else {}
