"""Rules → decision: identity groups × connection × classification → allow | deny.

Rules are ordered and the first whose every condition matches decides. A call is decided statement by
statement and the strictest decision wins, so one denied statement refuses the whole call.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Literal

from mcp_guard.classify import Classification, Statement, StatementKind
from mcp_guard.config import PolicyRule, PolicySettings

Action = Literal["allow", "deny"]

DEFAULT_RULE = "default"


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    rule: str
    reason: str
    statement_index: int | None = None

    @property
    def allowed(self) -> bool:
        return self.action == "allow"


def _any_glob(values: tuple[str, ...], globs: tuple[str, ...]) -> bool:
    return any(fnmatchcase(value.lower(), glob.lower()) for value in values for glob in globs)


def _matches(
    rule: PolicyRule, statement: Statement, tool: str, connection: str, groups: frozenset[str]
) -> bool:
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
    if rule.tables:
        if statement.kind is StatementKind.UNKNOWN:
            # Its tables cannot be known: it may touch the rule's tables, never provably only them.
            return rule.action == "deny"
        names = statement.tables + tuple(t.rsplit(".", 1)[-1] for t in statement.tables if "." in t)
        if not _any_glob(names, rule.tables):
            return False
    return True


def _describe(statement: Statement) -> str:
    flags = ", ".join(sorted(statement.flags))
    return f"{statement.operation} ({statement.kind}{'; ' + flags if flags else ''})"


def decide_statement(
    policy: PolicySettings, statement: Statement, *, tool: str, connection: str, groups: frozenset[str]
) -> Decision:
    for rule in policy.rules:
        if _matches(rule, statement, tool, connection, groups):
            reason = rule.message or f"rule {rule.name!r} {rule.action}s {_describe(statement)}"
            return Decision(rule.action, rule.name, reason)
    return Decision(policy.default, DEFAULT_RULE, f"no rule matched {_describe(statement)}")


def decide(
    policy: PolicySettings,
    classification: Classification,
    *,
    tool: str,
    connection: str,
    groups: frozenset[str],
) -> Decision:
    """The strictest decision over every statement; names the statement that decided it."""
    decisions = [
        decide_statement(policy, statement, tool=tool, connection=connection, groups=groups)
        for statement in classification.statements
    ]
    for index, decision in enumerate(decisions):
        if not decision.allowed:
            return Decision(decision.action, decision.rule, decision.reason, index)
    rules = ", ".join(dict.fromkeys(d.rule for d in decisions))
    return Decision("allow", rules, "; ".join(dict.fromkeys(d.reason for d in decisions)))
