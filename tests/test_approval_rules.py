"""The rules of approval without a server: lifecycle, binding, keys, policy terms, configuration."""

from __future__ import annotations

import itertools

import pytest

from mcp_guard.approvals import ApprovalState, binding_digest, check_transition
from mcp_guard.classify import classify
from mcp_guard.config import PolicyRule, PolicySettings, load_config
from mcp_guard.errors import ApprovalError, ConfigError
from mcp_guard.policy import Requirement, decide, needs_estimate
from mcp_guard.reviewers import ReviewerKey, enroll
from tests.approval_support import key

LEGAL = {
    (ApprovalState.PENDING, ApprovalState.APPROVED),
    (ApprovalState.PENDING, ApprovalState.DENIED),
    (ApprovalState.PENDING, ApprovalState.EXPIRED),
    (ApprovalState.APPROVED, ApprovalState.EXECUTED),
    (ApprovalState.APPROVED, ApprovalState.EXPIRED),
}


@pytest.mark.parametrize(("current", "target"), list(itertools.product(ApprovalState, repeat=2)))
def test_only_the_lifecycles_transitions_are_allowed_and_a_refusal_says_why(current, target):
    if (current, target) in LEGAL:
        check_transition("r1", current, target)
        return
    with pytest.raises(ApprovalError) as refused:
        check_transition("r1", current, target)
    assert str(refused.value).startswith(f"request r1 is {current}; it cannot become {target} (")


def test_the_final_states_name_their_reason():
    with pytest.raises(
        ApprovalError, match=r"is executed; it cannot become approved \(an approval runs once\)"
    ):
        check_transition("r1", ApprovalState.EXECUTED, ApprovalState.APPROVED)
    with pytest.raises(ApprovalError, match=r"\(an expired request never runs\)"):
        check_transition("r1", ApprovalState.EXPIRED, ApprovalState.EXECUTED)
    with pytest.raises(ApprovalError, match=r"\(it is still waiting for reviewers\)"):
        check_transition("r1", ApprovalState.PENDING, ApprovalState.EXECUTED)


def test_the_binding_digest_changes_with_every_bound_field_and_the_exact_text():
    base = ("shop", ["DELETE FROM t WHERE id = ?"], [1], "local:ann")
    variants = [
        ("prod", *base[1:]),
        ("shop", ["DELETE FROM t WHERE id = ? "], [1], "local:ann"),
        ("shop", ["DELETE FROM t WHERE id = ?"], [2], "local:ann"),
        ("shop", ["DELETE FROM t WHERE id = ?"], ["1"], "local:ann"),
        ("shop", ["DELETE FROM t WHERE id = ?"], [1], "local:bob"),
        ("shop", ["DELETE FROM t WHERE id = ?", "SELECT 1"], [1], "local:ann"),
    ]
    digests = {binding_digest(*base)} | {binding_digest(*v) for v in variants}  # type: ignore[arg-type]
    assert len(digests) == 1 + len(variants)
    assert binding_digest(*base) == binding_digest(*base)  # type: ignore[arg-type]


