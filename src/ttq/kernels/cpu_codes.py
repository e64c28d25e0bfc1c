"""Fused CPU quantization to unpacked codes: :func:`ttq.formats.affine.quantize` and
:func:`~ttq.formats.affine.dequantize` of the integer format, each one pass over the weight.

The eager formulas run ~22 PyTorch ops per layer.  Each op over more than 32768 elements is an
OpenMP parallel region, and when other processes keep the cores busy every region can wait at its
closing barrier for a descheduled thread (libgomp's default policy spins before it sleeps, so the
waiting thread also loses the scheduler's favour): milliseconds instead of microseconds per region.
The per-sequence TTQ forward quantizes every linear layer at every forward -- SmolLM2-135M on 1024
tokens ran 6701 regions against 1241 for the fp32 forward -- and slowed down up to ~13x next to
a busy process where the fp32 forward slowed ~3x.  The compiled ops ``quant_codes`` and
``dequant_codes`` (``csrc/codes.inc``) do the same float32 arithmetic in one loop on the calling
thread and return bit-identical codes, scales, zeros and weights.

Both functions return None whenever the eager formula should run instead: tensors not on the
CPU, too small to be parallelized by PyTorch anyway (``MIN_FUSED_ELEMENTS``), needing autograd,
of other dtypes or shapes, non-finite weights (the eager path raises its clear error), or the
extension unavailable (:mod:`ttq.kernels.cpu_build`; built at first use).
"""

from __future__ import annotations

import torch

from ttq.formats.spec import QuantSpec, effective_group_size, num_groups
from ttq.kernels import cpu_build

MIN_FUSED_ELEMENTS = 32768  # at::internal::GRAIN_SIZE: smaller tensors never open a parallel region in PyTorch
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _usable(t: torch.Tensor) -> bool:
    """A large-enough plain CPU tensor that needs no gradient."""
    return (t.device.type == "cpu" and t.layout == torch.strided and t.numel() >= MIN_FUSED_ELEMENTS
            and not (t.requires_grad and torch.is_grad_enabled()))


def quantize_codes(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Codes uint8 (d_out, d_in), scale and zero float32 (d_out, n_groups) of ``w`` (d_out, d_in),
    equal to ``ttq.formats.affine.quantize(w, spec)``; None when the fused kernel does not apply."""
    if spec.fmt != "int" or w.dim() != 2 or w.dtype not in FLOAT_DTYPES + (torch.float64,) or not _usable(w):
        return None
    if not cpu_build.load():
        return None
    g = effective_group_size(w.shape[1], spec.group_size)
    codes, scale, zero, status = torch.ops.ttq_cpu.quant_codes(w, spec.bits, g, spec.symmetric, float(spec.nu))
    return None if status else (codes, scale, zero)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor | None:
    """``codes * S + Z`` (d_out, d_in) float32, equal to ``ttq.formats.affine.dequantize`` of the integer
    format; None when the fused kernel does not apply."""
    if codes.dtype != torch.uint8 or codes.dim() != 2 or not _usable(codes):
        return None
    d_out, d_in = codes.shape
    n = (d_out, num_groups(d_in, group_size))
    for p in (scale, zero):
        if (p.dtype not in FLOAT_DTYPES or tuple(p.shape) != n or p.device.type != "cpu"
                or (p.requires_grad and torch.is_grad_enabled())):
            return None
    if not cpu_build.load():
        return None
    return torch.ops.ttq_cpu.dequant_codes(codes, scale, zero, effective_group_size(d_in, group_size))


def clip_codes(v: torch.Tensor, hw: torch.Tensor, spec: QuantSpec, grid: tuple[float, ...], with_codes: bool = True,
               s: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The diagonal-scored clipping search of :func:`ttq.methods.refine.search_clip` fused with
    :func:`~ttq.methods.refine.apply_clip`, one pass over ``v`` (``csrc/codes.inc``).

    Args:
        v: (d_out, d_in) float32 scaled weight ``w_res diag(s)``; hw: (d_in,) ``h_i / s_i^2``.
        spec: an integer format; grid: the shrinks tried, in order (the first of equal errors wins).
        with_codes: False returns empty codes (0, d_in) and skips writing them (a search that needs the errors only).
        s: (d_in,) when given, ``v`` is the unscaled ``w_res`` and ``w_res diag(s)`` is formed row by row inside
            (the same float32 products, no temporary).
    Returns:
        (codes uint8 (d_out, d_in), scale, zero, beta, error), the last four float32 (d_out, n_groups),
        or None when the fused kernel does not apply (the PyTorch path runs instead): not the integer
        format, not a 2-D float32 CPU tensor without gradient, or the extension unavailable.
        Errors differ from the PyTorch score by float rounding only (another summation order).
    """
    if (spec.fmt != "int" or v.dim() != 2 or v.dtype != torch.float32 or v.device.type != "cpu"
            or (v.requires_grad and torch.is_grad_enabled()) or not grid):
        return None
    if not cpu_build.load():
        return None
    g = effective_group_size(v.shape[1], spec.group_size)
    return torch.ops.ttq_cpu.clip_codes(v, hw.float(), spec.bits, g, spec.symmetric, float(spec.nu),
                                        [float(b) for b in grid], with_codes, s)
