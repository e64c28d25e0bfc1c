"""Tests of the Appendix E low-rank variants (src/ttq/methods/lowrank_variants.py)."""

from __future__ import annotations

import pytest
import torch

from ttq.formats.affine import QuantSpec, qdq
from ttq.methods.lowrank import residual, svd_factors
from ttq.methods.lowrank_variants import (
    alternating_factors,
    asvd_factors,
    compress_factors,
    factor_masks,
    quantization_error,
    quantize_factors,
    shrunk_correlation,
    sqrt_pair,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _weight(d_out: int, d_in: int, seed: int) -> torch.Tensor:
    g = _gen(seed)
    low = torch.randn(d_out, 4, generator=g) @ torch.randn(4, d_in, generator=g)  # a strong rank-4 part
    return (low + torch.randn(d_out, d_in, generator=g)) / d_in**0.5


def _acts(t: int, d: int, seed: int) -> torch.Tensor:
    g = _gen(seed)
    return torch.randn(t, d, generator=g) * torch.exp(torch.randn(d, generator=g))


# ---------------------------------------------------------------- correlation and square roots


def test_shrunk_correlation_endpoints() -> None:
    x = _acts(200, 16, 0)
    gram = x.T @ x
    c = gram / 200
    torch.testing.assert_close(shrunk_correlation(gram, 0.0, 200), c)
    eta = torch.diagonal(c).mean()
    torch.testing.assert_close(shrunk_correlation(gram, 1.0, 200), eta * torch.eye(16))
    torch.testing.assert_close(shrunk_correlation(gram, 0.3, 200, diagonal=True), 0.7 * torch.diagonal(c) + 0.3 * eta)


def test_sqrt_pair_inverts_and_survives_ill_conditioning() -> None:
    x = _acts(100, 12, 1)
    c = shrunk_correlation(x.T @ x, 0.1, 100)
    half, inv = sqrt_pair(c)
    torch.testing.assert_close(half @ half, c, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(half @ inv, torch.eye(12), rtol=1e-3, atol=1e-3)
    # rank-1 correlation (singular): floored, finite, and the condition number is bounded by 1 / EIG_FLOOR
    v = torch.randn(12, generator=_gen(2))
    half, inv = sqrt_pair(torch.outer(v, v))
    assert torch.isfinite(half).all() and torch.isfinite(inv).all()
    ev = torch.linalg.eigvalsh(half @ half)
    assert float(ev.max() / ev.min().clamp_min(1e-30)) < 2e6  # 1e6 up to float32 round-off
    # all-zero correlation -> identity
    h0, i0 = sqrt_pair(torch.zeros(5, 5))
    torch.testing.assert_close(h0, torch.eye(5))
    torch.testing.assert_close(i0, torch.eye(5))


# ---------------------------------------------------------------- ASVD


@pytest.mark.parametrize("rank", [1, 4, 8])
@pytest.mark.parametrize("diagonal", [False, True])
def test_asvd_with_identity_is_svd(rank: int, diagonal: bool) -> None:
    w = _weight(24, 32, rank)
    corr = torch.ones(32) if diagonal else torch.eye(32)
    b, a = asvd_factors(w, rank, corr)
    b0, a0 = svd_factors(w, rank)
    torch.testing.assert_close(b @ a, b0 @ a0, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b.abs(), b0.abs(), rtol=1e-4, atol=1e-5)  # same factors up to column signs
    torch.testing.assert_close(a.abs(), a0.abs(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("lam", [0.0, 0.1, 0.5])
def test_asvd_minimises_the_activation_weighted_error(lam: float) -> None:
    w, x = _weight(20, 16, 3), _acts(300, 16, 4)
    c = shrunk_correlation(x.T @ x, lam, 300)
    half, _ = sqrt_pair(c)
    b, a = asvd_factors(w, 4, c)
    b0, a0 = svd_factors(w, 4)
    err = float(((w - b @ a) @ half).norm())
    err_svd = float(((w - b0 @ a0) @ half).norm())
    optimum = float(torch.linalg.svdvals(w @ half)[4:].square().sum().sqrt())  # Eckart-Young in the C-norm
    assert err == pytest.approx(optimum, rel=1e-3)
    assert err <= err_svd + 1e-6


def test_asvd_rank_zero_and_bad_input() -> None:
    w = _weight(8, 16, 5)
    b, a = asvd_factors(w, 0, torch.eye(16))
    assert b.shape == (8, 0) and a.shape == (0, 16)
    with pytest.raises(ValueError, match=r"correlation has shape \(15,\), expected \(16,\) or \(16, 16\)"):
        asvd_factors(w, 2, torch.ones(15))
    with pytest.raises(ValueError, match="rank must be an integer in 0..8"):
        asvd_factors(w, 9, torch.eye(16))
    with pytest.raises(ValueError, match=r"lam must be in \[0, 1\]"):
        shrunk_correlation(torch.eye(4), 1.5, 10)
    with pytest.raises(ValueError, match="square"):
        shrunk_correlation(torch.ones(4, 3), 0.1, 10)
    with pytest.raises(ValueError, match="at least one token"):
        shrunk_correlation(torch.eye(4), 0.1, 0)
    with pytest.raises(ValueError, match="NaN/Inf"):
        shrunk_correlation(torch.full((4, 4), float("nan")), 0.1, 3)


# ---------------------------------------------------------------- alternating (eqs. 34-35)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("seed", [0, 1])
def test_alternating_never_worse_than_svd_init(bits: int, seed: int) -> None:
    w = _weight(32, 64, seed)
    spec = QuantSpec(bits=bits, group_size=16)
    b, a, errors = alternating_factors(w, 4, spec, iters=6)
    b0, a0 = svd_factors(w, 4)
    init = quantization_error(w, b0, a0, spec)
    assert len(errors) == 7 and errors[0] == pytest.approx(init)
    final = quantization_error(w, b, a, spec)
    assert final <= init + 1e-6
    assert final == pytest.approx(min(errors), rel=1e-6)


def test_alternating_zero_iters_is_svd_and_scaled_variant() -> None:
    w = _weight(16, 32, 2)
    spec = QuantSpec(bits=3, group_size=8)
    b, a, errors = alternating_factors(w, 3, spec, iters=0)
    b0, a0 = svd_factors(w, 3)
    assert torch.equal(b, b0) and torch.equal(a, a0) and len(errors) == 1
    s = torch.linspace(0.5, 2.0, 32)
    b, a, errors = alternating_factors(w, 3, spec, iters=3, s=s)
    assert quantization_error(w, b, a, spec, s) <= errors[0] + 1e-6
    with pytest.raises(ValueError, match="iters must be a non-negative integer"):
        alternating_factors(w, 3, spec, iters=-1)


# ---------------------------------------------------------------- quantized and pruned factors


@pytest.mark.parametrize("which", ["A", "B", "both"])
@pytest.mark.parametrize("bits", [3, 4, 8])
def test_quantized_factor_error_bound(which: str, bits: int) -> None:
    b, a = svd_factors(_weight(24, 48, bits), 8)
    spec = QuantSpec(bits=bits, group_size=8)
    bq, aq = quantize_factors(b, a, spec, which)
    for name, f, fq in (("A", a, aq), ("B", b, bq)):
        if which in (name, "both"):
            g = f.reshape(f.shape[0], -1, 8)  # groups of 8 along the factor's input dim
            half_step = ((g.amax(-1) - g.amin(-1)) / (2**bits - 1) / 2).repeat_interleave(8, dim=1)
            assert ((f - fq).abs() <= half_step + 1e-6).all()
            assert not torch.equal(f, fq)
        else:
            assert torch.equal(f, fq)
    assert torch.equal(compress_factors(b, a, spec, which)[0], bq)  # same path without pruning


@pytest.mark.parametrize("which", ["A", "B", "both"])
def test_pruned_factors_exact_sparsity(which: str) -> None:
    b, a = svd_factors(_weight(24, 48, 7), 8)
    bp, ap = compress_factors(b, a, None, "both", 0.5, which)
    for name, f, fp in (("A", a, ap), ("B", b, bp)):
        if which in (name, "both"):
            zeros = (fp == 0).sum(1)
            assert (zeros == f.shape[1] // 2).all()  # exactly 50% per row
            kept_min = torch.where(fp != 0, f.abs(), torch.inf).amin(1)
            dropped_max = torch.where(fp == 0, f.abs(), -torch.inf).amax(1)
            assert (kept_min >= dropped_max).all()  # magnitude: the largest weights survive
        else:
            assert torch.equal(f, fp)


def test_pruned_then_quantized_factors_keep_zeros() -> None:
    b, a = svd_factors(_weight(24, 48, 8), 8)
    bp, ap = compress_factors(b, a, QuantSpec(bits=4, group_size=8), "both", 0.5, "both")
    assert ((bp == 0).sum(1) >= 4).all() and ((ap == 0).sum(1) >= 24).all()
    keep_b, keep_a = factor_masks(b, a, 0.5, "both")
    assert torch.equal(bp[~keep_b], torch.zeros_like(bp[~keep_b]))
    assert torch.equal(ap[~keep_a], torch.zeros_like(ap[~keep_a]))


def test_activation_aware_factor_scores_use_ax_norms() -> None:
    w, x = _weight(16, 32, 9), _acts(200, 32, 10)
    b, a = svd_factors(w, 4)
    gram = x.T @ x
    x_norm = gram.diagonal().sqrt()
    keep_b, keep_a = factor_masks(b, a, 0.5, "both", x_norm, gram)
    ax_norm = (x @ a.T).norm(dim=0)  # ||(A X)_j|| (r,)
    exp_a = torch.topk(a.abs() * x_norm, 16, dim=1).indices.sort(1).values
    exp_b = torch.topk(b.abs() * ax_norm, 2, dim=1).indices.sort(1).values
    assert torch.equal(keep_a.nonzero()[:, 1].reshape(4, 16), exp_a)
    assert torch.equal(keep_b.nonzero()[:, 1].reshape(16, 2), exp_b)


def test_factor_bad_input() -> None:
    b, a = svd_factors(_weight(8, 16, 11), 2)
    with pytest.raises(ValueError, match="which factor"):
        quantize_factors(b, a, QuantSpec(), "C")
    with pytest.raises(ValueError, match=r"sparsity must be a number in \[0, 1\)"):
        compress_factors(b, a, None, "both", 1.0, "both")


def test_residual_absorbs_factor_error() -> None:
    """The module quantizes W - B_hat A_hat, so W = B_hat A_hat + residual exactly (before QDQ)."""
    w = _weight(16, 32, 12)
    b, a = svd_factors(w, 4)
    bq, aq = quantize_factors(b, a, QuantSpec(bits=3, group_size=8), "both")
    torch.testing.assert_close(bq @ aq + residual(w, bq, aq), w)
    assert float((w - bq @ aq - qdq(residual(w, bq, aq), QuantSpec(8, 8))).abs().max()) < 1e-2
