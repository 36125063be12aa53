"""What no rewrite of the SQL can see, refused while masking applies, each with its reason.

The rewrite masks every table reference in the statement's tree. It cannot see inside a function
body (a user-defined function may read a masked table by itself, `query_to_xml` runs SQL from a
string), into catalog relations that copy column values (`pg_stats` histograms and most common
values, SQLite `sqlite_stat*` samples, query texts in `pg_stat_activity`), into tables its schema
does not know, or into the plan estimates EXPLAIN derives from column statistics. So, while masking
applies to the caller on a connection, a statement is refused when it calls a function that is not
on the list of known pure built-ins (plus the operator's `allowed_functions`), reads one of those
catalogs or an unknown table, or explains a statement over masked relations.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlglot import exp

from mcp_guard.backends.base import Relation
from mcp_guard.catalog import Catalog, TableName
from mcp_guard.classify import DYNAMIC_SQL_FUNCTIONS, Statement, refers_to_cte
from mcp_guard.kinds import RiskFlag
from mcp_guard.masking import FUNCTION_PREFIX

PURE_FUNCTIONS = frozenset(
    """
    abs acos asin atan atan2 ceil ceiling cos cot degrees div exp floor greatest least ln log log10
    mod pi power pow radians rand random round sign sin sqrt tan trunc width_bucket
    ascii btrim char chr concat concat_ws convert_to decode encode format hex initcap instr left length
    char_length character_length lower ltrim md5 octet_length pad printf quote quote_ident quote_literal
    regexp_like regexp_match regexp_matches regexp_replace regexp_split_to_array regexp_split_to_table
    repeat replace reverse right rtrim sha256 s_h_a2_digest split_part str_position string_to_array
    string_to_table strpos substr substring to_char to_number translate trim unicode unistr upper
    zeroblob typeof pg_typeof num_nulls num_nonnulls likely unlikely
    count sum avg min max total stddev stddev_pop stddev_samp variance variance_pop var_pop var_samp
    every bool_and bool_or logical_and logical_or bit_and bit_or bitwise_and_agg bitwise_or_agg corr
    covar_pop covar_samp regr_slope regr_intercept regr_count regr_r2 mode percentile_cont
    percentile_disc group_concat string_agg array_agg json_agg jsonb_agg json_object_agg
    jsonb_object_agg j_s_o_n_array_agg j_s_o_n_b_object_agg j_s_o_n_object_agg json_group_array
    json_group_object
    row_number rank dense_rank percent_rank cume_dist ntile lag lead first_value last_value nth_value
    coalesce nullif ifnull if iif nvl cast try_cast exists collate row
    overlay starts_with convert_from to_ascii bit_length regexp_count regexp_substr regexp_instr
    cbrt gcd lcm factorial array_upper array_lower array_ndims array_dims
    int4range int8range numrange tsrange tstzrange daterange isempty lower_inc upper_inc lower_inf
    upper_inf json_extract_path json_extract_path_text jsonb_extract_path jsonb_extract_path_text
    jsonb_path_query jsonb_path_query_array jsonb_path_query_first jsonb_path_exists jsonb_path_match
    now current_date current_time current_timestamp localtime localtimestamp clock_timestamp
    statement_timestamp transaction_timestamp date time datetime julianday strftime time_to_str
    unixepoch unix_to_time date_trunc timestamp_trunc date_part extract age make_date make_time
    make_timestamp make_interval timestamp_from_parts timezone date_bin justify_days justify_hours
    justify_interval isfinite to_date to_timestamp str_to_date ts_or_ds_to_timestamp ts_or_ds_to_date
    date_add date_sub date_diff datediff
    array array_append array_cat array_concat array_contains_all array_length array_position
    array_remove array_size array_to_string cardinality unnest explode exploding_generate_series
    generate_series
    row_to_json to_json to_jsonb json_build_object jsonb_build_object json_build_array
    jsonb_build_array j_s_o_n_object json_object json_array json_extract json_extract_scalar
    jsonb_extract_scalar json_each json_each_text jsonb_each jsonb_each_text json_array_elements
    jsonb_array_elements json_array_elements_text jsonb_array_elements_text json_array_length
    jsonb_array_length json_typeof jsonb_typeof jsonb_pretty jsonb_set jsonb_strip_nulls json_valid
    json_type json_object_keys jsonb_object_keys
    to_tsvector to_tsquery plainto_tsquery websearch_to_tsquery ts_rank ts_headline
    uuid gen_random_uuid host family masklen network abbrev
    current_user session_user current_schema current_database current_version version
    """.split()
)
"""Built-ins that compute only from their arguments, named as `classify` normalises them."""

DATA_CATALOGS = frozenset(
    {
        "pg_stats",
        "pg_statistic",
        "pg_stats_ext",
        "pg_stats_ext_exprs",
        "pg_statistic_ext_data",
        "pg_stat_activity",
        "pg_stat_statements",
        "pg_largeobject",
        "pg_prepared_statements",
        "sqlite_stat1",
        "sqlite_stat2",
        "sqlite_stat3",
        "sqlite_stat4",
    }
)
"""Catalog relations that hold copies of column values or of other sessions' SQL (with its literals)."""


