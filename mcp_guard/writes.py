"""Writes that would read masked data, refused while masking applies.

A write is never rewritten: rewriting `INSERT INTO archive SELECT ssn FROM customers` would store
masked values over real data, and `UPDATE customers SET flag = true WHERE ssn LIKE '123%'` tells by
its row count what the mask hides. So a write statement is refused when any part of it that reads
(WHERE, SET and VALUES expressions, a source SELECT, FROM/USING, RETURNING) names a masked column,
a whole row or `*` of a relation with masked columns. Assigning to a masked column is allowed: it
reveals nothing. The check goes by name, over every relation the statement touches, and so errs on
the side of refusing.
"""

from __future__ import annotations

from sqlglot import exp

from mcp_guard.catalog import TableName
from mcp_guard.classify import Statement, refers_to_cte
from mcp_guard.rewrite import MaskPlan


def masked_read_in_write(statement: Statement, plan: MaskPlan) -> str | None:
    """Why this statement would read masked data, or None."""
    catalog = plan.catalog
    tree = statement.tree
    masked_names: dict[str, str] = {}
    row_names: set[str] = set()
    tables = tree.find_all(exp.Table) if tree is not None else ()
    for table in tables:
        if refers_to_cte(table, catalog.dialect):
            continue
        relation = catalog.resolve(table)
        masks = plan.masks(relation) if relation is not None else {}
        if masks:
            for column in masks:
                masked_names[column.lower()] = f"{relation.qualified_name}.{column}" if relation else column
            row_names.update({table.name.lower(), table.alias_or_name.lower()})
    if tree is None:
        touched = [t for t in statement.tables if _masked_by_text(t, plan)]
        return (
            f"{statement.operation} touches {', '.join(touched)}, which has masked columns"
            if touched
            else None
        )
    if not masked_names:
        return None
    copied = _copied_out(tree, plan)
    if copied is not None:
        return copied
    targets = _assignment_targets(tree)
    for node in tree.walk():
        if isinstance(node, exp.Column) and id(node) not in targets:
            name = node.name.lower()
            if node.is_star and (not node.table or node.table.lower() in row_names):
                return f"{node.sql(catalog.dialect)} reads every column, masked ones included"
            if name in masked_names:
                return f"it reads the masked column {masked_names[name]}"
            if not node.table and name in row_names:
                return f"{node.name} reads whole rows of a relation with masked columns"
        elif isinstance(node, exp.TableColumn) or (
            isinstance(node, exp.Star) and not isinstance(node.parent, exp.Count | exp.Column)
        ):
            return "it reads whole rows (*) of a relation with masked columns"
    return None


def _copied_out(tree: exp.Expression, plan: MaskPlan) -> str | None:
    """`COPY t [(columns)] TO ...` sends the table's values, as stored, out of the database (a file, a
    program, the client): refused when one of them is masked. (`COPY (SELECT ...) TO` is a query,
    checked column by column like any other.)"""
    if not isinstance(tree, exp.Copy) or tree.args.get("kind"):
        return None
    listed = tree.this if isinstance(tree.this, exp.Schema) else None
    table = listed.this if listed is not None else tree.this
    relation = plan.catalog.resolve(table) if isinstance(table, exp.Table) else None
    masks = plan.masks(relation) if relation is not None else {}
    names = {column.name.lower() for column in listed.expressions} if listed is not None else None
    copied = [column for column in masks if names is None or column.lower() in names]
    if relation is None or not copied:
        return None
    return f"COPY ... TO sends {relation.qualified_name}.{copied[0]} as stored, and it is masked"


def _assignment_targets(tree: exp.Expression) -> set[int]:
    """Columns being assigned to (UPDATE ... SET col =, ON CONFLICT DO UPDATE SET col =)."""
    targets: set[int] = set()
    for update in tree.find_all(exp.Update, exp.OnConflict):
        for assignment in update.args.get("expressions") or []:
            if isinstance(assignment, exp.EQ) and isinstance(assignment.this, exp.Column):
                targets.add(id(assignment.this))
    return targets


def _masked_by_text(name: str, plan: MaskPlan) -> bool:
    schema, _, table = name.rpartition(".")
    relation = plan.catalog.find(TableName(schema or None, table))
    return relation is None or bool(plan.masks(relation))
