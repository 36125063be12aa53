"""Masked sources: every reference to a relation with masked columns becomes a derived table.

`FROM customers c` becomes `FROM (SELECT id, name, <mask of email> AS email, ... FROM customers) AS c`,
so everything downstream (projections, functions, aggregates, CTEs, subqueries, LATERAL, set
operations, `SELECT *`, whole-row references, WHERE and ORDER BY, error texts) sees only masked
values. PostgreSQL flattens such a derived table: a point query keeps its index scan.

A view is masked the same way, by its output columns: which of them carry masked data is read from
its definition with column lineage (see docs/architecture.md for why views are wrapped, not inlined).
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field

from sqlglot import exp

from mcp_guard.backends.base import Relation
from mcp_guard.blind_spots import blind_spot
from mcp_guard.catalog import Catalog
from mcp_guard.classify import Statement, StatementKind, classify, refers_to_cte
from mcp_guard.config import MaskRule
from mcp_guard.errors import PolicyDenied
from mcp_guard.lineage import ColumnLineage, Source, lineage
from mcp_guard.masking import ColumnMask, Masking

MASKING_RULE = "builtin:masking"
VIEW_RULE = "builtin:view-lineage"
CACHE_SIZE = 512
"""Rewrites kept per plan (oldest dropped first)."""


class MaskPlan:
    """What one caller sees masked on one connection: per relation, its masked columns."""

    def __init__(
        self,
        masking: Masking,
        rules: tuple[MaskRule, ...],
        catalog: Catalog,
        governing: tuple[MaskRule, ...] = (),
    ) -> None:
        self.masking = masking
        self.rules = rules
        self.catalog = catalog
        self.governing = governing
        """Every rule of the connection, the caller's exceptions included."""
        self._masks: dict[tuple[str, str], dict[str, ColumnMask]] = {}
        self._busy: set[tuple[str, str]] = set()
        self._derived: dict[tuple[str, str, tuple[int, int]], tuple[str, bool]] = {}
        self._derived_reads: dict[str, Statement | None] = {}
        """Each derived table's text (one per relation and spelling), classified as a read of its own."""
        self._rewrites: dict[tuple[str, int], Rewritten | None] = {}
        """rewrite() results by (statement text, parameter count). A plan is one caller's rules over one
        catalog and a schema read anew makes a new plan, so a cached rewrite never outlives either."""

    @property
    def active(self) -> bool:
        return bool(self.rules)

    def masks(self, relation: Relation) -> dict[str, ColumnMask]:
        key = (relation.schema, relation.name)
        cached = self._masks.get(key)
        if cached is not None:
            return cached
        if not self.rules:
            masks: dict[str, ColumnMask] = {}
        elif relation.kind == "view" and not relation.system:
            if key in self._busy:  # a view that reads itself cannot be resolved: mask it all
                return _everything(relation, "a view defined through itself")
            self._busy.add(key)
            try:
                masks = self._view_masks(relation)
            finally:
                self._busy.discard(key)
        else:
            masks = self.masking.table_masks(self.rules, relation)
        self._masks[key] = masks
        return masks

    def governed(self, source: Source) -> bool:
        """Whether some rule names this table column, even one that lets this caller see it clear."""
        return source.column in self.masking.table_masks(self.governing, source.relation)

    def source_mask(self, source: Source) -> ColumnMask | None:
        return self.masks(source.relation).get(source.column)

    def output_mask(self, output: ColumnLineage) -> ColumnMask | None:
        """The mask an output column carries: its source's when passed through, else `derived`."""
        if output.unresolved:
            return ColumnMask("redact", "builtin:unresolved-lineage")
        if output.direct is not None:
            direct = self.source_mask(output.direct)
            if direct is not None:
                return direct
        for source in sorted(output.sources, key=str):
            mask = self.source_mask(source)
            if mask is not None:
                return ColumnMask("redact", mask.rule)
        return None

    def derived(self, relation: Relation, key: tuple[int, int]) -> tuple[str, bool]:
        """The masked projection over `relation` (`SELECT ..., <mask> AS "email", ...`, as SQL) that
        replaces a reference to it, and whether it binds the hash key; built once per relation."""
        cache_key = (relation.schema, relation.name, key)
        found = self._derived.get(cache_key)
        if found is not None:
            return found
        dialect = self.catalog.dialect
        masks = self.masks(relation)
        projections: list[exp.Expression] = []
        uses_key = False
        for column, _ in relation.columns:
            reference = exp.column(column, quoted=True)
            mask = masks.get(column)
            if mask is None:
                projections.append(reference)
                continue
            uses_key = uses_key or (mask.strategy == "hash" and dialect == "postgres")
            projections.append(
                exp.alias_(self.masking.expression(mask, reference, dialect, key), column, quoted=True)
            )
        found = (exp.Select(expressions=projections).sql(dialect), uses_key)
        self._derived[cache_key] = found
        return found

    def _view_masks(self, relation: Relation) -> dict[str, ColumnMask]:
        """A view's outputs masked by the lineage of its definition; all of them when the definition
        reads what no lineage sees (a function that may query masked tables itself, a statistics
        catalog): what masking refuses in a statement, it cannot vouch for inside a view either."""
        parsed = classify(relation.definition or "", self.catalog.dialect).statements
        tree = parsed[0].tree if len(parsed) == 1 else None
        if isinstance(tree, exp.Create):  # SQLite keeps the CREATE VIEW statement
            tree = tree.expression
        outputs = lineage(tree, self.catalog) if isinstance(tree, exp.Query) else None
        if outputs is None or len(outputs) != len(relation.columns):
            return _everything(relation, "its definition cannot be analysed")
        allowed = frozenset(name.lower() for name in self.masking.settings.allowed_functions)
        unseen = blind_spot(parsed[0], self.catalog, self.masks, allowed, 0)
        if unseen is not None:
            return _everything(relation, f"its definition: {unseen}")
        masks = {}
        for (column, _), output in zip(relation.columns, outputs, strict=True):
            mask = self.output_mask(output)
            if mask is not None:
                kind = mask.semantic_type if output.direct is not None else None
                masks[column] = ColumnMask(mask.strategy, mask.rule, kind)
        return masks


