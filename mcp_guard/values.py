"""JSON-safe values: what a database value becomes before it reaches the assistant or the audit."""

from __future__ import annotations

import datetime as dt
import ipaddress
import math
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from decimal import Decimal
from itertools import chain
from typing import Any, TypeAlias

JsonScalar: TypeAlias = None | bool | int | float | str
JsonValue: TypeAlias = JsonScalar | list["JsonValue"] | dict[str, "JsonValue"]


def to_json_value(value: object) -> JsonValue:
    """Turn one driver value into JSON without losing what a reader needs; never raises.

    Exact forms: Decimal keeps its digits ("12.50"), bytes use PostgreSQL's "\\x..." hex, times
    are ISO 8601 (with their offset when they have one), intervals ISO 8601 durations.
    """
    kind = type(value)
    if kind in _AS_IS:
        return value  # type: ignore[return-value]
    convert = _BY_TYPE.get(kind)
    if convert is not None:
        return convert(value)
    for base, base_convert in _BY_TYPE.items():  # subclasses: IntEnum, pendulum, ip_interface, ...
        if isinstance(value, base):
            return base_convert(value)
    if isinstance(value, Mapping):
        return {str(key): to_json_value(item) for key, item in value.items()}
    if _is_range(value):
        return _range(value)
    if isinstance(value, Iterable) and not isinstance(value, str | bytes):  # asyncpg Record, composites
        try:
            return [to_json_value(item) for item in value]
        except Exception:  # a broken iterator must not break a result
            return str(value)
    return str(value)


def converter_for(kind: type) -> Callable[[Any], JsonValue] | None:
    """What every value of exactly type `kind` needs to become JSON; None when it already is.

    For drivers that know a column's type before its values: one lookup per column, not per value.
    """
    return None if kind in _AS_IS else _BY_TYPE.get(kind, to_json_value)


def json_rows(rows: Sequence[Sequence[object]]) -> list[list[JsonValue]]:
    """Driver rows → JSON rows; the values' types read in C first, so that rows holding only JSON
    scalars (most SQLite results) are copied, not converted a value at a time."""
    if _AS_IS.issuperset(map(type, chain.from_iterable(rows))):
        return [list(row) for row in rows]
    return [[to_json_value(value) for value in row] for row in rows]


def iso_duration(delta: dt.timedelta) -> str:
    """`timedelta` → ISO 8601 duration: 1 day 2:03:04 → "P1DT2H3M4S"; zero → "PT0S"."""
    micros = (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
    sign = "-" if micros < 0 else ""
    seconds, micros = divmod(abs(micros), 1_000_000)
    days, seconds = divmod(seconds, 86_400)
    hours, seconds = divmod(seconds, 3_600)
    minutes, seconds = divmod(seconds, 60)
    date_part = f"{days}D" if days else ""
    time_part = (f"{hours}H" if hours else "") + (f"{minutes}M" if minutes else "")
    if micros:
        time_part += f"{seconds}.{micros:06d}".rstrip("0") + "S"
    elif seconds:
        time_part += f"{seconds}S"
    if not date_part and not time_part:
        return "PT0S"
    return f"{sign}P{date_part}{'T' + time_part if time_part else ''}"


def _float(value: float) -> JsonValue:
    if math.isfinite(value):
        return value
    if math.isnan(value):
        return "NaN"
    return "Infinity" if value > 0 else "-Infinity"


def _bytes(value: bytes | bytearray | memoryview) -> str:
    return "\\x" + bytes(value).hex()


def _list(value: list[Any] | tuple[Any, ...]) -> list[JsonValue]:
    return [to_json_value(item) for item in value]


def _dict(value: dict[Any, Any]) -> dict[str, JsonValue]:
    return {str(key): to_json_value(item) for key, item in value.items()}


def _is_range(value: object) -> bool:
    """asyncpg's Range (and psycopg's) by shape: values.py must not import a driver."""
    return all(hasattr(value, name) for name in ("lower", "upper", "lower_inc", "upper_inc", "isempty"))


def _range(value: Any) -> str:
    """A range as PostgreSQL prints it: "[1,5)", "(,10]", "empty"."""
    if value.isempty:
        return "empty"
    lower = "" if value.lower is None else _bound(value.lower)
    upper = "" if value.upper is None else _bound(value.upper)
    return f"{'[' if value.lower_inc else '('}{lower},{upper}{']' if value.upper_inc else ')'}"


def _bound(value: object) -> str:
    converted = to_json_value(value)
    return converted if isinstance(converted, str) else str(converted)


_AS_IS: frozenset[type] = frozenset({str, int, bool, type(None)})

# Exact type first (one dict lookup on the hot path), then isinstance in this order for subclasses.
_BY_TYPE: dict[type, Callable[[Any], JsonValue]] = {
    bool: bool,
    int: int,
    str: str,
    float: _float,
    Decimal: lambda value: format(value, "f"),
    dt.datetime: dt.datetime.isoformat,
    dt.date: dt.date.isoformat,
    dt.time: dt.time.isoformat,
    dt.timedelta: iso_duration,
    uuid.UUID: str,
    bytes: _bytes,
    bytearray: _bytes,
    memoryview: _bytes,
    list: _list,
    tuple: _list,
    dict: _dict,
    ipaddress.IPv4Address: str,
    ipaddress.IPv6Address: str,
    ipaddress.IPv4Interface: str,
    ipaddress.IPv6Interface: str,
    ipaddress.IPv4Network: str,
    ipaddress.IPv6Network: str,
}
