"""Quantize-dequantize formats.

:mod:`ttq.formats.spec` holds ``QuantSpec`` and the granularity table, :mod:`ttq.formats.registry`
the table of formats, :mod:`ttq.formats.affine` the integer format and the entry points of every
format.  Importing this package registers the built-in formats, in the order of the registry's
table (and of its error messages): ``int`` (affine), ``nf4``, then ``fp4`` / ``nvfp4`` / ``mxfp4``.
"""

# the order of these three imports is the registration order
# isort: off
from ttq.formats import affine  # noqa: F401  registers "int"
from ttq.formats import nf4  # noqa: F401  registers "nf4"
from ttq.formats import fp4  # noqa: F401  registers "fp4", "nvfp4", "mxfp4"

# isort: on
from ttq.formats.affine import (
    QuantSpec,
    bits_per_weight,
    check_bits,
    check_group_size,
    dequantize,
    effective_group_size,
    group_params,
    num_groups,
    qdq,
    quantize,
)
from ttq.formats.registry import Format, codebook_format, format_names, get_format, register_format

__all__ = [
    "Format",
    "QuantSpec",
    "bits_per_weight",
    "check_bits",
    "check_group_size",
    "codebook_format",
    "dequantize",
    "effective_group_size",
    "format_names",
    "get_format",
    "group_params",
    "num_groups",
    "qdq",
    "quantize",
    "register_format",
]