def _everything(relation: Relation, why: str) -> dict[str, ColumnMask]:
    return {column: ColumnMask("redact", f"{VIEW_RULE} ({why})") for column, _ in relation.columns}


@dataclass(frozen=True, slots=True)
class Rewritten:
    """A read with its masked sources, ready to run."""

    sql: str
    bound: tuple[str, ...] = field(repr=False)
    """Parameters to bind after the caller's (the HMAC key halves on PostgreSQL)."""
    relations: tuple[str, ...] = ()
    """Relations that were replaced by masked derived tables."""


def rewrite(statement: Statement, plan: MaskPlan, param_count: int) -> Rewritten | None:
    """The statement with masked sources; None when it reads no masked relation (it runs as written).
    Cached per plan: the same SQL from the same caller on the same schema is rewritten once."""
    if statement.tree is None:
        return None
    key = (statement.text, param_count)
    if key in plan._rewrites:
        return plan._rewrites[key]
    rewritten = _rewrite(statement, plan, param_count)  # a refusal raises and is not cached
    if len(plan._rewrites) >= CACHE_SIZE:
        del plan._rewrites[next(iter(plan._rewrites))]
    plan._rewrites[key] = rewritten
    return rewritten


_SLOT = f"mcp_guard_masked_{secrets.token_hex(8)}_"
"""Names the placeholder of each masked derived table while the statement is generated; random per
process, so no caller's SQL can spell it."""


_OF_THE_TABLE = ("this", "db", "catalog", "only", "sample")
"""What a table reference says of the table itself (`ONLY t`, `t TABLESAMPLE ...`): it moves into the
derived table, which reads the table."""
_AFTER_THE_TABLE = ("joins", "laterals")
"""What follows the table in its table expression (`(t JOIN u ON ...)` hangs the join on `t`): it stays
on the placeholder, outside the derived table, where it sees only masked columns."""
_PLACED = frozenset({*_OF_THE_TABLE, *_AFTER_THE_TABLE, "alias"})


