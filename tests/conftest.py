"""Shared fixtures: real databases (PostgreSQL on 127.0.0.1:5432, SQLite files), never mocks."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from mcp_guard.demo.data import create_demo_database, shop_rows
from tests.idp import LocalIdP

PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/test"

PG_SCHEMA = """
CREATE TABLE customers (
    id serial PRIMARY KEY, name text NOT NULL, email text NOT NULL UNIQUE, phone text, ssn text,
    card_number text, notes text, created_at timestamptz NOT NULL
);
CREATE TABLE orders (
    id serial PRIMARY KEY, customer_id int NOT NULL REFERENCES customers(id), total numeric(10, 2) NOT NULL,
    status text NOT NULL, created_at timestamptz NOT NULL
);
CREATE TABLE payments (
    id serial PRIMARY KEY, order_id int NOT NULL REFERENCES orders(id), amount numeric(10, 2) NOT NULL,
    method text NOT NULL, paid_at timestamptz NOT NULL
);
CREATE TABLE api_keys (
    id serial PRIMARY KEY, customer_id int NOT NULL REFERENCES customers(id), label text NOT NULL,
    secret text NOT NULL, created_at timestamptz NOT NULL
);
"""


async def _create_pg_shop(name: str) -> None:
    try:
        admin = await asyncpg.connect(PG_ADMIN_URL, timeout=10)
    except (OSError, asyncpg.PostgresError) as error:
        raise RuntimeError(f"PostgreSQL is required at {PG_ADMIN_URL} and is unreachable: {error}") from error
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    conn = await asyncpg.connect(PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}")
    try:
        await conn.execute(PG_SCHEMA)
        for table, rows in shop_rows().items():
            await conn.copy_records_to_table(table, records=rows)
            await conn.execute(f"SELECT setval('{table}_id_seq', (SELECT max(id) FROM {table}))")
    finally:
        await conn.close()


async def _drop_pg_db(name: str) -> None:
    admin = await asyncpg.connect(PG_ADMIN_URL, timeout=10)
    try:
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = $1 AND pid <> pg_backend_pid()",
            name,
        )
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
    finally:
        await admin.close()


@pytest.fixture(scope="session")
def pg_shop_url() -> Iterator[str]:
    """A fresh PostgreSQL database holding the shop, for this test session only."""
    name = f"mcpguard_{uuid.uuid4().hex[:10]}"
    asyncio.run(_create_pg_shop(name))
    yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    asyncio.run(_drop_pg_db(name))


@pytest.fixture
def sqlite_shop(tmp_path: Path) -> Path:
    path = tmp_path / "shop.db"
    create_demo_database(path)
    return path


def write_config(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "mcp-guard.toml"
    path.write_text(f'[audit]\nurl = "sqlite:///{tmp_path / "audit.db"}"\n\n{body}')
    return path


@pytest.fixture(scope="session")
def local_idp() -> Iterator[LocalIdP]:
    """An OIDC provider on 127.0.0.1 shared by the session; tests that rotate keys make their own."""
    idp = LocalIdP().start()
    yield idp
    idp.stop()


@pytest.fixture
def fresh_idp() -> Iterator[LocalIdP]:
    """An OIDC provider of this test alone, whose keys it may rotate."""
    idp = LocalIdP().start()
    yield idp
    idp.stop()


async def _create_pg_store(name: str) -> str:
    admin = await asyncpg.connect(PG_ADMIN_URL, timeout=10)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    from mcp_guard.store.postgres import PostgresStore

    await PostgresStore(url).migrate()
    return url


@pytest.fixture(scope="session")
def pg_store_url() -> Iterator[str]:
    """A fresh PostgreSQL audit store (schema migrated) for this test session; tests empty it first."""
    name = f"mcpguard_store_{uuid.uuid4().hex[:10]}"
    url = asyncio.run(_create_pg_store(name))
    yield url
    asyncio.run(_drop_pg_db(name))


async def empty_pg_store(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("TRUNCATE audit, checkpoint, approval_requests, approval_votes")
    finally:
        await conn.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty audit store of each engine, by URL: a new SQLite file, or the session's PostgreSQL store."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'audit' / 'audit.db'}"
    url: str = request.getfixturevalue("pg_store_url")
    asyncio.run(empty_pg_store(url))
    return url
