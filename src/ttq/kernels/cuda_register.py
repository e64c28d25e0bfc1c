"""CUDA kernels behind :func:`ttq.kernels.api.pack_ttq` / ``packed_linear``.

Two layouts for ``device_type="cuda"`` (both need Triton; this module is skipped
with a logged line when Triton is not installed, see ``api._load_builtin_kernels``):

=================  ===========================================================================
layout             tensors of :class:`~ttq.kernels.api.PackedWeight`
=================  ===========================================================================
``cuda_triton``    bits 2/4/8.  qweight int32 (d_out, ceil(d_in / P)), P = 32 // bits codes per
                   word, column k in bits ``[bits (k % P), bits (k % P + 1))`` of word k // P
                   (see :mod:`ttq.kernels.triton_quant`); scale float16
                   (d_out, n_groups, 2) = ``[S / n_g, Z / n_g]``; zero = ``n_g`` float32
                   (n_groups,), the max of ``s`` over the group's columns.  Scaled-domain
                   weight ``(code * S' + Z') * n_g``.  Decode (M <= 8 tokens): fused Triton GEMV
                   with ``x / s``, the group scales, ``B t`` and bias in one kernel after one
                   small launch for ``t = A x``; prefill (M > 8): Triton dequantize + cuBLAS.
``cuda_aten_int4`` 4-bit, g in {32, 64, 128, 256} dividing d_in, d_in % 32 == 0, d_out % 8 == 0.
                   qweight = ``torch.ops.aten._convert_weight_to_int4pack`` output (int32,
                   4-D tinygemm tiles); scale bfloat16 (n_groups, d_out, 2) =
                   ``[S', Z' + 8 S']`` (tinygemm: ``w = (c - 8) S' + zero``); zero = ``n_g``.
                   Linear: one Triton launch for ``x n_g / s`` in bf16 and ``t = A x``, then
                   ``torch.ops.aten._weight_int4pack_mm``, then one launch for ``+ B t + bias``
                   and the cast (skipped for bf16 without bias and rank).
=================  ===========================================================================

Both quantize in one fused Triton pass (:func:`ttq.kernels.triton_quant.quantize_words`);
their codes equal the reference's for r = 0.  Scale/zero are rounded to float16
(bfloat16 for tinygemm) after dividing by ``n_g``, which keeps them in range for
any ``s``; the oracle dequantizes the stored values (see ``unpack``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ttq.formats.spec import QuantSpec, effective_group_size, num_groups
from ttq.kernels.api import PackedWeight, register_kernel
from ttq.kernels.triton_matmul import GEMV_MAX_M, dequant_words, epilogue, gemv_words, lowrank_t, prep_bf16
from ttq.kernels.triton_quant import MAX_RANK, quantize_words, supports, unpack_words
from ttq.methods.lowrank import residual

LAYOUT_TRITON = "cuda_triton"
LAYOUT_INT4 = "cuda_aten_int4"
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _common_reason(spec: QuantSpec, shape: tuple[int, int], dtype: torch.dtype) -> str | None:
    if getattr(spec, "fmt", "int") != "int":
        return f"format {spec.fmt!r} (integer codes only)"
    if dtype not in FLOAT_DTYPES:
        return f"weight dtype {dtype} (needs one of float32/float16/bfloat16)"
    return supports(spec.bits, spec.group_size, shape[1])


def _split_rank(w, b, a):
    """(w, b, a) with the residual precomputed when the rank exceeds the fused kernel's limit."""
    if b is not None and b.shape[1] == 0:
        return w, None, None
    if b is not None and b.shape[1] > MAX_RANK:
        return residual(w, b.float(), a.float()), None, None
    return w, b, a


def _rank(a: torch.Tensor | None) -> int:
    return 0 if a is None else a.shape[0]