def _rewrite(statement: Statement, plan: MaskPlan, param_count: int) -> Rewritten | None:
    """Each masked table reference becomes a placeholder in a copy of the tree; the SQL generated
    from it gets each placeholder replaced by its derived table's text (generated once per relation,
    not deep-copied and regenerated per query). `_check_regenerated` then re-reads the result."""
    dialect = plan.catalog.dialect
    assert statement.tree is not None
    work = statement.tree.copy()
    if dialect == "postgres":  # sqlglot reads to_hex() as Hex, then writes HEX(), which PostgreSQL lacks
        for node in list(work.find_all(exp.Hex)):
            node.replace(exp.Anonymous(this="to_hex", expressions=[node.this]))
    key = (param_count + 1, param_count + 2)
    replaced: list[str] = []
    uses_key = False
    derived_tables: dict[str, str] = {}
    for table in list(work.find_all(exp.Table)):
        if not isinstance(table.this, exp.Identifier) or refers_to_cte(table, dialect):
            continue
        relation = plan.catalog.resolve(table)
        if relation is None:
            raise PolicyDenied(f"table {table.sql(dialect)} is not known to masking", rule=MASKING_RULE)
        if not plan.masks(relation):
            continue
        unplaced = [name for name, value in table.args.items() if value and name not in _PLACED]
        if unplaced:
            raise PolicyDenied(
                f"{table.sql(dialect)[:80]}: masking cannot place its {', '.join(unplaced)}; refused",
                rule=MASKING_RULE,
            )
        select, binds = plan.derived(relation, key)
        uses_key = uses_key or binds
        alias = table.args.get("alias") or exp.TableAlias(this=table.this.copy())
        source = exp.Table(**{name: table.args[name] for name in _OF_THE_TABLE if table.args.get(name)})
        slot = f"{_SLOT}{len(derived_tables):04d}"
        derived_tables[slot] = f"({select} FROM {source.sql(dialect)})"
        after = {name: table.args[name] for name in _AFTER_THE_TABLE if table.args.get(name)}
        table.replace(exp.Table(this=exp.to_identifier(slot), alias=alias, **after))
        replaced.append(relation.qualified_name)
    if not replaced:
        return None
    sql = work.sql(dialect)
    _check_regenerated(statement, sql, derived_tables, plan)
    for slot, text in derived_tables.items():
        if sql.count(slot) != 1:
            raise PolicyDenied(
                "the masked form of this statement could not be generated; refused", rule=MASKING_RULE
            )
        sql = sql.replace(slot, text)
    return Rewritten(
        sql, tuple(plan.masking.key_params()) if uses_key else (), tuple(dict.fromkeys(replaced))
    )


def _check_regenerated(
    original: Statement, sql: str, derived_tables: Mapping[str, str], plan: MaskPlan
) -> None:
    """Fail closed on a generator bug: the statement as sqlglot regenerated it, each masked table still
    a placeholder, must be one READ with no risk the original did not carry, and with the derived
    tables (each read once per plan, `_derived_reads`) read exactly the original's tables.

    What runs is this SQL with each placeholder, an identifier that occurs once, replaced by its
    derived table's text: a parenthesized subquery that parses alone, so it splices in as one table
    expression. Re-reading the spliced whole instead (five times the text, with every mask) cost
    ~2 ms of a new query's ~3."""
    after = classify(sql, plan.catalog.dialect).statements
    reads = [_derived_reads(text, plan) for text in derived_tables.values()]
    slots = set(derived_tables)
    read_tables = {table for read in reads if read is not None for table in read.tables}
    if (
        len(after) != 1
        or after[0].kind is not StatementKind.READ
        or not after[0].flags <= original.flags
        or any(read is None or len(read.tables) != 1 or not read.flags <= original.flags for read in reads)
        or not slots <= set(after[0].tables)
        or (set(after[0].tables) - slots) | read_tables != set(original.tables)
    ):
        raise PolicyDenied(
            "the masked form of this statement did not classify as the same single read; refused",
            rule=MASKING_RULE,
        )


def _derived_reads(text: str, plan: MaskPlan) -> Statement | None:
    """A derived table's text as a read on its own (None if it is not one plain read), once per plan."""
    if text not in plan._derived_reads:
        found = classify(f"SELECT * FROM {text} AS derived", plan.catalog.dialect).statements
        read = found[0] if len(found) == 1 and found[0].kind is StatementKind.READ else None
        if read is not None and not _one_table_expression(read.tree):
            read = None
        if len(plan._derived_reads) >= CACHE_SIZE:
            del plan._derived_reads[next(iter(plan._derived_reads))]
        plan._derived_reads[text] = read
    return plan._derived_reads[text]


def _one_table_expression(tree: exp.Expression | None) -> bool:
    """`SELECT * FROM (...) AS derived` and nothing else: the text is one parenthesized subquery."""
    if not isinstance(tree, exp.Select) or len(tree.expressions) != 1:
        return False
    source = tree.args.get("from_")
    return (
        isinstance(tree.expressions[0], exp.Star)
        and isinstance(source, exp.From)
        and isinstance(source.this, exp.Subquery)
        and source.this.alias == "derived"
        and not any(value for key, value in tree.args.items() if key not in ("expressions", "from_"))
    )
