"""Tests of the weight methods: RTN, AWQ search/apply, TTQ and the low-rank split (src/ttq/methods/*)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ttq.formats.affine import QuantSpec, qdq
from ttq.methods.awq import DEFAULT_ALPHAS, awq_apply, awq_search, output_error
from ttq.methods.lowrank import check_rank, residual, svd_factors
from ttq.methods.rtn import rtn
from ttq.methods.scaling import ChannelStats, ScaleSpec, input_scale, scaled_qdq, scaled_quantize
from ttq.methods.ttq import ttq_linear, ttq_qdq, ttq_quantize, ttq_scale
from ttq.nn.linear import TTQLinear


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _skewed_acts(t: int, d: int, seed: int) -> torch.Tensor:
    """(t, d) activations whose channel magnitudes are log-normal (a few loud channels, as in LLMs)."""
    g = _gen(seed)
    return torch.randn(t, d, generator=g) * torch.exp(torch.randn(d, generator=g) * 1.5)


def _weight(d_out: int, d_in: int, seed: int) -> torch.Tensor:
    return torch.randn(d_out, d_in, generator=_gen(seed)) / d_in**0.5


# ---------------------------------------------------------------- RTN


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rtn_is_qdq(bits: int, group_size: int, dtype: torch.dtype) -> None:
    w = _weight(16, 96, bits).to(dtype)
    spec = QuantSpec(bits, group_size)
    out = rtn(w, spec)
    assert out.dtype == dtype and torch.equal(out, qdq(w, spec))


# ---------------------------------------------------------------- low rank


@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (32, 32)])
@pytest.mark.parametrize("rank", [1, 4, 23])
def test_svd_factors_best_rank_r(shape: tuple[int, int], rank: int) -> None:
    """B A equals the truncated SVD (Eckart-Young: residual energy = sum of the dropped sigma^2)."""
    w = torch.randn(*shape, generator=_gen(rank))
    b, a = svd_factors(w, rank)
    assert b.shape == (shape[0], rank) and a.shape == (rank, shape[1])
    assert b.dtype == a.dtype == torch.float32
    u, sv, vh = torch.linalg.svd(w.double(), full_matrices=False)
    best = (u[:, :rank] * sv[:rank]) @ vh[:rank]
    torch.testing.assert_close((b @ a).double(), best, rtol=0, atol=1e-4)
    res = residual(w, b, a)
    torch.testing.assert_close(res.double().square().sum(), sv[rank:].square().sum(), rtol=1e-4, atol=1e-6)
    # balanced split B = U L^1/2, A = L^1/2 V: B^T B = A A^T = diag(sigma_1..r)
    torch.testing.assert_close((b.T @ b).double(), torch.diag(sv[:rank]), rtol=0, atol=1e-4)
    torch.testing.assert_close((a @ a.T).double(), torch.diag(sv[:rank]), rtol=0, atol=1e-4)


@pytest.mark.parametrize("decay", [0.0, 0.5, 1.0])
def test_svd_factors_randomized_near_optimal(decay: float) -> None:
    """exact=False (the default above EXACT_SVD_MAX_NUMEL weights): the residual energy is within 1 % of
    Eckart-Young's optimum and B A holds >= 98 % of the best rank-r energy on a flat spectrum (Gaussian,
    decay 0; measured 98.4 %), >= 99.99 % when sigma_k ~ k^-0.5 or k^-1; repeated calls agree."""
    g = _gen(7)
    u, _ = torch.linalg.qr(torch.randn(300, 300, generator=g))
    v, _ = torch.linalg.qr(torch.randn(700, 300, generator=g))
    sv = torch.arange(1, 301, dtype=torch.float32) ** -decay * (1 + 0.1 * torch.rand(300, generator=g))
    sv = sv.sort(descending=True).values
    w = (u * sv) @ v.T if decay else torch.randn(300, 700, generator=g)
    opt = torch.linalg.svdvals(w.double())
    for rank in (1, 16):
        b, a = svd_factors(w, rank, exact=False)
        assert b.shape == (300, rank) and a.shape == (rank, 700) and b.dtype == torch.float32
        energy = residual(w, b, a).double().square().sum()
        best = opt[rank:].square().sum()
        assert best <= energy * (1 + 1e-5) and energy <= best * 1.01, (rank, float(energy / best))
        captured = (b @ a).double().square().sum() / opt[:rank].square().sum()  # of the best rank-r energy
        assert captured >= (0.98 if decay == 0 else 0.9999), (rank, float(captured))
        b2, a2 = svd_factors(w, rank, exact=False)
        assert torch.equal(b, b2) and torch.equal(a, a2)


def test_svd_factors_default_is_exact_for_small_layers(monkeypatch) -> None:
    from ttq.methods import lowrank

    w = torch.randn(40, 30, generator=_gen(1))
    b, a = svd_factors(w, 3)
    assert torch.equal(b, svd_factors(w, 3, exact=True)[0]) and torch.equal(a, svd_factors(w, 3, exact=True)[1])
    monkeypatch.setattr(lowrank, "EXACT_SVD_MAX_NUMEL", 100)  # now "large": the randomized path
    b_r, a_r = svd_factors(w, 3)
    assert torch.equal(b_r, svd_factors(w, 3, exact=False)[0]) and not torch.equal(b_r, b)


@pytest.mark.parametrize("bad", ["yes", 1, 0.5])
def test_svd_factors_exact_must_be_bool_or_none(bad) -> None:
    with pytest.raises(ValueError, match="exact must be True"):
        svd_factors(torch.randn(8, 6), 2, exact=bad)


@pytest.mark.parametrize("exact", [True, False])
def test_svd_factors_do_not_depend_on_the_thread_count(exact) -> None:
    """LAPACK's SVD rounds differently on 2 threads than on 1: ~1e-5 on SmolLM2's factors, enough to flip 3-bit
    codes of W - B A and move TTQ r = 16's logits by up to 9.  The factors are computed on one thread, so they are
    bit-identical whatever torch's thread setting, and the setting is restored."""
    w = torch.randn(384, 1152, generator=torch.Generator().manual_seed(0))
    saved = torch.get_num_threads()
    try:
        got = {}
        for n in (1, 2, 4):
            torch.set_num_threads(n)
            got[n] = svd_factors(w, 16, exact=exact)
            assert torch.get_num_threads() == n
        for n in (2, 4):
            assert torch.equal(got[n][0], got[1][0]) and torch.equal(got[n][1], got[1][1])
    finally:
        torch.set_num_threads(saved)