def test_a_reviewer_key_holds_only_public_values_and_checks_its_passphrase():
    made = enroll("a long passphrase", cost=14)
    text = str(made)
    assert ReviewerKey.parse(text) == made and text.startswith("ed25519-scrypt:14:")
    assert "a long passphrase" not in text
    made.derive("a long passphrase")
    with pytest.raises(ApprovalError, match="wrong passphrase"):
        made.derive("a long passphrasE")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("ssh-ed25519 AAAA", "looks like ed25519-scrypt:16:SALT:PUBLIC_KEY"),
        ("ed25519-scrypt:x:abc:def", "not readable"),
        ("ed25519-scrypt:9:" + "A" * 22 + ":" + "A" * 43, "cost 9 is outside 14..20"),
        ("ed25519-scrypt:16:AAAA:" + "A" * 43, "wrong length"),
    ],
)
def test_a_damaged_reviewer_key_is_refused_naming_the_configuration_key(tmp_path, text, message):
    path = tmp_path / "c.toml"
    path.write_text(
        f'[connections.x]\nurl = "sqlite:////tmp/x.db"\n[approvals.reviewers.dana]\nkey = "{text}"\n'
    )
    with pytest.raises(ConfigError) as refused:
        load_config(path)
    assert str(refused.value).startswith(f"{path}: approvals.reviewers.dana.key: ")
    assert message in str(refused.value)


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ('name = "r"\naction = "approve"\nkinds = ["ddl"]\n', "needs `approvers`"),
        ('name = "r"\naction = "deny"\napprovers = ["dba"]\n', "approvers: only `approve` rules"),
        ('name = "r"\naction = "allow"\nttl = 5\n', "ttl: only `approve` rules"),
        ('name = "r"\naction = "approve"\napprovers = ["a"]\napprovals = 0\n', "greater than or equal to 1"),
        ('name = "r"\naction = "approve"\napprovers = ["a"]\ntools = ["query"]\n', "cannot apply to `query`"),
    ],
)
def test_approval_terms_belong_to_approve_rules_only(tmp_path, rule, message):
    path = tmp_path / "c.toml"
    path.write_text(f'[connections.x]\nurl = "sqlite:////tmp/x.db"\n[[policy.rules]]\n{rule}')
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_the_example_configurations_reviewers_load(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(
        f'[connections.x]\nurl = "sqlite:////tmp/x.db"\n[approvals]\nwait = 0\n'
        f'[approvals.reviewers.dana]\nkey = "{key("dana")}"\ngroups = ["dba"]\n'
    )
    [dana] = load_config(path).settings.approvals.reviewer_map().values()
    assert (dana.name, dana.subject, dana.groups) == ("dana", "local:dana", frozenset({"dba"}))


def held(
    sql: str, *, dialect: str = "postgres", estimates: list[int | None] | None = None
) -> tuple[str, str]:
    decision = decide(
        PolicySettings(),
        classify(sql, dialect),
        tool="execute",
        connection="c",
        groups=frozenset(),
        estimates=estimates,
    )
    return decision.action, decision.rule


def test_the_default_policy_holds_a_delete_above_100_estimated_rows_and_when_it_cannot_know():
    assert held("DELETE FROM t WHERE id < 500", estimates=[400]) == ("approve", "hold-large-delete")
    assert held("DELETE FROM t WHERE id < 50", estimates=[100]) == ("allow", "allow-writes-with-where")
    assert held("DELETE FROM t WHERE id < 50", estimates=[None]) == ("approve", "hold-large-delete")
    assert held("UPDATE t SET a = 1 WHERE id < 500", estimates=[400]) == ("allow", "allow-writes-with-where")
    cte = "WITH d AS (DELETE FROM t WHERE id < 500 RETURNING id) SELECT count(*) FROM d"
    assert held(cte, estimates=[400]) == ("approve", "hold-large-delete")
    assert held("DROP TABLE t") == ("approve", "hold-ddl")
    assert held("GRANT SELECT ON t TO x") == ("deny", "deny-risky-kinds")


def test_an_allow_rule_never_admits_what_it_cannot_know():
    policy = PolicySettings(
        rules=(PolicyRule(name="small-deletes", action="allow", operations=("DELETE",)),)
        + (PolicyRule(name="few-rows", action="allow", kinds=(), rows_above=10),),
        default="deny",
    )
    unknown = classify("FROBNICATE everything", "postgres")
    decision = decide(policy, unknown, tool="execute", connection="c", groups=frozenset(), estimates=[None])
    assert decision.action == "deny"


def test_every_held_statements_terms_are_needed_and_the_shortest_ttl_applies():
    policy = PolicySettings(
        rules=(
            PolicyRule(
                name="ddl", action="approve", kinds=("ddl",), approvers=("dba",), approvals=2, ttl=600
            ),
            PolicyRule(
                name="wipe", action="approve", flags=("write_without_where",), approvers=("ops",), ttl=60
            ),
            PolicyRule(name="rest", action="allow"),
        )
    )
    decision = decide(
        policy,
        classify("DROP TABLE a; DELETE FROM b; SELECT 1", "postgres"),
        tool="execute",
        connection="c",
        groups=frozenset(),
    )
    assert decision.action == "approve" and decision.rule == "ddl, wipe" and decision.statement_index == 0
    assert decision.hold is not None and decision.hold.ttl == 60
    assert decision.hold.requirements == (Requirement("ddl", ("dba",), 2), Requirement("wipe", ("ops",), 1))


def test_the_database_is_asked_for_an_estimate_only_where_a_rule_could_use_it():
    def asked(sql: str) -> bool:
        [statement] = classify(sql, "postgres").statements
        return needs_estimate(PolicySettings(), statement, tool="execute", connection="c", groups=frozenset())

    assert asked("DELETE FROM t WHERE id < 500")
    assert not asked("UPDATE t SET a = 1 WHERE id < 500")
    assert not asked("INSERT INTO t VALUES (1)")
