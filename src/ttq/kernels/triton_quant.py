"""Fused on-the-fly TTQ quantization on CUDA (Triton), TTQ paper Section 2 / eq. 3.

One pass over the weight: each program loads a tile of ``W`` (d_out, d_in) in
its own dtype, subtracts the static low-rank part ``B A`` (float32 ``tl.dot``,
when given), multiplies by the input scale ``s``, takes each group's min/max
(eqs. 8-9; symmetric eqs. 29-30 and range expansion eqs. 27-28 as options),
rounds to codes (eq. 6, ties to even like ``torch.round``) and packs them into
int32 words; scales and zeros are written beside.  Codes are bit-identical to
:func:`ttq.formats.affine.quantize` of ``(W - B A) * s`` for r = 0 (the low-rank
product is summed in another order, so a code on a rounding boundary may move
by one when r > 0).

Word packing (``P = 32 // bits`` codes per int32, LSB first)::

    words[n, k // P] bits [bits * (k % P), bits * (k % P + 1))  =  code[n, k]

With ``swap_nibbles`` (4-bit) the two nibbles of every byte are exchanged,
which is the input byte order of PyTorch's int4 (tinygemm) converter.
Padding codes are 0.  Scale/zero can be stored raw (float32, exact) or divided
by a per-group normaliser ``n_g = max_{k in g} s_k`` (``normalize=True``),
which keeps them in float16 range whatever the magnitude of ``s``: the weight
in the scaled domain is then ``(code * S' + Z') * n_g``.

Handled here: bits in {2, 4, 8}; effective group sizes that are powers of two
in 16..1024 (the last group may be shorter); fp32/bf16/fp16 ``W``; rank r <= 64.  Other cases are refused with the
reason (callers fall back).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ttq.formats.spec import effective_group_size

BITS_SUPPORTED = (2, 4, 8)
MAX_RANK = 64


def codes_per_word(bits: int) -> int:
    return 32 // bits


def supports(bits: int, group_size: int, d_in: int, rank: int = 0) -> str | None:
    """None when the fused kernels handle this case, else the reason they do not."""
    if bits not in BITS_SUPPORTED:
        return f"bits={bits} (the Triton path packs {BITS_SUPPORTED})"
    g = effective_group_size(d_in, group_size)
    if g < 16 or g > 1024 or g & (g - 1):
        return f"group_size={group_size} for d_in={d_in} (needs an effective group that is a power of two in 16..1024)"
    if rank > MAX_RANK:
        return f"rank={rank} (the Triton path supports rank <= {MAX_RANK})"
    return None


@triton.jit
def _round_half_even(x, USE_RINT: tl.constexpr):
    """``torch.round`` semantics (ties to even); exact for |x| < 2^23.  The hardware
    instruction on GPUs; a floor-based emulation under the interpreter (no libdevice)."""
    if USE_RINT:
        return libdevice.rint(x)
    f = tl.floor(x)
    d = x - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
    up = (d > 0.5) | ((d == 0.5) & odd)
    return tl.where(up, f + 1.0, f)


@triton.jit
def _quant_kernel(
    W, S_IN, LB, LA, WORDS, SCALE, ZERO, NORM,
    d_out, d_in, rank, n_words, n_groups,
    stride_w, stride_lb, stride_la, stride_words,
    stride_s_row, stride_s_grp, stride_z_row, stride_z_grp,
    nu_a, nu_b,
    BITS: tl.constexpr, G: tl.constexpr, GPB: tl.constexpr, TILE_N: tl.constexpr,
    TILE_R: tl.constexpr, HAS_LR: tl.constexpr, SYMMETRIC: tl.constexpr, HAS_NU: tl.constexpr,
    SWAP_NIBBLES: tl.constexpr, NORMALIZE: tl.constexpr, ZERO_MID: tl.constexpr, USE_RINT: tl.constexpr,
):
    P: tl.constexpr = 32 // BITS
    QMAX: tl.constexpr = (1 << BITS) - 1
    TK: tl.constexpr = GPB * G
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * TILE_N + tl.arange(0, TILE_N)  # (TN,)
    cols = pid_k * TK + tl.arange(0, TK)  # (TK,)
    rmask = rows < d_out
    cmask = cols < d_in
    m2 = rmask[:, None] & cmask[None, :]
    w = tl.load(W + rows[:, None].to(tl.int64) * stride_w + cols[None, :], mask=m2, other=0.0).to(tl.float32)
    if HAS_LR:  # residual W - B A; r padded to TILE_R with zeros
        rr = tl.arange(0, TILE_R)
        b = tl.load(LB + rows[:, None] * stride_lb + rr[None, :], mask=rmask[:, None] & (rr[None, :] < rank), other=0.0)
        a = tl.load(LA + rr[:, None] * stride_la + cols[None, :], mask=(rr[:, None] < rank) & cmask[None, :], other=0.0)
        w = w - tl.dot(b.to(tl.float32), a.to(tl.float32), input_precision="tf32x3")  # ~fp32 accuracy
    s = tl.load(S_IN + cols, mask=cmask, other=1.0)
    v = w * s[None, :]  # (TN, TK): W diag(s)
    v3 = tl.reshape(v, (TILE_N, GPB, G))
    m3 = tl.reshape(m2, (TILE_N, GPB, G))
    vmax = tl.max(tl.where(m3, v3, float("-inf")), axis=2)  # (TN, GPB)
    vmin = tl.min(tl.where(m3, v3, float("inf")), axis=2)
    if SYMMETRIC:
        vmax = tl.maximum(tl.abs(vmax), tl.abs(vmin))
        vmin = -vmax
    if HAS_NU:
        hi = nu_a * vmax + nu_b * vmin
        lo = nu_b * vmax + nu_a * vmin
        vmax = hi
        vmin = lo
    scale = tl.div_rn(vmax - vmin, QMAX * 1.0)
    safe = tl.where(scale > 0.0, scale, 1.0)  # zero range: code 0, W_hat = Z exactly
    q = _round_half_even(tl.div_rn(v3 - vmin[:, :, None], safe[:, :, None]), USE_RINT)
    q = tl.minimum(tl.maximum(q, 0.0), QMAX * 1.0).to(tl.int32)
    q = tl.where(m3, q, 0)
    # P consecutive codes -> one int32 (disjoint bit fields, so the sum is an OR)
    q = tl.reshape(q, (TILE_N, TK // P, P))
    pos = tl.arange(0, P)
    if SWAP_NIBBLES:
        pos = pos ^ 1
    words = tl.sum(q << (pos * BITS)[None, None, :], axis=2)  # (TN, TK // P)
    wcols = pid_k * (TK // P) + tl.arange(0, TK // P)
    tl.store(WORDS + rows[:, None].to(tl.int64) * stride_words + wcols[None, :], words,
             mask=rmask[:, None] & (wcols[None, :] < n_words))
    gcols = pid_k * GPB + tl.arange(0, GPB)
    gvalid = gcols < n_groups
    if NORMALIZE:  # n_g = max s over the group's columns
        s3 = tl.reshape(tl.broadcast_to(s[None, :], (TILE_N, TK)), (TILE_N, GPB, G))
        norm = tl.max(tl.where(m3, s3, 0.0), axis=2)  # (TN, GPB), equal along rows
        norm = tl.where(norm > 0.0, norm, 1.0)
        scale = scale / norm
        vmin = vmin / norm
        tl.store(NORM + gcols[None, :] + 0 * rows[:, None], norm, mask=(rows[:, None] == 0) & gvalid[None, :])
    if ZERO_MID:  # tinygemm's zero: w = (c - 2^(bits-1)) S + (Z + 2^(bits-1) S)
        vmin = vmin + scale * (1 << (BITS - 1))
    gmask = rmask[:, None] & gvalid[None, :]
    tl.store(SCALE + rows[:, None] * stride_s_row + gcols[None, :] * stride_s_grp,
             scale.to(SCALE.dtype.element_ty), mask=gmask)
    tl.store(ZERO + rows[:, None] * stride_z_row + gcols[None, :] * stride_z_grp,
             vmin.to(ZERO.dtype.element_ty), mask=gmask)


def _tile_config(g: int, d_in: int) -> tuple[int, int, int]:
    """(groups per program, rows per program, warps): about 4K weights per program."""
    gpb = max(1, min(256 // g, triton.next_power_of_2(-(-d_in // g))))
    tile_n = min(64, max(16, 4096 // (gpb * g)))
    return gpb, tile_n, 8 if tile_n * gpb * g > 8192 else 4


def quantize_words(
    w: torch.Tensor,
    s: torch.Tensor,
    bits: int,
    group_size: int,
    lr_b: torch.Tensor | None = None,
    lr_a: torch.Tensor | None = None,
    symmetric: bool = False,
    nu: float = 1.0,
    scale_out: torch.Tensor | None = None,
    zero_out: torch.Tensor | None = None,
    normalize: bool = False,
    swap_nibbles: bool = False,
    zero_mid: bool = False,
    words_out: torch.Tensor | None = None,
    norm_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Codes, scales and zeros of ``(W - B A) diag(s)`` in one kernel launch.

    Args:
        w: (d_out, d_in) CUDA weight (or CPU under ``TRITON_INTERPRET=1``), fp32/bf16/fp16.
        s: (d_in,) positive input scale (used in float32).
        bits, group_size: the format (see :func:`supports`); -1 = per output row.
        lr_b, lr_a: optional low-rank factors (d_out, r), (r, d_in).
        symmetric, nu: as in :class:`ttq.formats.affine.QuantSpec`.
        scale_out, zero_out: optional (d_out, n_groups) views to write (any float dtype,
            any strides); default new float32 tensors.
        normalize: store ``S / n_g`` and ``Z / n_g`` and return ``n_g`` (n_groups,) float32.
        swap_nibbles: 4-bit only; tinygemm byte order.
        zero_mid: store ``Z + 2^(bits-1) S`` (tinygemm's zero convention).
        words_out, norm_out: optional contiguous outputs to overwrite (int32 (d_out, n_words),
            float32 (n_groups,)), e.g. to keep the addresses a CUDA graph captured.
    Returns:
        (words int32 (d_out, ceil(d_in / P)), scale, zero, n_g or None).
    """
    if w.dim() != 2 or s.shape != (w.shape[1],):
        raise ValueError(f"expected w (d_out, d_in) and s (d_in,), got {tuple(w.shape)} and {tuple(s.shape)}")
    d_out, d_in = w.shape
    rank = 0 if lr_b is None or lr_b.shape[1] == 0 else lr_b.shape[1]
    why = supports(bits, group_size, d_in, rank)
    if why:
        raise ValueError(f"fused Triton quantization does not support {why}")
    if swap_nibbles and bits != 4:
        raise ValueError("swap_nibbles is only meaningful for 4-bit codes")
    g = effective_group_size(d_in, group_size)
    n_words, n_groups = -(-d_in // codes_per_word(bits)), -(-d_in // g)
    dev = w.device
    w = w.contiguous()
    s32 = s.to(device=dev, dtype=torch.float32).contiguous()
    words = words_out if words_out is not None else torch.empty(d_out, n_words, dtype=torch.int32, device=dev)
    scale = scale_out if scale_out is not None else torch.empty(d_out, n_groups, dtype=torch.float32, device=dev)
    zero = zero_out if zero_out is not None else torch.empty(d_out, n_groups, dtype=torch.float32, device=dev)
    for t in (scale, zero):
        if t.shape != (d_out, n_groups):
            raise ValueError(f"scale/zero outputs must be ({d_out}, {n_groups}), got {tuple(t.shape)}")
    if words.shape != (d_out, n_words) or words.dtype != torch.int32 or not words.is_contiguous():
        raise ValueError(f"words output must be contiguous int32 ({d_out}, {n_words}), got {tuple(words.shape)} {words.dtype}")
    if not normalize:
        norm = s32
    elif norm_out is not None:
        if norm_out.shape != (n_groups,) or norm_out.dtype != torch.float32:
            raise ValueError(f"norm output must be float32 ({n_groups},), got {tuple(norm_out.shape)} {norm_out.dtype}")
        norm = norm_out
    else:
        norm = torch.empty(n_groups, dtype=torch.float32, device=dev)
    if rank:
        lb, la = lr_b.contiguous(), lr_a.contiguous()
        tile_r = max(16, triton.next_power_of_2(rank))
    else:
        lb, la, tile_r = w, w, 16  # unused pointers
    gpb, tile_n, warps = _tile_config(g, d_in)
    grid = (triton.cdiv(d_out, tile_n), triton.cdiv(n_groups, gpb))
    _quant_kernel[grid](
        w, s32, lb, la, words, scale, zero, norm,
        d_out, d_in, rank, n_words, n_groups,
        w.stride(0), lb.stride(0), la.stride(0), words.stride(0),
        scale.stride(0), scale.stride(1), zero.stride(0), zero.stride(1),
        (1 + nu) / 2, (1 - nu) / 2,
        BITS=bits, G=g, GPB=gpb, TILE_N=tile_n, TILE_R=tile_r, HAS_LR=bool(rank),
        SYMMETRIC=symmetric, HAS_NU=nu != 1.0, SWAP_NIBBLES=swap_nibbles,
        NORMALIZE=normalize, ZERO_MID=zero_mid, USE_RINT=os.environ.get("TRITON_INTERPRET", "0") != "1",
        num_warps=warps,
    )
    return words, scale, zero, (norm if normalize else None)


def unpack_words(words: torch.Tensor, bits: int, d_in: int) -> torch.Tensor:
    """Plain-PyTorch inverse of the packing: int32 (d_out, n_words) -> uint8 codes (d_out, d_in)."""
    p = codes_per_word(bits)
    shifts = torch.arange(p, device=words.device, dtype=torch.int32) * bits
    codes = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # (d_out, n_words, P)
    return codes.reshape(words.shape[0], -1)[:, :d_in].to(torch.uint8)
