"""FP4 (E2M1) with micro-scaling: plain FP4, NVFP4 and MXFP4 (TTQ paper, Appendix B/D).

E2M1 is a 4-bit float (1 sign, 2 exponent, 1 mantissa bit) whose magnitudes are
``0, 0.5, 1, 1.5, 2, 3, 4, 6``.  Codes use the standard sign-magnitude layout:
bit 3 is the sign, bits 0-2 index the magnitude (``0b0111`` = 6,
``0b1001`` = -0.5).  Rounding is to nearest, ties to the even magnitude index
(as hardware conversion does); magnitudes above 6 saturate to 6.

The three formats differ only in the per-group scale ``S`` (``W_hat = E2M1[codes] * S``):

=========  ======  =====================================================  ==================
``fmt``    group   scale of a group with absmax ``a``                     stored scale bits
=========  ======  =====================================================  ==================
``fp4``    any     ``a / 6`` in float32 (reference, no scale rounding)   16 (as fp16)
``nvfp4``  16      ``E4M3(a / (6 t)) * t``; ``t = amax(W) / (6 * 448)``  8 per group + 32
                   the per-tensor fp32 scale (``t = 1`` without it)       per tensor
``mxfp4``  32      ``2^(floor(log2 a) - 2)`` (E8M0, OCP MX v1.0)           8 per group
=========  ======  =====================================================  ==================

``E4M3`` rounds to the nearest FP8-E4M3 value (saturating at 448, subnormals
down to 2^-9).  MXFP4 follows the OCP rule (``emax(E2M1) = 2``), so weights
in ``(6 S, 8 S)`` saturate to ``6 S``.  The zero-point tensor of the common
interface is all zeros.  ``QuantSpec.nu`` multiplies each group's absmax
before the scale is formed; ``QuantSpec.symmetric`` has no effect.  The three are
registered as formats (:mod:`ttq.formats.registry`); bits per weight ``4 + scale_bits / g``
for ``fp4``, ``4 + 8 / g`` for the 8-bit scales of ``nvfp4`` and ``mxfp4``.
"""

from __future__ import annotations

import torch

from ttq.formats.registry import codebook_format, register_format
from ttq.formats.spec import QuantSpec, _grouped, check_finite, effective_group_size, expand_groups

E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_MAX = 6.0
E4M3_MAX = 448.0
E8M0_EMIN, E8M0_EMAX = -127, 127
E2M1_EMAX = 2  # exponent of the largest E2M1 power of two (4 = 2^2), OCP MX
FP4_FORMATS = ("fp4", "nvfp4", "mxfp4")


def e2m1_values() -> torch.Tensor:
    """The 16 values of the code points 0..15 (16,), float32 (code 8 is -0.0)."""
    m = torch.tensor(E2M1_MAGNITUDES, dtype=torch.float32)
    return torch.cat([m, -m])


def e2m1_encode(x: torch.Tensor) -> torch.Tensor:
    """Sign-magnitude E2M1 codes (uint8, x's shape) of ``x`` (already divided by its scale)."""
    mags = torch.tensor(E2M1_MAGNITUDES, dtype=torch.float32, device=x.device)
    a = x.float().abs()
    mids = (mags[1:] + mags[:-1]) / 2  # (7,)
    idx = torch.bucketize(a, mids, right=False)  # ties -> lower index
    at_mid = (idx < 7) & (a == mids[idx.clamp(max=6)])
    idx = torch.where(at_mid & (idx % 2 == 1), idx + 1, idx)  # ties -> even index (round half to even)
    sign = (x < 0) & (idx > 0)
    return (idx + 8 * sign.long()).to(torch.uint8)


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """Values (float32) of E2M1 codes."""
    return e2m1_values().to(codes.device)[codes.long()]


def round_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Non-negative ``x`` rounded to the nearest FP8-E4M3 value (ties to even), saturating at 448; float32."""
    return x.float().clamp(0.0, E4M3_MAX).to(torch.float8_e4m3fn).float()


def e8m0_scale(amax: torch.Tensor) -> torch.Tensor:
    """MX shared scale ``2^(floor(log2 amax) - emax_E2M1)``, exponent clamped to E8M0's [-127, 127]; float32."""
    e = torch.floor(torch.log2(amax.float())) - E2M1_EMAX  # log2(0) = -inf -> clamped
    e = e.clamp(E8M0_EMIN, E8M0_EMAX)
    return torch.exp2(e)


