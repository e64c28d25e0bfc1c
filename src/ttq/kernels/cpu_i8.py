"""The opt-in int8-activation layouts ``cpu_q4_i8`` and ``cpu_q8_i8`` (AVX-512 VNNI or AVX2).

Each reads the packed tensors of its base layout (``cpu_q4`` / ``cpu_q8``: same packer, same
bytes); only the product differs.  Per call, ``x / s`` is rounded to int8 per tile of 32
columns (symmetric, scale ``sx = absmax / 127``) and the unsigned codes are multiplied with
``_mm512_dpbusd_epi32`` (``packed_mm_q4i8`` / ``packed_mm_q8i8`` in csrc/ttq_cpu.cpp; the kernels in
csrc/vnni.inc, and csrc/avx2_i8.inc for AVX2).  Codes are centred at ``c = 2^(bits-1)``; the
zero-point term ``sum_g (Z_g + c S_g) sum_{i in g} x_i / s_i`` and the rank-r term ``B (A x)`` stay in
float32, so only the ``S (q - c)`` part of each weight sees the int8 rounding:
``|y - y_exact| <= sum_i |S_g(i) (q_i - c)| sx_t(i) / 2`` (about
0.3-1% relative error on random layers, see tests/kernels/test_cpu_i8.py).  The results are
therefore not bit-identical to the ``u8`` reference, which is why ``layout=None`` keeps
choosing the exact float kernel (``cpu_q4`` / ``cpu_q8``, priority 10 > 5).

Served: the base layout's bits (4 for ``cpu_q4_i8``, 5..8 for ``cpu_q8_i8``), group sizes that
are multiples of 32 or one group per row, float32 / bfloat16 / float16 weights and
activations.  Batches above ``cpu.SMALL_BATCH`` tokens (prefill) use the dense path of
:mod:`ttq.kernels.cpu`: in bfloat16 on CPUs that multiply it natively (AVX-512 BF16 or AMX,
:func:`ttq.kernels.cpu.native_bf16`; 2-3x faster than float32 there, relative error ~3e-3, the same order as
the int8 rounding), else exact float32.  Offered when the extension was built with AVX-512 VNNI and the
running CPU has ``avx512_vnni``, or in builds without AVX-512 on CPUs with AVX2 + FMA (``_mm256_maddubs_epi16``
kernels, one 32-column tile at a time, the same rounding of ``x / s``; 5..8-bit codes centred to int8).
"""

from __future__ import annotations

import dataclasses

import torch

from ttq.formats.spec import QuantSpec, effective_group_size
from ttq.kernels import cpu, cpu_build
from ttq.kernels.api import PackedWeight, register_kernel

PRIORITY = 5  # below the base layouts' 10: never picked by layout=None while the exact kernel serves
TILE = 32  # columns per int8 activation scale (the int8 activation tile)


_AVAILABLE: list[bool] = []  # the answer, once the extension is loaded (a plain bool: torch.compile traces it)


def i8_available() -> bool:
    """True when the int8-activation products run here: AVX-512 VNNI, or the AVX2 kernels of builds without AVX-512."""
    if _AVAILABLE:
        return _AVAILABLE[0]
    if not cpu_build.load():
        return False
    _AVAILABLE.append(bool(torch.ops.ttq_cpu.has_i8()))
    return _AVAILABLE[0]


@dataclasses.dataclass(frozen=True)
class CpuI8Kernel:
    """``base`` packing, int8-activation VNNI product ``op``, ``base`` unpacking.

    Attributes:
        layout: the layout name this kernel registers.
        base: the exact layout whose packed tensors it reads (its bits are the bits served).
        op: the ``torch.ops.ttq_cpu`` product.
    """

    layout: str
    base: str
    op: str

    def check_supported(self, spec: QuantSpec, shape: tuple[int, int], dtype: torch.dtype) -> str | None:
        """None when this layout serves (spec, weight shape, dtype), else why not."""
        if getattr(spec, "fmt", "int") != "int":
            return f"format {spec.fmt!r} is a codebook format (reference layout only)"
        bits = cpu.LAYOUT_BITS[self.base]
        if spec.bits not in bits:
            held = f"{bits[0]}-bit" if len(bits) == 1 else f"{bits[0]}..{bits[-1]}-bit"
            return f"{self.layout} holds {held} codes (the {self.base} layout), not {spec.bits}"
        d_in = shape[1]
        g = effective_group_size(d_in, spec.group_size)
        if g % TILE and g < d_in:
            return (f"group size {spec.group_size} is not a multiple of {TILE} (int8 activations are scaled per "
                    f"{TILE} columns; use a multiple of {TILE} or -1)")
        why = cpu.check_supported(self.base, spec, shape, dtype)
        if why is not None:
            return why
        if not self.available():
            return "this CPU or build has neither AVX-512 VNNI nor AVX2"
        return None

    def available(self) -> bool:
        """The product runs here (AVX-512 VNNI or AVX2)."""
        return i8_available()

    def supports(self, spec: QuantSpec, shape: tuple[int, int], dtype: torch.dtype) -> str | None:
        return self.check_supported(spec, shape, dtype)

    def _check(self, spec: QuantSpec, w: torch.Tensor) -> None:
        why = self.check_supported(spec, tuple(w.shape), w.dtype)
        if why is not None:
            raise ValueError(f"layout {self.layout!r} cannot pack this weight: {why}")

    half_params = True  # pack / pack_into take ``half_params`` (float16 scale / zero)

    def pack(self, w, s, spec, b, a, half_params: bool | None = None) -> PackedWeight:
        self._check(spec, w)
        return cpu.pack(self.layout, w, s, spec, b, a, half_params)

    def pack_into(self, out, w, s, spec, b, a, half_params: bool | None = None) -> PackedWeight:
        self._check(spec, w)
        return cpu.pack_into(out, w, s, spec, b, a, half_params)

    def linear(self, x, packed, s=None, bias=None, b=None, a=None) -> torch.Tensor:
        """``deq(packed) @ (x / s) + B (A x) + bias`` with int8-rounded ``x / s``; (..., d_in) -> (..., d_out)."""
        if not self.available():
            raise RuntimeError(f"packed weight in layout {self.layout!r} needs the ttq C++ extension with AVX-512 "
                               f"VNNI or AVX2 ({cpu_build.error() or 'not available on this CPU'}); "
                               f"repack with layout=None")
        # prefill-sized x: the tiled dense path, in bfloat16 where the CPU has it (module docstring)
        return cpu.linear(x, packed, s, bias, b, a, op=self.op, dense_bf16=None)

    def decoder(self, packed, s=None, bias=None, b=None, a=None):
        """Prompt mode's decode product (:func:`ttq.kernels.cpu.bind_small_batch` with ``one_token``; None
        for inputs it does not take); the whole decoder is None when the int8 kernels cannot run here
        (:meth:`available`)."""
        if not self.available():
            return None
        return cpu.bind_small_batch(self.op, packed, s, bias, b, a, one_token=True)

    def unpack(self, packed) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return cpu.unpack(dataclasses.replace(packed, layout=self.base))


KERNELS = {
    k.layout: k
    for k in (
        CpuI8Kernel("cpu_q4_i8", "cpu_q4", "packed_mm_q4i8"),
        CpuI8Kernel("cpu_q8_i8", "cpu_q8", "packed_mm_q8i8"),
    )
}
for _layout, _kernel in KERNELS.items():
    register_kernel(_layout, "cpu", priority=PRIORITY)(_kernel)
