"""Keep credentials out of every message that leaves the process."""

from __future__ import annotations

import re
from collections.abc import Iterable

# user:password@ inside any URL-like string
_URL_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@/\s]*)@", re.I)
_KEYWORD_PASSWORD = re.compile(r"(?P<key>password|passwd|pwd)\s*=\s*(?P<pw>'[^']*'|\"[^\"]*\"|\S+)", re.I)

MARK = "***"


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """Remove URL passwords, `password=` pairs and every known secret from `text`."""
    text = _URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:{MARK}@", text)
    text = _KEYWORD_PASSWORD.sub(lambda m: f"{m['key']}={MARK}", text)
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, MARK)
    return text
