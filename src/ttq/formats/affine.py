"""Groupwise affine integer quantization and the entry points of every format (TTQ paper, Appendix B and D).

Granularity (``group_size``; -1 = one group per output row): the table of :mod:`ttq.formats.spec`.

The integer format (``QuantSpec.fmt = "int"``):

* asymmetric (eqs. 8-9 / 25-26): ``S = (max - min) / (2^q - 1)``, ``Z = min``;
* symmetric (eqs. 29-30): ``S = 2 |W|max / (2^q - 1)``, ``Z = -|W|max``;
* range expansion ``nu`` (eqs. 27-28) applied to (max, min) before either;
  ``nu = 1`` is the plain range, ``nu < 1`` clips, ``nu > 1`` widens.

Quantization is ``W_int = clamp(round((W - Z) / S), 0, 2^q - 1)`` and
dequantization ``W_hat = W_int * S + Z`` (eqs. 6-7).  Codes, scales and zeros
are returned as plain tensors so that kernels can pack them.

This module registers the integer format ``"int"`` (:func:`int_params`, :func:`int_quantize`,
:func:`int_dequantize`).  The entry points :func:`quantize`, :func:`dequantize` (``fmt=``),
:func:`group_params`, :func:`qdq` and :func:`bits_per_weight` look ``QuantSpec.fmt`` up in the
format table (:mod:`ttq.formats.registry`), so every method picks up the non-integer 4-bit
formats of Appendix D too: ``"nf4"`` (:mod:`ttq.formats.nf4`) and the E2M1 micro-scaling formats
``"fp4"``, ``"nvfp4"`` (group 16), ``"mxfp4"`` (group 32) (:mod:`ttq.formats.fp4`); their zero
tensor is all zeros.  ``QuantSpec`` and the grouping helpers live in :mod:`ttq.formats.spec` and
are re-exported here.
"""

from __future__ import annotations

import torch

from ttq.formats.registry import (  # noqa: F401  (check_format re-exported)
    Format,
    check_format,
    fixed_group_sizes,
    format_names,
    get_format,
    register_format,
)
from ttq.formats.spec import (  # noqa: F401  (re-exported: the public names of ttq.formats.affine)
    MAX_BITS,
    MIN_BITS,
    QuantSpec,
    _grouped,
    check_bits,
    check_finite,
    check_group_size,
    effective_group_size,
    expand_groups,
    num_groups,
)


def __getattr__(name: str):
    """``FORMATS`` (registered names) and ``FORMAT_GROUP_SIZE`` (fixed group sizes), read from the table."""
    if name == "FORMATS":
        return format_names()
    if name == "FORMAT_GROUP_SIZE":
        return fixed_group_sizes()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------- the integer format


