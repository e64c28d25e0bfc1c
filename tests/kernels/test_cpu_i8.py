"""The opt-in ``cpu_q4_i8`` kernel (ttq.kernels.cpu_i8, packed_mm_q4i8 in csrc/ttq_cpu.cpp).

Two references:

* :func:`i8_reference` rounds ``x / s`` to int8 exactly as the kernel does (per 32 columns,
  ``sx = absmax / 127``, round half to even) and evaluates the kernel's algebra in float64:
  ``y = sum_i S (q_i - 8) sx xq_i + sum_i (Z + 8 S) x_i / s_i``.  The integer path is exact, so
  the kernel matches it up to float32 summation order (bound 1e-5 relative).
* ``reference_linear`` (dequantize the same codes, float32 ``F.linear``).  Rounding ``x / s`` to
  int8 moves each input by ``|d_i| <= sx / 2``; only the ``S (q - 8)`` part of each weight sees it,
  so ``|y_r - y_ref_r| <= sum_i |S (q_i - 8)| sx_b(i) / 2`` (checked elementwise).  For independent
  uniform rounding errors the expected error is ``sqrt(sum_i (S (q_i - 8))^2 sx^2 / 12)``; with
  Gaussian inputs (absmax of 32 ~ 2.2 sigma) that is ~0.5% of ||y|| (bound 1e-2 asserted).
"""

from __future__ import annotations

import pytest
import torch

from ttq.formats.affine import QuantSpec
from ttq.kernels import cpu_build
from ttq.kernels.api import pack_ttq, packed_linear, registered_layouts, select_layout, unpack
from ttq.kernels.reference import reference_linear
from ttq.methods.lowrank import svd_factors

_OK = cpu_build.load()
if _OK:
    from ttq.kernels.cpu_i8 import vnni_available

    _OK = vnni_available()
pytestmark = pytest.mark.skipif(not _OK, reason="ttq C++ CPU kernels with AVX-512 VNNI unavailable")

LAYOUT = "cpu_q4_i8"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def _int8_acts(xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(xq * sx (..., d_in) float64, sx per column (..., d_in)) as the kernel rounds ``xs``."""
    d_in = xs.shape[-1]
    nb = -(-d_in // 32)
    xp = torch.zeros(*xs.shape[:-1], nb * 32)
    xp[..., :d_in] = xs
    xb = xp.reshape(*xs.shape[:-1], nb, 32)  # (..., nb, 32)
    sx = xb.abs().amax(-1, keepdim=True) / 127  # float32, as the kernel
    xq = torch.where(sx > 0, torch.round(xb / torch.where(sx > 0, sx, torch.ones_like(sx))), torch.zeros_like(xb))
    xd = (xq.double() * sx.double()).reshape(*xs.shape[:-1], nb * 32)[..., :d_in]
    return xd, sx.expand_as(xb).reshape(*xs.shape[:-1], nb * 32)[..., :d_in].double()


def _params(packed):
    codes, scale, zero = unpack(packed)
    d_in = packed.shape[1]
    g = d_in if packed.group_size == -1 or packed.group_size >= d_in else packed.group_size
    gi = torch.arange(d_in) // g
    return codes.double(), scale[:, gi].double(), zero[:, gi].double()  # per column (d_out, d_in)


def i8_reference(x, packed, s=None, bias=None, b=None, a=None) -> torch.Tensor:
    """The kernel's result in float64 (int8-rounded x / s, exact zero-point and rank-r terms)."""
    xf = x.float()
    xs = xf / s.float() if s is not None else xf
    xd, _ = _int8_acts(xs)
    q, S, Z = _params(packed)
    y = xd @ (S * (q - 8)).T + xs.double() @ (Z + 8 * S).T
    if b is not None:
        y = y + (xf.double() @ a.double().T) @ b.double().T
    if bias is not None:
        y = y + bias.double()
    return y


def worst_case_error(x, packed, s=None) -> torch.Tensor:
    """sum_i |S (q_i - 8)| sx_b(i) / 2 per output: the largest |y - y_ref| int8 rounding can cause."""
    xf = x.float()
    xs = xf / s.float() if s is not None else xf
    _, sx = _int8_acts(xs)
    q, S, _ = _params(packed)
    return (sx / 2) @ (S * (q - 8)).abs().T


def _case(d_out, d_in, seed, dtype=torch.float32, s_kind="ones"):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(d_out, d_in, generator=g) * 0.05).to(dtype)
    if s_kind == "ones":
        s = torch.ones(d_in)
    elif s_kind == "random":
        s = torch.rand(d_in, generator=g) * 2 + 0.1
    else:  # extreme: 14 decades
        s = torch.rand(d_in, generator=g) * 2 + 0.1
        s[::7] = 1e-7
        s[3::11] = 1e7
    return w, s, g


