"""Low-bit decode matmul on packed TTQ weights (CUDA), TTQ paper Appendix H.

``y = deq(Wq) (x / s) + B (A x) + bias`` where ``deq(Wq)`` lives in the scaled
domain ``W diag(s)``.  Packed inputs come from :mod:`ttq.kernels.triton_quant`
with ``normalize=True``: int32 words (``P = 32 // bits`` consecutive codes each), an
interleaved float16 tensor ``sz`` (d_out, n_groups, 2) = ``[S', Z']`` and the
per-group normaliser ``n_g`` (n_groups,) float32, so that::

    y[m, n] = sum_g n_g * (S'[n, g] * sum_{k in g} code[n, k] x'[m, k]
                         + Z'[n, g] * sum_{k in g} x'[m, k]),   x' = x / s

Paths:

* :func:`gemv_words` -- Triton kernel for a few tokens (decode, M <= ``GEMV_MAX_M``):
  reads the packed weight once per token, does ``x / s`` on the fly, applies
  ``S', Z', n_g`` per group, adds the low-rank term ``B t`` (``t = A x`` is one
  small product computed before) and the bias in the epilogue.  Accumulates in
  float32.
* :func:`dequant_words` -- Triton kernel that writes ``deq(Wq) diag(1/s)`` in the
  activation dtype; larger M (prefill) use it with cuBLAS.
* :func:`prep_bf16` (``x n_g / s`` in bf16 and ``t = A x`` in one launch) + PyTorch's
  tinygemm int4 kernel (``torch.ops.aten._weight_int4pack_mm``) + :func:`epilogue`
  (``+ B t + bias``, cast): the 4-bit alternative, see ``cuda_register``.
* :func:`lowrank_t`: ``t = A x`` for the Triton decode path (one small launch).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

GEMV_MAX_M = 8
# decode kernel (TILE_N, columns per step, num_warps, num_stages); set_gemv_config() overrides per shape
DEFAULT_GEMV_CONFIG = (4, 1024, 4, 1)
_GEMV_CONFIGS: dict[tuple, tuple[int, int, int, int]] = {}


@triton.jit
def _gemv_kernel(
    X, S_IN, NORM, WORDS, SZ, LB, T, BIAS, Y,
    d_out, d_in, n_words, n_groups, rank,
    stride_xm, stride_words, stride_sz, stride_lb, stride_tm, stride_ym,
    BITS: tl.constexpr, G: tl.constexpr, GPB: tl.constexpr, TILE_N: tl.constexpr,
    TILE_R: tl.constexpr, HAS_S: tl.constexpr, HAS_LR: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    """One program: TILE_N output rows of one token, GPB groups of columns per step."""
    P: tl.constexpr = 32 // BITS
    WPG: tl.constexpr = G // P  # words per group
    TKW: tl.constexpr = GPB * WPG  # words per row per step
    TK: tl.constexpr = GPB * G
    QM: tl.constexpr = (1 << BITS) - 1
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    rows = pid_n * TILE_N + tl.arange(0, TILE_N)
    rmask = rows < d_out
    wrow = WORDS + rows[:, None].to(tl.int64) * stride_words
    szrow = SZ + rows[:, None].to(tl.int64) * stride_sz
    xrow = X + m * stride_xm
    wr = tl.arange(0, TKW)
    sh = tl.arange(0, P) * BITS
    acc = tl.zeros((TILE_N, GPB), dtype=tl.float32)
    for g0 in tl.range(0, n_groups, GPB):
        wcol = g0 * WPG + wr  # (TKW,)
        words = tl.load(wrow + wcol[None, :], mask=rmask[:, None] & (wcol < n_words)[None, :], other=0)
        col = g0 * G + tl.arange(0, TK)
        cm = col < d_in
        xv = tl.load(xrow + col, mask=cm, other=0.0).to(tl.float32)
        if HAS_S:
            xv = xv / tl.load(S_IN + col, mask=cm, other=1.0)
        # codes -> float without I2F: the bits of 2^23 + c, minus 2^23 (exact)
        c = ((words[:, :, None] >> sh[None, None, :]) & QM) | 0x4B000000  # (TN, TKW, P)
        c = c.to(tl.float32, bitcast=True) - 8388608.0
        x3 = tl.reshape(xv, (TKW, P))
        tw = tl.sum(c * x3[None, :, :], axis=2)  # (TN, TKW): per-word partial dot
        tg = tl.sum(tl.reshape(tw, (TILE_N, GPB, WPG)), axis=2)  # (TN, GPB)
        xg = tl.sum(tl.reshape(xv, (GPB, G)), axis=1)  # (GPB,)
        gcol = g0 + tl.arange(0, GPB)
        gm = gcol < n_groups
        m2 = rmask[:, None] & gm[None, :]
        sc = tl.load(szrow + 2 * gcol[None, :], mask=m2, other=0.0).to(tl.float32)
        zr = tl.load(szrow + 2 * gcol[None, :] + 1, mask=m2, other=0.0).to(tl.float32)
        nrm = tl.load(NORM + gcol, mask=gm, other=0.0)
        acc += (sc * tg + zr * xg[None, :]) * nrm[None, :]
    y = tl.sum(acc, axis=1)  # (TN,)
    if HAS_LR:
        rr = tl.arange(0, TILE_R)
        lb = tl.load(LB + rows[:, None] * stride_lb + rr[None, :], mask=rmask[:, None] & (rr < rank)[None, :], other=0.0)
        tv = tl.load(T + m * stride_tm + rr, mask=rr < rank, other=0.0)
        y += tl.sum(lb.to(tl.float32) * tv[None, :], axis=1)
    if HAS_BIAS:
        y += tl.load(BIAS + rows, mask=rmask, other=0.0).to(tl.float32)
    tl.store(Y + m * stride_ym + rows, y.to(Y.dtype.element_ty), mask=rmask)


@triton.jit
def _dequant_kernel(
    WORDS, SZ, NORM, S_IN, OUT, d_out, d_in, stride_words, stride_sz, stride_out,
    BITS: tl.constexpr, G: tl.constexpr, TILE_N: tl.constexpr, TILE_K: tl.constexpr, HAS_S: tl.constexpr,
):
    P: tl.constexpr = 32 // BITS
    QM: tl.constexpr = (1 << BITS) - 1
    rows = tl.program_id(0) * TILE_N + tl.arange(0, TILE_N)
    cols = tl.program_id(1) * TILE_K + tl.arange(0, TILE_K)
    rm, cm = rows < d_out, cols < d_in
    m2 = rm[:, None] & cm[None, :]
    r64 = rows[:, None].to(tl.int64)
    words = tl.load(WORDS + r64 * stride_words + (cols // P)[None, :], mask=m2, other=0)
    c = ((words >> ((cols % P) * BITS)[None, :]) & QM).to(tl.float32)
    grp = cols // G
    sc = tl.load(SZ + r64 * stride_sz + 2 * grp[None, :], mask=m2, other=0.0).to(tl.float32)
    zr = tl.load(SZ + r64 * stride_sz + 2 * grp[None, :] + 1, mask=m2, other=0.0).to(tl.float32)
    f = tl.load(NORM + grp, mask=cm, other=0.0)
    if HAS_S:
        f = f / tl.load(S_IN + cols, mask=cm, other=1.0)
    w = (c * sc + zr) * f[None, :]
    tl.store(OUT + r64 * stride_out + cols[None, :], w.to(OUT.dtype.element_ty), mask=m2)


@triton.jit
def _prep_kernel(
    X, S_IN, NORM, A, XQ, T, d_in, rank, stride_xm, stride_a, stride_xqm, stride_tm,
    G: tl.constexpr, TILE: tl.constexpr, PRESCALE: tl.constexpr, HAS_S: tl.constexpr,
):
    """Programs [0, nb): ``xq = x n_g / s`` (bf16) for one tile of columns (when PRESCALE);
    programs [nb, nb + rank): ``t[r] = A[r] . x`` (float32) for one rank row."""
    pid = tl.program_id(0)
    m = tl.program_id(1)
    nb = 0
    if PRESCALE:
        nb = tl.cdiv(d_in, TILE)
    if pid < nb:
        col = pid * TILE + tl.arange(0, TILE)
        cm = col < d_in
        x = tl.load(X + m * stride_xm + col, mask=cm, other=0.0).to(tl.float32)
        f = tl.load(NORM + col // G, mask=cm, other=1.0)
        if HAS_S:
            f = f / tl.load(S_IN + col, mask=cm, other=1.0)
        tl.store(XQ + m * stride_xqm + col, (x * f).to(XQ.dtype.element_ty), mask=cm)
    else:
        r = pid - nb
        acc = tl.zeros((TILE,), dtype=tl.float32)
        for k0 in tl.range(0, d_in, TILE):
            col = k0 + tl.arange(0, TILE)
            cm = col < d_in
            x = tl.load(X + m * stride_xm + col, mask=cm, other=0.0).to(tl.float32)
            a = tl.load(A + r * stride_a + col, mask=cm, other=0.0).to(tl.float32)
            acc += x * a
        tl.store(T + m * stride_tm + r, tl.sum(acc, axis=0))


@triton.jit
def _epilogue_kernel(
    YIN, LB, T, BIAS, Y, d_out, rank, stride_yin, stride_lb, stride_tm, stride_y,
    TILE: tl.constexpr, TILE_R: tl.constexpr, HAS_LR: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    """``y = yin + B t + bias`` in y's dtype."""
    rows = tl.program_id(0) * TILE + tl.arange(0, TILE)
    m = tl.program_id(1)
    rm = rows < d_out
    y = tl.load(YIN + m * stride_yin + rows, mask=rm, other=0.0).to(tl.float32)
    if HAS_LR:
        rr = tl.arange(0, TILE_R)
        lb = tl.load(LB + rows[:, None] * stride_lb + rr[None, :], mask=rm[:, None] & (rr < rank)[None, :], other=0.0)
        tv = tl.load(T + m * stride_tm + rr, mask=rr < rank, other=0.0)
        y += tl.sum(lb.to(tl.float32) * tv[None, :], axis=1)
    if HAS_BIAS:
        y += tl.load(BIAS + rows, mask=rm, other=0.0).to(tl.float32)
    tl.store(Y + m * stride_y + rows, y.to(Y.dtype.element_ty), mask=rm)


