"""Who is calling. In single-user mode the operating-system user; OIDC tokens come later."""

from __future__ import annotations

import getpass
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True, slots=True)
class Identity:
    subject: str
    groups: frozenset[str]
    source: Literal["local", "oidc"]

    def as_dict(self) -> dict[str, object]:
        return {"subject": self.subject, "groups": sorted(self.groups), "source": self.source}


def local_identity(groups: tuple[str, ...] = ()) -> Identity:
    """The OS user running the server; recorded as such, so the audit says no token vouched for it."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown-local-user"
    return Identity(subject=f"local:{user}", groups=frozenset(groups), source="local")
