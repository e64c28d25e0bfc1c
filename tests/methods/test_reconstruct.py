"""The tensor math of learned weight adjustment (src/ttq/methods/reconstruct.py): the straight-through fake
quantizer against ttq's integer format, LWC, the SDE band map, and Theorem 1 (SDE generalises LSI)."""

from __future__ import annotations

import math

import pytest
import torch

from ttq.formats.affine import QuantSpec, dequantize, int_params, qdq, quantize
from ttq.methods.reconstruct import (
    LWC_INIT,
    adjusted_weight,
    band_matrix,
    band_positions,
    band_size,
    clip_range,
    fake_quant,
    round_ste,
    svd_basis,
    ttq_fake_quant,
)
from ttq.methods.scaling import ScaleSpec
from ttq.methods.ttq import ttq_qdq, ttq_scale


def _weight(d_out: int, d_in: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(seed)) / d_in**0.5).to(dtype)


SPECS = [QuantSpec(3, 32), QuantSpec(2, 64), QuantSpec(4, 24), QuantSpec(3, -1), QuantSpec(4, 32, symmetric=True),
         QuantSpec(3, 32, nu=0.9)]
SHAPES = [(24, 96), (96, 40), (64, 64)]  # wide (transposed), tall, square
DTYPES = [torch.float32, torch.bfloat16]


def _id(s: QuantSpec) -> str:
    return f"q{s.bits}g{s.group_size}{'s' if s.symmetric else ''}{'' if s.nu == 1 else f'nu{s.nu}'}"


def test_round_ste_rounds_forward_and_passes_the_gradient():
    x = torch.tensor([0.2, 0.5001, 1.49, -2.7], requires_grad=True)
    y = round_ste(x)
    assert torch.equal(y, torch.round(x.detach()))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(4))


@pytest.mark.parametrize("spec", SPECS, ids=_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_min_max_ranges_and_fake_quant_equal_the_integer_format(spec: QuantSpec, dtype: torch.dtype):
    """No clipping: clip_range is int_params, and the fake quantizer gives qdq's values bit for bit."""
    w = _weight(20, 100, 1, dtype)  # 100 = 3 x 32 + 4: a short last group
    scale, zero = clip_range(w.float(), spec)
    ref_s, ref_z = int_params(w, spec)
    assert torch.equal(scale, ref_s) and torch.equal(zero, ref_z)
    assert torch.equal(fake_quant(w.float(), spec, scale, zero), qdq(w.float(), spec))


@pytest.mark.parametrize("spec", SPECS, ids=_id)
def test_learned_clipping_codes_reproduce_the_fake_quantized_weight(spec: QuantSpec):
    """LWC: sigmoid(logit) scales each group's max / min; codes with those ranges dequantize to fake_quant."""
    w = _weight(16, 96, 2)
    ng = int_params(w, spec)[0].shape[1]
    g = torch.Generator().manual_seed(3)
    up, low = torch.randn(16, ng, generator=g) + 2, torch.randn(16, ng, generator=g) + 2
    scale, zero = clip_range(w, spec, up, low)
    w_hat = fake_quant(w, spec, scale, zero)
    codes, s2, z2 = quantize(w, spec, scale=scale, zero=zero)
    assert int(codes.max()) <= spec.qmax
    assert torch.allclose(dequantize(codes, s2, z2, spec.group_size), w_hat, atol=1e-6)
    init = torch.full((16, ng), LWC_INIT)
    s_init, _ = clip_range(w, spec, init, init)
    assert math.isclose(torch.sigmoid(torch.tensor(LWC_INIT)).item(), 0.982, abs_tol=1e-3)
    if spec.nu == 1:  # the range shrinks by sigmoid(4) = 0.982 at start
        assert torch.allclose(s_init, torch.sigmoid(torch.tensor(LWC_INIT)) * int_params(w, spec)[0], rtol=1e-5)


def test_fake_quant_gradient_is_straight_through():
    spec = QuantSpec(3, 32)
    w = _weight(8, 64, 4).requires_grad_(True)
    scale, zero = (t.detach() for t in clip_range(w.detach(), spec))
    fake_quant(w, spec, scale, zero).sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))  # min-max ranges: every weight is inside its range
    up = torch.full((8, 2), LWC_INIT, requires_grad=True)
    low = torch.full((8, 2), LWC_INIT, requires_grad=True)
    w2 = w.detach().clone().requires_grad_(True)
    (fake_quant(w2, spec, *clip_range(w2, spec, up, low)) - w2.detach()).square().sum().backward()
    assert up.grad.abs().sum() > 0 and low.grad.abs().sum() > 0  # the clipping logits learn
    w3 = w.detach().clone().requires_grad_(True)
    half = torch.zeros(8, 2)  # sigmoid(0) = 0.5: half the range clipped
    scale, zero = clip_range(w3.detach(), spec, half, half)
    fake_quant(w3, spec, scale, zero).sum().backward()
    lo, hi = zero.repeat_interleave(32, 1), (zero + spec.qmax * scale).repeat_interleave(32, 1)
    outside = ((w3 - lo) / scale.repeat_interleave(32, 1) < -0.5) | ((w3 - hi) / scale.repeat_interleave(32, 1) > 0.5)
    assert outside.any() and torch.equal(w3.grad, (~outside).float())  # clamped weights: no gradient


