"""The audit store behind one interface; see `base.Store`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from mcp_guard.errors import ConfigError
from mcp_guard.store.base import Store

if TYPE_CHECKING:
    from mcp_guard.store.sqlite import Durability

_SCHEME = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<rest>.*)$", re.S)


def open_store(url: str, *, durability: Durability = "writes") -> Store:
    """The store named by `url` (`sqlite:///absolute/path.db`, a plain path, or `postgresql://...`),
    not yet opened."""
    from mcp_guard.store.sqlite import SqliteStore  # each engine's driver loads only when chosen

    match = _SCHEME.match(url)
    if match is None:
        if not url.strip():
            raise ConfigError("the audit store location is empty; give sqlite:///absolute/path.db or a path")
        return SqliteStore(Path(url).expanduser().absolute(), durability=durability)
    scheme = match["scheme"].lower()
    if scheme == "sqlite":
        rest = match["rest"]  # sqlite:////var/x.db says /var/x.db as well as sqlite:///var/x.db does
        path = Path("/" + rest.lstrip("/")) if rest.startswith("/") else Path(rest)
        if not path.is_absolute():
            raise ConfigError(
                f"audit store sqlite://{match['rest']}: the path must be absolute (sqlite:///var/lib/audit.db)"
            )
        return SqliteStore(path, durability=durability)
    if scheme in ("postgresql", "postgres"):
        from mcp_guard.store.postgres import PostgresStore

        return PostgresStore(url, durability=durability)
    # the URL itself is not repeated: it may carry a password
    raise ConfigError(
        f"audit store scheme {scheme}:// is not supported; use sqlite:///absolute/path.db or postgresql://"
    )