def int_params(w: torch.Tensor, spec: QuantSpec, check: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero-point per group of the integer format (eqs. 8-9, 27-30).

    Args:
        w: weights (d_out, d_in), any float dtype (math in float32).
        spec: the format.
        check: refuse NaN/Inf weights (one pass over ``w``; callers that checked it already pass False).
    Returns:
        (scale, zero), each float32 of shape (d_out, n_groups).  A constant
        group gets scale 0 and zero = its value (dequantizes exactly).
    """
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight (d_out, d_in), got shape {tuple(w.shape)}")
    if check:
        check_finite(w, "weight")
    g = effective_group_size(w.shape[1], spec.group_size)
    wg = _grouped(w.float(), g)  # (d_out, n_groups, g)
    wmax, wmin = wg.amax(dim=-1), wg.amin(dim=-1)  # (d_out, n_groups)
    if spec.symmetric:
        wmax = torch.maximum(wmax.abs(), wmin.abs())
        wmin = -wmax
    if spec.nu != 1.0:  # eqs. 27-28 as centre +- nu * half-range: a zero range stays exact
        mid, half = (wmax + wmin) / 2, spec.nu * (wmax - wmin) / 2
        wmax, wmin = mid + half, mid - half
    scale = (wmax - wmin) / spec.qmax
    return scale, wmin


def int_quantize(
    w: torch.Tensor, spec: QuantSpec, scale: torch.Tensor | None = None, zero: torch.Tensor | None = None,
    check: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integer codes of ``w`` (eq. 6); arguments and result as :func:`quantize`.

    On the CPU this runs as one compiled pass (:mod:`ttq.kernels.cpu_codes`, the same
    numbers bit for bit) instead of ~20 PyTorch ops, each a parallel region that stalls next to busy processes.
    """
    if scale is None and zero is None:
        from ttq.kernels.cpu_codes import quantize_codes  # imported here: ttq.kernels imports ttq.formats

        fused = quantize_codes(w, spec)  # one compiled pass on CPU, same numbers; None: not applicable
        if fused is not None:
            return fused
    if scale is None or zero is None:
        scale, zero = int_params(w, spec, check)
    d_in = w.shape[1]
    s = expand_groups(scale, d_in, spec.group_size)
    z = expand_groups(zero, d_in, spec.group_size)
    safe = torch.where(s > 0, s, torch.ones_like(s))  # zero range: code 0 -> W_hat = Z exactly
    codes = torch.round((w.float() - z) / safe).clamp_(0, spec.qmax).to(torch.uint8)
    return codes, scale, zero


def int_dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    """``W_hat = W_int * S + Z`` (eq. 7), (d_out, d_in) float32."""
    from ttq.kernels.cpu_codes import dequantize_codes  # imported here: ttq.kernels imports ttq.formats

    w = dequantize_codes(codes, scale, zero, group_size)  # one compiled pass on CPU; None: not applicable
    if w is not None:
        return w
    d_in = codes.shape[1]
    s = expand_groups(scale, d_in, group_size)
    z = expand_groups(zero, d_in, group_size)
    return codes.float() * s + z


def int_bits_per_weight(spec: QuantSpec, g: int, scale_bits: int) -> float:
    """``q + 2 * scale_bits / g`` asymmetric (S and Z), ``q + scale_bits / g`` symmetric
    (Z = -S (2^q - 1) / 2 is implied)."""
    n_params = 1 if spec.symmetric else 2
    return spec.bits + n_params * scale_bits / g


INT = register_format(Format("int", int_params, int_quantize, int_dequantize, int_bits_per_weight))


# ---------------------------------------------------------------- every format


def bits_per_weight(spec: QuantSpec, d_in: int | None = None, scale_bits: int = 16) -> float:
    """Storage bits per weight, scale (and zero) bits included.

    int: ``q + 2 * scale_bits / g`` asymmetric (S and Z), ``q + scale_bits / g`` symmetric
    (Z = -S (2^q - 1) / 2 is implied); nf4 / fp4: ``4 + scale_bits / g`` (absmax);
    nvfp4: ``4 + 8 / 16`` (E4M3 scales; the per-tensor fp32 scale is negligible);
    mxfp4: ``4 + 8 / 32`` (E8M0 scales).  ``d_in`` is needed for ``group_size = -1``.
    """
    if spec.group_size == -1 and d_in is None:
        raise ValueError("bits_per_weight of a per-channel (group_size=-1) format needs d_in")
    g = spec.group_size if spec.group_size > 0 else d_in
    if d_in is not None:
        g = min(g, d_in)
    return get_format(spec.fmt).bits_per_weight(spec, g, scale_bits)


def group_params(w: torch.Tensor, spec: QuantSpec, check: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero-point per group of ``spec.fmt``.

    Args:
        w: weights (d_out, d_in), any float dtype (math in float32).
        spec: the format.
        check: refuse NaN/Inf weights (one pass over ``w``; callers that checked it already pass False;
            the codebook formats always check).
    Returns:
        (scale, zero), each float32 of shape (d_out, n_groups); a codebook format's zero is all zeros.
        An integer group of constant value gets scale 0 and zero = its value (dequantizes exactly).
    """
    return get_format(spec.fmt).params(w, spec, check)


def quantize(
    w: torch.Tensor, spec: QuantSpec, scale: torch.Tensor | None = None, zero: torch.Tensor | None = None,
    check: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes of ``w`` in ``spec.fmt`` (eq. 6 for the integer format).

    Args:
        w: (d_out, d_in) weights.
        spec: the format.
        scale, zero: optional precomputed (d_out, n_groups) parameters.
        check: refuse NaN/Inf weights (integer format; the codebook formats always check).
    Returns:
        codes uint8 (d_out, d_in) (in [0, 2^q - 1] for the integer format), scale and zero
        float32 (d_out, n_groups).

    On the CPU the integer format runs as one compiled pass (:mod:`ttq.kernels.cpu_codes`, the same
    numbers bit for bit) instead of ~20 PyTorch ops, each a parallel region that stalls next to busy processes.
    """
    return get_format(spec.fmt).quantize(w, spec, scale, zero, check)


def dequantize(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    group_size: int,
    dtype: torch.dtype = torch.float32,
    fmt: str = "int",
) -> torch.Tensor:
    """``W_hat = W_int * S + Z`` (eq. 7); (d_out, d_in) in ``dtype``.  ``fmt`` as in ``QuantSpec``
    (a codebook format decodes its levels times the group scale)."""
    return get_format(fmt).dequantize(codes, scale, zero, group_size).to(dtype)


def qdq(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Quantize-dequantize ``Q[W]`` (eq. 5), returned in ``w``'s dtype."""
    codes, scale, zero = quantize(w, spec)
    return dequantize(codes, scale, zero, spec.group_size, w.dtype, spec.fmt)
