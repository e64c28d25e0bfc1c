"""Quantized linear modules that replace ``nn.Linear`` in decoder blocks.

* :class:`StaticQuantLinear` -- RTN / AWQ (and any method that produces codes
  once): stores codes, scales, zeros and an optional input scale ``s``; the
  reference forward is ``F.linear(x / s, dequant(codes))``.
* :class:`TTQLinear` -- keeps the full-precision weight and quantizes it from
  each forward's own activations (per-sequence mode, the paper's evaluation).

Both keep the original ``nn.Linear`` reachable (``.original``) so that
:func:`ttq.patch.restore_` can put it back.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ttq.formats.affine import QuantSpec, dequantize
from ttq.methods.lowrank import residual, svd_factors
from ttq.methods.scaling import ChannelStats, ScaleSpec, input_scale, scaled_quantize


class StaticQuantLinear(nn.Module):
    """A linear layer with weights quantized once (codes, scale, zero; optional input scale)."""

    def __init__(
        self,
        original: nn.Linear,
        codes: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor,
        spec: QuantSpec,
        input_scale: torch.Tensor | None = None,
        keep_original: bool = True,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = original.in_features, original.out_features
        self.spec = spec
        self.register_buffer("codes", codes)  # (d_out, d_in) uint8
        self.register_buffer("scale", scale)  # (d_out, n_groups) float32
        self.register_buffer("zero", zero)  # (d_out, n_groups) float32
        self.register_buffer("input_scale", input_scale)  # (d_in,) or None
        self.bias = original.bias
        self._dtype = original.weight.dtype
        self.original = original if keep_original else None
        self._w_cache: torch.Tensor | None = None

    def dequantized_weight(self) -> torch.Tensor:
        """Effective weight ``dequant(codes) diag(s)^-1`` (d_out, d_in) in the layer dtype."""
        if self._w_cache is None:
            w = dequantize(self.codes, self.scale, self.zero, self.spec.group_size, fmt=self.spec.fmt)
            if self.input_scale is not None:
                w = w / self.input_scale
            self._w_cache = w.to(self._dtype)
        return self._w_cache

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        s = self.spec
        return f"in={self.in_features}, out={self.out_features}, bits={s.bits}, group_size={s.group_size}, awq={self.input_scale is not None}"


class TTQLinear(nn.Module):
    """Test-time quantized linear layer (TTQ paper, Section 2).

    Each forward computes ``s`` from its own inputs, quantizes
    ``W - B A`` scaled by ``s`` and returns ``x W_q^T + (x A^T) B^T + bias``.
    A batch of several sequences is quantized per sequence.
    """

    def __init__(self, original: nn.Linear, spec: QuantSpec, scale: ScaleSpec, rank: int = 0) -> None:
        super().__init__()
        self.in_features, self.out_features = original.in_features, original.out_features
        self.spec, self.scale_spec, self.rank = spec, scale, rank
        self.weight = original.weight  # full precision, kept by design
        self.bias = original.bias
        self.original = original
        b, a = svd_factors(original.weight.detach(), rank)
        self.register_buffer("lr_b", b.to(original.weight.dtype))  # (d_out, r)
        self.register_buffer("lr_a", a.to(original.weight.dtype))  # (r, d_in)
        self._residual: torch.Tensor | None = None

    def residual_weight(self) -> torch.Tensor:
        """``W - B A`` (float32), computed once."""
        if self._residual is None:
            self._residual = residual(self.weight.detach(), self.lr_b.float(), self.lr_a.float())
        return self._residual

    def quantize_for(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Codes, scale, zero of ``(W - B A) diag(s)`` and ``s`` (d_in,) for activations ``x``."""
        s = input_scale(ChannelStats.from_activations(x, self.scale_spec.p), self.scale_spec)
        codes, scale, zero = scaled_quantize(self.residual_weight(), s, self.spec)
        return codes, scale, zero, s

    def _forward_one(self, x: torch.Tensor) -> torch.Tensor:
        codes, scale, zero, s = self.quantize_for(x)
        w_q = dequantize(codes, scale, zero, self.spec.group_size, fmt=self.spec.fmt).to(x.dtype)  # (d_out, d_in)
        y = F.linear(x / s.to(x.dtype), w_q, self.bias)
        if self.rank:
            y = y + F.linear(F.linear(x, self.lr_a.to(x.dtype)), self.lr_b.to(x.dtype))
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3 and x.shape[0] > 1:  # (B, T, d): one quantization per sequence
            return torch.cat([self._forward_one(xi[None]) for xi in x], dim=0)
        return self._forward_one(x)

    def extra_repr(self) -> str:
        s, c = self.spec, self.scale_spec
        return (
            f"in={self.in_features}, out={self.out_features}, bits={s.bits}, group_size={s.group_size}, "
            f"rank={self.rank}, alpha={c.alpha}, lam={c.lam}, p={c.p}, form={c.form}"
        )