_OUT_OF_SIGHT = frozenset(
    {RiskFlag.PROCEDURAL, RiskFlag.DYNAMIC_SQL, RiskFlag.OPAQUE_COMMAND, RiskFlag.UNPARSEABLE}
)
"""Flags of statements whose reads no rewrite sees: a DO block, a procedure, SQL in a string."""

_SYSTEM_COLUMNS = {
    "sqlite": frozenset({"rowid", "oid", "_rowid_"}),
    "postgres": frozenset({"tableoid", "ctid", "xmin", "xmax", "cmin", "cmax"}),
}
"""Columns a table has beside its own (SQLite's row id, PostgreSQL's system columns), which a derived
table does not carry."""


def blind_spot(
    statement: Statement,
    catalog: Catalog,
    masks_of: Callable[[Relation], dict[str, object]],
    allowed_functions: frozenset[str],
    param_count: int,
) -> str | None:
    """Why masking cannot vouch for this statement, or None when the rewrite covers it."""
    for name in statement.functions:
        if name.startswith(FUNCTION_PREFIX):
            return f"{name}() is mcp-guard's own masking function and cannot be called"
        if name in DYNAMIC_SQL_FUNCTIONS:
            return f"{name}() runs SQL given as text, out of sight of masking"
        if name not in PURE_FUNCTIONS and name not in allowed_functions:
            return (
                f"{name}() is not on the list of functions known to compute only from their arguments; "
                "a function may read masked data by itself (the operator can allow it in "
                "masking.allowed_functions)"
            )
    unseen = statement.flags & _OUT_OF_SIGHT
    if unseen:
        return (
            f"{statement.operation} runs code or text mcp-guard cannot read "
            f"({', '.join(sorted(unseen))}), so masking cannot vouch for what it reads"
        )
    tree = statement.tree
    if tree is None:
        return _opaque(statement, catalog, masks_of)
    for node in tree.find_all(exp.Dot):
        if isinstance(node.expression, exp.Func) and node.this.name.lower() != "pg_catalog":
            where = node.sql(catalog.dialect)[:80]
            return f"{where}: schema-qualified functions are not allowed while masking applies"
    for node in tree.find_all(exp.Operator):  # OPERATOR(schema.op): a function by another name
        if not str(node.args.get("operator", "")).lower().startswith("pg_catalog."):
            where = node.sql(catalog.dialect)[:80]
            return f"{where}: operators named outside pg_catalog are not allowed while masking applies"
    for node in tree.find_all(exp.Parameter, exp.Placeholder):
        number = node.this.name if isinstance(node.this, exp.Literal) else node.name
        if number.isdigit() and int(number) > param_count:
            return f"${number} names a parameter beyond the {param_count} given"
    system = {column.name.lower() for column in tree.find_all(exp.Column)}
    system &= _SYSTEM_COLUMNS.get(catalog.dialect, frozenset())
    for table in tree.find_all(exp.Table):
        name = catalog.name_of(table)
        if name is None:
            if isinstance(table.this, exp.Identifier):
                where = table.sql(catalog.dialect)[:80]
                return f"{where}: names with a database part are not allowed while masking applies"
            continue  # a table function: its name was checked with the functions
        if refers_to_cte(table, catalog.dialect):
            continue
        relation = catalog.find(name)
        if relation is None:
            return (
                f"table {name} is not in the schema mcp-guard read from the database, "
                "so masking cannot vouch for it"
            )
        if relation.name.lower() in DATA_CATALOGS:
            return f"{relation.qualified_name} holds copies of column values (statistics or query texts)"
        if system and masks_of(relation) and not system <= {column.lower() for column, _ in relation.columns}:
            return (
                f"{relation.qualified_name} is masked and read through a derived table, which has "
                f"no {'/'.join(sorted(system))}: only its own columns pass (for a row id, use its "
                "primary key)"
            )
    return None


def _opaque(
    statement: Statement, catalog: Catalog, masks_of: Callable[[Relation], dict[str, object]]
) -> str | None:
    """A statement read by its keywords (SHOW, EXPLAIN): fine unless it touches masked relations."""
    if statement.operation == "SHOW":
        return None
    for table in statement.tables:
        schema, _, name = table.rpartition(".")
        relation = catalog.find(TableName(schema or None, name))
        if relation is None or masks_of(relation) or relation.name.lower() in DATA_CATALOGS:
            if statement.operation != "EXPLAIN":
                return (
                    f"{statement.operation} over {table}: mcp-guard reads this statement by its keywords "
                    "only, so masking cannot rewrite the query inside"
                )
            return (
                f"{statement.operation} over {table}: its plan estimates come from the statistics of "
                "masked columns"
            )
    return None