SHAPES = [(45, 300, 32), (37, 200, -1), (33, 1000, 64), (19, 96, 96), (70, 544, 128), (5, 4096, 32)]


@pytest.mark.parametrize("d_out,d_in,group_size", SHAPES)
@pytest.mark.parametrize("n_tokens", [1, 3, 5])
@pytest.mark.parametrize("s_kind", ["ones", "random"])
def test_integer_path_is_exact(d_out, d_in, group_size, n_tokens, s_kind):
    w, s, g = _case(d_out, d_in, d_in + n_tokens, s_kind=s_kind)
    packed = pack_ttq(w, s, QuantSpec(bits=4, group_size=group_size), layout=LAYOUT)
    x = torch.randn(n_tokens, d_in, generator=g)
    y = packed_linear(x, packed, s)
    assert y.shape == (n_tokens, d_out) and y.dtype == torch.float32
    assert _rel(y, i8_reference(x, packed, s)) < 1e-5  # float32 sums in another order


@pytest.mark.parametrize("d_out,d_in,group_size", SHAPES)
def test_error_vs_exact_reference_is_int8_rounding(d_out, d_in, group_size):
    w, s, g = _case(d_out, d_in, 3 * d_in)
    packed = pack_ttq(w, s, QuantSpec(bits=4, group_size=group_size), layout=LAYOUT)
    x = torch.randn(3, d_in, generator=g)
    y, y_ref = packed_linear(x, packed, s), reference_linear(x, packed, s)
    rel = _rel(y, y_ref)
    assert 1e-4 < rel < 1e-2  # nonzero (x really is rounded) and within the derived bound
    bound = worst_case_error(x, packed, s)
    assert ((y.double() - y_ref.double()).abs() <= bound + 1e-5 * y_ref.abs().max()).all()


def test_large_batch_uses_exact_path():
    w, s, g = _case(40, 300, 1, s_kind="random")
    packed = pack_ttq(w, s, QuantSpec(bits=4, group_size=32), layout=LAYOUT)
    x = torch.randn(2, 20, 300, generator=g)  # 40 tokens > cpu.SMALL_BATCH
    y = packed_linear(x, packed, s)
    assert y.shape == (2, 20, 40)
    assert _rel(y, reference_linear(x, packed, s)) < 1e-5


def test_packed_tensors_are_cpu_q4():
    w, s, _ = _case(37, 200, 2, s_kind="random")
    spec = QuantSpec(bits=4, group_size=32)
    p8, p4 = pack_ttq(w, s, spec, layout=LAYOUT), pack_ttq(w, s, spec, layout="cpu_q4")
    assert p8.layout == LAYOUT and p4.layout == "cpu_q4"
    assert torch.equal(p8.qweight, p4.qweight) and torch.equal(p8.scale, p4.scale) and torch.equal(p8.zero, p4.zero)
    for t8, t4 in zip(unpack(p8), unpack(p4)):
        assert torch.equal(t8, t4)
    out = pack_ttq(w * 2, s, spec, layout=LAYOUT, out=p8)  # pack_into reuses the buffers
    assert out.qweight.data_ptr() == p8.qweight.data_ptr()
    assert torch.equal(out.scale, pack_ttq(w * 2, s, spec, layout="cpu_q4").scale)


def test_zero_range_groups():
    w, s, g = _case(9, 128, 4)
    w[:, :32] = 0.3  # every row's first group is constant: S = 0, W_hat = Z exactly
    w[2] = -1.0  # a whole constant row
    packed = pack_ttq(w, s, QuantSpec(bits=4, group_size=32), layout=LAYOUT)
    assert (unpack(packed)[1][:, 0] == 0).all()
    x = torch.randn(1, 128, generator=g)
    y = packed_linear(x, packed, s)
    assert _rel(y, i8_reference(x, packed, s)) < 1e-5
    assert abs(y[0, 2].item() - (-x.sum()).item()) < 1e-4  # constant row: only the exact zero-point term