def test_svd_full_rank_reconstructs() -> None:
    w = torch.randn(12, 20, generator=_gen(0))
    b, a = svd_factors(w, 12)
    torch.testing.assert_close(b @ a, w, rtol=0, atol=1e-5)
    assert float(residual(w, b, a).abs().max()) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rank_zero(dtype: torch.dtype) -> None:
    w = torch.randn(6, 10).to(dtype)
    b, a = svd_factors(w, 0)
    assert b.shape == (6, 0) and a.shape == (0, 10) and b.dtype == torch.float32
    assert torch.equal(residual(w, b, a), w.float())


@pytest.mark.parametrize("rank", [11, 100, -1, 2.0, True])
def test_bad_rank(rank) -> None:
    with pytest.raises(ValueError, match=r"rank must be an integer in 0\.\.10 \(= min of weight shape \(10, 16\)\)"):
        svd_factors(torch.randn(10, 16), rank)
    with pytest.raises(ValueError, match="rank must be an integer"):
        check_rank(rank, (10, 16))


# ---------------------------------------------------------------- AWQ


def _calib(t: int = 512, d: int = 64, seed: int = 0) -> tuple[torch.Tensor, ChannelStats, torch.Tensor]:
    x = _skewed_acts(t, d, seed)  # (T, d_in)
    return x, ChannelStats.from_activations(x, 2.0), x.T @ x  # gram C = X X^T with X (d_in, T)


def test_output_error_is_trace_form() -> None:
    x, _, gram = _calib(100, 16)
    w = _weight(8, 16, 1)
    w_hat = qdq(w, QuantSpec(2, 8))
    direct = float(((w - w_hat) @ x.T).square().sum())  # ||(W - W_hat) X||_F^2
    assert output_error(w, w_hat, gram) == pytest.approx(direct, rel=1e-4)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [-1, 32])
