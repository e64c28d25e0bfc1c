"""The opt-in ``cpu_q8_i8`` layout: ``cpu_q8`` codes read with int8 activations (AVX-512 VNNI).

The packed tensors are exactly those of ``cpu_q8`` (same packer, same bytes: one code per
byte, rows padded to 16 columns); only the product differs.  Per call, ``x / s`` is
rounded to int8 per block of 32 columns (symmetric, ``sx = absmax / 127``, as for
``cpu_q4_i8``) and the unsigned code bytes are multiplied with ``_mm512_dpbusd_epi32``.
Codes are centred at ``c = 2^(bits-1)`` in integer arithmetic, and the zero-point term
``sum_g (Z_g + c S_g) sum_{i in g} x_i / s_i`` and the rank-r term ``B (A x)`` stay in
float32, so only the ``S (q - c)`` part of each weight sees the int8 rounding:
``|y - y_exact| <= sum_i |S_g(i) (q_i - c)| sx_b(i) / 2`` (tests/kernels/test_cpu_q8_i8.py).
Results are therefore not bit-identical to the ``u8`` reference, and ``layout=None`` keeps
choosing the exact float kernel (``cpu_q8``, priority 10 > 5).

Served: bits 5..8, group sizes that are multiples of 32 or one group per row, float32 /
bfloat16 / float16 weights and activations; batches above ``cpu.SMALL_BATCH`` tokens use
the exact dense path of :mod:`ttq.kernels.cpu`.  Offered only when the extension was built
with AVX-512 VNNI and the running CPU has ``avx512_vnni``.
"""

from __future__ import annotations

import dataclasses

import torch

from ttq.formats.affine import QuantSpec, effective_group_size
from ttq.kernels import cpu, cpu_build
from ttq.kernels.api import PackedWeight, register_kernel
from ttq.kernels.cpu_i8 import vnni_available

LAYOUT = "cpu_q8_i8"
BASE_LAYOUT = "cpu_q8"  # the packing it shares
PRIORITY = 5  # below cpu_q8's 10: never picked by layout=None while cpu_q8 serves the combination
BLOCK = 32  # columns per int8 activation scale


def check_supported(spec: QuantSpec, shape: tuple[int, int], dtype: torch.dtype) -> str | None:
    """None when ``cpu_q8_i8`` serves (spec, weight shape, dtype), else why not."""
    if getattr(spec, "fmt", "int") != "int":
        return f"format {spec.fmt!r} is a codebook format (reference layout only)"
    if spec.bits not in cpu.LAYOUT_BITS[BASE_LAYOUT]:
        return f"{LAYOUT} holds 5..8-bit codes (the {BASE_LAYOUT} layout), not {spec.bits}"
    d_in = shape[1]
    g = effective_group_size(d_in, spec.group_size)
    if g % BLOCK and g < d_in:
        return (f"group size {spec.group_size} is not a multiple of {BLOCK} (int8 activations are scaled per "
                f"{BLOCK} columns; use a multiple of {BLOCK} or -1)")
    why = cpu.check_supported(BASE_LAYOUT, spec, shape, dtype)
    if why is not None:
        return why
    if not vnni_available():
        return "this CPU or build lacks AVX-512 VNNI (avx512_vnni)"
    return None


def linear(x: torch.Tensor, packed: PackedWeight, s=None, bias=None, b=None, a=None) -> torch.Tensor:
    """``deq(packed) @ (x / s) + B (A x) + bias`` with int8-rounded ``x / s``; (..., d_in) -> (..., d_out)."""
    d_out, d_in = packed.shape
    x2 = x.reshape(-1, d_in)  # (..., d_in) -> (n, d_in)
    if x2.shape[0] > cpu.SMALL_BATCH:  # prefill: the exact blocked-dequantize path
        return cpu.linear(x, packed, s, bias, b, a)
    has_lr = b is not None and b.shape[1] > 0
    g = effective_group_size(d_in, packed.group_size)
    y = torch.ops.ttq_cpu.packed_mm_q8i8(x2, s, packed.qweight, packed.scale, packed.zero, packed.bits, g, d_out,
                                         d_in, bias, b if has_lr else None, a if has_lr else None)  # (n, d_out)
    return y.reshape(*x.shape[:-1], d_out)


class CpuQ8I8Kernel:
    """``cpu_q8`` packing, int8-activation VNNI product, ``cpu_q8`` unpacking."""

    layout = LAYOUT

    def supports(self, spec: QuantSpec, shape: tuple[int, int], dtype: torch.dtype) -> str | None:
        return check_supported(spec, shape, dtype)

    def _check(self, spec: QuantSpec, w: torch.Tensor) -> None:
        why = check_supported(spec, tuple(w.shape), w.dtype)
        if why is not None:
            raise ValueError(f"layout {LAYOUT!r} cannot pack this weight: {why}")

    def pack(self, w, s, spec, b, a) -> PackedWeight:
        self._check(spec, w)
        return cpu.pack(LAYOUT, w, s, spec, b, a)

    def pack_into(self, out, w, s, spec, b, a) -> PackedWeight:
        self._check(spec, w)
        return cpu.pack_into(out, w, s, spec, b, a)

    def linear(self, x, packed, s, bias, b, a) -> torch.Tensor:
        if not vnni_available():
            raise RuntimeError(f"packed weight in layout {LAYOUT!r} needs the ttq C++ extension with AVX-512 VNNI "
                               f"({cpu_build.error() or 'not available on this CPU'}); repack with layout=None")
        return linear(x, packed, s, bias, b, a)

    def unpack(self, packed) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return cpu.unpack(dataclasses.replace(packed, layout=BASE_LAYOUT))


register_kernel(LAYOUT, "cpu", priority=PRIORITY)(CpuQ8I8Kernel())
