"""Rules → decision: identity groups × connection × classification → allow | deny | approve.

Rules are ordered and the first whose every condition matches decides. A call is decided statement by
statement and the strictest decision wins: one denied statement refuses the whole call; otherwise one
held statement holds it, and then every held statement's approval terms must be met.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Literal

from sqlglot import exp

from mcp_guard.classify import Classification, Statement, StatementKind
from mcp_guard.config import PolicyRule, PolicySettings

Action = Literal["allow", "deny", "approve"]

DEFAULT_RULE = "default"

_NESTED_WRITES: dict[type[exp.Expression], str] = {
    exp.Delete: "DELETE",
    exp.Update: "UPDATE",
    exp.Insert: "INSERT",
    exp.Merge: "MERGE",
}


@dataclass(frozen=True, slots=True)
class Requirement:
    """`approvals` distinct reviewers from any of the `approvers` groups must approve."""

    rule: str
    approvers: tuple[str, ...]
    approvals: int

    def as_dict(self) -> dict[str, object]:
        return {"rule": self.rule, "approvers": list(self.approvers), "approvals": self.approvals}

    def describe(self) -> str:
        who = " or ".join(self.approvers)
        return f"{self.approvals} approval{'s' if self.approvals != 1 else ''} from {who}"


@dataclass(frozen=True, slots=True)
class Hold:
    """The approval terms of a held call: every requirement met, before `ttl` seconds pass."""

    requirements: tuple[Requirement, ...]
    ttl: float


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    rule: str
    reason: str
    statement_index: int | None = None
    hold: Hold | None = None

    @property
    def allowed(self) -> bool:
        return self.action == "allow"

    @property
    def held(self) -> bool:
        return self.action == "approve"


def _any_glob(values: tuple[str, ...], globs: tuple[str, ...]) -> bool:
    return any(fnmatchcase(value.lower(), glob.lower()) for value in values for glob in globs)


def operations(statement: Statement) -> frozenset[str]:
    """The statement's operation and every write nested in it (a DELETE inside a CTE), upper case."""
    found = {statement.operation.upper()}
    if statement.tree is not None:
        for node_type, name in _NESTED_WRITES.items():
            if statement.tree.find(node_type) is not None:
                found.add(name)
    return frozenset(found)


def _matches(
    rule: PolicyRule,
    statement: Statement,
    tool: str,
    connection: str,
    groups: frozenset[str],
    rows: int | None,
) -> bool:
    unknown = statement.kind is StatementKind.UNKNOWN
    if rule.tools and tool not in rule.tools:
        return False
    if rule.connections and not _any_glob((connection,), rule.connections):
        return False
    if rule.groups and not groups.intersection(rule.groups):
        return False
    if rule.kinds and statement.kind not in rule.kinds:
        return False
    if rule.flags and not statement.flags.intersection(rule.flags):
        return False
    # What cannot be known (the operations or tables of an unknown statement, a row estimate the
    # database could not give) may be what a restricting rule is about, never provably what an
    # allowing rule admits.
    if rule.operations:
        if unknown:
            if rule.action == "allow":
                return False
        elif not operations(statement) & {op.upper() for op in rule.operations}:
            return False
    if rule.rows_above is not None:
        if statement.kind is StatementKind.READ:
            rows = 0  # a read changes no row
        if rows is None and rule.action == "allow":
            return False
        if rows is not None and rows <= rule.rows_above:
            return False
    if rule.tables:
        if unknown:
            return rule.action != "allow"
        names = statement.tables + tuple(t.rsplit(".", 1)[-1] for t in statement.tables if "." in t)
        if not _any_glob(names, rule.tables):
            return False
    return True


def _describe(statement: Statement, rows: int | None) -> str:
    flags = ", ".join(sorted(statement.flags))
    estimate = f", about {rows} rows" if rows is not None else ""
    return f"{statement.operation} ({statement.kind}{'; ' + flags if flags else ''}{estimate})"


def needs_estimate(
    policy: PolicySettings, statement: Statement, *, tool: str, connection: str, groups: frozenset[str]
) -> bool:
    """Whether a rule that looks at row counts could match this statement, so that asking the
    database for its estimate (one more round trip) can change the decision."""
    return any(
        rule.rows_above is not None
        and _matches(rule, statement, tool, connection, groups, rows=rule.rows_above + 1)
        for rule in policy.rules
    )


def decide_statement(
    policy: PolicySettings,
    statement: Statement,
    *,
    tool: str,
    connection: str,
    groups: frozenset[str],
    rows: int | None = None,
) -> Decision:
    """`rows`: the database's estimate of the rows the statement changes, None when unknown."""
    for rule in policy.rules:
        if _matches(rule, statement, tool, connection, groups, rows):
            reason = rule.message or f"rule {rule.name!r} {rule.action}s {_describe(statement, rows)}"
            hold = None
            if rule.action == "approve":
                hold = Hold((Requirement(rule.name, rule.approvers, rule.approvals),), rule.ttl)
            return Decision(rule.action, rule.name, reason, hold=hold)
    return Decision(policy.default, DEFAULT_RULE, f"no rule matched {_describe(statement, rows)}")


def decide(
    policy: PolicySettings,
    classification: Classification,
    *,
    tool: str,
    connection: str,
    groups: frozenset[str],
    estimates: Sequence[int | None] | None = None,
) -> Decision:
    """The strictest decision over every statement; names the statement that decided it."""
    decisions = [
        decide_statement(
            policy,
            statement,
            tool=tool,
            connection=connection,
            groups=groups,
            rows=estimates[index] if estimates else None,
        )
        for index, statement in enumerate(classification.statements)
    ]
    for index, decision in enumerate(decisions):
        if decision.action == "deny":
            return Decision(decision.action, decision.rule, decision.reason, index)
    held = [(index, d) for index, d in enumerate(decisions) if d.hold is not None]
    if held:
        first = held[0][0]
        requirements = tuple(dict.fromkeys(r for _, d in held if d.hold for r in d.hold.requirements))
        ttl = min(d.hold.ttl for _, d in held if d.hold)
        return Decision(
            "approve",
            ", ".join(dict.fromkeys(d.rule for _, d in held)),
            "; ".join(dict.fromkeys(d.reason for _, d in held)),
            first,
            Hold(requirements, ttl),
        )
    rules = ", ".join(dict.fromkeys(d.rule for d in decisions))
    return Decision("allow", rules, "; ".join(dict.fromkeys(d.reason for d in decisions)))
