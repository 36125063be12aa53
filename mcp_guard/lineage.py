"""Output column → the source columns its values come from, with sqlglot qualify and scope analysis.

Fail closed: whatever cannot be resolved (an unknown table or column, a star that cannot be
expanded, a recursive CTE, a statement qualify cannot read) marks the output `unresolved`, and an
unresolved output counts as masked. Stock `sqlglot.lineage` is not used because it misses what
matters here: whole-row references (`row_to_json(c)`, `SELECT c FROM customers c`, `json_agg(c)`),
`to_jsonb(c.*)`, table functions (`jsonb_each_text(c.profile)`), and it returns unknown tables and
columns as ordinary-looking leaves.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from sqlglot import exp
from sqlglot.errors import SqlglotError
from sqlglot.optimizer.qualify import qualify
from sqlglot.optimizer.scope import Scope, build_scope

from mcp_guard.backends.base import Relation
from mcp_guard.catalog import Catalog
from mcp_guard.classify import Statement, refers_to_cte

log = logging.getLogger(__name__)

CACHE_SIZE = 512
"""Lineages kept per catalog (oldest dropped first)."""


@dataclass(frozen=True, slots=True)
class Source:
    """One column of one relation."""

    relation: Relation
    column: str

    def __str__(self) -> str:
        return f"{self.relation.qualified_name}.{self.column}"


@dataclass(frozen=True, slots=True)
class ColumnLineage:
    """Where one output column's values come from."""

    name: str
    sources: frozenset[Source] = frozenset()
    unresolved: bool = False
    direct: Source | None = None
    """The one source when the output is that column passed through unchanged (renames allowed)."""


@dataclass(slots=True)
class _Flow:
    sources: set[Source] = field(default_factory=set)
    unresolved: bool = False
    direct: Source | None = None

    def add(self, other: _Flow) -> None:
        self.sources |= other.sources
        self.unresolved = self.unresolved or other.unresolved


def statement_lineage(statement: Statement, catalog: Catalog) -> list[ColumnLineage] | None:
    """`lineage` of a classified statement, computed once per catalog: it depends on the statement's
    text (its tree is parsed from it) and the schema only, not on who asks."""
    if statement.tree is None:
        return None
    key = ("lineage", statement.text)
    if key in catalog.memo:
        found = catalog.memo[key]
    else:
        outputs = lineage(statement.tree, catalog)
        found = tuple(outputs) if outputs is not None else None
        if len(catalog.memo) >= CACHE_SIZE:
            del catalog.memo[next(iter(catalog.memo))]
        catalog.memo[key] = found
    return list(found) if isinstance(found, tuple) else None


def lineage(tree: exp.Expression, catalog: Catalog) -> list[ColumnLineage] | None:
    """Lineage of each output column of a read, in order; None when the statement cannot be analysed
    at all (the caller then treats every output as masked)."""
    if isinstance(tree, exp.Values) and tree.find(exp.Table) is None:  # literals only: nothing flows in
        width = len(tree.expressions[0].expressions) if tree.expressions else 0
        return [ColumnLineage(f"column{i}", frozenset(), False, None) for i in range(1, width + 1)]
    work = tree.copy()
    for table in list(work.find_all(exp.Table)):
        relation = catalog.resolve(table) if not refers_to_cte(table, catalog.dialect) else None
        if relation is not None and table.args.get("db") is None:
            table.set("db", exp.to_identifier(relation.schema, quoted=True))
            table.set("this", exp.to_identifier(relation.name, quoted=True))
    try:
        qualified = qualify(
            work,
            dialect=catalog.dialect,
            schema=catalog.mapping,
            validate_qualify_columns=False,
            quote_identifiers=False,
            identify=False,
        )
        root = build_scope(qualified)
    except (SqlglotError, RecursionError, KeyError, ValueError, AttributeError) as error:
        log.debug("lineage: cannot analyse: %s", error)
        return None
    if root is None:
        return None
    analysis = _Analysis(catalog)
    try:
        outputs = analysis.outputs(root)
        names = _names(root.expression)
    except (SqlglotError, RecursionError, KeyError, ValueError, AttributeError) as error:
        log.debug("lineage: cannot analyse: %s", error)
        return None
    if outputs is None or names is None or len(names) != len(outputs):
        return None
    return [
        ColumnLineage(name, frozenset(flow.sources), flow.unresolved, flow.direct)
        for name, flow in zip(names, outputs, strict=True)
    ]


def _names(expression: exp.Expression) -> list[str] | None:
    while isinstance(expression, exp.SetOperation):
        expression = expression.left
    if isinstance(expression, exp.Subquery):
        return _names(expression.unnest())
    if not isinstance(expression, exp.Select):
        return None
    return [projection.alias_or_name for projection in expression.selects]