@pytest.mark.parametrize("spec", SPECS[:3], ids=_id)
def test_ttq_fake_quant_is_ttq_qdq(spec: QuantSpec):
    w, x = _weight(24, 96, 5), torch.randn(1, 50, 96, generator=torch.Generator().manual_seed(6))
    sc = ScaleSpec()
    ref = ttq_qdq(w, x, spec, sc)
    assert torch.allclose(ttq_fake_quant(w, ttq_scale(x, sc), spec), ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("a, b, n", [(6, 4, 2), (5, 5, 3), (9, 3, 100), (4, 4, 0)])
def test_band_map_places_the_diagonals(a: int, b: int, n: int):
    """Row 0 -> main diagonal, row 2k-1 -> k-th upper, row 2k -> k-th lower (rows b.. of D use U beyond rank b)."""
    n_used = min(n, a - 1)
    flat, pick = band_positions(a, b, n_used)
    rows = 2 * n_used + 1
    inc = torch.arange(1, rows * b + 1, dtype=torch.float32).reshape(rows, b)
    a_used = min(a, b + n_used)

    class _B:  # the two attributes band_matrix reads
        u = torch.zeros(a, a_used)
        vh = torch.zeros(b, b)

    _B.flat, _B.pick, _B.b = flat, pick, b
    d = band_matrix(inc, _B)
    assert d.shape == (a_used, b)
    expect = torch.zeros(a_used, b)
    for l in range(b):
        expect[l, l] = inc[0, l]
        for k in range(1, n_used + 1):
            if l - k >= 0:
                expect[l - k, l] = inc[2 * k - 1, l]
            if l + k < a_used:
                expect[l + k, l] = inc[2 * k, l]
    assert torch.equal(d, expect)
    j, col = torch.meshgrid(torch.arange(a_used), torch.arange(b), indexing="ij")
    assert torch.all(d[(j - col).abs() > n_used] == 0)
    assert band_size(a, b, n) == int((expect != 0).sum()) == flat.numel()


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("n", [0, 3, 100])
def test_adjusted_weight_is_the_papers_formula(shape, n: int):
    """``W + U Map(I^D) V`` equals eq. 4's ``U (diag(S) + Map(I^D)) V`` (its own full SVD), in the weight's
    orientation; for LSI (n = 0) also with an independent float64 SVD (sign flips of singular pairs cancel)."""
    w = _weight(*shape, seed=7)
    basis = svd_basis(w, n)
    m = w.T if shape[0] < shape[1] else w
    a, b = m.shape
    assert basis.transposed == (shape[0] < shape[1]) and basis.n == min(n, a - 1)
    assert basis.u.shape == (a, min(a, b + basis.n)) and basis.vh.shape == (b, b)
    inc = torch.randn(basis.rows, b, generator=torch.Generator().manual_seed(8)) * 0.1
    d = torch.zeros(basis.u.shape[1], b)  # rows of D beyond a' are zero: U D only needs U's first a' columns
    d[:b, :b] = torch.diag(basis.s)
    d = d + (band_matrix(inc, basis) if basis.n else torch.diag(inc[0]))
    literal = basis.u @ d @ basis.vh  # eq. 4
    ours = adjusted_weight(w, basis, inc)
    assert ours.shape == w.shape
    assert torch.allclose(ours.T if basis.transposed else ours, literal, atol=1e-5)
    if n == 0:
        u, s, vh = torch.linalg.svd(m.double(), full_matrices=False)
        ref = (u * (s + inc[0].double())) @ vh
        assert torch.allclose((ours.T if basis.transposed else ours).double(), ref, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_theorem1_sde_with_zero_off_diagonals_is_lsi(shape, dtype):
    """Theorem 1: the SDE parameterisation with its off-diagonal rows at zero is LSI's; zero increments give W."""
    w = _weight(*shape, seed=9, dtype=dtype)
    lsi, sde = svd_basis(w, 0), svd_basis(w, 100)
    assert lsi.rows == 1 and sde.rows == 2 * sde.n + 1 and sde.n == max(shape) - 1
    delta = torch.randn(lsi.b, generator=torch.Generator().manual_seed(10)) * 0.05
    inc = torch.zeros(sde.rows, sde.b)
    inc[0] = delta
    w_lsi, w_sde = adjusted_weight(w, lsi, delta[None]), adjusted_weight(w, sde, inc)
    assert torch.allclose(w_sde, w_lsi, atol=1e-6)
    # LSI is U diag(S + S~) V
    m = (w.T if lsi.transposed else w).float()
    ref = (lsi.u * (lsi.s + delta)) @ lsi.vh
    assert torch.allclose((w_lsi.T if lsi.transposed else w_lsi), ref, atol=1e-5)
    assert not torch.allclose(w_lsi, w.float(), atol=1e-4)
    for basis in (lsi, sde):  # zero increments: exactly the weight
        assert torch.equal(adjusted_weight(w, basis, torch.zeros(basis.rows, basis.b)), w.float())
    assert torch.allclose(m, (lsi.u * lsi.s) @ lsi.vh, atol=1e-5)


def test_band_is_capped_by_the_layer_shape():
    w = _weight(8, 3, 11)  # a = 8, b = 3
    basis = svd_basis(w, 100)
    assert basis.n == 7 and basis.size == 8 * 3 and basis.u.shape == (8, 8)  # the band covers all of D
    assert svd_basis(w, 2).u.shape == (8, 5) and svd_basis(w, 2).size == band_size(8, 3, 2) == 3 + 2 + 1 + 3 + 3
    assert svd_basis(w, 0).u.shape == (8, 3) and svd_basis(w, 0).size == 3


@pytest.mark.parametrize("n", [-1, 2.5, True, "3"])
def test_bad_band_width(n):
    with pytest.raises(ValueError, match="non-negative integer"):
        svd_basis(_weight(4, 4), n)


def test_increment_shape_is_checked():
    basis = svd_basis(_weight(6, 4), 1)
    with pytest.raises(ValueError, match=r"expected \(3, 4\)"):
        adjusted_weight(_weight(6, 4), basis, torch.zeros(1, 4))
