"""CUDA/Triton kernels (ttq.kernels.triton_quant, triton_matmul, cuda_register) against the oracle.

Skipped without a CUDA device or without Triton.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

from ttq.formats.affine import QuantSpec, quantize  # noqa: E402
from ttq.kernels.api import pack_ttq, packed_linear, unpack  # noqa: E402
from ttq.kernels.reference import reference_linear, reference_pack  # noqa: E402

DEV = "cuda"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def _scale(d_in: int, gen: torch.Generator, extreme: bool = False) -> torch.Tensor:
    s = torch.rand(d_in, generator=gen) * 2 + 0.1
    if extreme:
        s[::7] = 1e-5
        s[3::11] = 1e5
    return s.to(DEV)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("g", [16, 32, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fused_quant_codes_equal_reference(bits, g, dtype):
    from ttq.kernels.triton_quant import quantize_words, unpack_words

    gen = torch.Generator().manual_seed(bits * 100 + g)
    d_out, d_in = 37, 200 + g // 2  # odd rows, a short last group, a partial last word
    w = torch.randn(d_out, d_in, generator=gen).to(dtype).to(DEV)
    w[5, :g] = 0.0  # a zero-range group (W s is constant there)
    s = _scale(d_in, gen, extreme=True)
    words, scale, zero, _ = quantize_words(w, s, bits, g)
    # reference on the CPU: torch on CUDA divides by a Python scalar through its reciprocal (1 ulp off)
    c_ref, s_ref, z_ref = quantize((w.float() * s).cpu(), QuantSpec(bits=bits, group_size=g))
    assert torch.equal(unpack_words(words, bits, d_in).cpu(), c_ref)
    assert torch.equal(scale.cpu(), s_ref) and torch.equal(zero.cpu(), z_ref)
    assert c_ref[5, :g].eq(0).all() and scale[5, 0].item() == 0.0


@pytest.mark.parametrize("symmetric,nu", [(True, 1.0), (False, 0.9), (False, 1.3)])
def test_fused_quant_symmetric_and_range(symmetric, nu):
    from ttq.kernels.triton_quant import quantize_words, unpack_words

    gen = torch.Generator().manual_seed(1)
    w = torch.randn(64, 256, generator=gen).to(DEV)
    s = _scale(256, gen)
    words, scale, zero, _ = quantize_words(w, s, 4, 32, symmetric=symmetric, nu=nu)
    c_ref, s_ref, z_ref = quantize(w * s, QuantSpec(bits=4, group_size=32, symmetric=symmetric, nu=nu))
    c = unpack_words(words, 4, 256)
    assert (c.int() - c_ref.int()).abs().max().item() <= 1
    assert (c != c_ref).float().mean().item() < 1e-3  # fma contraction may move a tie
    assert _rel(scale, s_ref) < 1e-6 and _rel(zero, z_ref) < 1e-6


def test_fused_quant_lowrank_residual():
    from ttq.kernels.triton_quant import quantize_words, unpack_words

    gen = torch.Generator().manual_seed(2)
    w = torch.randn(96, 320, generator=gen).to(DEV)
    b, a = (torch.randn(96, 16, generator=gen) * 0.3).to(DEV), (torch.randn(16, 320, generator=gen) * 0.3).to(DEV)
    s = _scale(320, gen)
    words, scale, zero, _ = quantize_words(w, s, 4, 32, b, a)
    c_ref, s_ref, z_ref = quantize((w - b @ a) * s, QuantSpec(bits=4, group_size=32))
    c = unpack_words(words, 4, 320)
    assert (c.int() - c_ref.int()).abs().max().item() <= 1
    assert (c != c_ref).float().mean().item() < 2e-3
    assert _rel(scale, s_ref) < 1e-5 and _rel(zero, z_ref) < 1e-5


@pytest.mark.parametrize("layout", ["cuda_triton", "cuda_aten_int4"])
@pytest.mark.parametrize("x_dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m", [1, 3, 40])
@pytest.mark.parametrize("rank", [0, 16])
def test_packed_linear_matches_oracle(layout, x_dtype, m, rank):
    gen = torch.Generator().manual_seed(m * 10 + rank)
    d_out, d_in = (264, 384) if layout == "cuda_aten_int4" else (131, 300)
    w = (torch.randn(d_out, d_in, generator=gen) * 0.05).to(x_dtype).to(DEV)
    s = _scale(d_in, gen)
    b = (torch.randn(d_out, rank, generator=gen) * 0.05).to(x_dtype).to(DEV) if rank else None
    a = (torch.randn(rank, d_in, generator=gen) * 0.05).to(x_dtype).to(DEV) if rank else None
    bias = torch.randn(d_out, generator=gen).to(x_dtype).to(DEV)
    spec = QuantSpec(bits=4, group_size=32)
    packed = pack_ttq(w, s, spec, b, a, layout=layout)
    assert packed.layout == layout
    x = torch.randn(2, m, d_in, generator=gen).to(x_dtype).to(DEV)
    y = packed_linear(x, packed, s, bias, b, a)
    ref = reference_linear(x.float(), packed, s, bias.float(), None if b is None else b.float(),
                           None if a is None else a.float())
    assert y.shape == (2, m, d_out) and y.dtype == x_dtype and torch.isfinite(y).all()
    tol = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[x_dtype]
    if layout == "cuda_aten_int4":
        tol = max(tol, 1.5e-2)  # bf16 activations and bf16 scale/zero inside tinygemm
    assert _rel(y, ref) < tol


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_triton_pack_codes_and_params_match_reference_pack(bits):
    gen = torch.Generator().manual_seed(bits)
    w = torch.randn(75, 257, generator=gen).half().to(DEV)
    s = _scale(257, gen, extreme=True)
    spec = QuantSpec(bits=bits, group_size=64)
    packed = pack_ttq(w, s, spec, layout="cuda_triton")
    codes, scale, zero = unpack(packed)
    ref = reference_pack(w.cpu(), s.cpu(), spec)  # CPU: exact division, like the kernel
    assert torch.equal(codes.cpu(), ref.qweight)
    scale, zero = scale.cpu(), zero.cpu()
    assert _rel(scale, ref.scale) < 1e-3 and _rel(zero, ref.zero) < 1e-3  # float16 storage of S/n_g, Z/n_g


def test_extreme_scale_output_matches_oracle():
    gen = torch.Generator().manual_seed(3)
    d_out, d_in = 128, 512
    w = (torch.randn(d_out, d_in, generator=gen) * 0.05).to(DEV)
    s = _scale(d_in, gen, extreme=True)
    for layout in ("cuda_triton", "cuda_aten_int4"):
        packed = pack_ttq(w, s, QuantSpec(bits=4, group_size=32), layout=layout)
        x = torch.randn(1, d_in, generator=gen).to(DEV)
        y = packed_linear(x, packed, s)
        ref = reference_linear(x, packed, s)
        assert torch.isfinite(y).all()
        assert _rel(y, ref) < (1e-3 if layout == "cuda_triton" else 2e-2), layout


def test_zero_range_rows_are_exact():
    w = torch.full((16, 128), 0.5, device=DEV)
    w[8:] = -1.25
    s = torch.ones(128, device=DEV)
    packed = pack_ttq(w, s, QuantSpec(bits=4, group_size=32), layout="cuda_triton")
    codes, scale, zero = unpack(packed)
    assert codes.eq(0).all() and scale.eq(0).all()
    x = torch.randn(1, 128, device=DEV)
    assert torch.allclose(packed_linear(x, packed, s), x @ w.T, rtol=1e-5, atol=1e-4)


def test_default_selection_and_fallbacks():
    w = torch.randn(64, 128, device=DEV)
    s = torch.ones(128, device=DEV)
    assert pack_ttq(w, s, QuantSpec(bits=4, group_size=32)).layout == "cuda_aten_int4"  # preferred for 4-bit
    assert pack_ttq(w, s, QuantSpec(bits=2, group_size=32)).layout == "cuda_triton"
    assert pack_ttq(w[:, :100], s[:100], QuantSpec(bits=4, group_size=32)).layout == "cuda_triton"
    assert pack_ttq(w, s, QuantSpec(bits=3, group_size=32)).layout == "u8"  # 3-bit: reference with a logged line
    with pytest.raises(ValueError, match="bits=3"):
        pack_ttq(w, s, QuantSpec(bits=3, group_size=32), layout="cuda_triton")
    with pytest.raises(ValueError, match="tinygemm"):
        pack_ttq(w[:, :100], s[:100], QuantSpec(bits=4, group_size=32), layout="cuda_aten_int4")


def test_large_rank_falls_back_to_precomputed_residual():
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(128, 128, generator=gen).to(DEV)
    b, a = torch.randn(128, 80, generator=gen).to(DEV) * 0.1, torch.randn(80, 128, generator=gen).to(DEV) * 0.1
    s = _scale(128, gen)
    packed = pack_ttq(w, s, QuantSpec(bits=4, group_size=32), b, a, layout="cuda_triton")
    x = torch.randn(1, 128, generator=gen).to(DEV)
    assert _rel(packed_linear(x, packed, s, None, b, a), reference_linear(x, packed, s, None, b, a)) < 1e-4


@pytest.mark.parametrize("layout", ["cuda_triton", "cuda_aten_int4"])
def test_pack_into_reuses_buffers_and_matches_fresh_pack(layout):
    gen = torch.Generator().manual_seed(5)
    w = (torch.randn(128, 256, generator=gen) * 0.05).half().to(DEV)
    spec = QuantSpec(bits=4, group_size=32)
    first = pack_ttq(w, _scale(256, gen), spec, layout=layout)
    ptrs = [first.qweight.data_ptr(), first.scale.data_ptr(), first.zero.data_ptr()]
    s2 = _scale(256, gen)
    again = pack_ttq(w, s2, spec, layout=layout, out=first)
    fresh = pack_ttq(w, s2, spec, layout=layout)
    assert [again.qweight.data_ptr(), again.scale.data_ptr(), again.zero.data_ptr()] == ptrs
    assert torch.equal(again.qweight, fresh.qweight) and torch.equal(again.scale, fresh.scale)
    assert torch.equal(again.zero, fresh.zero)
