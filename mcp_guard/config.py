"""One TOML file → validated settings; every error names the file, the key and what is wrong.

Connection URLs never sit in the file in clear when they can carry a credential: a connection names
an environment variable (`url_env`) or a file (`url_file`) that holds its URL. Only a `sqlite:///`
URL, which has no credential, may be written inline.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import platformdirs
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mcp_guard.backends.base import Limits
from mcp_guard.classify import RiskFlag, StatementKind
from mcp_guard.errors import ConfigError

CONFIG_ENV = "MCP_GUARD_CONFIG"
HOME_ENV = "MCP_GUARD_HOME"


def guard_home() -> Path:
    """Where the demo database and the default audit store live."""
    configured = os.environ.get(HOME_ENV)
    return Path(configured).expanduser() if configured else Path(platformdirs.user_data_dir("mcp-guard"))


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ConnectionSettings(_Model):
    """One database the assistant may reach through the guard."""

    url_env: str | None = None
    """Name of the environment variable that holds the connection URL."""
    url_file: Path | None = None
    """Path of a file whose first line is the connection URL."""
    url: str | None = None
    """Inline URL; allowed only for `sqlite:///` URLs, which carry no credential."""
    description: str = ""
    """Shown to the assistant by list_connections."""
    row_limit: Annotated[int, Field(gt=0, le=100_000)] = 500
    """Rows returned by one statement at most; more sets `truncated`."""
    byte_limit: Annotated[int, Field(gt=0, le=100_000_000)] = 1_000_000
    """Bytes of JSON rows returned by one statement at most."""
    timeout: Annotated[float, Field(gt=0, le=3600)] = 5.0
    """Statement timeout in seconds."""
    pool_size: Annotated[int, Field(gt=0, le=100)] = 4
    """Database connections kept open (PostgreSQL)."""

    @model_validator(mode="after")
    def _one_source(self) -> ConnectionSettings:
        sources = [name for name in ("url_env", "url_file", "url") if getattr(self, name) is not None]
        if len(sources) != 1:
            raise ValueError("give exactly one of url_env, url_file or url (for sqlite:/// only)")
        if self.url is not None and not self.url.startswith("sqlite:///"):
            raise ValueError(
                "only sqlite:/// URLs may be written in the file; put other URLs in an environment "
                "variable (url_env) or a file (url_file) so the credential stays out of the config"
            )
        return self

    @property
    def limits(self) -> Limits:
        return Limits(row_limit=self.row_limit, byte_limit=self.byte_limit, timeout_s=self.timeout)


class PolicyRule(_Model):
    """A rule matches when every field it sets matches; the first matching rule decides."""

    name: Annotated[str, Field(min_length=1)]
    """Named in every decision and audit record."""
    action: Literal["allow", "deny"]
    kinds: tuple[StatementKind, ...] = ()
    """Statement kinds this rule applies to (any of)."""
    flags: tuple[RiskFlag, ...] = ()
    """Risk flags (any of)."""
    tables: tuple[str, ...] = ()
    """Table globs (any table of the statement matching any glob)."""
    connections: tuple[str, ...] = ()
    """Connection name globs."""
    groups: tuple[str, ...] = ()
    """Identity groups (any of)."""
    tools: tuple[Literal["query", "execute"], ...] = ()
    """Tools this rule applies to."""
    message: str = ""
    """Shown to the assistant when this rule denies."""


DEFAULT_RULES: tuple[PolicyRule, ...] = (
    PolicyRule(
        name="deny-risky-kinds",
        action="deny",
        kinds=(
            StatementKind.DDL,
            StatementKind.DCL,
            StatementKind.ADMIN,
            StatementKind.UNKNOWN,
            StatementKind.TRANSACTION,
            StatementKind.SESSION,
        ),
        message="schema changes, permissions, administration, session or transaction control and "
        "statements mcp-guard cannot classify are not allowed; ask a person with direct access",
    ),
    PolicyRule(
        name="deny-write-without-where",
        action="deny",
        flags=(RiskFlag.WRITE_WITHOUT_WHERE,),
        message="UPDATE and DELETE must have a WHERE clause that narrows the rows they change",
    ),
    PolicyRule(name="allow-reads", action="allow", kinds=(StatementKind.READ,)),
    PolicyRule(
        name="allow-writes-with-where", action="allow", kinds=(StatementKind.WRITE,), tools=("execute",)
    ),
)


class PolicySettings(_Model):
    rules: tuple[PolicyRule, ...] = DEFAULT_RULES
    """Ordered rules; without a [policy] table the default policy applies."""
    default: Literal["allow", "deny"] = "deny"
    """What happens when no rule matches."""

    @field_validator("rules")
    @classmethod
    def _unique_names(cls, rules: tuple[PolicyRule, ...]) -> tuple[PolicyRule, ...]:
        seen: set[str] = set()
        for rule in rules:
            if rule.name in seen:
                raise ValueError(f"rule name {rule.name!r} is used twice; names must be unique")
            seen.add(rule.name)
        return rules


class IdentitySettings(_Model):
    mode: Literal["local"] = "local"
    """`local`: the operating-system user runs every call (single-user mode)."""
    groups: tuple[str, ...] = ()
    """Groups given to the local identity, for policy rules."""


class AuditSettings(_Model):
    url: str | None = None
    """Audit store: `sqlite:///path`; default: audit.db under MCP_GUARD_HOME."""
    response_cap: Annotated[int, Field(gt=0)] = 65_536
    """Characters of each response kept in the audit record."""
    checkpoint_every: Annotated[int, Field(ge=0)] = 1000
    """Sign a checkpoint of the chain every N entries (and at each session end); 0: no checkpoints."""
    signing_key_file: Path | None = None
    """Ed25519 key that signs checkpoints; default audit-signing.key under MCP_GUARD_HOME, created on
    first use. The environment variable MCP_GUARD_SIGNING_KEY, when set, is used instead."""
    trusted_keys: tuple[str, ...] = ()
    """Public keys (`ed25519:<base64>`) whose checkpoints `audit verify` accepts besides the signing key's."""
    witness: Path | None = None
    """File every checkpoint is appended to, outside the database; default: the store's path + `.witness`."""
    prompt_window: Annotated[float, Field(gt=0)] = 1800.0
    """Seconds within which a prompt is linked to a call by project directory and time alone."""

    @field_validator("trusted_keys")
    @classmethod
    def _public_keys(cls, keys: tuple[str, ...]) -> tuple[str, ...]:
        from mcp_guard.store.checkpoint import parse_public_key

        for key in keys:
            try:
                parse_public_key(key, "trusted key")
            except ConfigError as error:
                raise ValueError(str(error)) from None
        return keys