class _Analysis:
    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self._outputs: dict[int, list[_Flow] | None] = {}
        self._busy: set[int] = set()

    def outputs(self, scope: Scope) -> list[_Flow] | None:
        """Per projection of a scope; None when its projections cannot be known (a star left)."""
        key = id(scope.expression)
        if key in self._outputs:
            return self._outputs[key]
        if key in self._busy:  # a recursive CTE reading itself
            return None
        self._busy.add(key)
        try:
            result = self._compute(scope)
        finally:
            self._busy.discard(key)
        self._outputs[key] = result
        return result

    def _compute(self, scope: Scope) -> list[_Flow] | None:
        expression = scope.expression
        if isinstance(expression, exp.SetOperation):
            branches = [self.outputs(branch) for branch in scope.set_operation_scopes]
            if not branches or any(b is None or len(b) != len(branches[0] or []) for b in branches):
                return None
            merged = []
            for position in range(len(branches[0] or [])):
                flow = _Flow()
                for branch in branches:
                    assert branch is not None
                    flow.add(branch[position])
                merged.append(flow)
            if _recursive_cte(expression):
                # sqlglot resolves the self-reference to the anchor only: let every column feed every other.
                everything = _Flow()
                for flow in merged:
                    everything.add(flow)
                return [_Flow(set(everything.sources), everything.unresolved) for _ in merged]
            return merged
        if isinstance(expression, exp.Select):
            if any(
                isinstance(p, exp.Star) or (isinstance(p, exp.Column) and p.is_star)
                for p in expression.selects
            ):
                return None
            return [self.flow(projection, scope) for projection in expression.selects]
        # VALUES, a table function, anything else: every column it mentions may flow anywhere.
        return None

    def flow(self, expression: exp.Expression, scope: Scope) -> _Flow:
        """The sources of one expression evaluated in `scope`."""
        flow = _Flow()
        inner = expression.unalias() if isinstance(expression, exp.Alias) else expression
        nested = {id(child.expression): child for child in scope.subquery_scopes}
        nested.update({id(child.expression): child for child in scope.set_operation_scopes})
        stack: list[exp.Expression] = [inner]
        while stack:
            node = stack.pop()
            child = nested.get(id(node))
            if child is None and isinstance(node, exp.Subquery):
                stack.append(node.this)
                continue
            if child is not None or isinstance(node, exp.Query):
                flow.add(self._whole_scope(child) if child is not None else _Flow(unresolved=True))
                continue
            if isinstance(node, exp.Column):
                found = self.column(node, scope)
                flow.add(found)
                if node is inner:
                    flow.direct = found.direct
                continue
            if isinstance(node, exp.TableColumn):
                flow.add(self.whole_row(node.name, scope))
                continue
            if isinstance(node, exp.Star) and not isinstance(node.parent, exp.Count):
                flow.unresolved = True
                continue
            stack.extend(node.iter_expressions())
        return flow

    def _whole_scope(self, scope: Scope) -> _Flow:
        flow = _Flow()
        outputs = self.outputs(scope)
        if outputs is None:
            flow.unresolved = True
        else:
            for output in outputs:
                flow.add(output)
        return flow

    def column(self, column: exp.Column, scope: Scope) -> _Flow:
        if column.is_star:
            return self.whole_row(column.table, scope) if column.table else _Flow(unresolved=True)
        if not column.table:
            # PostgreSQL reads a bare name that is no column as the whole row of that source.
            return self.whole_row(column.name, scope)
        found = _source(column.table, scope)
        if found is None:
            return _Flow(unresolved=True)
        source, where = found
        if isinstance(source, Scope):
            if source.is_udtf:
                return self.flow(source.expression, where)
            outputs = self.outputs(source)
            names = _names(source.expression)
            if outputs is None or names is None or column.name not in names:
                return _Flow(unresolved=True)
            position = names.index(column.name)
            output = outputs[position]
            return _Flow(set(output.sources), output.unresolved, output.direct)
        if isinstance(source, exp.Table):
            relation = self.catalog.resolve(source)
            if relation is None:
                return (
                    self.flow(source.this, where)
                    if not isinstance(source.this, exp.Identifier)
                    else _Flow(unresolved=True)
                )
            name = _column_name(relation, column.name, self.catalog)
            if name is None:
                return _Flow(unresolved=True)
            origin = Source(relation, name)
            return _Flow({origin}, direct=origin)
        return _Flow(unresolved=True)

    def whole_row(self, name: str, scope: Scope) -> _Flow:
        found = _source(name, scope)
        if found is None:
            return _Flow(unresolved=True)
        source, where = found
        if isinstance(source, Scope):
            return self.flow(source.expression, where) if source.is_udtf else self._whole_scope(source)
        if isinstance(source, exp.Table):
            relation = self.catalog.resolve(source)
            if relation is None:
                return _Flow(unresolved=True)
            return _Flow({Source(relation, column) for column, _ in relation.columns})
        return _Flow(unresolved=True)


def _recursive_cte(expression: exp.Expression) -> bool:
    with_ = expression.parent.parent if isinstance(expression.parent, exp.CTE) else None
    return isinstance(with_, exp.With) and bool(with_.args.get("recursive"))


def _source(name: str, scope: Scope) -> tuple[exp.Expression | Scope, Scope] | None:
    """The source a qualifier names, looked up from `scope` outwards (correlated references)."""
    current: Scope | None = scope
    while current is not None:
        if name in current.sources:
            return current.sources[name], current
        current = current.parent
    return None


def _column_name(relation: Relation, name: str, catalog: Catalog) -> str | None:
    for column, _ in relation.columns:
        if column == name or (not catalog.schema.case_sensitive and column.lower() == name.lower()):
            return column
    return None