def _tile_r(rank: int) -> int:
    return max(16, triton.next_power_of_2(max(rank, 1)))


def gemv_config(d_out: int, d_in: int, bits: int, g: int) -> tuple[int, int, int, int]:
    """(TILE_N, groups per step, num_warps, num_stages) of the decode kernel for this shape."""
    cfg = _GEMV_CONFIGS.get((d_out, d_in, bits, g))
    if cfg is not None:
        return cfg
    tile_n, cols, nw, ns = DEFAULT_GEMV_CONFIG
    return tile_n, max(1, min(cols // g, triton.next_power_of_2(-(-d_in // g)))), nw, ns


def set_gemv_config(d_out: int, d_in: int, bits: int, g: int, cfg: tuple[int, int, int, int]) -> None:
    """Use ``cfg`` (TILE_N, groups per step, num_warps, num_stages) for this shape from now on."""
    _GEMV_CONFIGS[(d_out, d_in, bits, g)] = tuple(cfg)


def lowrank_t(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``t = x A^T`` (M, r) float32 for x (M, d_in), a (r, d_in): one small launch."""
    m, d_in = x.shape
    rank = a.shape[0]
    t = torch.empty(m, rank, dtype=torch.float32, device=x.device)
    _prep_kernel[(rank, m)](x, t, t, a, t, t, d_in, rank, x.stride(0), a.stride(0), 0, t.stride(0),
                            G=16, TILE=1024, PRESCALE=False, HAS_S=False, num_warps=4)
    return t


def gemv_words(
    x: torch.Tensor,
    words: torch.Tensor,
    sz: torch.Tensor,
    norm: torch.Tensor,
    s: torch.Tensor | None,
    bits: int,
    g: int,
    bias: torch.Tensor | None = None,
    lr_b: torch.Tensor | None = None,
    t: torch.Tensor | None = None,
    config: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """Decode product on packed words.

    Args:
        x: (M, d_in) activations, contiguous last dim.
        words: (d_out, n_words) int32 (consecutive order); sz: (d_out, n_groups, 2) [S', Z'];
            norm: (n_groups,) float32.
        s: (d_in,) float32 input scale or None; bits, g: code width and effective group size.
        bias: (d_out,) or None; lr_b: (d_out, r) and t = A x (M, r) float32, or None.
        config: (TILE_N, groups per step, num_warps, num_stages); default :func:`gemv_config`.
    Returns:
        (M, d_out) in x's dtype.
    """
    m, d_in = x.shape
    d_out, n_words = words.shape
    n_groups = sz.shape[1]
    tile_n, gpb, nw, ns = config or gemv_config(d_out, d_in, bits, g)
    y = torch.empty(m, d_out, dtype=x.dtype, device=x.device)
    rank = 0 if lr_b is None else lr_b.shape[1]
    dummy = norm
    _gemv_kernel[(triton.cdiv(d_out, tile_n), m)](
        x, s if s is not None else dummy, norm, words, sz,
        lr_b if rank else dummy, t if rank else dummy, bias if bias is not None else dummy, y,
        d_out, d_in, n_words, n_groups, rank,
        x.stride(0), words.stride(0), sz.stride(0), lr_b.stride(0) if rank else 0, t.stride(0) if rank else 0, y.stride(0),
        BITS=bits, G=g, GPB=gpb, TILE_N=tile_n, TILE_R=_tile_r(rank),
        HAS_S=s is not None, HAS_LR=bool(rank), HAS_BIAS=bias is not None,
        num_warps=nw, num_stages=ns,
    )
    return y


def dequant_words(
    words: torch.Tensor, sz: torch.Tensor, norm: torch.Tensor, s: torch.Tensor | None,
    bits: int, g: int, d_in: int, dtype: torch.dtype,
) -> torch.Tensor:
    """Effective weight ``deq(Wq) diag(1/s)`` (d_out, d_in) in ``dtype`` (for prefill with cuBLAS)."""
    d_out = words.shape[0]
    out = torch.empty(d_out, d_in, dtype=dtype, device=words.device)
    tile_n, tile_k = 32, 128
    _dequant_kernel[(triton.cdiv(d_out, tile_n), triton.cdiv(d_in, tile_k))](
        words, sz, norm, s if s is not None else norm, out, d_out, d_in, words.stride(0), sz.stride(0), out.stride(0),
        BITS=bits, G=g, TILE_N=tile_n, TILE_K=tile_k, HAS_S=s is not None, num_warps=4,
    )
    return out


def prep_bf16(
    x: torch.Tensor, s: torch.Tensor | None, norm: torch.Tensor, g: int, a: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(x n_g / s`` in bfloat16, ``t = x A^T`` float32 or None), both from one launch.

    Args:
        x: (M, d_in); s: (d_in,) float32 or None; norm: (n_groups,) float32; g: group size;
        a: (r, d_in) low-rank factor or None.
    """
    m, d_in = x.shape
    rank = 0 if a is None else a.shape[0]
    xq = torch.empty(m, d_in, dtype=torch.bfloat16, device=x.device)
    t = torch.empty(m, max(rank, 1), dtype=torch.float32, device=x.device)
    tile = 1024
    _prep_kernel[(triton.cdiv(d_in, tile) + rank, m)](
        x, s if s is not None else norm, norm, a if rank else x, xq, t, d_in, rank,
        x.stride(0), a.stride(0) if rank else 0, xq.stride(0), t.stride(0),
        G=g, TILE=tile, PRESCALE=True, HAS_S=s is not None, num_warps=4,
    )
    return xq, (t if rank else None)


def epilogue(
    y_in: torch.Tensor, dtype: torch.dtype, bias: torch.Tensor | None, lr_b: torch.Tensor | None, t: torch.Tensor | None,
) -> torch.Tensor:
    """``y_in + B t + bias`` (M, d_out) in ``dtype``, one launch (the tinygemm path's tail)."""
    m, d_out = y_in.shape
    rank = 0 if t is None else t.shape[1]
    y = torch.empty(m, d_out, dtype=dtype, device=y_in.device)
    tile = 128
    _epilogue_kernel[(triton.cdiv(d_out, tile), m)](
        y_in, lr_b if rank else y_in, t if rank else y_in, bias if bias is not None else y_in, y,
        d_out, rank, y_in.stride(0), lr_b.stride(0) if rank else 0, t.stride(0) if rank else 0, y.stride(0),
        TILE=tile, TILE_R=_tile_r(rank), HAS_LR=bool(rank), HAS_BIAS=bias is not None, num_warps=4,
    )
    return y
