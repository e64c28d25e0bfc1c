"""4-bit NormalFloat (NF4) quantization (QLoRA, Dettmers et al. 2023; TTQ paper, Appendix D).

A non-uniform, symmetric codebook: the 16 levels are quantiles of a standard
normal distribution normalized to [-1, 1] (8 positive levels, 7 negative
levels and an exact zero).  Each group of ``group_size`` weights stores one
absmax scale; a weight is encoded as the index of the nearest level of
``w / absmax``::

    codes = argmin_k |w / absmax - NF4[k]|,   W_hat = NF4[codes] * absmax

Codes are the sorted level index 0..15 (code 7 is zero), the same order as
bitsandbytes' NF4 table.  The zero-point tensor of the common interface is
all zeros.  ``QuantSpec.nu`` multiplies the absmax (nu < 1 clips the
largest weights); ``QuantSpec.symmetric`` has no effect (NF4 is symmetric).
Registered as format ``"nf4"`` (:mod:`ttq.formats.registry`): ``4 + scale_bits / g`` bits per weight.
"""

from __future__ import annotations

import torch

from ttq.formats.registry import codebook_format, register_format
from ttq.formats.spec import QuantSpec, _grouped, check_finite, effective_group_size, expand_groups

# bitsandbytes / QLoRA NF4 levels (create_normal_map(offset=0.9677083), float32).
NF4_LEVELS = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
NF4_OFFSET = 0.9677083  # QLoRA's quantile offset: the mean of (1 - 1/(2*15), 1 - 1/(2*16))


def nf4_codebook() -> torch.Tensor:
    """The 16 NF4 levels (16,), float32, sorted ascending."""
    return torch.tensor(NF4_LEVELS, dtype=torch.float32)


def normal_float_levels(offset: float = NF4_OFFSET) -> torch.Tensor:
    """Re-derive the NF4 levels from normal quantiles (the construction of QLoRA's appendix).

    8 positive quantiles ``Phi^-1(linspace(offset, 0.5, 9)[:-1])``, 7 negative ones
    ``-Phi^-1(linspace(offset, 0.5, 8)[:-1])`` and an exact 0, sorted and divided by
    the largest.  The probabilities are float32 (as QLoRA's ``torch.linspace``), the
    quantiles float64.  Returns (16,) float64.
    """
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9)[:-1].double())
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double())
    v = torch.cat([pos, neg, torch.zeros(1, dtype=torch.float64)]).sort().values
    return v / v.max()


def nearest_level(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index (int64, x's shape) of the nearest entry of the sorted ``levels``; ties go to the lower level."""
    mids = (levels[1:] + levels[:-1]) / 2  # (K-1,)
    return torch.bucketize(x, mids.to(x.dtype), right=False)


def nf4_params(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Absmax scale per group, (d_out, n_groups) float32 (times ``spec.nu``)."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight (d_out, d_in), got shape {tuple(w.shape)}")
    check_finite(w, "weight")
    g = effective_group_size(w.shape[1], spec.group_size)
    return _grouped(w.float(), g).abs().amax(dim=-1) * float(spec.nu)  # (d_out, n_groups)


def nf4_quantize(
    w: torch.Tensor, spec: QuantSpec, scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4 codes of ``w``.

    Args:
        w: (d_out, d_in) weights.
        spec: a ``fmt="nf4"`` spec (its group size is used).
        scale: optional precomputed absmax (d_out, n_groups).
    Returns:
        codes uint8 (d_out, d_in) in 0..15 and scale float32 (d_out, n_groups).
    """
    if scale is None:
        scale = nf4_params(w, spec)
    s = expand_groups(scale, w.shape[1], spec.group_size)  # (d_out, d_in)
    x = w.float() / torch.where(s > 0, s, torch.ones_like(s))  # an all-zero group maps to code 7 (= 0)
    return nearest_level(x, nf4_codebook().to(w.device)).to(torch.uint8), scale


def nf4_dequantize(codes: torch.Tensor, scale: torch.Tensor, group_size: int) -> torch.Tensor:
    """``NF4[codes] * absmax`` (d_out, d_in), float32."""
    s = expand_groups(scale, codes.shape[1], group_size)
    return nf4_codebook().to(codes.device)[codes.long()] * s


def _nf4_bits_per_weight(spec: QuantSpec, g: int, scale_bits: int) -> float:
    """``q + scale_bits / g``: the codes and one stored absmax per group."""
    return spec.bits + scale_bits / g


NF4 = register_format(codebook_format("nf4", nf4_params, nf4_quantize, nf4_dequantize, _nf4_bits_per_weight))
