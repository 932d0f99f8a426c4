"""The JSON codec of the report's records, driven by their dataclass field types.

:func:`encode` turns a record into JSON-ready data: a dataclass becomes an object of its
fields in declaration order, and a float that JSON cannot hold becomes the string ``"inf"``,
``"-inf"`` or ``"nan"``. :func:`decode` reads it back by the declared type of each field, so
every float field (metrics, sample aggregates, fidelity, tolerances, timings) gets its
non-finite values back and a string field keeps the text ``"nan"`` as text. The layout is
documented in ``docs/report-format.md``.

This module knows no record: it works for any dataclass whose fields are typed with ``str``,
``int``, ``float``, ``bool``, ``None``, ``Literal``, ``list``, ``dict`` with string keys, other
such dataclasses, and unions of these.

Example:
    >>> import math
    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class Point:
    ...     x: float
    ...     label: str
    >>> encode(Point(math.inf, "nan"))
    {'x': 'inf', 'label': 'nan'}
    >>> decode(Point, {"x": "inf", "label": "nan"})
    Point(x=inf, label='nan')
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from typing import Any, Literal, Union

from fxalign.errors import InternalError

__all__ = ["NON_FINITE", "decode", "encode"]

NON_FINITE: dict[str, float] = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}
"""The strings that stand for non-finite floats in the JSON."""


def encode(value: Any) -> Any:
    """JSON-ready data of ``value``: dataclasses as dicts, non-finite floats as strings.

    Args:
        value: A dataclass instance, or a value of one of the field types the module supports.

    Returns:
        Dicts, lists, strings, numbers, booleans and ``None`` only.
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode(v) for v in value]
    return value


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    """``field name -> resolved type`` of the init fields of dataclass ``cls``."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def decode(tp: Any, value: Any, where: str = "report") -> Any:
    """Read ``value`` (from :func:`encode`, through JSON) back as type ``tp``.

    Object entries that are not fields of the dataclass they are read as are ignored, and
    fields missing from the object take their defaults.

    Args:
        tp: The type to read: a dataclass or a supported field type.
        value: The JSON data.
        where: Where ``value`` sits, for error messages (``report.rows[2].metrics``).

    Returns:
        The value, with dataclasses rebuilt and non-finite floats restored.

    Raises:
        TypeError: ``value`` does not fit ``tp``, or a required field is missing.
        InternalError: ``tp`` is not a type this codec supports.
    """
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return _decode_union(typing.get_args(tp), value, where)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise TypeError(f"{where}: {value!r} is not one of {list(typing.get_args(tp))}")
    if origin is list:
        (item,) = typing.get_args(tp)
        _expect(isinstance(value, list), "a list", value, where)
        return [decode(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _, item = typing.get_args(tp)
        _expect(isinstance(value, dict), "an object", value, where)
        return {k: decode(item, v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _decode_record(tp, value, where)
    return _decode_scalar(tp, value, where)


def _decode_union(members: tuple[Any, ...], value: Any, where: str) -> Any:
    if value is None and type(None) in members:
        return None
    errors = []
    for member in members:
        if member is type(None):
            continue
        try:
            return decode(member, value, where)
        except TypeError as e:
            errors.append(str(e))
    raise TypeError(" or ".join(errors))


def _decode_record(cls: type, value: Any, where: str) -> Any:
    _expect(isinstance(value, dict), "an object", value, where)
    types_ = _field_types(cls)
    kwargs = {k: decode(types_[k], v, f"{where}.{k}") for k, v in value.items() if k in types_}
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise TypeError(f"{where}: {e}") from e


def _decode_scalar(tp: Any, value: Any, where: str) -> Any:
    if tp is float:
        if isinstance(value, str) and value in NON_FINITE:
            return NON_FINITE[value]
        _expect(
            isinstance(value, (int, float)) and not isinstance(value, bool),
            "a number",
            value,
            where,
        )
        return float(value)
    if tp is int:
        _expect(isinstance(value, int) and not isinstance(value, bool), "an integer", value, where)
        return value
    if tp is bool:
        _expect(isinstance(value, bool), "true or false", value, where)
        return value
    if tp is str:
        _expect(isinstance(value, str), "a string", value, where)
        return value
    if tp is Any:
        return value
    raise InternalError(f"{where}: the report codec cannot read fields of type {tp!r}")


def _expect(ok: bool, what: str, value: Any, where: str) -> None:
    if not ok:
        raise TypeError(f"{where}: expected {what}, got {value!r:.60}")