@pytest.mark.parametrize("form", ["norm", "shrinkage"])
@pytest.mark.parametrize("seed", [0, 1])
def test_awq_search_never_worse_than_rtn(bits: int, group_size: int, form: str, seed: int) -> None:
    _, stats, gram = _calib(seed=seed)
    w = _weight(48, 64, seed + 10)
    spec = QuantSpec(bits, group_size)
    found = awq_search(w, stats, gram, spec, ScaleSpec(0.5, 0.0, 2.0, form))
    loss_rtn = output_error(w, rtn(w, spec), gram)
    assert found["alpha"] in DEFAULT_ALPHAS
    assert found["loss"] <= loss_rtn
    # the reported loss is the loss of what awq_apply produces, and of every candidate it is the least
    applied = awq_apply(w, found, spec)
    assert output_error(w, applied, gram) == pytest.approx(found["loss"], rel=1e-6)
    for alpha in (0.0, 0.25, 0.5, 1.0):
        s = input_scale(stats, ScaleSpec(alpha, 0.0, 2.0, form))
        assert found["loss"] <= output_error(w, scaled_qdq(w, s, spec), gram) * (1 + 1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_awq_search_beats_rtn_on_skewed_inputs(bits: int) -> None:
    _, stats, gram = _calib(seed=2)
    w = _weight(48, 64, 3)
    spec = QuantSpec(bits, 32)
    found = awq_search(w, stats, gram, spec, ScaleSpec(0.5, 0.0, 2.0, "shrinkage"))
    assert found["alpha"] > 0
    assert found["loss"] < 0.9 * output_error(w, rtn(w, spec), gram)


def test_awq_alpha_zero_only_is_rtn() -> None:
    _, stats, gram = _calib()
    w = _weight(16, 64, 4)
    spec = QuantSpec(3, 32)
    found = awq_search(w, stats, gram, spec, ScaleSpec(), alphas=(0.0,))
    assert found["alpha"] == 0.0 and torch.equal(found["scale"], torch.ones(64))
    assert torch.equal(awq_apply(w, found, spec), rtn(w, spec))


def test_awq_no_candidates() -> None:
    _, stats, gram = _calib()
    with pytest.raises(ValueError, match="at least one alpha"):
        awq_search(_weight(4, 64, 0), stats, gram, QuantSpec(), ScaleSpec(), alphas=())


# ---------------------------------------------------------------- TTQ


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [-1, 16])
@pytest.mark.parametrize("form", ["norm", "shrinkage"])
def test_ttq_alpha_zero_is_rtn(bits: int, group_size: int, form: str) -> None:
    """D = 1 (alpha = 0): TTQ collapses to RTN, bit for bit."""
    w, x = _weight(24, 48, bits), _skewed_acts(10, 48, bits)
    spec = QuantSpec(bits, group_size)
    assert torch.equal(ttq_qdq(w, x, spec, ScaleSpec(0.0, 0.4, 2.0, form)), rtn(w, spec))


@pytest.mark.parametrize("form", ["norm", "shrinkage"])
@pytest.mark.parametrize("p", [1.0, 2.0])
def test_ttq_is_scaled_qdq_with_its_own_scale(form: str, p: float) -> None:
    w, x = _weight(24, 48, 5), _skewed_acts(3 * 7, 48, 5)
    spec, sc = QuantSpec(3, 16), ScaleSpec(0.5, 0.4, p, form)
    s = input_scale(ChannelStats.from_activations(x, p), sc)
    want = scaled_qdq(w, s, spec)
    assert torch.equal(ttq_qdq(w, x, spec, sc), want)
    assert torch.equal(ttq_qdq(w, x.reshape(3, 7, 48), spec, sc), want)  # leading dims are tokens


def test_ttq_rank_zero_is_plain_ttq() -> None:
    w, x = _weight(24, 48, 6), _skewed_acts(12, 48, 6)
    spec, sc = QuantSpec(3, 16), ScaleSpec()
    b, a = svd_factors(w, 0)
    assert torch.equal(ttq_qdq(w, x, spec, sc, b, a), ttq_qdq(w, x, spec, sc))


@pytest.mark.parametrize("rank", [2, 8])
def test_ttq_low_rank_formula(rank: int) -> None:
    """W_hat = B A + Q[(W - B A) diag(s)] diag(s)^-1, computed independently."""
    w, x = _weight(24, 48, 7), _skewed_acts(12, 48, 7)
    spec, sc = QuantSpec(2, 16), ScaleSpec(0.5, 0.4, 2.0, "shrinkage")
    b, a = svd_factors(w, rank)
    s = input_scale(ChannelStats.from_activations(x, 2.0), sc)
    want = b @ a + qdq((w - b @ a) @ torch.diag(s), spec) @ torch.diag(1 / s)
    torch.testing.assert_close(ttq_qdq(w, x, spec, sc, b, a), want, rtol=1e-5, atol=1e-6)


def test_ttq_low_rank_reduces_error() -> None:
    """A rank-r part taken out before 2-bit quantization lowers the output error (paper's point)."""
    g = _gen(8)
    w = (torch.randn(48, 4, generator=g) @ torch.randn(4, 64, generator=g)) / 8 + _weight(48, 64, 9) * 0.2
    x = _skewed_acts(64, 64, 8)
    spec, sc = QuantSpec(2, 32), ScaleSpec()
    err = {r: float(((w - ttq_qdq(w, x, spec, sc, *svd_factors(w, r))) @ x.T).square().sum()) for r in (0, 4)}
    assert err[4] < 0.5 * err[0], err


