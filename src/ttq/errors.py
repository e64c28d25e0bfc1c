"""The library's own errors: one hierarchy under :class:`TTQError`.

Every error a user can cause (a bad argument, a missing or malformed file, a model that
cannot be loaded or holds NaN weights, a device that is not there, a cache that cannot be
written) is raised as a subclass of :class:`TTQError` with a message that says what was
wrong and what is allowed.  The CLI prints such a message and exits with status 2; anything
else is a bug in ttq.

The subclasses also derive from the matching built-in exception (``ValueError``,
``FileNotFoundError``, ``RuntimeError``), so ``except ValueError`` keeps working.

=====================  ============================================  =====================
class                  raised for                                    also a
=====================  ============================================  =====================
``ConfigError``        a bad argument, config field or option         ``ValueError``
``DataError``          a data file or row that is malformed           ``ValueError``
``DataNotFoundError``  a data file, model path or cache that is not   ``FileNotFoundError``
                       there
``ModelError``         a model that cannot be loaded or used (a        ``ValueError``
                       truncated file, NaN weights, no blocks found)
``DeviceError``        a device that does not exist or is not         ``RuntimeError``
                       available in this build (CUDA on CPU-only)
``OutputExistsError``  an output file that exists (``--overwrite``)   ``FileExistsError``
``MissingDependency``  an optional package that is not installed     ``ImportError``
=====================  ============================================  =====================
"""

from __future__ import annotations


class TTQError(Exception):
    """Base of every error ttq raises on purpose (the CLI prints it and exits with status 2)."""


class ConfigError(TTQError, ValueError):
    """A bad argument, config field or option value."""


class DataError(TTQError, ValueError):
    """A data file or record that is malformed (e.g. a C4 row without ``text``)."""


class DataNotFoundError(TTQError, FileNotFoundError):
    """A data file, model path or other input that does not exist."""


class ModelError(TTQError, ValueError):
    """A model that cannot be loaded or used (truncated weights, non-finite weights, unknown layout)."""


class DeviceError(TTQError, RuntimeError):
    """A device that does not exist or that this build of PyTorch cannot use."""


class OutputExistsError(TTQError, FileExistsError):
    """An output that already exists and would be overwritten without ``overwrite=True``."""


class MissingDependency(TTQError, ImportError):
    """An optional package a feature needs is not installed (the message names the pip extra)."""
