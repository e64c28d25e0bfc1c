"""CPU kernels for the ``cpu_q2`` / ``cpu_q3`` / ``cpu_q4`` / ``cpu_q8`` layouts.

The layouts are documented in :mod:`ttq.kernels.api`; this module registers one
kernel per layout.  Packing and the bs <= ``SMALL_BATCH`` products run in the
compiled extension (:mod:`ttq.kernels.cpu_build`): one pass over ``W`` computes
``W s``, the group min/max, the codes and the packed bytes; the product
prescales ``x / s`` once and reads the packed codes row by row.  Larger batches
(prefill) dequantize once into a dense float32 matrix and call ``F.linear``.
:func:`unpack` is pure PyTorch bit arithmetic, so tests check the C++ packer
against the layout definition rather than against itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ttq.formats.spec import QuantSpec, effective_group_size, num_groups
from ttq.kernels import cpu_build
from ttq.kernels.api import PackedWeight, register_kernel, wants_half
from ttq.methods.lowrank import residual

SMALL_BATCH = 32  # rows of x up to which the packed GEMM is used; above, tiled dequantize + torch.mm (measured)
CHUNK = 16  # group sizes must be multiples of this (or cover the whole row)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LAYOUT_BITS = {"cpu_q2": (2,), "cpu_q3": (3,), "cpu_q4": (4,), "cpu_q8": (5, 6, 7, 8)}


def _ops():
    return torch.ops.ttq_cpu


def check_supported(layout: str, spec: QuantSpec, shape: tuple[int, int], dtype: torch.dtype) -> str | None:
    """None when ``layout`` can pack ``spec`` for a weight of ``shape``/``dtype``, else why not."""
    if getattr(spec, "fmt", "int") != "int":
        return f"format {spec.fmt!r} is a codebook format (reference layout only)"
    if spec.bits not in LAYOUT_BITS[layout]:
        return f"{layout} holds {'/'.join(map(str, LAYOUT_BITS[layout]))}-bit codes, not {spec.bits}"
    if dtype not in DTYPES:
        return f"weight dtype {dtype} (supported: float32, bfloat16, float16)"
    d_in = shape[1]
    g = effective_group_size(d_in, spec.group_size)
    if g % CHUNK and g < d_in:
        return f"group size {spec.group_size} is not a multiple of {CHUNK}"
    if not cpu_build.load():
        return f"C++ extension unavailable ({cpu_build.error()})"
    return None


def pack(layout: str, w: torch.Tensor, s: torch.Tensor, spec: QuantSpec, b=None, a=None,
         half_params: bool | None = None) -> PackedWeight:
    """Fused ``(W - B A) diag(s)`` -> codes, scales, zeros in ``layout`` (see :mod:`ttq.kernels.api`).

    ``half_params``: float16 scale / zero (:func:`ttq.kernels.api.wants_half`); kept in
    float32 when a value does not fit float16's normal range.
    """
    w_res = residual(w, b.float(), a.float()) if b is not None and b.shape[1] > 0 else w
    g = effective_group_size(w.shape[1], spec.group_size)
    half = wants_half(half_params)
    q, scale, zero, status = _ops().quant_pack(w_res, s, spec.bits, g, spec.symmetric, float(spec.nu), half)
    if status & 1:
        n_bad = int((~torch.isfinite(w_res.float() * s)).sum())
        raise ValueError(f"weight * scale contains {n_bad} NaN/Inf value(s); refusing to quantize")
    if status & 2:  # a scale or zero outside float16's normal range: keep them in float32
        q, scale, zero, _ = _ops().quant_pack(w_res, s, spec.bits, g, spec.symmetric, float(spec.nu), False)
    return PackedWeight(layout, spec.bits, spec.group_size, tuple(w.shape), q, scale, zero)


def pack_into(out: PackedWeight, w: torch.Tensor, s: torch.Tensor, spec: QuantSpec, b=None, a=None,
              half_params: bool | None = None) -> PackedWeight:
    """:func:`pack` writing into ``out``'s tensors (same layout, shape, bits, group size, scale dtype)."""
    w_res = residual(w, b.float(), a.float()) if b is not None and b.shape[1] > 0 else w
    g = effective_group_size(w.shape[1], spec.group_size)
    if half_params is not None and (out.scale.dtype == torch.float16) != wants_half(half_params):
        return pack(out.layout, w, s, spec, b, a, half_params)  # out holds the other scale / zero dtype
    status = _ops().quant_pack_out(w_res, s, spec.bits, g, spec.symmetric, float(spec.nu), out.qweight, out.scale,
                                   out.zero)
    if status & 1:
        n_bad = int((~torch.isfinite(w_res.float() * s)).sum())
        raise ValueError(f"weight * scale contains {n_bad} NaN/Inf value(s); refusing to quantize")
    if status & 2:  # out holds float16 scale/zero that cannot represent these: allocate float32 ones
        return pack(out.layout, w, s, spec, b, a, half_params=False)
    return out


