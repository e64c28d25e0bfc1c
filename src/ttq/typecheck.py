"""Type checks of config dataclass fields against their annotations (one checker for every config).

A config given as JSON (``--config LABEL=JSON``, :func:`ttq.config.config_from_dict`) or from
Python can carry ``"false"`` for a bool (truthy: it would silently turn the option on) or
``3.5`` for an int.  Every config dataclass calls :func:`check_types` first in its
``__post_init__``, so such a value is refused with the field, the value and the expected type.

=====================  ===================================================
annotation             accepted values
=====================  ===================================================
``bool``               ``True`` / ``False`` only (not 0/1, not "false")
``int``                an int that is not a bool (not 3.0, not "3")
``float``              an int or a float, not a bool
``str``                a str
``X | None``           None or an X
``tuple[X, ...]``      a tuple or list whose items are X
``tuple[X, Y]``        a tuple or list of two items, an X and a Y
a class (QuantSpec)    an instance of it
=====================  ===================================================
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Mapping
from typing import Any

from ttq.errors import ConfigError


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """The resolved annotations of ``cls`` (``from __future__ import annotations`` leaves strings)."""
    return typing.get_type_hints(cls)


def matches(value: Any, tp: Any) -> bool:
    """Whether ``value`` is acceptable for a field annotated ``tp`` (see the module table)."""
    if tp is Any:
        return True
    if tp is type(None):
        return value is None
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(matches(value, a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (tuple, list)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(matches(v, args[0]) for v in value)
        return len(value) == len(args) and all(matches(v, a) for v, a in zip(value, args))
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True  # an annotation this table does not cover is not checked


def describe(tp: Any) -> str:
    """The expected type in words, for error messages."""
    if tp is type(None):
        return "None (null)"
    if tp is bool:
        return "true or false (a bool)"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_plain(args[0])}s"
        return f"a list of {len(args)} items ({', '.join(_plain(a) for a in args)})"
    return f"a {getattr(tp, '__name__', tp)}"


def _plain(tp: Any) -> str:
    return {bool: "bool", int: "integer", float: "number", str: "string"}.get(tp, getattr(tp, "__name__", str(tp)))


def check_values(cls: type, values: Mapping[str, Any], where: str, prefix: str = "") -> None:
    """Check the ``values`` given for fields of the dataclass ``cls`` (fields not given are skipped).

    Args:
        cls: a dataclass.
        values: ``{field name: value}``, e.g. a config dict from JSON.
        where: what the error message names first (``"method 'rtn'"``, ``"QuantSpec"``).
        prefix: put before the field name (``"quant."`` for a nested spec).
    Raises:
        ConfigError: naming ``where``, the field, the value and the expected type.
    """
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in values and not matches(values[f.name], hints[f.name]):
            v = values[f.name]
            raise ConfigError(
                f"{where}: {prefix}{f.name} must be {describe(hints[f.name])}, got {v!r} ({type(v).__name__})"
            )


def check_types(obj: Any, where: str | None = None) -> None:
    """Check every field of the dataclass instance ``obj`` (call it first in ``__post_init__``)."""
    values = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    check_values(type(obj), values, where or type(obj).__name__)


def check_choice(what: str, value: Any, allowed: tuple) -> None:
    """Refuse ``value`` unless it is one of ``allowed`` (the message lists them)."""
    if value not in allowed:
        raise ConfigError(f"{what} must be one of {', '.join(map(str, allowed))}, got {value!r}")


def check_rank(rank: Any) -> None:
    """A low-rank r: a non-negative int."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise ConfigError(f"rank must be a non-negative integer, got {rank!r}")
