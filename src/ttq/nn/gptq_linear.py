"""GPTQ with act-order and dynamic groups: codes in processing (permuted) order.

GPTQ's ``act_order`` without static groups forms groups of consecutive
columns *in the permuted order*, so its codes, scales and zeros only
describe ``W_hat[:, perm]``.  :class:`PermutedQuantLinear` keeps them in that
layout with ``perm`` and un-permutes the dequantized weight once.  It is
deliberately not a :class:`~ttq.nn.linear.StaticQuantLinear`: packed kernels
that read ``codes`` in natural column order must not pick it up (both share the
weight cache of :class:`~ttq.nn.linear.DequantCachedLinear`).
"""

from __future__ import annotations

import torch
from torch import nn

from ttq.formats.affine import QuantSpec, dequantize
from ttq.nn.linear import DequantCachedLinear


class PermutedQuantLinear(DequantCachedLinear):
    """Static quantized linear with column permutation: ``W_hat = dequant(codes)[:, argsort(perm)] / s``."""

    def __init__(
        self,
        original: nn.Linear,
        codes: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor,
        spec: QuantSpec,
        perm: torch.Tensor,
        input_scale: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = original.in_features, original.out_features
        self.spec = spec
        self.register_buffer("codes", codes)  # (d_out, d_in) uint8, permuted columns
        self.register_buffer("scale", scale)  # (d_out, n_groups) of the permuted columns
        self.register_buffer("zero", zero)  # (d_out, n_groups)
        self.register_buffer("perm", perm)  # (d_in,) int64: permuted column j is natural column perm[j]
        self.register_buffer("input_scale", input_scale)  # (d_in,) natural order, or None
        self.bias = original.bias
        self.original = original
        self._dtype = original.weight.dtype

    def _dequantize(self) -> torch.Tensor:
        """Effective weight (d_out, d_in) float32 in natural column order."""
        w = dequantize(self.codes, self.scale, self.zero, self.spec.group_size, fmt=self.spec.fmt)
        w = w[:, torch.argsort(self.perm)]
        return w / self.input_scale if self.input_scale is not None else w

    def extra_repr(self) -> str:
        s = self.spec
        return (
            f"in={self.in_features}, out={self.out_features}, bits={s.bits}, group_size={s.group_size}, "
            f"fmt={s.fmt}, act_order=True"
        )