def test_zero_input_block_and_zero_input():
    w, s, g = _case(8, 96, 5)
    packed = pack_ttq(w, s, QuantSpec(bits=4, group_size=32), layout=LAYOUT)
    x = torch.randn(1, 96, generator=g)
    x[0, 32:64] = 0  # absmax 0: sx = 0, the block contributes nothing
    assert _rel(packed_linear(x, packed, s), i8_reference(x, packed, s)) < 1e-5
    assert torch.equal(packed_linear(torch.zeros(1, 96), packed, s), torch.zeros(1, 8))


def test_extreme_scale():
    w, s, g = _case(21, 300, 6, s_kind="extreme")
    packed = pack_ttq(w, s, QuantSpec(bits=4, group_size=32), layout=LAYOUT)
    x = torch.randn(2, 300, generator=g)
    y = packed_linear(x, packed, s)
    assert torch.isfinite(y).all()
    assert _rel(y, i8_reference(x, packed, s)) < 1e-5
    bound = worst_case_error(x, packed, s)
    y_ref = reference_linear(x, packed, s)
    assert ((y.double() - y_ref.double()).abs() <= bound + 1e-5 * y_ref.abs().max()).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_weights_and_inputs(dtype):
    w, s, g = _case(33, 320, 7, dtype=dtype, s_kind="random")
    packed = pack_ttq(w, s, QuantSpec(bits=4, group_size=64), layout=LAYOUT)
    x = torch.randn(3, 320, generator=g).to(dtype)
    y = packed_linear(x, packed, s)
    assert y.dtype == dtype and y.shape == (3, 33)
    eps = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11  # output rounding to x's dtype
    assert _rel(y, i8_reference(x, packed, s)) < eps


def test_lowrank_and_bias():
    w, s, g = _case(48, 256, 8, s_kind="random")
    b, a = (f.contiguous() for f in svd_factors(w, 16))
    bias = torch.randn(48, generator=g)
    packed = pack_ttq(w, s, QuantSpec(bits=4, group_size=32), b, a, layout=LAYOUT)
    for n in (1, 3):
        x = torch.randn(n, 256, generator=g)
        y = packed_linear(x, packed, s, bias, b, a)
        assert _rel(y, i8_reference(x, packed, s, bias, b, a)) < 1e-5
        y_ref = reference_linear(x, packed, s, bias, b, a)  # random s: x / s is heavy-tailed, use the bound
        bound = worst_case_error(x, packed, s)
        assert ((y.double() - y_ref.double()).abs() <= bound + 1e-5 * y_ref.abs().max()).all()


def test_half_params(monkeypatch):
    monkeypatch.setenv("TTQ_HALF_PARAMS", "1")
    w, s, g = _case(20, 256, 9, s_kind="random")
    packed = pack_ttq(w, s, QuantSpec(bits=4, group_size=32), layout=LAYOUT)
    assert packed.scale.dtype == torch.float16
    x = torch.randn(1, 256, generator=g)
    assert _rel(packed_linear(x, packed, s), i8_reference(x, packed, s)) < 1e-5


def test_default_selection_keeps_exact_kernel():
    assert LAYOUT in registered_layouts("cpu")
    spec = QuantSpec(bits=4, group_size=32)
    assert select_layout(spec, (64, 256), "cpu", torch.float32) == "cpu_q4"
    w, s, _ = _case(16, 128, 10)
    assert pack_ttq(w, s, spec).layout == "cpu_q4"
    assert pack_ttq(w, s, spec, strict=True).layout == "cpu_q4"


@pytest.mark.parametrize("bits,group_size,match", [(3, 32, "4-bit"), (8, 32, "4-bit"), (4, 16, "multiple of 32"),
                                                   (4, 48, "multiple of 32")])
def test_unsupported_combinations_raise(bits, group_size, match):
    w, s, _ = _case(8, 128, 11)
    with pytest.raises(ValueError, match=match):
        pack_ttq(w, s, QuantSpec(bits=bits, group_size=group_size), layout=LAYOUT)
    # layout=None is unaffected: another kernel (or the reference) serves it
    assert pack_ttq(w, s, QuantSpec(bits=bits, group_size=group_size)).layout != LAYOUT
