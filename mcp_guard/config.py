"""One TOML file → validated settings; every error names the file, the key and what is wrong.

Connection URLs never sit in the file in clear when they can carry a credential: a connection names
an environment variable (`url_env`) or a file (`url_file`) that holds its URL. Only a `sqlite:///`
URL, which has no credential, may be written inline.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import parse_qs, urlsplit

import platformdirs
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mcp_guard.backends.base import Limits
from mcp_guard.errors import ConfigError
from mcp_guard.kinds import RiskFlag, StatementKind
from mcp_guard.reviewers import AnyProof, GatewayVerifier, KeyVerifier, Reviewer, ReviewerKey

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
    sql_limit: Annotated[int, Field(gt=0, le=1_000_000)] = 256_000
    """Characters of SQL one call may send. Reading a statement is CPU work on the server's event loop
    (about 0.8 ms per 1,000 characters measured here): a longer one would stall every other caller."""

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
    action: Literal["allow", "deny", "approve"]
    kinds: tuple[StatementKind, ...] = ()
    """Statement kinds this rule applies to (any of)."""
    flags: tuple[RiskFlag, ...] = ()
    """Risk flags (any of)."""
    operations: tuple[str, ...] = ()
    """Operations (any of), e.g. `DELETE`, `UPDATE`, `DROP TABLE`; a write nested in a CTE counts too."""
    rows_above: Annotated[int, Field(ge=0)] | None = None
    """Matches a write whose estimated row count is above this number."""
    tables: tuple[str, ...] = ()
    """Table globs (any table of the statement matching any glob)."""
    connections: tuple[str, ...] = ()
    """Connection name globs."""
    groups: tuple[str, ...] = ()
    """Identity groups (any of)."""
    tools: tuple[Literal["query", "execute"], ...] = ()
    """Tools this rule applies to."""
    message: str = ""
    """Shown to the assistant when this rule denies or holds."""
    approvers: tuple[str, ...] = ()
    """`approve` rules: the reviewer groups whose members may decide."""
    approvals: Annotated[int, Field(ge=1, le=100)] = 1
    """`approve` rules: distinct reviewers who must approve."""
    ttl: Annotated[float, Field(gt=0, le=30 * 86_400)] = 3600.0
    """`approve` rules: seconds a request may wait for its decision and run after it; then it expires."""

    @model_validator(mode="after")
    def _approval_terms(self) -> PolicyRule:
        terms = {"approvers", "approvals", "ttl"} & self.model_fields_set
        if self.action != "approve" and terms:
            raise ValueError(f"{', '.join(sorted(terms))}: only `approve` rules take approval terms")
        if self.action == "approve" and not self.approvers:
            raise ValueError("an `approve` rule needs `approvers`: the reviewer groups that may decide")
        if self.action == "approve" and "query" in self.tools:
            raise ValueError("only `execute` waits for reviewers; an `approve` rule cannot apply to `query`")
        return self


REVIEWERS_GROUP = "reviewers"
"""The approver group of the default policy's approval rules."""

DELETE_ROWS_HELD_ABOVE = 100
"""The default policy holds a DELETE estimated to remove more rows than this."""

