"""Policy: ordered rules, first match wins, the strictest statement decides the call."""

from __future__ import annotations

from mcp_guard.classify import Classification, RiskFlag, Statement, StatementKind
from mcp_guard.config import PolicyRule, PolicySettings
from mcp_guard.policy import Hold, Requirement, decide


def stmt(kind: StatementKind, *flags: RiskFlag, tables: tuple[str, ...] = ()) -> Statement:
    return Statement(
        text="...", kind=kind, operation=str(kind).upper(), tables=tables, flags=frozenset(flags)
    )


def calls(*statements: Statement) -> Classification:
    return Classification(sql="...", dialect="postgres", statements=statements)


DEFAULT = PolicySettings()


def test_the_default_policy_allows_reads_and_writes_with_where():
    assert decide(
        DEFAULT, calls(stmt(StatementKind.READ)), tool="query", connection="c", groups=frozenset()
    ).allowed
    decision = decide(
        DEFAULT, calls(stmt(StatementKind.WRITE)), tool="execute", connection="c", groups=frozenset()
    )
    assert decision.allowed and decision.rule == "allow-writes-with-where"


def test_the_default_policy_holds_ddl_and_writes_without_where_for_reviewers():
    no_where = calls(stmt(StatementKind.WRITE, RiskFlag.WRITE_WITHOUT_WHERE))
    held = decide(DEFAULT, no_where, tool="execute", connection="c", groups=frozenset())
    assert held.action == "approve" and held.rule == "hold-write-without-where"
    assert held.hold == Hold((Requirement("hold-write-without-where", ("reviewers",), 1),), 3600.0)
    ddl = decide(DEFAULT, calls(stmt(StatementKind.DDL)), tool="execute", connection="c", groups=frozenset())
    assert ddl.action == "approve" and ddl.rule == "hold-ddl"


def test_the_default_policy_still_denies_dcl_unknown_and_the_other_risky_kinds():
    for kind in ("dcl", "admin", "unknown", "transaction", "session"):
        decision = decide(
            DEFAULT, calls(stmt(StatementKind(kind))), tool="execute", connection="c", groups=frozenset()
        )
        assert decision.action == "deny" and decision.rule == "deny-risky-kinds", kind


def test_one_denied_statement_denies_the_call_and_is_named():
    decision = decide(
        DEFAULT,
        calls(stmt(StatementKind.READ), stmt(StatementKind.DDL), stmt(StatementKind.DCL)),
        tool="execute",
        connection="c",
        groups=frozenset(),
    )
    assert decision.action == "deny" and decision.statement_index == 2


def test_rules_match_on_groups_tables_connections_and_tools():
    policy = PolicySettings(
        rules=(
            PolicyRule(name="dba-ddl", action="allow", kinds=(StatementKind.DDL,), groups=("dba",)),
            PolicyRule(name="no-payments", action="deny", tables=("payments", "*.payments")),
            PolicyRule(
                name="prod-read-only", action="deny", kinds=(StatementKind.WRITE,), connections=("prod*",)
            ),
            PolicyRule(name="writes", action="allow", kinds=(StatementKind.WRITE,), tools=("execute",)),
            PolicyRule(name="reads", action="allow", kinds=(StatementKind.READ,)),
        )
    )
    none: frozenset[str] = frozenset()
    assert (
        decide(
            policy, calls(stmt(StatementKind.DDL)), tool="execute", connection="c", groups=frozenset({"dba"})
        ).rule
        == "dba-ddl"
    )
    assert (
        decide(policy, calls(stmt(StatementKind.DDL)), tool="execute", connection="c", groups=none).rule
        == "default"
    )
    assert (
        decide(
            policy,
            calls(stmt(StatementKind.READ, tables=("public.payments",))),
            tool="query",
            connection="c",
            groups=none,
        ).rule
        == "no-payments"
    )
    assert (
        decide(
            policy, calls(stmt(StatementKind.WRITE)), tool="execute", connection="prod-eu", groups=none
        ).rule
        == "prod-read-only"
    )
    assert (
        decide(policy, calls(stmt(StatementKind.WRITE)), tool="query", connection="dev", groups=none).action
        == "deny"
    )
    assert (
        decide(policy, calls(stmt(StatementKind.WRITE)), tool="execute", connection="dev", groups=none).rule
        == "writes"
    )


def test_a_table_rule_matches_a_statement_whose_tables_are_unknown():
    policy = PolicySettings(
        rules=(PolicyRule(name="no-payments", action="deny", tables=("payments",)),), default="allow"
    )
    assert (
        decide(
            policy, calls(stmt(StatementKind.UNKNOWN)), tool="execute", connection="c", groups=frozenset()
        ).rule
        == "no-payments"
    )