@register_kernel(LAYOUT_TRITON, "cuda", priority=10)
class TritonKernel:
    """Fused Triton quantization + low-bit GEMV (bits 2, 4, 8)."""

    def supports(self, spec: QuantSpec, shape: tuple[int, int], dtype: torch.dtype) -> str | None:
        return _common_reason(spec, shape, dtype)

    def pack(self, w, s, spec, b, a) -> PackedWeight:
        sz = torch.empty(w.shape[0], num_groups(w.shape[1], spec.group_size), 2, dtype=torch.float16, device=w.device)
        return self._pack(w, s, spec, b, a, None, sz, None)

    def pack_into(self, out: PackedWeight, w, s, spec, b, a) -> PackedWeight:
        """Re-quantize into ``out``'s tensors (same addresses: safe under a captured CUDA graph)."""
        return self._pack(w, s, spec, b, a, out.qweight, out.scale, out.zero)

    def _pack(self, w, s, spec, b, a, words, sz, norm) -> PackedWeight:
        d_out, d_in = w.shape
        w, b, a = _split_rank(w, b, a)
        words, _, _, norm = quantize_words(
            w, s, spec.bits, spec.group_size, b, a, spec.symmetric, spec.nu,
            scale_out=sz[..., 0], zero_out=sz[..., 1], normalize=True, words_out=words, norm_out=norm,
        )
        return PackedWeight(LAYOUT_TRITON, spec.bits, spec.group_size, (d_out, d_in), words, sz, norm)

    def linear(self, x, packed, s, bias, b, a) -> torch.Tensor:
        d_out, d_in = packed.shape
        lead = x.shape[:-1]
        x2 = x.reshape(-1, d_in)  # (..., d_in) -> (M, d_in)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        s32 = None if s is None else s.float()
        g = effective_group_size(d_in, packed.group_size)
        if x2.shape[0] <= GEMV_MAX_M:
            t = lowrank_t(x2, a) if _rank(a) else None  # (M, r) float32
            y = gemv_words(x2, packed.qweight, packed.scale, packed.zero, s32, packed.bits, g,
                           bias=bias, lr_b=b if t is not None else None, t=t)
        else:
            w_eff = dequant_words(packed.qweight, packed.scale, packed.zero, s32, packed.bits, g, d_in, x.dtype)
            y = F.linear(x2, w_eff, None if bias is None else bias.to(x.dtype))
            if _rank(a):
                y = y + F.linear(F.linear(x2, a.to(x.dtype)), b.to(x.dtype))
        return y.reshape(*lead, d_out)

    def unpack(self, packed: PackedWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        codes = unpack_words(packed.qweight, packed.bits, packed.shape[1])
        norm = packed.zero[None, :]
        return codes, packed.scale[..., 0].float() * norm, packed.scale[..., 1].float() * norm


def _inner_k_tiles(d_in: int) -> int:
    return 8 if d_in % 128 == 0 else 4 if d_in % 64 == 0 else 2


@register_kernel(LAYOUT_INT4, "cuda", priority=20)
class AtenInt4Kernel:
    """Fused Triton quantization into PyTorch's tinygemm int4 format + ``_weight_int4pack_mm``."""

    def supports(self, spec: QuantSpec, shape: tuple[int, int], dtype: torch.dtype) -> str | None:
        why = _common_reason(spec, shape, dtype)
        if why:
            return why
        d_out, d_in = shape
        g = effective_group_size(d_in, spec.group_size)
        if spec.bits != 4 or g not in (32, 64, 128, 256) or d_in % g or d_in % 32 or d_out % 8:
            return (f"tinygemm int4 needs bits=4, group 32/64/128/256 dividing d_in, d_in % 32 == 0 and "
                    f"d_out % 8 == 0 (got bits={spec.bits}, group={g}, shape={tuple(shape)})")
        return None

    def pack(self, w, s, spec, b, a) -> PackedWeight:
        g = effective_group_size(w.shape[1], spec.group_size)
        sz = torch.empty(w.shape[1] // g, w.shape[0], 2, dtype=torch.bfloat16, device=w.device)  # (n_groups, d_out, 2)
        return self._pack(w, s, spec, b, a, sz, None, None)

    def pack_into(self, out: PackedWeight, w, s, spec, b, a) -> PackedWeight:
        """Re-quantize into ``out``'s tensors (the tinygemm tiles are converted, then copied in)."""
        return self._pack(w, s, spec, b, a, out.scale, out.zero, out.qweight)

    def _pack(self, w, s, spec, b, a, sz, norm, qweight) -> PackedWeight:
        d_out, d_in = w.shape
        w, b, a = _split_rank(w, b, a)
        g = effective_group_size(d_in, spec.group_size)
        words, _, _, norm = quantize_words(
            w, s, 4, g, b, a, spec.symmetric, spec.nu, scale_out=sz[..., 0].t(), zero_out=sz[..., 1].t(),
            normalize=True, swap_nibbles=True, zero_mid=True, norm_out=norm,
        )
        u8 = words.view(torch.uint8)  # (d_out, d_in / 2): even column in the high nibble
        tiles = torch.ops.aten._convert_weight_to_int4pack(u8, _inner_k_tiles(d_in))
        qweight = tiles if qweight is None else qweight.copy_(tiles)
        return PackedWeight(LAYOUT_INT4, 4, spec.group_size, (d_out, d_in), qweight, sz, norm)

    def linear(self, x, packed, s, bias, b, a) -> torch.Tensor:
        d_out, d_in = packed.shape
        lead = x.shape[:-1]
        x2 = x.reshape(-1, d_in)
        g = effective_group_size(d_in, packed.group_size)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        xq, t = prep_bf16(x2, None if s is None else s.float(), packed.zero, g, a if _rank(a) else None)
        y = torch.ops.aten._weight_int4pack_mm(xq, packed.qweight, g, packed.scale)  # (M, d_out) bf16
        if t is not None or bias is not None or x.dtype != torch.bfloat16:
            y = epilogue(y, x.dtype, bias, b if t is not None else None, t)
        return y.reshape(*lead, d_out)

    def unpack(self, packed: PackedWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Codes recovered exactly by multiplying with the identity (bf16 output keeps 8 bits,
        enough to tell 16 levels apart), scale/zero from the stored values."""
        d_out, d_in = packed.shape
        g = effective_group_size(d_in, packed.group_size)
        sc = packed.scale[..., 0].float().t()  # (d_out, n_groups)
        zmid = packed.scale[..., 1].float().t()
        eye = torch.eye(d_in, dtype=torch.bfloat16, device=packed.device)
        w_t = torch.ops.aten._weight_int4pack_mm(eye, packed.qweight, g, packed.scale).float()  # (d_in, d_out)
        sc_e, zm_e = sc.repeat_interleave(g, 1), zmid.repeat_interleave(g, 1)
        safe = torch.where(sc_e != 0, sc_e, torch.ones_like(sc_e))
        codes = torch.round((w_t.t() - zm_e) / safe + 8).clamp_(0, 15)
        codes = torch.where(sc_e != 0, codes, torch.zeros_like(codes)).to(torch.uint8)
        norm = packed.zero[None, :]
        return codes, sc * norm, (zmid - 8 * sc) * norm
