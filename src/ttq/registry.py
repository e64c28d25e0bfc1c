"""The method registry: a method is registered once, next to its handler, and shows up everywhere.

A method is a frozen config dataclass with a ``name`` plus a handler, in one file of
:mod:`ttq.quantizers` (or any module of yours)::

    @register_method
    @dataclass(frozen=True)
    class MyConfig:
        name: ClassVar[str] = "mine"
        needs_calibration: ClassVar[bool] = False
        quant: QuantSpec = field(default_factory=QuantSpec)

    @register_handler(MyConfig)
    def _mine(module: nn.Linear, parameter_name: str, config: MyConfig, calibration) -> nn.Module:
        ...  # return the module that replaces ``module``

That is all: :func:`ttq.quantize_` applies it, ``config_from_dict`` / ``--config`` parse it, and the
method lists of ``ttq ppl --methods`` / ``ttq qtime`` are read from here.  How a perplexity table
makes rows of a method from the common options (bits, group size, ranks, calibration sets) is
:func:`table_rows`: a default from the config's fields, or a builder given with
:func:`register_rows` (several CLI names may map to one config, e.g. ``awp_online``).

=================  ==========================================================================
table              maps
=================  ==========================================================================
``METHODS``        method name -> config class (``config_from_dict``)
``HANDLERS``       config class -> handler ``(module, parameter_name, config, calibration)``
``KINDS``          config class -> the parameter kinds its handler accepts (``"linear"``, ...)
``ROWS``           CLI row name -> ``rows(options) -> [(label, config)]``
=================  ==========================================================================
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ttq.errors import ConfigError

Handler = Callable[[Any, str, Any, Any], Any]
RowBuilder = Callable[["RowOptions"], list[tuple[str, Any]]]

METHODS: dict[str, type] = {}
HANDLERS: dict[type, Handler] = {}
KINDS: dict[type, tuple[str, ...]] = {}
ROWS: dict[str, RowBuilder] = {}
_ORDER: list[str] = []  # CLI row names in registration order (the paper's row order for the built-ins)

PARAMETER_KINDS = ("linear", "experts")  # 2-D weights of linear layers; 3-D fused expert tensors (E, out, in)


def register_method(cls: type) -> type:
    """Class decorator: make ``cls`` (a frozen dataclass with a ``name``) known by name."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{cls.__name__} needs a class attribute `name: ClassVar[str]` to be registered")
    if not dataclasses.is_dataclass(cls):
        raise ConfigError(f"{cls.__name__} must be a (frozen) dataclass to be registered as a method")
    METHODS[name] = cls
    if name not in _ORDER:
        _ORDER.append(name)
    return cls


def register_handler(config_cls: type, kinds: tuple[str, ...] = ("linear",)) -> Callable[[Handler], Handler]:
    """Decorator: ``handler(module, parameter_name, config, calibration) -> nn.Module`` for ``config_cls``.

    Args:
        config_cls: the method's config class.
        kinds: the parameter kinds the handler accepts (:data:`PARAMETER_KINDS`); the walker skips others.
    """
    bad = [k for k in kinds if k not in PARAMETER_KINDS]
    if bad:
        raise ConfigError(f"unknown parameter kind(s) {bad}; allowed: {', '.join(PARAMETER_KINDS)}")

    def deco(fn: Handler) -> Handler:
        HANDLERS[config_cls] = fn
        KINDS[config_cls] = tuple(kinds)
        return fn

    return deco


def register_rows(name: str) -> Callable[[RowBuilder], RowBuilder]:
    """Decorator: ``rows(options) -> [(label, config)]``, the table rows of CLI method ``name``."""

    def deco(fn: RowBuilder) -> RowBuilder:
        ROWS[name] = fn
        if name not in _ORDER:
            _ORDER.append(name)
        return fn

    return deco


@dataclass(frozen=True)
class RowOptions:
    """The common options a table row is made from (``ttq ppl`` / ``qtime`` arguments).

    Args:
        quant: the format (one bits x group size cell of the table).
        scale: the diagonal statistic's hyper-parameters.
        ranks: low-rank r values (one row per rank for methods with a ``rank`` field).
        calibs: calibration sets (one row per set for calibrated methods), ``CalibSpec``s.
    """

    quant: Any
    scale: Any
    ranks: tuple[int, ...] = (0,)
    calibs: tuple[Any, ...] = ()


SHORT = {"wikitext2": "WT2", "ptb": "PTB", "c4": "C4"}


def pow2_label(n: int) -> str:
    k = int(math.log2(n)) if n > 0 else 0
    return f"2^{k}" if 2**k == n else str(n)


def calib_label(calib: Any) -> str:
    """``"C4 Calib, 2^17"`` for a CalibSpec (``"legal Calib, 2^17"`` for ``file:/x/legal.txt``)."""
    from ttq.data.texts import dataset_label  # ttq.data imports this module

    return f"{dataset_label(calib.dataset)} Calib, {pow2_label(calib.n_tokens)}"


def _needs_calibration(cls: type, kwargs: dict) -> bool:
    attr = getattr(cls, "needs_calibration", False)
    if isinstance(attr, property):
        return bool(attr.fget(cls(**kwargs)))
    return bool(attr)


def default_rows(cls: type, options: RowOptions) -> list[tuple[str, Any]]:
    """Rows of a config class from its fields: ``quant`` / ``scale`` from the options, one row per rank
    when it has ``rank``, one per calibration set when it needs calibration."""
    names = {f.name for f in dataclasses.fields(cls)}
    base = {k: getattr(options, k) for k in ("quant", "scale") if k in names}
    label = getattr(cls, "label", cls.name.upper())
    ranks = [{"rank": r} for r in options.ranks] if "rank" in names else [{}]
    rows = []
    for extra in ranks:
        tag = f" (r={extra['rank']})" if extra else ""
        if "calib" in names and _needs_calibration(cls, {**base, **extra}):
            rows += [(f"{label}{tag} ({calib_label(c)})" if tag else f"{label} ({calib_label(c)})",
                      cls(**base, **extra, calib=c)) for c in options.calibs]
        else:
            rows.append((f"{label}{tag}", cls(**base, **extra)))
    return rows


def row_names() -> list[str]:
    """Every CLI row name (methods and extra row builders such as ``awp_online``), in registration order."""
    return list(_ORDER)


def table_rows(name: str, options: RowOptions) -> list[tuple[str, Any]]:
    """``[(label, config)]`` of CLI method ``name`` for one format cell."""
    if name in ROWS:
        return ROWS[name](options)
    if name in METHODS:
        return default_rows(METHODS[name], options)
    raise ConfigError(f"unknown method {name!r}; allowed: fp, {', '.join(row_names())}")