class Settings(_Model):
    connections: dict[str, ConnectionSettings] = Field(min_length=1)
    policy: PolicySettings = PolicySettings()
    identity: IdentitySettings = IdentitySettings()
    audit: AuditSettings = AuditSettings()

    @field_validator("connections")
    @classmethod
    def _connection_names(cls, connections: dict[str, ConnectionSettings]) -> dict[str, ConnectionSettings]:
        for name in connections:
            if not name.replace("_", "").replace("-", "").isalnum():
                raise ValueError(f"connection name {name!r} may hold only letters, digits, '-' and '_'")
        return connections


@dataclass(frozen=True, slots=True)
class Config:
    """Validated settings plus where they came from and the resolved secrets."""

    settings: Settings
    source: str
    urls: Mapping[str, str]
    audit_url: str
    signing_key_path: Path | None = None
    """Where the checkpoint signing key is read (and created on first use)."""
    witness_path: Path | None = None
    """The file checkpoints are appended to, outside the audit database."""

    @property
    def secrets(self) -> tuple[str, ...]:
        """Strings that must never appear in any output (URLs and their passwords)."""
        found: list[str] = []
        for url in self.urls.values():
            found.append(url)
            if "@" in url and "://" in url:
                userinfo = url.split("://", 1)[1].rsplit("@", 1)[0]
                if ":" in userinfo:
                    found.append(userinfo.split(":", 1)[1])
        return tuple(found)