DEFAULT_RULES: tuple[PolicyRule, ...] = (
    PolicyRule(
        name="deny-risky-kinds",
        action="deny",
        kinds=(
            StatementKind.DCL,
            StatementKind.ADMIN,
            StatementKind.UNKNOWN,
            StatementKind.TRANSACTION,
            StatementKind.SESSION,
        ),
        message="permissions, administration, session or transaction control and statements mcp-guard "
        "cannot classify are not allowed; ask a person with direct access",
    ),
    PolicyRule(
        name="hold-ddl",
        action="approve",
        kinds=(StatementKind.DDL,),
        approvers=(REVIEWERS_GROUP,),
        message="schema changes wait for a reviewer's approval",
    ),
    PolicyRule(
        name="hold-write-without-where",
        action="approve",
        flags=(RiskFlag.WRITE_WITHOUT_WHERE,),
        approvers=(REVIEWERS_GROUP,),
        message="an UPDATE or DELETE without a WHERE clause changes every row; it waits for a reviewer",
    ),
    PolicyRule(
        name="hold-large-delete",
        action="approve",
        operations=("DELETE",),
        rows_above=DELETE_ROWS_HELD_ABOVE,
        approvers=(REVIEWERS_GROUP,),
        message=f"a DELETE of more than {DELETE_ROWS_HELD_ABOVE} rows (by the database's estimate) waits "
        "for a reviewer",
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


SIGNING_ALGORITHMS = ("RS256", "RS384", "RS512", "ES256", "ES384", "ES512")
_OIDC_ONLY = (
    "issuer",
    "audience",
    "jwks_url",
    "jwks_file",
    "authorized_party",
    "token_env",
    "token_file",
    "resource_url",
)


def command_line_url(text: str) -> str:
    """An audit store URL given as a command-line argument, where every user of the machine can read
    it (`ps`, shell history): refused when it holds a password."""
    if "://" in text:
        parts = urlsplit(text)
        if parts.password or "password" in parse_qs(parts.query):
            raise argparse.ArgumentTypeError(
                "this URL holds a password, which every user of this machine could read on the command "
                "line; leave it out and set PGPASSWORD or use ~/.pgpass (PostgreSQL reads either), or "
                "name the store in the configuration (url_env, url_file)"
            )
    return text


MAX_COMMAND_LINE_COUNT = 1_000_000_000


def command_line_count(text: str) -> int:
    """A `--limit` given on the command line: a whole number a store can take."""
    try:
        count = int(text)
    except ValueError:
        count = -1
    if not 0 <= count <= MAX_COMMAND_LINE_COUNT:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a whole number from 0 to {MAX_COMMAND_LINE_COUNT:,}"
        )
    return count


def is_loopback(host: str | None) -> bool:
    return host in ("127.0.0.1", "localhost", "::1")


def check_fetch_url(value: str | None, key: str) -> None:
    """Keys and metadata come over HTTPS; plain HTTP only on this machine (a local test provider)."""
    if value is None:
        return
    parts = urlsplit(value)
    if parts.scheme == "https" and parts.hostname:
        return
    if parts.scheme == "http" and is_loopback(parts.hostname):
        return
    raise ValueError(f"{key} must be an https:// URL (http:// only for 127.0.0.1 or localhost): {value!r}")


class IdentitySettings(_Model):
    """Who is calling: the operating-system user (`local`) or a token from an OIDC provider (`oidc`)."""

    mode: Literal["local", "oidc"] = "local"
    """`local`: the operating-system user runs every call (single-user mode); `oidc`: a verified token."""
    groups: tuple[str, ...] = ()
    """Groups given to the local identity, for policy rules (mode `local` only)."""
    issuer: str | None = None
    """OIDC: the token issuer (`iss`), exactly as the provider writes it; required."""
    audience: str | None = None
    """OIDC: the audience (`aud`) a token must be issued for; required."""
    jwks_url: str | None = None
    """OIDC: the provider's key set; default: `jwks_uri` from the issuer's discovery document."""
    jwks_file: Path | None = None
    """OIDC: a key set read from a file instead of a URL (the development issuer, offline setups)."""
    algorithms: tuple[str, ...] = ("RS256", "ES256")
    """OIDC: signature algorithms accepted; asymmetric only."""
    groups_claim: Annotated[str, Field(min_length=1)] = "groups"
    """OIDC: the claim holding the caller's groups (a list, or one string); a token without it is refused."""
    user_claim: Annotated[str, Field(min_length=1)] = "sub"
    """OIDC: the claim recorded as the user id; `email` and `preferred_username` are recorded too."""
    authorized_party: str | None = None
    """OIDC: when set, the token's `azp` (the client it was issued to) must equal it."""
    clock_skew: Annotated[float, Field(ge=0, le=300)] = 60.0
    """OIDC: seconds of clock difference tolerated for `exp`, `nbf` and `iat`."""
    jwks_max_age: Annotated[float, Field(ge=60, le=86_400)] = 3600.0
    """OIDC: seconds the key set is used before it is fetched again."""
    jwks_refresh_interval: Annotated[float, Field(ge=1, le=3600)] = 60.0
    """OIDC: a token with an unknown key id refetches the key set at most once per this many seconds."""
    token_env: str | None = None
    """OIDC over stdio: the environment variable holding the caller's token."""
    token_file: Path | None = None
    """OIDC over stdio: a file holding the caller's token, re-read when it changes or the token expires."""
    resource_url: str | None = None
    """OIDC over HTTP: this server's public URL (RFC 9728 resource); default http://HOST:PORT/mcp."""

    @field_validator("algorithms")
    @classmethod
    def _asymmetric_only(cls, algorithms: tuple[str, ...]) -> tuple[str, ...]:
        if not algorithms:
            raise ValueError('give at least one algorithm, e.g. ["RS256", "ES256"]')
        for name in algorithms:
            if name.lower() == "none":
                raise ValueError("unsigned tokens (none) are never accepted")
            if name.upper().startswith("HS"):
                raise ValueError(
                    f"{name} is never accepted: HMAC would let anyone holding the provider's public key sign"
                )
            if name not in SIGNING_ALGORITHMS:
                raise ValueError(f"{name!r} is not one of {', '.join(SIGNING_ALGORITHMS)}")
        return algorithms

    @model_validator(mode="after")
    def _mode_keys(self) -> IdentitySettings:
        if self.mode == "local":
            for key in _OIDC_ONLY:
                if getattr(self, key) is not None:
                    raise ValueError(f'{key} applies to mode = "oidc" only')
            return self
        if self.groups:
            raise ValueError('groups apply to mode = "local" only; with oidc they come from the token')
        for key in ("issuer", "audience"):
            if not getattr(self, key):
                raise ValueError(f'{key} is required with mode = "oidc"')
        if self.jwks_url is not None and self.jwks_file is not None:
            raise ValueError("give jwks_url or jwks_file, not both")
        if self.token_env is not None and self.token_file is not None:
            raise ValueError("give token_env or token_file, not both")
        check_fetch_url(self.issuer, "issuer")
        check_fetch_url(self.jwks_url, "jwks_url")
        if self.resource_url is not None and urlsplit(self.resource_url).scheme not in ("http", "https"):
            raise ValueError(f"resource_url must be an http(s):// URL: {self.resource_url!r}")
        return self


def _public_key_texts(keys: tuple[str, ...], what: str) -> tuple[str, ...]:
    """`keys` when each is an Ed25519 public key as `ed25519:<base64>`; ValueError naming the bad one."""
    from mcp_guard.store.checkpoint import parse_public_key

    for key in keys:
        try:
            parse_public_key(key, what)
        except ConfigError as error:
            raise ValueError(str(error)) from None
    return keys


class AuditSettings(_Model):
    url: str | None = None
    """Audit store: `sqlite:///path`, or `postgresql://` without a password; default: audit.db under
    MCP_GUARD_HOME."""
    url_env: str | None = None
    """Name of the environment variable that holds the audit store's URL (a team's PostgreSQL store)."""
    url_file: Path | None = None
    """Path of a file whose first line is the audit store's URL."""
    response_cap: Annotated[int, Field(gt=0)] = 65_536
    """Characters of each response kept in the audit record."""
    durability: Literal["full", "writes", "normal"] = "writes"
    """Entries synced to disk before the call goes on: `writes` (execute calls), `full`, `normal`."""
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

    @model_validator(mode="after")
    def _one_store(self) -> AuditSettings:
        sources = [name for name in ("url_env", "url_file", "url") if getattr(self, name) is not None]
        if len(sources) > 1:
            raise ValueError("give at most one of url, url_env or url_file for the audit store")
        if self.url is not None and "://" in self.url and urlsplit(self.url).password:
            raise ValueError(
                "the audit store URL holds a password; put it in an environment variable (url_env) or a "
                "file (url_file) so the credential stays out of the config"
            )
        return self

    @field_validator("trusted_keys")
    @classmethod
    def _public_keys(cls, keys: tuple[str, ...]) -> tuple[str, ...]:
        return _public_key_texts(keys, "trusted key")


SemanticType = Literal["email", "phone", "ssn", "national_id", "card", "iban", "secret", "jwt", "ip"]
MaskStrategy = Literal["redact", "partial", "hash", "null"]
DetectorName = Literal["email", "phone", "ssn", "card", "iban", "secret", "jwt", "ip"]
ALL_DETECTORS: tuple[DetectorName, ...] = ("email", "phone", "ssn", "card", "iban", "secret", "jwt", "ip")
DEFAULT_DETECTORS: tuple[DetectorName, ...] = ALL_DETECTORS[:-1]
"""Every detector but `ip`: addresses in logs are usually what an analyst is after."""


class MaskRule(_Model):
    """Columns to mask: by name (globs) or by semantic type read from the column name."""

    name: Annotated[str, Field(min_length=1)]
    """Named in result notes, `check` and the audit."""
    columns: tuple[str, ...] = ()
    """Column globs: `column`, `table.column` or `schema.table.column` (`*.email`, `customers.*`)."""
    types: tuple[SemanticType, ...] = ()
    """Semantic types, recognised from column names (`email`, `phone`, `ssn`, `card`, ...)."""
    strategy: MaskStrategy = "redact"
    """`redact` (a fixed marker), `partial` (a safe part), `hash` (keyed, stable) or `null`."""
    connections: tuple[str, ...] = ()
    """Connection name globs; empty: every connection."""
    except_groups: tuple[str, ...] = ()
    """Identity groups that see clear values under this rule."""

    @model_validator(mode="after")
    def _selects_something(self) -> MaskRule:
        if not self.columns and not self.types:
            raise ValueError("a masking rule needs columns or types (or both)")
        for glob in self.columns:
            if not 1 <= len(glob.split(".")) <= 3 or "" in glob.split("."):
                raise ValueError(f"column glob {glob!r} must be column, table.column or schema.table.column")
        return self


class MaskingSettings(_Model):
    rules: tuple[MaskRule, ...] = ()
    """Ordered rules; a column is masked by the first rule that matches it and applies to the caller."""
    hash_key_env: str = "MCP_GUARD_MASK_KEY"
    """Environment variable holding the key of `hash` masks; unset: a random key per server process."""
    detectors: tuple[DetectorName, ...] = DEFAULT_DETECTORS
    """Content detectors run on every text value of a result; `[]` turns them off."""
    detector_exclude: tuple[str, ...] = ()
    """Column globs (as in rules) whose values the detectors leave alone."""
    allowed_functions: tuple[str, ...] = ()
    """Functions allowed in reads while masking applies, beyond the built-in list of pure ones."""
    originals: Literal["none", "digest", "sealed"] = "none"
    """What the audit keeps of masked values: nothing, a keyed digest, or the values sealed (AES-GCM)."""
    originals_key_env: str = "MCP_GUARD_AUDIT_KEY"
    """Environment variable holding the digest or sealing key (32 bytes, hex or base64)."""

    @field_validator("rules")
    @classmethod
    def _unique_names(cls, rules: tuple[MaskRule, ...]) -> tuple[MaskRule, ...]:
        seen: set[str] = set()
        for rule in rules:
            if rule.name in seen:
                raise ValueError(f"masking rule name {rule.name!r} is used twice; names must be unique")
            seen.add(rule.name)
        return rules


DEMO_MASKING = MaskingSettings(
    rules=(
        MaskRule(name="contact-details", columns=("*.email", "*.phone"), strategy="partial"),
        MaskRule(name="national-ids", columns=("*.ssn",), strategy="hash"),
        MaskRule(name="card-numbers", columns=("*.card_number",), strategy="partial"),
        MaskRule(name="api-secrets", columns=("api_keys.secret",), strategy="redact"),
    )
)
"""The demo's sensitive columns; `customers.notes` is left to the content detectors."""


class ReviewerSettings(_Model):
    """A person who may approve or deny held statements, known by the public key of their passphrase."""

    key: str
    """The reviewer's public key, as printed by `mcp-guard reviewer init`."""
    groups: tuple[str, ...] = ()
    """Approver groups the reviewer belongs to, matched by `approvers` of approve rules."""
    subject: str | None = None
    """The identity the reviewer has as a requester (default `local:NAME`); nobody approves their own."""

    @field_validator("key")
    @classmethod
    def _readable_key(cls, key: str) -> str:
        ReviewerKey.parse(key)
        return key


class ApprovalSettings(_Model):
    wait: Annotated[float, Field(ge=0, le=3600)] = 50.0
    """Seconds an `execute` call waits for a held statement's decision before answering "pending"."""
    reviewers: dict[str, ReviewerSettings] = {}
    """Reviewers by name; `mcp-guard approve --reviewer NAME` (default: the local user name)."""
    token_reviewers: bool = False
    """Over HTTP with `identity.mode = "oidc"`: reviewers decide with their OIDC token at this gateway's
    `/approvals` endpoint (`mcp-guard approve --server URL`); the gateway signs each vote with its key."""
    token_audience: str | None = None
    """The audience a reviewer's token must be issued for; default `identity.audience`. A separate
    client for reviewers keeps the assistant's own token from deciding anything."""
    gateway_keys: tuple[str, ...] = ()
    """Public keys (`ed25519:<base64>`) of the gateways whose token-based votes count here, this
    gateway's own included (`mcp-guard audit key` prints it)."""
    token_max_age: Annotated[float, Field(gt=0, le=86_400)] | None = None
    """Seconds since the reviewer signed in (the token's `auth_time`, else `iat`) within which their
    token may cast a vote; an older one is refused with a request to sign in again (RFC 9470). Unset:
    any valid token may vote."""

    @field_validator("gateway_keys")
    @classmethod
    def _gateway_keys(cls, keys: tuple[str, ...]) -> tuple[str, ...]:
        return _public_key_texts(keys, "gateway key")

    @field_validator("reviewers")
    @classmethod
    def _reviewer_names(cls, reviewers: dict[str, ReviewerSettings]) -> dict[str, ReviewerSettings]:
        for name in reviewers:
            if not name or not name.replace("_", "").replace("-", "").replace(".", "").isalnum():
                raise ValueError(f"reviewer name {name!r} may hold only letters, digits, '-', '_' and '.'")
        return reviewers

    def reviewer_map(self) -> dict[str, Reviewer]:
        return {
            name: Reviewer(
                name=name,
                subject=settings.subject or f"local:{name}",
                groups=frozenset(settings.groups),
                key=ReviewerKey.parse(settings.key),
            )
            for name, settings in self.reviewers.items()
        }

    def verifier(self) -> AnyProof:
        """What a vote must prove: a configured reviewer's passphrase key, or a trusted gateway's key."""
        return AnyProof(KeyVerifier(self.reviewer_map()), GatewayVerifier(self.gateway_keys))


class Settings(_Model):
    connections: dict[str, ConnectionSettings] = Field(min_length=1)
    policy: PolicySettings = PolicySettings()
    identity: IdentitySettings = IdentitySettings()
    audit: AuditSettings = AuditSettings()
    masking: MaskingSettings = MaskingSettings()
    approvals: ApprovalSettings = ApprovalSettings()

    @model_validator(mode="after")
    def _token_reviewers(self) -> Settings:
        if self.approvals.token_reviewers and self.identity.mode != "oidc":
            raise ValueError(
                'approvals.token_reviewers needs [identity] mode = "oidc": tokens are how reviewers sign in'
            )
        if self.approvals.token_audience is not None and not self.approvals.token_reviewers:
            raise ValueError("approvals.token_audience applies with approvals.token_reviewers = true only")
        return self

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
        store = [self.audit_url] if "@" in self.audit_url else []
        for url in (*self.urls.values(), *store):
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


def _resolve_url(name: str, conn: ConnectionSettings, source: str, key: str | None = None) -> str:
    key = key or f"connections.{name}"
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


def audit_locations(
    audit: AuditSettings, store_url: str | None = None, source: str = "(built-in defaults)"
) -> AuditLocations:
    """The locations `audit` names, defaults filled in; `store_url` overrides the store (--store)."""
    url = store_url or _audit_url(audit, source) or f"sqlite:///{guard_home() / 'audit.db'}"
    return AuditLocations(
        store_url=url,
        signing_key_path=(audit.signing_key_file or guard_home() / "audit-signing.key").expanduser(),
        witness_path=audit.witness.expanduser() if audit.witness else _beside(url),
    )


def _audit_url(audit: AuditSettings, source: str) -> str | None:
    """The audit store's URL as configured: inline, or read from the environment or a file."""
    if audit.url_env is None and audit.url_file is None:
        return audit.url
    url = _resolve_url(
        "audit", ConnectionSettings(url_env=audit.url_env, url_file=audit.url_file), source, key="audit"
    )
    return url


def build_config(settings: Settings, source: str) -> Config:
    urls = {name: _resolve_url(name, conn, source) for name, conn in settings.connections.items()}
    where = audit_locations(settings.audit, source=source)
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
        },
        masking=DEMO_MASKING,
    )
    return build_config(settings, "(built-in demo)")


def load_config(path: Path) -> Config:
    """Read, validate and resolve one configuration file."""
    return build_config(read_settings(path), str(path))


MAX_CONFIG_BYTES = 1_000_000
"""A configuration is a few kilobytes; a larger file is a mistake or an attack, not settings."""


def read_settings(path: Path) -> Settings:
    """Read and validate one configuration file, without resolving connection URLs (audit commands
    need no database credential)."""
    source = str(path)
    try:
        with path.open("rb") as file:
            raw = file.read(MAX_CONFIG_BYTES + 1)
    except OSError as error:
        raise ConfigError(f"cannot read the configuration: {error.strerror}", file=source) from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"the configuration is larger than {MAX_CONFIG_BYTES:,} bytes", file=source)
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError("the configuration is not UTF-8 text", file=source) from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"not valid TOML: {error}", file=source) from None
    except RecursionError:
        raise ConfigError("not valid TOML: its arrays or tables are nested too deeply", file=source) from None
    return parse_settings(data, source)


def config_path_from_env(explicit: str | None) -> Path | None:
    chosen = explicit or os.environ.get(CONFIG_ENV)
    return Path(chosen).expanduser() if chosen else None
