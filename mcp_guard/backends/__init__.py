"""Database backends behind one interface; see `base.Backend`."""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import unquote, urlsplit

from mcp_guard.backends.base import Backend, SqlFunction
from mcp_guard.errors import ConfigError
from mcp_guard.redact import redact

_URL_FORMS = "sqlite:///absolute/path.db or postgresql://user@host:port/database"


def open_backend(
    url: str,
    *,
    pool_size: int = 4,
    read_timeout_s: float | None = None,
    functions: Sequence[SqlFunction] = (),
) -> Backend:
    """The backend for `url`, not yet connected (`await backend.open()` connects).

    `functions` are registered on SQLite read connections (the masks); PostgreSQL masks are SQL.

    `sqlite:///abs/path.db` (three slashes, then an absolute path) or `postgresql://...` /
    `postgres://...`; anything else is a ConfigError whose message never shows a password.
    `read_timeout_s`, the connection's usual statement timeout, lets PostgreSQL reads start timed.
    """
    if pool_size < 1:
        raise ConfigError(f"pool_size must be at least 1, not {pool_size}")
    scheme, _, rest = url.partition("://")
    scheme = scheme.lower()
    if scheme == "sqlite":
        from mcp_guard.backends.sqlite import SqliteBackend

        if not rest.startswith("/") or rest.strip("/") == "" or "?" in rest or "#" in rest:
            raise ConfigError(f"a SQLite URL names an absolute file: {_URL_FORMS}; got {redact(url)!r}")
        return SqliteBackend("/" + unquote(rest).lstrip("/"), pool_size=pool_size, functions=functions)
    if scheme in ("postgresql", "postgres"):
        from mcp_guard.backends.postgres import PostgresBackend

        try:
            urlsplit(url).port  # noqa: B018 - raises on a port that is not a number
        except ValueError as error:
            raise ConfigError(f"the port in {redact(url)!r} is not a number") from error
        return PostgresBackend(url, pool_size=pool_size, read_timeout_s=read_timeout_s)
    raise ConfigError(f"unsupported database URL {redact(url)!r}: use {_URL_FORMS}")