@pytest.mark.parametrize("rank", [0, 4])
@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_ttq_linear_matches_ttq_qdq(rank: int, alpha: float) -> None:
    """The module's forward (x/s through Q, plus x A^T B^T) equals F.linear with ttq_qdq's weight."""
    lin = nn.Linear(48, 24, bias=True)
    with torch.no_grad():
        lin.weight.copy_(_weight(24, 48, 10))
    spec, sc = QuantSpec(3, 16), ScaleSpec(alpha, 0.4, 2.0, "shrinkage")
    mod = TTQLinear(lin, spec, sc, rank)
    x = _skewed_acts(9, 48, 10)[None]  # (1, T, d)
    b, a = svd_factors(lin.weight.detach(), rank)
    want = F.linear(x, ttq_qdq(lin.weight.detach(), x, spec, sc, b, a), lin.bias)
    with torch.no_grad():
        got = mod(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    if rank == 0 and alpha == 0.0:
        torch.testing.assert_close(got, F.linear(x, rtn(lin.weight.detach(), spec), lin.bias), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rank", [0, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ttq_linear_is_the_modules_forward(rank: int, dtype: torch.dtype) -> None:
    """One copy of the math: TTQLinear and LowRankTTQLinear compute exactly ttq_linear for one sequence."""
    from ttq.nn.lowrank_linear import LowRankTTQLinear

    lin = nn.Linear(48, 24, bias=True).to(dtype)
    spec, sc = QuantSpec(3, 16), ScaleSpec()
    x = _skewed_acts(9, 48, 13)[None].to(dtype)  # (1, T, d)
    b, a = svd_factors(lin.weight.detach(), rank)
    s = ttq_scale(x, sc)
    mod = TTQLinear(lin, spec, sc, rank)  # keeps its factors in the weight's dtype
    b_mod, a_mod = mod.lr_b, mod.lr_a
    with torch.no_grad():
        want = ttq_linear(x, residual(lin.weight.detach(), b_mod.float(), a_mod.float()), b_mod, a_mod, s, spec,
                          lin.bias)
        assert torch.equal(mod(x), want)
        got = LowRankTTQLinear(lin, spec, sc, b, a)(x)
        assert torch.equal(got, ttq_linear(x, residual(lin.weight.detach(), b, a), b, a, s, spec, lin.bias))
    if dtype == torch.float32:  # the effective weight of ttq_qdq gives the same output up to rounding
        torch.testing.assert_close(got, F.linear(x, ttq_qdq(lin.weight.detach(), x, spec, sc, b, a), lin.bias),
                                   rtol=1e-4, atol=1e-5)


def test_ttq_scale_and_quantize() -> None:
    w, x = _weight(24, 48, 14), _skewed_acts(12, 48, 14)
    spec, sc = QuantSpec(4, 16), ScaleSpec(0.5, 0.4, 1.0, "norm")
    s = ttq_scale(x, sc)
    assert torch.equal(s, input_scale(ChannelStats.from_activations(x, 1.0), sc))
    assert torch.equal(ttq_scale(ChannelStats.from_activations(x, 1.0), sc), s)
    for got, want in zip(ttq_quantize(w, s, spec), scaled_quantize(w, s, spec)):
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="scale has shape"):
        ttq_quantize(w, s[:-1], spec)
    bad = w.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        ttq_quantize(bad, s, spec)
    ttq_quantize(bad, s, spec, check=False)  # layers checked their weight once already


def test_ttq_linear_quantizes_each_sequence_separately() -> None:
    lin = nn.Linear(48, 24, bias=False)
    mod = TTQLinear(lin, QuantSpec(3, 16), ScaleSpec())
    x = torch.stack([_skewed_acts(8, 48, 11), _skewed_acts(8, 48, 12)])  # (2, T, d)
    with torch.no_grad():
        both = mod(x)
        one = torch.cat([mod(x[:1]), mod(x[1:])])
    assert torch.equal(both, one)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_ttq_rejects_bad_activations(bad: float) -> None:
    w, x = _weight(8, 16, 0), torch.randn(4, 16)
    x[1, 2] = bad
    with pytest.raises(ValueError, match="activations contains 1 NaN/Inf"):
        ttq_qdq(w, x, QuantSpec(4, 16), ScaleSpec())
    with pytest.raises(ValueError, match="at least one token"):
        ttq_qdq(w, torch.empty(0, 16), QuantSpec(4, 16), ScaleSpec())


def test_ttq_rejects_bad_weight() -> None:
    w = _weight(8, 16, 0)
    w[0, 0] = float("nan")
    with pytest.raises(ValueError, match="weight contains 1 NaN/Inf"):
        ttq_qdq(w, torch.randn(4, 16), QuantSpec(4, 16), ScaleSpec())
