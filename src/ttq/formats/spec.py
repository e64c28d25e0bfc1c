"""The quantization spec and the grouping helpers every format shares (TTQ paper, Appendix B).

Granularity vocabulary, used everywhere in ttq:

==============  ==============================================================
``group_size``  meaning (weight ``W`` of shape ``(d_out, d_in)``)
==============  ==============================================================
``g > 0``       groups of ``g`` consecutive input columns per output row; when
                ``g`` does not divide ``d_in`` the last group is shorter.  A
                group at least as wide as the row is per-channel.
``-1``          one group per output row (per output channel).
==============  ==============================================================

This module holds :class:`QuantSpec` and its checks, the group arithmetic
(:func:`effective_group_size`, :func:`num_groups`) and the reshaping helpers
(:func:`_grouped`, :func:`expand_groups`).  The formats (:mod:`ttq.formats.affine`,
:mod:`ttq.formats.nf4`, :mod:`ttq.formats.fp4`) import it; it imports none of them:
``QuantSpec.fmt`` is checked against the table of :mod:`ttq.formats.registry`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ttq.formats.registry import check_format
from ttq.typecheck import check_types

MIN_BITS, MAX_BITS = 2, 8


@dataclass(frozen=True)
class QuantSpec:
    """A quantization format: bits, group size, symmetric or not, range expansion, number format.

    Args:
        bits: code width q, 2..8.
        group_size: see the module table; -1 per output channel.
        symmetric: use eqs. 29-30 instead of the asymmetric eqs. 8-9.
        nu: range-expansion factor of eqs. 27-28 (1.0 = plain min/max); for the
            codebook formats it multiplies each group's absmax.
        fmt: a registered format (:mod:`ttq.formats.registry`): ``"int"`` (:mod:`ttq.formats.affine`)
            or a 4-bit codebook format: ``"nf4"``, ``"fp4"``, ``"nvfp4"`` (group_size 16),
            ``"mxfp4"`` (group_size 32).
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


def expand_groups(p: torch.Tensor, d_in: int, group_size: int) -> torch.Tensor:
    """(d_out, n_groups) -> (d_out, d_in), each group's value on its columns."""
    g = effective_group_size(d_in, group_size)
    return p.repeat_interleave(g, dim=1)[:, :d_in]