def _key_path(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


def parse_settings(data: Mapping[str, Any], source: str) -> Settings:
    try:
        return Settings.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        message = first["msg"].removeprefix("Value error, ")
        raise ConfigError(message, file=source, key=_key_path(first["loc"])) from None


def _resolve_url(name: str, conn: ConnectionSettings, source: str) -> str:
    key = f"connections.{name}"
    if conn.url is not None:
        url = conn.url
    elif conn.url_env is not None:
        url = os.environ.get(conn.url_env, "").strip()
        if not url:
            raise ConfigError(
                f"environment variable {conn.url_env} is not set or empty", file=source, key=f"{key}.url_env"
            )
    else:
        assert conn.url_file is not None
        try:
            lines = conn.url_file.expanduser().read_text(encoding="utf-8").splitlines()
        except OSError as error:
            raise ConfigError(
                f"cannot read {conn.url_file}: {error.strerror}", file=source, key=f"{key}.url_file"
            ) from None
        url = lines[0].strip() if lines else ""
        if not url:
            raise ConfigError(f"{conn.url_file} is empty", file=source, key=f"{key}.url_file")
    if not url.startswith(("sqlite:///", "postgresql://", "postgres://")):
        raise ConfigError(
            "the URL must start with sqlite:///, postgresql:// or postgres://", file=source, key=key
        )
    return url


@dataclass(frozen=True, slots=True)
class AuditLocations:
    """Where the audit store, the checkpoint signing key and the witness file are."""

    store_url: str
    signing_key_path: Path
    witness_path: Path | None


def audit_locations(audit: AuditSettings, store_url: str | None = None) -> AuditLocations:
    """The locations `audit` names, defaults filled in; `store_url` overrides the store (--store)."""
    url = store_url or audit.url or f"sqlite:///{guard_home() / 'audit.db'}"
    return AuditLocations(
        store_url=url,
        signing_key_path=(audit.signing_key_file or guard_home() / "audit-signing.key").expanduser(),
        witness_path=audit.witness.expanduser() if audit.witness else _beside(url),
    )


def build_config(settings: Settings, source: str) -> Config:
    urls = {name: _resolve_url(name, conn, source) for name, conn in settings.connections.items()}
    where = audit_locations(settings.audit)
    return Config(
        settings=settings,
        source=source,
        urls=urls,
        audit_url=where.store_url,
        signing_key_path=where.signing_key_path,
        witness_path=where.witness_path,
    )


def _beside(audit_url: str) -> Path | None:
    """`<store file>.witness` for an SQLite store: another file, so cutting the database leaves it."""
    if audit_url.startswith("sqlite:///"):
        path = Path(audit_url.removeprefix("sqlite://"))
    elif "://" not in audit_url:
        path = Path(audit_url).expanduser().absolute()
    else:
        return None
    return path.with_name(path.name + ".witness")


def demo_config() -> Config:
    """The built-in demo: the shop database under MCP_GUARD_HOME, created on first use."""
    from mcp_guard.demo.data import create_demo_database

    home = guard_home()
    database = home / "demo.db"
    if not database.exists():
        create_demo_database(database)
    settings = Settings(
        connections={
            "shop": ConnectionSettings(
                url=f"sqlite:///{database}",
                description="Demo shop: customers, orders, payments, api_keys (SQLite, made-up data)",
            ),
        }
    )
    return build_config(settings, "(built-in demo)")


def load_config(path: Path) -> Config:
    """Read, validate and resolve one configuration file."""
    return build_config(read_settings(path), str(path))


def read_settings(path: Path) -> Settings:
    """Read and validate one configuration file, without resolving connection URLs (audit commands
    need no database credential)."""
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"cannot read the configuration: {error.strerror}", file=source) from None
    except UnicodeDecodeError:
        raise ConfigError("the configuration is not UTF-8 text", file=source) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"not valid TOML: {error}", file=source) from None
    return parse_settings(data, source)


def config_path_from_env(explicit: str | None) -> Path | None:
    chosen = explicit or os.environ.get(CONFIG_ENV)
    return Path(chosen).expanduser() if chosen else None