def dequantize(packed: PackedWeight) -> torch.Tensor:
    """``deq(codes)`` (d_out, d_in) float32 through the compiled kernel."""
    d_out, d_in = packed.shape
    g = effective_group_size(d_in, packed.group_size)
    return _ops().dequant(packed.qweight, packed.scale, packed.zero, packed.bits, g, d_out, d_in, False)


DENSE_TILE_BYTES = 4 << 20  # dequantize this much at a time for large batches (a reused allocation, no page faults)


_NATIVE_BF16: list[bool] = []  # the answer, once asked (a plain bool: torch.compile traces it)


def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX-512 BF16 or AMX).  Only there is a bfloat16 ``torch.mm``
    faster than a float32 one (2-3x for SmolLM2 / Gemma3 layers at 512 tokens, one thread; elsewhere it is emulated)."""
    if not _NATIVE_BF16:
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        _NATIVE_BF16.append(any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes))
    return _NATIVE_BF16[0]


def _dense_product(xs: torch.Tensor, packed: PackedWeight, bf16: bool = False) -> torch.Tensor:
    """``xs @ deq(packed)^T`` for many rows of ``xs`` (n, d_in): dequantize tiles of output rows
    (a few MB) and multiply each with ``torch.mm``; returns (n, d_out) float32.

    ``bf16``: tiles, ``xs`` and the product in bfloat16 (float32 accumulation inside ``torch.mm``; relative error
    ~3e-3), else everything in float32 (exact up to summation order)."""
    d_out, d_in = packed.shape
    g = effective_group_size(d_in, packed.group_size)
    dtype = torch.bfloat16 if bf16 else torch.float32
    rows = max(16, DENSE_TILE_BYTES // (dtype.itemsize * d_in))
    y_t = torch.empty(d_out, xs.shape[0], dtype=dtype)  # (d_out, n): row tiles are contiguous
    xs_t = xs.to(dtype).t()  # (d_in, n)
    for r0 in range(0, d_out, rows):
        r1 = min(d_out, r0 + rows)
        w_tile = _ops().dequant(packed.qweight[r0:r1], packed.scale[r0:r1], packed.zero[r0:r1], packed.bits, g,
                               r1 - r0, d_in, bf16)  # (rows, d_in)
        torch.mm(w_tile, xs_t, out=y_t[r0:r1])
    # row-major like F.linear's output: downstream ops (SDPA) choose kernels by stride, and a
    # transposed result made them round differently from the reference path
    return y_t.t().contiguous().float()


def dense_linear(x, packed: PackedWeight, s=None, bias=None, b=None, a=None, bf16: bool = False) -> torch.Tensor:
    """Large-batch (prefill) ``deq(packed) @ (x / s) + B (A x) + bias``: tiled dequantize + ``torch.mm``
    (the weight product in bfloat16 with ``bf16``, see :func:`_dense_product`)."""
    d_out, d_in = packed.shape
    xf = x.reshape(-1, d_in).float()  # (..., d_in) -> (n, d_in)
    y = _dense_product(xf / s.float() if s is not None else xf, packed, bf16)  # (n, d_out)
    if b is not None and b.shape[1] > 0:
        y = y + F.linear(F.linear(xf, a.float()), b.float())
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], d_out)


def linear(x, packed: PackedWeight, s=None, bias=None, b=None, a=None, op: str = "packed_mm",
           dense_bf16: bool | None = False) -> torch.Tensor:
    """``deq(packed) @ (x / s) + B (A x) + bias``; (..., d_in) -> (..., d_out) in x's dtype.

    Up to ``SMALL_BATCH`` rows through the product ``op`` (see :func:`bind_small_batch`), larger
    batches through :func:`dense_linear`: exact, or in bfloat16 with ``dense_bf16`` (None: where
    :func:`native_bf16`)."""
    traced = torch.compiler.is_compiling()  # torch.compile traces the registered op (kernels.cpu_fake)
    y = bind_small_batch(op, packed, s, bias, b, a, traced=traced)(x)
    if y is not None:
        return y
    return dense_linear(x, packed, s, bias, b, a, bf16=native_bf16() if dense_bf16 is None else dense_bf16)


def bind_small_batch(op: str, packed: PackedWeight, s, bias, b, a, one_token: bool = False, traced: bool = False):
    """The product ``deq(packed) @ (x / s) + B (A x) + bias`` through the ``torch.ops.ttq_cpu`` op named
    ``op``, with every argument but x bound (``BoundProduct`` of the extension's ``ttq_bind.cpp``).

    The decode fast path of prompt mode: argument checks, group size and low-rank test run once per
    prompt, and each call goes from Python straight to the kernel (no dispatcher argument boxing).

    Args:
        op: ``packed_mm`` (``cpu_q*`` layouts), ``packed_mm_q4i8`` or ``packed_mm_q8i8``.
        packed, s, bias, b, a: as for :func:`linear` (s float32 (d_in,) or None).
        one_token: accept only one token per sequence (``x.shape[-2] == 1``; prompt mode's decode steps).
        traced: call ``torch.ops.ttq_cpu.<op>`` from Python instead of the extension's ``BoundProduct``
            (which ``torch.compile`` cannot trace; :mod:`ttq.compiled`).
    Returns:
        a function of x (..., d_in) returning (..., d_out) in x's dtype for CPU inputs of at most
        ``SMALL_BATCH`` rows (and one token with ``one_token``), None for any other x (prefill-sized
        inputs: the caller takes :func:`dense_linear`); a wrong feature count raises ``ValueError``.
    """
    d_out, d_in = packed.shape
    has_lr = b is not None and b.shape[1] > 0
    args = (s, packed.qweight, packed.scale, packed.zero, packed.bits, effective_group_size(d_in, packed.group_size),
            d_out, d_in, bias, b if has_lr else None, a if has_lr else None)
    mod = cpu_build.module()
    if mod is not None and not traced:
        return mod.BoundProduct(op, *args, SMALL_BATCH, one_token)
    return _bound_through_ops(op, *args, one_token=one_token)  # built without the Python binding


def _bound_through_ops(op_name: str, s, qweight, scale, zero, bits, g, d_out, d_in, bias, b, a, one_token: bool):
    """:func:`bind_small_batch` in Python, calling ``torch.ops.ttq_cpu.<op_name>`` (same contract)."""
    if op_name not in ("packed_mm", "packed_mm_q4i8", "packed_mm_q8i8"):
        raise ValueError(f"unknown op {op_name!r} (allowed: packed_mm, packed_mm_q4i8, packed_mm_q8i8)")
    op = getattr(_ops(), op_name).default
    head = (s, qweight, scale, zero) + (() if op_name == "packed_mm_q4i8" else (bits,))
    tail = (g, d_out, d_in, bias, b, a)

    def run(x: torch.Tensor) -> torch.Tensor | None:
        if x.dim() == 0 or x.device.type != "cpu":
            return None
        if x.shape[-1] != d_in:
            raise ValueError(f"input has {x.shape[-1]} features, packed weight expects {d_in} "
                             f"(shape ({d_out}, {d_in}))")
        if one_token and x.dim() >= 2 and x.shape[-2] != 1:
            return None
        rows = x.numel() // d_in
        if rows == 0 or rows > SMALL_BATCH:
            return None
        return op(x.reshape(rows, d_in), *head, *tail).reshape(*x.shape[:-1], d_out)

    return run


def unpack(packed: PackedWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pure-PyTorch decoding of a ``cpu_q*`` layout: (codes u8 (d_out, d_in), scale f32, zero f32)."""
    d_out, d_in = packed.shape
    qw = packed.qweight
    if packed.layout == "cpu_q8":
        codes = qw[:, :d_in]
    elif packed.layout == "cpu_q4":
        tiles = qw.reshape(d_out, -1, 1, 16)  # (d_out, n_tiles, 1, 16)
        codes = torch.cat([tiles & 15, tiles >> 4], dim=2).reshape(d_out, -1)[:, :d_in]
    elif packed.layout == "cpu_q3":
        lanes = qw.reshape(d_out, -1, 16, 3).to(torch.int32)  # (d_out, n_tiles, 16 lanes, 3 bytes)
        v = lanes[..., 0] | (lanes[..., 1] << 8) | (lanes[..., 2] << 16)  # 24-bit lanes
        codes = torch.stack([(v >> (3 * k)) & 7 for k in range(8)], dim=2)  # (d_out, n_tiles, 8, 16)
        codes = codes.to(torch.uint8).reshape(d_out, -1)[:, :d_in]
    else:
        tiles = qw.reshape(d_out, -1, 1, 16)  # (d_out, n_tiles, 1, 16)
        codes = torch.cat([(tiles >> (2 * k)) & 3 for k in range(4)], dim=2)  # (d_out, n_tiles, 4, 16)
        codes = codes.reshape(d_out, -1)[:, :d_in]
    n = num_groups(d_in, packed.group_size)
    return codes.contiguous(), packed.scale.float().reshape(d_out, n), packed.zero.float().reshape(d_out, n)


class CpuPackedKernel:
    """One ``cpu_q*`` layout: compiled packing and products, pure-PyTorch unpacking."""

    def __init__(self, layout: str) -> None:
        self.layout = layout

    def supports(self, spec: QuantSpec, shape: tuple[int, int], dtype: torch.dtype) -> str | None:
        return check_supported(self.layout, spec, shape, dtype)

    half_params = True  # pack / pack_into take ``half_params`` (float16 scale / zero)

    def pack(self, w, s, spec, b, a, half_params: bool | None = None) -> PackedWeight:
        why = check_supported(self.layout, spec, tuple(w.shape), w.dtype)
        if why is not None:
            raise ValueError(f"layout {self.layout!r} cannot pack this weight: {why}")
        return pack(self.layout, w, s, spec, b, a, half_params)

    def pack_into(self, out, w, s, spec, b, a, half_params: bool | None = None) -> PackedWeight:
        why = check_supported(self.layout, spec, tuple(w.shape), w.dtype)
        if why is not None:
            raise ValueError(f"layout {self.layout!r} cannot pack this weight: {why}")
        return pack_into(out, w, s, spec, b, a, half_params)

    def linear(self, x, packed, s, bias, b, a) -> torch.Tensor:
        if not cpu_build.load():
            raise RuntimeError(f"packed weight in layout {packed.layout!r} needs the ttq C++ extension: "
                               f"{cpu_build.error()}")
        return linear(x, packed, s, bias, b, a)

    def decoder(self, packed, s, bias, b, a):
        """Prompt mode's decode product (:func:`bind_small_batch` with ``one_token``): returns None for
        inputs it does not take; the whole decoder is None without the extension."""
        if not cpu_build.load():
            return None
        return bind_small_batch("packed_mm", packed, s, bias, b, a, one_token=True)

    def unpack(self, packed) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return unpack(packed)


for _layout in LAYOUT_BITS:
    register_kernel(_layout, "cpu", priority=10)(CpuPackedKernel(_layout))
