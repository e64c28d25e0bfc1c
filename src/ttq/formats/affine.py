"""Groupwise affine integer quantization (TTQ paper, Appendix B and D).

Granularity vocabulary, used everywhere in ttq:

==============  ==============================================================
``group_size``  meaning (weight ``W`` of shape ``(d_out, d_in)``)
==============  ==============================================================
``g > 0``       groups of ``g`` consecutive input columns per output row; when
                ``g`` does not divide ``d_in`` the last group is shorter.  A
                group at least as wide as the row is per-channel.
``-1``          one group per output row (per output channel).
==============  ==============================================================

Formats (``QuantSpec``):

* asymmetric (eqs. 8-9 / 25-26): ``S = (max - min) / (2^q - 1)``, ``Z = min``;
* symmetric (eqs. 29-30): ``S = 2 |W|max / (2^q - 1)``, ``Z = -|W|max``;
* range expansion ``nu`` (eqs. 27-28) applied to (max, min) before either;
  ``nu = 1`` is the plain range, ``nu < 1`` clips, ``nu > 1`` widens.

Quantization is ``W_int = clamp(round((W - Z) / S), 0, 2^q - 1)`` and
dequantization ``W_hat = W_int * S + Z`` (eqs. 6-7).  Codes, scales and zeros
are returned as plain tensors so that kernels can pack them.

Non-integer 4-bit formats (``QuantSpec.fmt``; Appendix D) go through the same
``quantize`` / ``dequantize(..., fmt=)`` / ``qdq`` entry points, so every method
picks them up: ``"nf4"`` (:mod:`ttq.formats.nf4`) and the E2M1 micro-scaling
formats ``"fp4"``, ``"nvfp4"`` (group 16), ``"mxfp4"`` (group 32)
(:mod:`ttq.formats.fp4`); their zero tensor is all zeros.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ttq.typecheck import check_types

MIN_BITS, MAX_BITS = 2, 8
FORMATS = ("int", "nf4", "fp4", "nvfp4", "mxfp4")
FORMAT_GROUP_SIZE = {"nvfp4": 16, "mxfp4": 32}  # micro-scaling formats fix their group size


@dataclass(frozen=True)
class QuantSpec:
    """An integer format: bits, group size, symmetric or not, range expansion.

    Args:
        bits: code width q, 2..8.
        group_size: see the module table; -1 per output channel.
        symmetric: use eqs. 29-30 instead of the asymmetric eqs. 8-9.
        nu: range-expansion factor of eqs. 27-28 (1.0 = plain min/max); for the
            codebook formats it multiplies each group's absmax.
        fmt: ``"int"`` (this module) or a 4-bit codebook format: ``"nf4"``,
            ``"fp4"``, ``"nvfp4"`` (group_size 16), ``"mxfp4"`` (group_size 32).
    """

    bits: int = 4
    group_size: int = 32
    symmetric: bool = False
    nu: float = 1.0
    fmt: str = "int"

    def __post_init__(self) -> None:
        check_types(self)  # "false" for symmetric, 4.0 for bits: refused, not read as truthy / rounded
        check_bits(self.bits)
        check_group_size(self.group_size)
        check_format(self.fmt, self.bits, self.group_size)
        if not (isinstance(self.nu, (int, float)) and 0.0 < float(self.nu) <= 4.0):
            raise ValueError(f"nu (range expansion) must be in (0, 4], got {self.nu!r}")

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1


def check_bits(bits: int, lo: int = MIN_BITS, hi: int = MAX_BITS) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not lo <= bits <= hi:
        raise ValueError(f"bits must be an integer in {lo}..{hi}, got {bits!r}")


def check_format(fmt: str, bits: int, group_size: int) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown quantization format {fmt!r}; allowed: {', '.join(FORMATS)}")
    if fmt != "int" and bits != 4:
        raise ValueError(f"format {fmt!r} has 4-bit codes only, got bits={bits}; use fmt='int' for other widths")
    need = FORMAT_GROUP_SIZE.get(fmt)
    if need is not None and group_size != need:
        raise ValueError(f"format {fmt!r} uses groups of {need} weights, got group_size={group_size}")


def _codebook_format(fmt: str):
    """``(params, quantize, dequantize)`` of a non-integer format (imported here: those modules import this one)."""
    if fmt == "nf4":
        from ttq.formats.nf4 import nf4_dequantize, nf4_params, nf4_quantize

        return nf4_params, nf4_quantize, nf4_dequantize
    from ttq.formats.fp4 import fp4_dequantize, fp4_params, fp4_quantize

    return fp4_params, fp4_quantize, fp4_dequantize


def bits_per_weight(spec: "QuantSpec", d_in: int | None = None, scale_bits: int = 16) -> float:
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
    if spec.fmt in FORMAT_GROUP_SIZE:
        return spec.bits + 8 / g
    n_params = 2 if spec.fmt == "int" and not spec.symmetric else 1
    return spec.bits + n_params * scale_bits / g


def check_group_size(group_size: int) -> None:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size == 0 or group_size < -1:
        raise ValueError(
            f"group_size must be a positive integer or -1 (per output channel), got {group_size!r}"
        )


def check_finite(t: torch.Tensor, what: str) -> None:
    if t.numel() == 0:
        raise ValueError(f"{what} is empty (shape {tuple(t.shape)})")
    if not torch.isfinite(t).all():
        n_bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{what} contains {n_bad} NaN/Inf value(s); refusing to quantize")


def effective_group_size(d_in: int, group_size: int) -> int:
    """The group width actually used for a row of ``d_in`` columns."""
    check_group_size(group_size)
    return d_in if group_size == -1 or group_size >= d_in else group_size


def num_groups(d_in: int, group_size: int) -> int:
    g = effective_group_size(d_in, group_size)
    return -(-d_in // g)


def _grouped(w: torch.Tensor, g: int) -> torch.Tensor:
    """(d_out, d_in) -> (d_out, n_groups, g); a short last group is padded by
    repeating the row's last value, which changes neither its min nor its max."""
    d_out, d_in = w.shape
    pad = (-d_in) % g
    if pad:
        w = F.pad(w.unsqueeze(0), (0, pad), mode="replicate").squeeze(0)
    return w.reshape(d_out, -1, g)


