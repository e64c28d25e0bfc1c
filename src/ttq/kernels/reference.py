"""Plain-PyTorch oracle for every packed kernel: dequantize, then matmul.

Layout ``u8`` (see :mod:`ttq.kernels.api`): one code per byte, float32 scale
and zero per group, any bits 2..8 / group size / device.  Every compiled kernel
is tested against :func:`reference_linear` applied to its own unpacked codes,
and this path is the fallback when no kernel serves a combination.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ttq.formats.affine import QuantSpec, dequantize
from ttq.kernels.api import REFERENCE_LAYOUT, PackedWeight, register_kernel, unpack
from ttq.methods.lowrank import residual
from ttq.methods.scaling import scaled_quantize


def reference_pack(
    w: torch.Tensor, s: torch.Tensor, spec: QuantSpec, b: torch.Tensor | None = None, a: torch.Tensor | None = None
) -> PackedWeight:
    """``u8`` codes of ``(W - B A) diag(s)`` via :func:`ttq.methods.scaling.scaled_quantize`."""
    w_res = residual(w, b.float(), a.float()) if b is not None else w
    codes, scale, zero = scaled_quantize(w_res, s.float(), spec)  # (d_out, d_in) u8, (d_out, n_groups) x2
    fmt = getattr(spec, "fmt", "int")
    return PackedWeight(REFERENCE_LAYOUT, spec.bits, spec.group_size, tuple(w.shape), codes, scale, zero, fmt)


def dequantize_packed(packed: PackedWeight) -> torch.Tensor:
    """``deq(codes)`` (d_out, d_in) float32 of any layout (the weights in the scaled domain ``W s``)."""
    codes, scale, zero = unpack(packed)
    return dequantize(codes, scale, zero, packed.group_size, fmt=packed.fmt)  # codebook formats use their table


def reference_linear(
    x: torch.Tensor,
    packed: PackedWeight,
    s: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    a: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """``deq(packed) @ (x / s) + B (A x) + bias`` computed in float32, returned in x's dtype.

    Args:
        x: (..., d_in); packed: any layout; s: (d_in,) or None; bias: (d_out,) or None;
        b, a: (d_out, r), (r, d_in) or None.
        weight: ``dequantize_packed(packed)`` when the caller keeps it (decoding many tokens with one
            packed weight); None dequantizes here.
    Returns:
        (..., d_out) in x's dtype.
    """
    if weight is not None and tuple(weight.shape) != tuple(packed.shape):
        raise ValueError(f"weight has shape {tuple(weight.shape)}, the packed weight {tuple(packed.shape)}; pass "
                         f"dequantize_packed(packed) or None")
    xf = x.float()
    xs = xf / s.float() if s is not None else xf  # (..., d_in)
    y = F.linear(xs, dequantize_packed(packed) if weight is None else weight)  # (..., d_out)
    if b is not None and b.shape[1] > 0:
        y = y + F.linear(F.linear(xf, a.float()), b.float())  # (..., r) -> (..., d_out)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


@register_kernel(REFERENCE_LAYOUT, "any")
class ReferenceKernel:
    """The ``u8`` layout on any device (the oracle and the fallback)."""

    def supports(self, spec: QuantSpec, shape: tuple[int, int], dtype: torch.dtype) -> str | None:
        return None

    def pack(self, w, s, spec, b, a) -> PackedWeight:
        return reference_pack(w, s, spec, b, a)

    def linear(self, x, packed, s, bias, b, a) -> torch.Tensor:
        return reference_linear(x, packed, s, bias, b, a)

    def unpack(self, packed: PackedWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return packed.qweight, packed.scale.float(), packed.zero.float()
