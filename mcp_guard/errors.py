"""The one exception tree of mcp-guard.

    GuardError                  base: every error mcp-guard raises on purpose
     ├── ConfigError            the configuration file or a value in it is wrong (exit 2)
     ├── UsageError             a tool or command argument is wrong (unknown connection, bad params)
     ├── AuthenticationError    the caller's token is missing or refused; says why, never holds the token
     ├── PolicyDenied           the policy refused the call; names the rule and the reason
     ├── BackendError           the database refused or failed; credentials already redacted
     │    └── StatementTimeout  the statement ran past its timeout and was cancelled
     ├── AuditError             the audit store could not record: the call is refused
     └── ApprovalError          an approval step is refused: not pending, not a reviewer, one's own
          │                     request, a missing or wrong proof, an illegal state transition
          └── ApprovalExpired   the request outlived its time to live; it can no longer run

Messages are written for the person (or model) who must act on them.
"""

from __future__ import annotations


class GuardError(Exception):
    """Base of every error mcp-guard raises on purpose."""


class ConfigError(GuardError):
    """A configuration file, or one key in it, is wrong."""

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None) -> None:
        self.file = file
        self.key = key
        where = ": ".join(part for part in (file, key) if part)
        super().__init__(f"{where}: {message}" if where else message)


class UsageError(GuardError):
    """A tool argument or command-line argument is wrong."""


class AuthenticationError(GuardError):
    """The caller's token is missing or was refused. `detail` is safe to record: never the token itself."""

    def __init__(
        self, message: str, *, detail: dict[str, str] | None = None, challenge: dict[str, str] | None = None
    ) -> None:
        self.detail = dict(detail or {})
        self.challenge = dict(challenge or {"error": "invalid_token"})
        """The 401's WWW-Authenticate parameters (RFC 6750; RFC 9470 for a sign-in too old)."""
        super().__init__(message)


class PolicyDenied(GuardError):
    """The policy refused the call."""

    def __init__(self, message: str, *, rule: str) -> None:
        self.rule = rule
        super().__init__(message)


class BackendError(GuardError):
    """The database refused or failed the statement; the text is safe to show."""


class StatementTimeout(BackendError):
    """The statement ran past its timeout and was cancelled."""


class AuditError(GuardError):
    """The audit store could not record; no record, no access."""


class ApprovalError(GuardError):
    """An approval step is refused; the message says which rule of the lifecycle refused it."""


class ApprovalExpired(ApprovalError):
    """The request outlived its time to live without running; it never will."""
