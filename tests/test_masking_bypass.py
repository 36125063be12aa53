"""The bypass corpora through the real server: no sensitive value of the shop reaches the model.

Each statement of tests/fixtures/masking/bypass_*.sql goes through a real MCP client over stdio to a
server masking with the demo's rules and detectors. The reply (text and structure) must hold no
sensitive value in any trivial form: as is, lower or upper case, reversed, without separators, in
base64 or hex.
"""

from __future__ import annotations

import base64
import json
import re
import sqlite3

import asyncpg
import pytest

from mcp_guard.demo.data import shop_rows
from tests.client import Reply, guard_client
from tests.conftest import write_config
from tests.masking_corpus import load

MASKING = """
[masking]
hash_key_env = "TEST_MASK_KEY"

[[masking.rules]]
name = "contact-details"
columns = ["*.email", "*.phone"]
strategy = "partial"

[[masking.rules]]
name = "national-ids"
columns = ["*.ssn"]
strategy = "hash"

[[masking.rules]]
name = "card-numbers"
columns = ["*.card_number"]
strategy = "partial"

[[masking.rules]]
name = "api-secrets"
columns = ["api_keys.secret"]
strategy = "redact"
"""
KEY = "11" * 32
VIEW = (
    "CREATE VIEW masking_contacts AS"
    " SELECT c.id, c.name, c.email AS contact, upper(c.ssn) AS ident FROM customers c"
)

OUT_OF_SIGHT_VIEWS = """
CREATE OR REPLACE FUNCTION masking_ident(i int) RETURNS text LANGUAGE sql
    AS $$SELECT replace(ssn, '-', '') FROM customers WHERE id = i$$;
CREATE OR REPLACE VIEW masking_fn_view AS SELECT id, masking_ident(id) AS ident FROM customers;
CREATE OR REPLACE VIEW masking_stats_view AS
    SELECT attname, reverse(histogram_bounds::text) AS bounds FROM pg_stats WHERE tablename = 'customers';
"""
"""Views whose definitions read what no lineage sees: a function querying a masked table itself, the
statistics catalog. Their values are written so the detectors would not catch them."""

_EMBEDDED = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[a-z]{2,}|\+1-202-555-[0-9]{4}|\b[0-9]{13,19}\b")


def sensitive_values() -> list[str]:
    """Every value the rules or the detectors must keep from the model."""
    rows = shop_rows()
    values: set[str] = set()
    for _, _, email, phone, ssn, card, notes, _ in rows["customers"]:
        values.update({email, phone, ssn, card})
        values.update(_EMBEDDED.findall(notes))
    values.update(secret for _, _, _, secret, _ in rows["api_keys"])
    return sorted(values)


def _forms(value: str) -> set[str]:
    bare = re.sub(r"[-@.+ ]", "", value)
    forms = {value, value.lower(), value.upper(), value[::-1], bare, bare.lower(), bare.upper()}
    forms.add(base64.b64encode(value.encode()).decode().rstrip("="))
    forms.add(value.encode().hex())
    return {form for form in forms if len(form) >= 6}


FORMS = {value: _forms(value) for value in sensitive_values()}


def leaks(reply: Reply) -> list[str]:
    haystack = reply.text + json.dumps(reply.structured or {}, ensure_ascii=False)
    squeezed = re.sub(r"[-@.+ ]", "", haystack)
    found = []
    for value, forms in FORMS.items():
        for form in forms:
            if form in haystack or form.lower() in haystack.lower() or (form.isdigit() and form in squeezed):
                found.append(f"{value!r} as {form!r}")
                break
    return found


def check(case, reply: Reply) -> list[str]:
    problems = [f"{case.id}: LEAKED {leak}" for leak in leaks(reply)]
    if case.expect == "rows" and (reply.is_error or not (reply.structured or {}).get("rows")):
        problems.append(f"{case.id}: expected rows, got: {reply.text[:300]}")
    if case.expect == "refused" and not (reply.is_error and reply.text.startswith("Denied")):
        problems.append(f"{case.id}: expected a refusal, got: {reply.text[:300]}")
    return problems


async def test_no_masked_value_reaches_the_model_on_postgres(tmp_path, pg_shop_url):
    admin = await asyncpg.connect(pg_shop_url)
    try:
        await admin.execute(f"DROP VIEW IF EXISTS masking_contacts; {VIEW}")
        await admin.execute("ANALYZE customers")  # pg_stats now holds real values
        await admin.execute(OUT_OF_SIGHT_VIEWS)
    finally:
        await admin.close()
    config = write_config(tmp_path, f'[connections.pg]\nurl_env = "SHOP_PG_URL"\n{MASKING}')
    problems: list[str] = []
    async with guard_client(config, tmp_path, SHOP_PG_URL=pg_shop_url, TEST_MASK_KEY=KEY) as client:
        for case in load("postgres"):
            problems += check(case, await client.call("query", sql=case.sql))
    assert not problems, "\n".join(problems)


async def test_no_masked_value_reaches_the_model_on_sqlite(tmp_path, sqlite_shop):
    db = sqlite3.connect(sqlite_shop)
    db.executescript(f"{VIEW}; ANALYZE;")
    db.close()
    config = write_config(tmp_path, f'[connections.shop]\nurl = "sqlite:///{sqlite_shop}"\n{MASKING}')
    problems: list[str] = []
    async with guard_client(config, tmp_path, TEST_MASK_KEY=KEY) as client:
        for case in load("sqlite"):
            problems += check(case, await client.call("query", sql=case.sql))
    assert not problems, "\n".join(problems)


def test_the_leak_check_itself_finds_every_trivial_form():
    ssn = next(v for v in FORMS if re.fullmatch(r"[0-9]{3}-[0-9]{2}-[0-9]{4}", v))
    for shown in (
        ssn,
        ssn[::-1],
        ssn.replace("-", ""),
        base64.b64encode(ssn.encode()).decode(),
        ssn.encode().hex(),
    ):
        assert leaks(Reply(text=f"x {shown} y", structured=None, is_error=False)), shown
    assert not leaks(Reply(text="***-**-1234 [masked]", structured=None, is_error=False))


@pytest.mark.parametrize("dialect", ["postgres", "sqlite"])
def test_the_corpora_cover_every_form_the_issue_names(dialect):
    text = "\n".join(case.sql for case in load(dialect)).lower()
    common = [
        "union",
        "with ",
        "order by",
        "group_concat" if dialect == "sqlite" else "row_to_json",
        "select *",
    ]
    for needle in common:
        assert needle in text, needle
