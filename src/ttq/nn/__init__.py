"""Quantized linear modules."""

from ttq.nn.linear import StaticQuantLinear, TTQLinear

__all__ = ["StaticQuantLinear", "TTQLinear"]
