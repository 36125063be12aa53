"""The database's relations, read once per connection and looked up the way the database does.

PostgreSQL folds an unquoted name to lower case and keeps a quoted one as written; an unqualified
name is looked up along the search path (pg_catalog first). SQLite compares names without case and
keeps everything in `main` here (the guard's connections cannot attach, and temp objects cannot be
created on a read connection).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlglot import exp
from sqlglot.schema import MappingSchema

from mcp_guard.backends.base import DbSchema, Relation


@dataclass(frozen=True, slots=True)
class TableName:
    """A table reference as written: each part already normalised the way the dialect compares names."""

    schema: str | None
    name: str

    def __str__(self) -> str:
        return f"{self.schema}.{self.name}" if self.schema else self.name


@dataclass
class Catalog:
    """A `DbSchema` indexed for lookups, with the sqlglot schema lineage qualifies against."""

    schema: DbSchema
    dialect: str
    _by_name: dict[tuple[str, str], Relation] = field(init=False, repr=False)
    _mapping: MappingSchema | None = field(init=False, default=None, repr=False)
    memo: dict[object, object] = field(init=False, default_factory=dict, repr=False)
    """What is computed from this schema alone (column lineage per statement): a schema read anew is
    a new Catalog, so nothing computed against an older one is reused."""

    def __post_init__(self) -> None:
        self._by_name = {(self._fold(r.schema), self._fold(r.name)): r for r in self.schema.relations}

    def _fold(self, name: str) -> str:
        return name if self.schema.case_sensitive else name.lower()

    def name_of(self, table: exp.Table) -> TableName | None:
        """The normalised name of a table reference; None for table functions and 3-part names."""
        if not isinstance(table.this, exp.Identifier) or table.args.get("catalog") is not None:
            return None
        db = table.args.get("db")
        schema = _normalise(db, self.dialect) if isinstance(db, exp.Identifier) else None
        if db is not None and schema is None:
            return None
        return TableName(schema, _normalise(table.this, self.dialect))

    def find(self, name: TableName) -> Relation | None:
        if name.schema is not None:
            return self._by_name.get((self._fold(name.schema), self._fold(name.name)))
        for schema in self.schema.search_path:
            relation = self._by_name.get((self._fold(schema), self._fold(name.name)))
            if relation is not None:
                return relation
        return None

    def resolve(self, table: exp.Table) -> Relation | None:
        name = self.name_of(table)
        return self.find(name) if name is not None else None

    @property
    def mapping(self) -> MappingSchema:
        """Every relation as {schema: {table: {column: type}}}, names exactly as stored."""
        if self._mapping is None:
            nested: dict[str, dict[str, dict[str, str]]] = {}
            for relation in self.schema.relations:
                columns = {self._fold(name): "UNKNOWN" for name, _ in relation.columns}
                nested.setdefault(self._fold(relation.schema), {})[self._fold(relation.name)] = columns
            self._mapping = MappingSchema(nested, dialect=self.dialect, normalize=False)
        return self._mapping


def _normalise(identifier: exp.Identifier, dialect: str) -> str:
    if identifier.quoted and dialect == "postgres":
        return identifier.name
    return identifier.name.lower()
