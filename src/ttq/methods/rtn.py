"""Round-to-nearest groupwise QDQ (TTQ paper, Appendix B): ``W_hat = Q[W]``."""

from __future__ import annotations

import torch

from ttq.formats.affine import QuantSpec, dequantize, quantize


def rtn_quantize(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes, scale, zero of ``w`` (d_out, d_in) in the format ``spec``."""
    return quantize(w.detach(), spec)


def rtn(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Args: w (d_out, d_in). Returns ``Q[w]`` in w's dtype."""
    codes, scale, zero = rtn_quantize(w, spec)
    return dequantize(codes, scale, zero, spec.group_size, w.dtype, spec.fmt)