def nvfp4_tensor_scale(w: torch.Tensor, nu: float = 1.0) -> torch.Tensor:
    """NVFP4 per-tensor fp32 scale ``amax(W) nu / (6 * 448)`` (a 0-d tensor; 1 for an all-zero W)."""
    t = w.float().abs().amax() * float(nu) / (E2M1_MAX * E4M3_MAX)
    return torch.where(t > 0, t, torch.ones_like(t))


def fp4_params(
    w: torch.Tensor, spec: QuantSpec, tensor_scale: bool = True, tensor_amax: torch.Tensor | None = None
) -> torch.Tensor:
    """Effective scale ``S`` per group (d_out, n_groups) float32, for ``spec.fmt`` in fp4/nvfp4/mxfp4.

    Args:
        w: (d_out, d_in) weights.
        spec: the format; its ``nu`` multiplies each group's absmax.
        tensor_scale: NVFP4 only: use the per-tensor fp32 scale (the standard
            two-level recipe); False keeps the bare E4M3 scale (``t = 1``).
        tensor_amax: NVFP4 only: the absmax that sets the per-tensor scale when
            ``w`` is a slice of a larger tensor (GPTQ's column blocks).
    """
    if spec.fmt not in FP4_FORMATS:
        raise ValueError(f"fp4_params handles formats {', '.join(FP4_FORMATS)}, got {spec.fmt!r}")
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight (d_out, d_in), got shape {tuple(w.shape)}")
    check_finite(w, "weight")
    g = effective_group_size(w.shape[1], spec.group_size)
    amax = _grouped(w.float(), g).abs().amax(dim=-1) * float(spec.nu)  # (d_out, n_groups)
    if spec.fmt == "fp4":
        return amax / E2M1_MAX
    if spec.fmt == "mxfp4":
        return e8m0_scale(amax)
    if not tensor_scale:
        return round_e4m3(amax / E2M1_MAX)
    t = nvfp4_tensor_scale(w if tensor_amax is None else tensor_amax.reshape(1, 1), spec.nu)
    return round_e4m3(amax / (E2M1_MAX * t)) * t


def fp4_quantize(
    w: torch.Tensor, spec: QuantSpec, scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """E2M1 codes of ``w`` with a micro-scaling format.

    Args:
        w: (d_out, d_in) weights.
        spec: ``fmt`` in fp4 / nvfp4 / mxfp4.
        scale: optional precomputed effective scale (d_out, n_groups).
    Returns:
        codes uint8 (d_out, d_in) in 0..15 and the effective scale float32 (d_out, n_groups).
    """
    if scale is None:
        scale = fp4_params(w, spec)
    s = expand_groups(scale, w.shape[1], spec.group_size)  # (d_out, d_in)
    x = w.float() / torch.where(s > 0, s, torch.ones_like(s))  # a zero scale only occurs for a ~zero group
    return e2m1_encode(torch.where(s > 0, x, torch.zeros_like(x))), scale


def fp4_dequantize(codes: torch.Tensor, scale: torch.Tensor, group_size: int) -> torch.Tensor:
    """``E2M1[codes] * S`` (d_out, d_in), float32."""
    return e2m1_decode(codes) * expand_groups(scale, codes.shape[1], group_size)


def _fp4_bits_per_weight(spec: QuantSpec, g: int, scale_bits: int) -> float:
    """``q + scale_bits / g``: fp4 stores its float scale at the caller's width."""
    return spec.bits + scale_bits / g


def _fp8_scale_bits_per_weight(spec: QuantSpec, g: int, scale_bits: int) -> float:
    """``q + 8 / g``: nvfp4's E4M3 and mxfp4's E8M0 scales (nvfp4's per-tensor fp32 scale is negligible)."""
    return spec.bits + 8 / g


FP4 = register_format(codebook_format("fp4", fp4_params, fp4_quantize, fp4_dequantize, _fp4_bits_per_weight))
NVFP4 = register_format(codebook_format("nvfp4", fp4_params, fp4_quantize, fp4_dequantize, _fp8_scale_bits_per_weight,
                                        group_size=16))
MXFP4 = register_format(codebook_format("mxfp4", fp4_params, fp4_quantize, fp4_dequantize, _fp8_scale_bits_per_weight,
                                        group_size=32))
