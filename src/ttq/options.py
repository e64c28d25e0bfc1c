"""Process-wide options, read from the environment once when ttq is imported.

=====================  ========================  ===================================================
field                  environment variable      meaning
=====================  ========================  ===================================================
``disable_kernels``    ``TTQ_DISABLE_KERNELS``   never use the C++/Triton kernels: packed weights take
                                                 the ``u8`` reference layout (:mod:`ttq.kernels.api`)
``half_params``        ``TTQ_HALF_PARAMS``       the default of ``half_params=None``: float16 scale /
                                                 zero in the ``cpu_q*`` layouts (any bits)
=====================  ========================  ===================================================

A variable is on for ``1``, ``true``, ``yes`` or ``on`` (any case, surrounding spaces ignored) and
off for anything else (``0``, empty, unset).  The library reads :func:`current`, never
``os.environ``: set a variable before starting Python (or the ``ttq`` command), or change the
options in the process with :func:`configure` (from then on) or :func:`using` (inside a ``with``
block, restored after it, e.g. in tests).  The options are one process-wide value, not per thread.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from ttq.errors import ConfigError
from ttq.typecheck import check_types

ENV_VARS = {"disable_kernels": "TTQ_DISABLE_KERNELS", "half_params": "TTQ_HALF_PARAMS"}  # field -> variable
TRUE_VALUES = ("1", "true", "yes", "on")


@dataclass(frozen=True)
class Options:
    """The process-wide options (see the module table).

    Args:
        disable_kernels: force the ``u8`` reference path for packed weights.
        half_params: float16 scale / zero by default (``cpu_q*`` layouts).
    """

    disable_kernels: bool = False
    half_params: bool = False

    def __post_init__(self) -> None:
        check_types(self)  # True / False only: "0" or 1 would be read as truthy

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Options:
        """The options that the variables of ``environ`` (e.g. ``os.environ``) set; unset ones are off."""
        return cls(**{field: is_true(environ.get(var, "")) for field, var in ENV_VARS.items()})


def is_true(value: str) -> bool:
    """Whether an environment variable's value turns its option on (``1/true/yes/on``, any case)."""
    return value.strip().lower() in TRUE_VALUES


_current = Options.from_env(os.environ)  # read once, when ttq is imported


def current() -> Options:
    """The options in force."""
    return _current


def configure(**changes: bool) -> Options:
    """Change the options in force from now on (``configure(half_params=True)``); returns the previous ones.

    Raises:
        ConfigError: an unknown option name or a value that is not a bool.
    """
    global _current
    unknown = sorted(set(changes) - set(ENV_VARS))
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(unknown)}; allowed: {', '.join(ENV_VARS)}")
    previous = _current
    _current = dataclasses.replace(_current, **changes)
    return previous


@contextlib.contextmanager
def using(**changes: bool) -> Iterator[Options]:
    """``with using(disable_kernels=True): ...``: the options changed inside the block, restored after it."""
    global _current
    previous = configure(**changes)
    try:
        yield _current
    finally:
        _current = previous
