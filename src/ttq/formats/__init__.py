"""Quantize-dequantize formats. See :mod:`ttq.formats.affine` for the granularity table."""

from ttq.formats.affine import (
    QuantSpec,
    check_bits,
    check_group_size,
    dequantize,
    effective_group_size,
    group_params,
    num_groups,
    qdq,
    quantize,
)

__all__ = [
    "QuantSpec",
    "check_bits",
    "check_group_size",
    "dequantize",
    "effective_group_size",
    "group_params",
    "num_groups",
    "qdq",
    "quantize",
]