def group_params(w: torch.Tensor, spec: QuantSpec, check: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero-point per group.

    Args:
        w: weights (d_out, d_in), any float dtype (math in float32).
        spec: the format.
        check: refuse NaN/Inf weights (one pass over ``w``; callers that checked it already pass False).
    Returns:
        (scale, zero), each float32 of shape (d_out, n_groups).  A constant
        group gets scale 0 and zero = its value (dequantizes exactly).
    """
    if spec.fmt != "int":  # codebook formats: (scale, all-zero zero-point)
        scale = _codebook_format(spec.fmt)[0](w, spec)
        return scale, torch.zeros_like(scale)
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


def expand_groups(p: torch.Tensor, d_in: int, group_size: int) -> torch.Tensor:
    """(d_out, n_groups) -> (d_out, d_in), each group's value on its columns."""
    g = effective_group_size(d_in, group_size)
    return p.repeat_interleave(g, dim=1)[:, :d_in]


def quantize(
    w: torch.Tensor, spec: QuantSpec, scale: torch.Tensor | None = None, zero: torch.Tensor | None = None,
    check: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integer codes of ``w`` (eq. 6).

    Args:
        w: (d_out, d_in) weights.
        spec: the format.
        scale, zero: optional precomputed (d_out, n_groups) parameters.
        check: refuse NaN/Inf weights (integer format; the codebook formats always check).
    Returns:
        codes uint8 (d_out, d_in) in [0, 2^q - 1], scale and zero float32 (d_out, n_groups).

    On the CPU the integer format runs as one compiled pass (:mod:`ttq.kernels.cpu_codes`, the same
    numbers bit for bit) instead of ~20 PyTorch ops, each a parallel region that stalls next to busy processes.
    """
    if spec.fmt != "int":
        codes, scale = _codebook_format(spec.fmt)[1](w, spec, scale)
        return codes, scale, torch.zeros_like(scale) if zero is None else zero
    if scale is None and zero is None:
        from ttq.kernels.cpu_codes import quantize_codes  # imported here: ttq.kernels imports this module

        fused = quantize_codes(w, spec)  # one compiled pass on CPU, same numbers; None: not applicable
        if fused is not None:
            return fused
    if scale is None or zero is None:
        scale, zero = group_params(w, spec, check)
    d_in = w.shape[1]
    s = expand_groups(scale, d_in, spec.group_size)
    z = expand_groups(zero, d_in, spec.group_size)
    safe = torch.where(s > 0, s, torch.ones_like(s))  # zero range: code 0 -> W_hat = Z exactly
    codes = torch.round((w.float() - z) / safe).clamp_(0, spec.qmax).to(torch.uint8)
    return codes, scale, zero


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
    if fmt != "int":
        if fmt not in FORMATS:
            raise ValueError(f"unknown quantization format {fmt!r}; allowed: {', '.join(FORMATS)}")
        return _codebook_format(fmt)[2](codes, scale, group_size).to(dtype)
    from ttq.kernels.cpu_codes import dequantize_codes

    w = dequantize_codes(codes, scale, zero, group_size)  # one compiled pass on CPU; None: not applicable
    if w is not None:
        return w.to(dtype)
    d_in = codes.shape[1]
    s = expand_groups(scale, d_in, group_size)
    z = expand_groups(zero, d_in, group_size)
    return (codes.float() * s + z).to(dtype)


def qdq(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Quantize-dequantize ``Q[W]`` (eq. 5), returned in ``w``'s dtype."""
    codes, scale, zero = quantize(w, spec)
    return dequantize(codes, scale, zero, spec.group_size, w.dtype, spec.fmt)
