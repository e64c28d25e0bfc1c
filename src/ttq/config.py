"""Method configurations: one frozen dataclass per method, registered once next to its handler.

The config classes live with their handlers in :mod:`ttq.quantizers` (one file per method) and are
registered in :mod:`ttq.registry`; this module gathers them (``from ttq.config import TTQConfig``) and
gives the JSON-able round trip ``config_to_dict`` / ``config_from_dict``.  A config says *what* to do
to every matched parameter; the walker (:func:`ttq.patch.quantize_`) says *where*.

Every field is type-checked against its annotation (:mod:`ttq.typecheck`) before the
method's own range checks: ``"false"`` for a bool or ``3.5`` for an int is a
:class:`~ttq.errors.ConfigError` naming the method, the field, the value and the type.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from ttq.data.windows import CalibSpec
from ttq.errors import ConfigError
from ttq.quantizers import (
    FACTOR_WHICH,
    LOWRANK_INITS,
    ONLINE_RULES,
    AWPConfig,
    AWQConfig,
    AWQSearchConfig,
    GPTQConfig,
    HQQConfig,
    LWCConfig,
    OnlineLowRankTTQConfig,
    PruneConfig,
    RTNConfig,
    SDEConfig,
    TTQConfig,
    TTQLowRankConfig,
)
from ttq.registry import METHODS, register_method
from ttq.typecheck import check_values

__all__ = [
    "FACTOR_WHICH", "LOWRANK_INITS", "METHODS", "ONLINE_RULES", "AWPConfig", "AWQConfig", "AWQSearchConfig",
    "CalibSpec", "GPTQConfig", "HQQConfig", "LWCConfig", "OnlineLowRankTTQConfig", "PruneConfig", "RTNConfig",
    "SDEConfig", "TTQConfig", "TTQLowRankConfig", "config_from_dict", "config_to_dict", "register_method",
]

def _spec_class(annotation: Any) -> type | None:
    """The dataclass a field holds (``QuantSpec`` for ``QuantSpec | None``), or None: its JSON is a nested dict."""
    for t in (annotation, *typing.get_args(annotation)):
        if isinstance(t, type) and dataclasses.is_dataclass(t):
            return t
    return None


def config_to_dict(config: Any) -> dict:
    """``{"method": name, **fields}``, JSON-able.

    A field declared with ``metadata={"omit_default": True}`` is left out while it has its
    default, so adding such a field keeps the dicts (and result-cache keys) of existing configs.
    """
    d = dataclasses.asdict(config)
    for f in dataclasses.fields(config):
        if f.metadata.get("omit_default") and d[f.name] == f.default:
            del d[f.name]
    return {"method": config.name, **d}


def config_from_dict(d: dict) -> Any:
    """Inverse of :func:`config_to_dict`.

    Every value is checked against its field's annotation first (nested spec dicts too), so
    ``{"quant": {"symmetric": "false"}}`` is a :class:`ConfigError`, never a truthy string.
    """
    if not isinstance(d, dict):
        raise ConfigError(f"a config must be a dict (JSON object) with a 'method', got {d!r}")
    d = dict(d)
    name = d.pop("method", None)
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; known: {', '.join(sorted(METHODS))}")
    cls = METHODS[name]
    hints = typing.get_type_hints(cls)
    where = f"method {name!r}"
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in d:
            continue
        v = d.pop(f.name)
        spec_cls = _spec_class(hints.get(f.name))
        if spec_cls is not None and isinstance(v, dict):
            known = {nf.name for nf in dataclasses.fields(spec_cls)}
            if set(v) - known:
                raise ConfigError(
                    f"unknown field(s) in {f.name!r} of {where}: {', '.join(sorted(set(v) - known))}; "
                    f"allowed: {', '.join(sorted(known))}"
                )
            check_values(spec_cls, v, where, prefix=f"{f.name}.")
            v = spec_cls(**v)
        kwargs[f.name] = tuple(v) if isinstance(v, list) else v
    if d:
        raise ConfigError(f"unknown field(s) for {where}: {', '.join(sorted(d))}")
    return cls(**kwargs)  # its __post_init__ checks the types of the top-level fields
