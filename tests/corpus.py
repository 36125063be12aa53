"""Load the SQL corpora: fixture files of titled statements with the classification each must get.

The files live in tests/fixtures/sql/ and are named `<purpose>_<dialect>.sql`, the dialect being a
sqlglot name (`escapes_postgres.sql`, `reads_sqlite.sql`). In the style of sqlglot's own fixtures,
each case is a few directive comments followed by its SQL:

    -- title: COPY TO PROGRAM runs a shell command as the server's OS user
    -- expect: kind=admin flags=copy,copy_program
    COPY customers TO PROGRAM 'touch /tmp/mcp_guard_escape_copy_to_program'
    -- end

- `-- title:` starts a case and says in a few words what it tries.
- `-- expect:` follows it: `kind=` a StatementKind value (the riskiest of the call) and `flags=` the
  exact set of RiskFlag values the whole call must carry, comma-separated, or `-` for none.
- The SQL is every following line up to `-- end` or the next `-- title:`; it may span lines and hold
  semicolons and comments of its own, and is kept exactly as written apart from surrounding blank
  lines. `-- end` is optional.
- Lines before the first title and after an `-- end` are notes for the reader and are ignored.

Any other shape is a mistake in the fixture and raises ValueError naming the file and line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mcp_guard.classify import RiskFlag, StatementKind

if TYPE_CHECKING:
    from tests.client import GuardClient

FIXTURES = Path(__file__).parent / "fixtures" / "sql"

_TITLE = "-- title:"
_EXPECT = "-- expect:"
_END = "-- end"


@dataclass(frozen=True, slots=True)
class Case:
    """One corpus statement and the classification it must get."""

    title: str
    sql: str
    dialect: str
    kind: StatementKind
    flags: frozenset[RiskFlag]
    file: str
    line: int

    @property
    def id(self) -> str:
        """A pytest id that points at the case in its file."""
        return f"{self.file}:{self.line}"


def load(name: str, directory: Path = FIXTURES) -> list[Case]:
    """The cases of `<directory>/<name>.sql`, in file order."""
    path = directory / f"{name}.sql"
    dialect = name.rsplit("_", 1)[-1]
    cases: list[Case] = []
    header: tuple[str, int] | None = None  # (title, line) of the case being read
    expect: tuple[StatementKind, frozenset[RiskFlag]] | None = None
    body: list[str] = []

    def close(at: int) -> None:
        if header is None:
            return
        if expect is None:
            raise ValueError(f"{path.name}:{header[1]}: case {header[0]!r} has no '{_EXPECT}' line")
        sql = "\n".join(body).strip()
        if not sql:
            raise ValueError(f"{path.name}:{header[1]}: case {header[0]!r} has no SQL (ends at line {at})")
        cases.append(Case(header[0], sql, dialect, expect[0], expect[1], path.name, header[1]))

    number = 0
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        stripped = line.strip()
        if stripped.startswith(_TITLE):
            close(number)
            header, expect, body = (stripped[len(_TITLE) :].strip(), number), None, []
        elif stripped.startswith(_EXPECT):
            if header is None or expect is not None:
                raise ValueError(f"{path.name}:{number}: '{_EXPECT}' belongs right after a '{_TITLE}' line")
            expect = _parse_expect(stripped[len(_EXPECT) :], f"{path.name}:{number}")
        elif stripped == _END:
            close(number)
            header, expect, body = None, None, []
        elif header is not None:
            if expect is None and stripped:
                raise ValueError(f"{path.name}:{number}: '{_EXPECT}' must follow '{_TITLE}'")
            body.append(line)
    close(number)
    return cases


def _parse_expect(text: str, where: str) -> tuple[StatementKind, frozenset[RiskFlag]]:
    fields = dict(part.split("=", 1) for part in text.split() if "=" in part)
    if set(fields) != {"kind", "flags"}:
        raise ValueError(f"{where}: expected 'kind=<kind> flags=<flags or ->', got {text.strip()!r}")
    try:
        kind = StatementKind(fields["kind"])
        names = [] if fields["flags"] == "-" else fields["flags"].split(",")
        flags = frozenset(RiskFlag(name) for name in names)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
    return kind, flags


async def unanswered_reads(client: GuardClient, dialect: str) -> list[str]:
    """The cases of reads_<dialect>.sql that the `query` tool did not answer, with what it said."""
    return [
        f"{case.id}: {reply.text[:200]}"
        for case in load(f"reads_{dialect}")
        if (reply := await client.call("query", sql=case.sql)).is_error
    ]
