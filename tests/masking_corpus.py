"""Load the masking bypass corpora: titled statements with what the guard must do with each.

Files in tests/fixtures/masking/ are named `bypass_<dialect>.sql`; each case is

    -- title: whole row as JSON
    -- expect: rows
    SELECT row_to_json(c) FROM customers AS c

`expect` is `rows` (answered with at least one row), `refused` (denied by the guard) or `any`
(answered or failed): in every case no sensitive value may appear in the reply. The SQL runs to the
next `-- title:`; lines before the first title are notes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

FIXTURES = Path(__file__).parent / "fixtures" / "masking"
Expect = Literal["rows", "refused", "any"]


@dataclass(frozen=True, slots=True)
class Case:
    title: str
    sql: str
    expect: Expect
    line: int

    @property
    def id(self) -> str:
        return f"line {self.line}: {self.title}"


def load(dialect: str) -> list[Case]:
    path = FIXTURES / f"bypass_{dialect}.sql"
    cases: list[Case] = []
    title: tuple[str, int] | None = None
    expect: str | None = None
    body: list[str] = []

    def close() -> None:
        if title is None:
            return
        if expect not in ("rows", "refused", "any") or not "\n".join(body).strip():
            raise ValueError(f"{path.name}:{title[1]}: a case needs '-- expect: rows|refused|any' and SQL")
        cases.append(Case(title[0], "\n".join(body).strip(), expect, title[1]))  # type: ignore[arg-type]

    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.startswith("-- title:"):
            close()
            title, expect, body = (line.removeprefix("-- title:").strip(), number), None, []
        elif line.startswith("-- expect:") and title is not None:
            expect = line.removeprefix("-- expect:").strip()
        elif title is not None:
            body.append(line)
    close()
    return cases
