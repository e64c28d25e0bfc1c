"""Fake implementations of the ttq_cpu products (src/ttq/kernels/cpu_fake.py): ``torch.library.opcheck``
compares each fake's output (shape, dtype, device, strides) with the real kernel's on the same arguments."""

from __future__ import annotations

import pytest
import torch

from ttq.formats.affine import QuantSpec
from ttq.kernels import cpu_build
from ttq.kernels.api import pack_ttq
from ttq.methods.lowrank import svd_factors

pytestmark = pytest.mark.skipif(not cpu_build.load(), reason="ttq C++ extension unavailable")


def _args(layout: str, bits: int, rank: int, dtype: torch.dtype, rows: int):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=g)
    s = torch.rand(64, generator=g) + 0.5
    b, a = svd_factors(w, rank) if rank else (None, None)
    packed = pack_ttq(w, s, QuantSpec(bits=bits, group_size=32), b, a, layout=layout)
    x = torch.randn(rows, 64, generator=g).to(dtype)
    bias = torch.randn(48, generator=g)
    head = (x, s, packed.qweight, packed.scale, packed.zero) + (() if layout == "cpu_q4_i8" else (bits,))
    return head + (32, 48, 64, bias, b, a)


@pytest.mark.parametrize("layout,op,bits", [("cpu_q4", "packed_mm", 4), ("cpu_q3", "packed_mm", 3),
                                            ("cpu_q8", "packed_mm", 8), ("cpu_q4_i8", "packed_mm_q4i8", 4),
                                            ("cpu_q8_i8", "packed_mm_q8i8", 8)])
@pytest.mark.parametrize("rank,dtype,rows", [(0, torch.float32, 1), (4, torch.bfloat16, 3)])
def test_fake_matches_the_kernel(layout, op, bits, rank, dtype, rows):
    if layout.endswith("_i8"):
        from ttq.kernels.cpu_i8 import i8_available

        if not i8_available():
            pytest.skip("int8-activation kernels need AVX-512 VNNI or AVX2")
    args = _args(layout, bits, rank, dtype, rows)
    torch.library.opcheck(getattr(torch.ops.ttq_cpu, op).default, args,
                          test_utils=("test_schema", "test_faketensor"))
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = getattr(torch.ops.ttq_cpu, op)(*[mode.from_tensor(t) if isinstance(t, torch.Tensor) else t
                                                 for t in args])
    assert fake.shape == (rows, 48) and fake.dtype == dtype


def test_dequant_fake_shape():
    w = torch.randn(48, 64)
    packed = pack_ttq(w, torch.ones(64), QuantSpec(bits=4, group_size=32), layout="cpu_q4")
    for as_bf16, dtype in ((False, torch.float32), (True, torch.bfloat16)):
        args = (packed.qweight, packed.scale, packed.zero, 4, 32, 48, 64, as_bf16)
        torch.library.opcheck(torch.ops.ttq_cpu.dequant.default, args, test_utils=("test_schema", "test_faketensor"))
        assert torch.ops.ttq_cpu.dequant(*args).dtype == dtype
