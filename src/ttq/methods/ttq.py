"""Test-time quantization (TTQ paper, Section 2): activation-aware QDQ whose
diagonal scale comes from the current forward pass's own tokens.

``W_hat(X) = B A + Q[(W - B A) diag(s(X))] diag(s(X))^-1`` with ``s`` from
:func:`ttq.methods.scaling.input_scale`; r = 0 drops the low-rank part.  A layer
computes it without forming ``W_hat``::

    y = F.linear(x / s, deq(Q[(W - B A) diag(s)])) + (x A^T) B^T + bias

This module is the one copy of that math; every TTQ layer (:class:`ttq.nn.linear.TTQLinear`,
:mod:`ttq.nn.lowrank_linear`) calls :func:`ttq_linear`:

* :func:`ttq_scale` -- ``s`` (d_in,) from activations or a :class:`ChannelStats`;
* :func:`ttq_quantize` -- codes, scale, zero of ``(W - B A) diag(s)``;
* :func:`ttq_linear` -- the layer output ``y`` for one sequence (:func:`codes_linear` of its codes);
* :func:`ttq_qdq` -- the effective weight ``W_hat`` (d_out, d_in), for analysis and tests.

The on-the-fly refinements (alpha search, clipping search, prompt-aware low rank, test-time GPTQ;
:mod:`ttq.methods.refine`) produce other codes / ``s`` / factors for the same product, :func:`codes_linear`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ttq.formats.affine import QuantSpec, dequantize, quantize
from ttq.methods.lowrank import residual
from ttq.methods.refine import RefineSpec, TokenStats, refine_quantize
from ttq.methods.scaling import ChannelStats, ScaleSpec, input_scale


def ttq_scale(x: torch.Tensor | ChannelStats, scale: ScaleSpec) -> torch.Tensor:
    """``s`` (d_in,) float32 for activations ``x`` (..., d_in; every leading dim is a token) or their statistic."""
    stats = x if isinstance(x, ChannelStats) else ChannelStats.from_activations(x, scale.p)
    return input_scale(stats, scale)


def ttq_quantize(
    w_res: torch.Tensor, s: torch.Tensor, spec: QuantSpec, check: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes uint8 (d_out, d_in), scale and zero (d_out, n_groups) of ``(W - B A) diag(s)``.

    Args:
        w_res: the residual ``W - B A`` (d_out, d_in) (W itself when r = 0).
        s: (d_in,) positive finite scale.
        spec: the format.
        check: refuse a non-finite ``w_res * s`` (one pass over the weight); layers that checked
            their weight once pass False (a finite weight times a finite scale stays finite).
    """
    if s.shape != (w_res.shape[1],):
        raise ValueError(f"scale has shape {tuple(s.shape)}, expected ({w_res.shape[1]},) for weight {tuple(w_res.shape)}")
    return quantize(w_res.float() * s, spec, check=check)  # (d_out, d_in) * (d_in,)


def ttq_linear(
    x: torch.Tensor,
    w_res: torch.Tensor,
    b: torch.Tensor | None,
    a: torch.Tensor | None,
    s: torch.Tensor,
    spec: QuantSpec,
    bias: torch.Tensor | None,
    check: bool = True,
) -> torch.Tensor:
    """``y = F.linear(x / s, deq(Q[w_res diag(s)])) + (x A^T) B^T + bias`` for one sequence.

    Args:
        x: (..., d_in) activations, any float dtype (the product runs in x's dtype).
        w_res: the residual ``W - B A`` (d_out, d_in), float32.
        b, a: low-rank factors (d_out, r), (r, d_in), or None (r = 0).
        s: (d_in,) scale of this sequence (:func:`ttq_scale`).
        spec: the format; bias: (d_out,) or None.
        check: as in :func:`ttq_quantize`.
    Returns:
        (..., d_out) in x's dtype.
    """
    codes, sc, zero = ttq_quantize(w_res, s, spec, check)
    return codes_linear(x, codes, sc, zero, s, spec, b, a, bias)


def codes_linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    s: torch.Tensor,
    spec: QuantSpec,
    b: torch.Tensor | None,
    a: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``y = F.linear(x / s, deq(codes)) + (x A^T) B^T + bias``.

    Args:
        x: (..., d_in) activations (the product runs in x's dtype).
        codes, scale, zero: uint8 (d_out, d_in), float32 (d_out, n_groups) x2 of ``(W - B A) diag(s)``.
        s: (d_in,) the scale they were quantized with; spec: the format.
        b, a: low-rank factors (d_out, r), (r, d_in), or None; bias: (d_out,) or None.
    Returns:
        (..., d_out) in x's dtype.
    """
    w_q = dequantize(codes, scale, zero, spec.group_size, fmt=spec.fmt).to(x.dtype)  # (d_out, d_in)
    y = F.linear(x / s.to(x.dtype), w_q, bias)
    if b is not None and b.shape[1]:
        y = y + F.linear(F.linear(x, a.to(x.dtype)), b.to(x.dtype))  # (..., d_in) -> (..., r) -> (..., d_out)
    return y


def ttq_qdq(
    w: torch.Tensor,
    x: torch.Tensor,
    spec: QuantSpec,
    scale: ScaleSpec,
    b: torch.Tensor | None = None,
    a: torch.Tensor | None = None,
    refine: RefineSpec | None = None,
) -> torch.Tensor:
    """Quantized weight for the activations ``x`` (..., d_in).

    Args:
        w: (d_out, d_in) full-precision weight.
        x: this forward's inputs to the layer; every leading dim is a token.
        spec, scale: format and diagonal-statistic hyper-parameters.
        b, a: optional static low-rank factors (d_out, r), (r, d_in).
        refine: optional on-the-fly refinements (:func:`ttq.methods.refine.refine_quantize`).
    Returns:
        The effective weight ``B A + Q[(W - B A) diag(s)] diag(s)^-1`` (d_out, d_in) in float32.
    """
    lowrank = b is not None and b.shape[1] > 0
    if refine is not None:
        stats = ChannelStats.from_activations(x, scale.p)
        tokens = TokenStats.from_activations(x, refine)
        fa = (b.float(), a.float()) if lowrank else (None, None)
        return refine_quantize(w, stats, tokens, spec, scale, refine, *fa).weight(spec)
    s = ttq_scale(x, scale)
    codes, sc, zero = ttq_quantize(residual(w, b, a) if lowrank else w.float(), s, spec)
    w_hat = dequantize(codes, sc, zero, spec.group_size, fmt=spec.fmt) / s  # (d_out, d_in)
    return w_hat + b @ a if lowrank else w_hat
