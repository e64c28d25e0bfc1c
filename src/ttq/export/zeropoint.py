"""The integer-zero-point format ``"int_zp"``: the grid of AutoAWQ, GPTQ and compressed-tensors.

ttq's ``"int"`` format stores a float zero ``Z = min`` per group (``W_hat = q S + Z``, eqs. 6-9), which
GGUF's Q4_1 / Q5_1 hold as they are but compressed-tensors (vLLM, transformers) cannot: its asymmetric
zero-point is an integer code ``zp`` (``W_hat = (c - zp) S``, packed like the codes).  ``"int_zp"``
quantizes on that grid from the start, so a model quantized with it exports to compressed-tensors
exactly.  Per group of ``W`` (d_out, d_in), ``q = bits``, ``qmax = 2^q - 1``:

==============  ==========================================================  =====================
                scale ``S``                                                 zero-point (code)
==============  ==========================================================  =====================
asymmetric      ``(max' - min') / qmax`` with ``min' = min(min, 0)``,        ``zp = clamp(round(-min' / S), 0, qmax)``
                ``max' = max(max, 0)`` (0 is on the grid)
symmetric       ``|W|max / (qmax / 2)`` (compressed-tensors' symmetric scale) ``zp = 2^(q-1)`` (fixed)
==============  ==========================================================  =====================

Codes are ``clamp(round(W / S + zp), 0, qmax)``; dequantization ``W_hat = (codes - zp) S``, computed in
that order (as compressed-tensors does: bit for bit the same weights).  Through ttq's common interface
the zero tensor holds ``Z = -zp S`` (so ``codes S + Z`` is the same grid and the format fits every
method, GPTQ's given-parameter path included); the integer ``zp`` is ``round(-Z / S)``
(:func:`zero_point_codes`).  A group whose scale is 0 (all-zero weights) dequantizes to ``Z = 0``.
``QuantSpec.nu`` widens or clips the range as in ``"int"`` before 0 is put on the grid.

The signed codes of compressed-tensors are ``c = codes - 2^(q-1)`` (``zp`` alike).  Registered by
:func:`ttq.export.register` (nothing is registered on import): then ``QuantSpec(bits=4, group_size=32,
fmt="int_zp")`` works everywhere (quantize_, save_pretrained / from_pretrained of a ttq checkpoint, ...).
"""

from __future__ import annotations

import torch

from ttq.formats.registry import Format, get_format, register_format
from ttq.formats.spec import QuantSpec, _grouped, check_finite, effective_group_size, expand_groups

NAME = "int_zp"


def int_zp_params(w: torch.Tensor, spec: QuantSpec, check: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale ``S`` and zero ``Z = -zp S`` per group, each float32 (d_out, n_groups); the table above.

    Args:
        w: (d_out, d_in) weights, any float dtype (math in float32).
        spec: the format (``fmt="int_zp"``).
        check: refuse NaN/Inf weights.
    """
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight (d_out, d_in), got shape {tuple(w.shape)}")
    if check:
        check_finite(w, "weight")
    g = effective_group_size(w.shape[1], spec.group_size)
    wg = _grouped(w.float(), g)  # (d_out, d_in) -> (d_out, n_groups, g)
    wmax, wmin = wg.amax(dim=-1), wg.amin(dim=-1)  # (d_out, n_groups)
    if spec.nu != 1.0:
        mid, half = (wmax + wmin) / 2, spec.nu * (wmax - wmin) / 2
        wmax, wmin = mid + half, mid - half
    if spec.symmetric:
        scale = torch.maximum(wmax.abs(), wmin.abs()) / (spec.qmax / 2)  # compressed-tensors' own expression
        zp = torch.full_like(scale, float(1 << (spec.bits - 1)))
    else:
        wmin, wmax = wmin.clamp(max=0.0), wmax.clamp(min=0.0)
        scale = (wmax - wmin) / spec.qmax
        zp = torch.round(-wmin / torch.where(scale > 0, scale, torch.ones_like(scale))).clamp_(0, spec.qmax)
    zero = torch.where(scale > 0, -zp * scale, torch.zeros_like(scale))
    return scale, zero


def zero_point_codes(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """The integer zero-point ``zp = round(-Z / S)`` (float32, same shape; 0 where ``S = 0``)."""
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.where(scale > 0, torch.round(-zero / safe), torch.zeros_like(scale))


def int_zp_quantize(
    w: torch.Tensor, spec: QuantSpec, scale: torch.Tensor | None = None, zero: torch.Tensor | None = None,
    check: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes uint8 (d_out, d_in) ``clamp(round(W / S + zp), 0, qmax)``, scale and zero (d_out, n_groups)."""
    if scale is None or zero is None:
        scale, zero = int_zp_params(w, spec, check)
    d_in = w.shape[1]
    s = expand_groups(scale, d_in, spec.group_size)  # (d_out, n_groups) -> (d_out, d_in)
    zp = expand_groups(zero_point_codes(scale, zero), d_in, spec.group_size)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    codes = torch.where(s > 0, torch.round(w.float() / safe + zp), torch.zeros_like(s))  # compressed-tensors' order
    return codes.clamp_(0, spec.qmax).to(torch.uint8), scale, zero


def int_zp_dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    """``W_hat = (codes - zp) S`` (d_out, d_in) float32; ``Z`` where ``S = 0``."""
    d_in = codes.shape[1]
    s = expand_groups(scale, d_in, group_size)  # (d_out, n_groups) -> (d_out, d_in)
    zp = expand_groups(zero_point_codes(scale, zero), d_in, group_size)
    w = (codes.float() - zp) * s
    return torch.where(s > 0, w, expand_groups(zero, d_in, group_size))


def int_zp_bits_per_weight(spec: QuantSpec, g: int, scale_bits: int) -> float:
    """``q + (scale_bits + q) / g`` asymmetric (a float scale and a q-bit zero-point), ``q + scale_bits / g``
    symmetric."""
    return spec.bits + (scale_bits + (0 if spec.symmetric else spec.bits)) / g


def register() -> Format:
    """Register ``"int_zp"`` (idempotent; :func:`ttq.export.register`, the export entry points and ``ttq export``
    call it); returns the format."""
    try:
        return get_format(NAME)
    except ValueError:  # ConfigError: not registered yet
        return register_format(Format(NAME, int_zp_params, int_zp_quantize, int_zp_dequantize, int_zp_bits_per_weight))

