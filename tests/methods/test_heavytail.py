"""Tests for ttq.methods.heavytail: ESD / FARMS, Hill and power-law MLE alphas, metrics."""

from __future__ import annotations

import math

import pytest
import torch

from ttq.methods.heavytail import (
    MatrixMetrics,
    alpha_hat,
    esd,
    farms_blocks,
    hill_alpha,
    matrix_metrics,
    powerlaw_alpha,
    stable_rank,
    weight_variance,
)


def pareto(alpha: float, n: int = 4000, seed: int = 0) -> torch.Tensor:
    """``n`` samples with density ``p(x) ~ x^-alpha`` on ``[1, inf)`` (tail index ``alpha - 1``)."""
    u = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (1.0 - u) ** (-1.0 / (alpha - 1.0))


def student_t(shape: tuple[int, ...], df: float, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.distributions.StudentT(df=df).sample(shape) * 0.02


# --- estimators on synthetic Pareto spectra -------------------------------------------------


@pytest.mark.parametrize("alpha", [2.5, 4.0, 6.0])
def test_pareto_hill_and_mle_recover_density_exponent(alpha):
    lam = pareto(alpha)
    # Hill-10 %: k = 400 tail samples; sd of the estimate ~ (alpha - 1) / sqrt(k); allow 3 sd.
    hill = hill_alpha(lam)
    assert abs(hill - alpha) <= 3 * (alpha - 1) / math.sqrt(400)
    # MLE-KS: sd ~ (alpha - 1) / sqrt(n_tail) with n_tail the samples above the chosen x_min.
    mle, xmin, ks = powerlaw_alpha(lam)
    n_tail = int((lam >= xmin).sum())
    assert n_tail >= 1000  # the true x_min is the sample minimum: most of the data is tail
    assert abs(mle - alpha) <= 3 * (alpha - 1) / math.sqrt(n_tail)
    assert 0 < ks < 0.05
    # Exchanging lambda for its shuffled copy changes nothing; a scale factor neither.
    shuffled = lam[torch.randperm(lam.numel(), generator=torch.Generator().manual_seed(1))]
    assert hill_alpha(shuffled * 7.0) == pytest.approx(hill, rel=1e-12)


def test_powerlaw_peak_search_stays_near_histogram_peak():
    lam = pareto(4.0)
    alpha, xmin, _ = powerlaw_alpha(lam, xmin_search="peak")
    # The log10 histogram of a Pareto sample peaks in its first bin, whose left edge is min(lam).
    assert lam.min() * 0.95 <= xmin <= lam.min() * 1.5
    assert abs(alpha - 4.0) <= 3 * 3.0 / math.sqrt(int((lam >= xmin).sum()))


def test_hill_matches_formula_and_clips_k():
    lam = torch.linspace(1.0, 3.0, 25, dtype=torch.float64) ** 3
    n, k = 25, 10  # k = max(10, floor(2.5)) = 10
    ref = lam[n - k - 1].item()
    expected = 1 + k / sum(math.log(lam[n - i].item() / ref) for i in range(1, k + 1))
    assert hill_alpha(lam) == pytest.approx(expected, rel=1e-12)
    small = lam[-5:]  # n = 5: k clipped to n - 1 = 4, reference = the smallest
    expected_small = 1 + 4 / sum(math.log(small[5 - i].item() / small[0].item()) for i in range(1, 5))
    assert hill_alpha(small) == pytest.approx(expected_small, rel=1e-12)
    # fraction wins once floor(fraction * n) > k_min
    big = pareto(3.0, n=1000)
    top = torch.sort(big).values
    expected_big = 1 + 200 / torch.log(top[-200:] / top[-201]).sum().item()
    assert hill_alpha(big, fraction=0.2) == pytest.approx(expected_big, rel=1e-12)


# --- ESD and FARMS -----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(64, 48), (48, 64), (200, 100)])
def test_esd_whole_matrix_is_sorted_squared_singular_values(shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = torch.sort(torch.linalg.svdvals(w.float()) ** 2).values
    for got in (esd(w, farms=False), esd(w, farms=True)):  # FARMS falls back: min(m, n) < 128
        assert got.dtype == torch.float32 and got.shape == (min(shape),)
        torch.testing.assert_close(got, expected)
        assert bool((got[1:] >= got[:-1]).all())


def test_farms_pools_squared_singular_values_of_sampled_blocks():
    w = student_t((96, 160), df=3.0, seed=0)  # 6 x 10 grid of 16 x 16 blocks
    blocks = farms_blocks(tuple(w.shape), block=16, max_blocks=8, seed=3)
    assert blocks.shape == (8, 2) and len({tuple(b) for b in blocks.tolist()}) == 8
    assert bool((blocks[:, 0] < 6).all() and (blocks[:, 1] < 10).all())
    pooled = torch.cat(
        [torch.linalg.svdvals(w[16 * r : 16 * r + 16, 16 * c : 16 * c + 16]) ** 2 for r, c in blocks.tolist()]
    )
    got = esd(w, block=16, max_blocks=8, seed=3)
    assert got.shape == (8 * 16,)
    torch.testing.assert_close(got, torch.sort(pooled).values)


def test_farms_is_seeded():
    w = student_t((128, 128), df=3.0, seed=1)
    a = esd(w, block=16, max_blocks=8, seed=0)
    assert torch.equal(a, esd(w, block=16, max_blocks=8, seed=0))
    assert not torch.equal(a, esd(w, block=16, max_blocks=8, seed=1))
    # Fewer blocks than max_blocks: all are used, the seed is irrelevant; remainders are dropped.
    w2 = student_t((40, 50), df=3.0, seed=2)  # 2 x 3 grid of 16 x 16 blocks
    assert farms_blocks((40, 50), block=16, max_blocks=256, seed=5).tolist() == [
        [0, 0],
        [0, 1],
        [0, 2],
        [1, 0],
        [1, 1],
        [1, 2],
    ]
    assert torch.equal(esd(w2, block=16, seed=0), esd(w2, block=16, seed=9))
    assert farms_blocks((100, 400), block=128).shape == (0, 2)


# --- derived metrics and matrix_metrics --------------------------------------------------------


def test_matrix_metrics_2d():
    w = student_t((64, 96), df=3.0, seed=4)
    eigs = esd(w, farms=False)
    for estimator, alpha in (("hill", hill_alpha(eigs)), ("mle", powerlaw_alpha(eigs)[0])):
        m = matrix_metrics(w, estimator=estimator)
        assert isinstance(m, MatrixMetrics) and m.estimator == estimator and m.n_eigs == 64
        assert m.alpha == pytest.approx(alpha, rel=1e-12)
        assert m.alpha_hat == pytest.approx(alpha * math.log10(eigs.max().item()), rel=1e-12)
        assert set(m.to_dict()) == {"alpha", "alpha_hat", "stable_rank", "variance", "n_eigs", "estimator"}
    # Whole-matrix stable rank is ||W||_F^2 / ||W||_2^2; variance is the population variance.
    fro2, spec2 = (w.double() ** 2).sum().item(), torch.linalg.matrix_norm(w.double(), ord=2).item() ** 2
    assert m.stable_rank == pytest.approx(fro2 / spec2, rel=1e-4)
    assert m.variance == pytest.approx(w.double().var(unbiased=False).item(), rel=1e-5)
    assert weight_variance(torch.tensor([[1.0, 3.0]])) == 1.0
    assert stable_rank(torch.tensor([1.0, 1.0, 2.0])) == 2.0
    assert alpha_hat(2.0, torch.tensor([1.0, 100.0])) == pytest.approx(4.0)


@pytest.mark.parametrize("estimator", ["hill", "mle"])
def test_matrix_metrics_3d_one_entry_per_expert(estimator):
    experts = torch.stack([student_t((144, 160), df=df, seed=i) for i, df in enumerate((2.5, 3.5, 6.0))])
    got = matrix_metrics(experts, estimator=estimator, block=32, max_blocks=6, seed=7)
    assert isinstance(got, list) and len(got) == 3
    for e in range(3):
        assert got[e] == matrix_metrics(experts[e], estimator=estimator, block=32, max_blocks=6, seed=7)
        assert got[e].n_eigs == 6 * 32
    assert len({m.alpha for m in got}) == 3


# --- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fn, arg, match",
    [
        (esd, torch.zeros(0, 4), "empty"),
        (esd, torch.ones(4), "2-D"),
        (esd, torch.ones(2, 3, 4), "2-D"),
        (esd, torch.tensor([[1.0, float("nan")]]), "NaN or Inf"),
        (matrix_metrics, torch.ones(2, 2, 2, 2), r"2-D or 3-D"),
        (matrix_metrics, torch.tensor([[float("inf"), 1.0]]), "NaN or Inf"),
        (hill_alpha, torch.tensor([1.0]), "at least 2 eigenvalues"),
        (hill_alpha, torch.ones(3, 3), "1-D"),
        (hill_alpha, torch.tensor([1.0, -2.0, 3.0]), "non-negative"),
        (hill_alpha, torch.tensor([0.0, 0.0, 1.0]), "zero"),
        (hill_alpha, torch.ones(20), "no tail"),
        (powerlaw_alpha, torch.tensor([0.0, 0.0, 1.0]), "above threshold"),
        (powerlaw_alpha, torch.tensor([1.0, float("nan")]), "NaN or Inf"),
    ],
)
def test_bad_input_raises(fn, arg, match):
    with pytest.raises(ValueError, match=match):
        fn(arg)


def test_non_tensor_raises_type_error():
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        esd([[1.0, 2.0]])
    with pytest.raises(TypeError, match="eigs must be a torch.Tensor"):
        hill_alpha([1.0, 2.0, 3.0])


def test_bad_options_raise():
    w = torch.ones(4, 4)
    with pytest.raises(ValueError, match="estimator must be one of"):
        matrix_metrics(w, estimator="ks")
    with pytest.raises(ValueError, match="xmin_search must be one of"):
        powerlaw_alpha(torch.arange(1.0, 10.0), xmin_search="auto")
    with pytest.raises(ValueError, match="fraction"):
        hill_alpha(torch.arange(1.0, 10.0), fraction=0.0)
    with pytest.raises(ValueError, match="block and max_blocks"):
        esd(w, block=0)


# --- oracle: the weightwatcher package (optional, `pip install ttq[heavytail]`) -----------------


def test_powerlaw_alpha_matches_weightwatcher():
    ww = pytest.importorskip("weightwatcher")
    shapes_dfs = [((512, 256), 2.5), ((384, 512), 3.0), ((200, 300), 4.0)]  # (out, in), Student-t dof
    model = torch.nn.Sequential(*[torch.nn.Linear(s[1], s[0], bias=False) for s, _ in shapes_dfs])
    with torch.no_grad():
        for i, (layer, (shape, df)) in enumerate(zip(model, shapes_dfs)):
            layer.weight.copy_(student_t(shape, df=df, seed=i))
    # Defaults: whole-matrix ESD, WWFit power law, every eigenvalue a candidate x_min (no fix_fingers).
    details = ww.WeightWatcher(model=model).analyze(plot=False)
    assert len(details) == 3
    for (_, row), layer in zip(details.iterrows(), model):
        eigs = esd(layer.weight, farms=False)
        alpha, xmin, ks = powerlaw_alpha(eigs)
        # Same estimator and x_min search; the only difference is WeightWatcher's float64 SVD vs our
        # float32 one (relative eigenvalue error ~1e-6), so the same x_min wins and alpha agrees to
        # ~1e-6 (measured); 1e-3 leaves room for BLAS differences without admitting another x_min.
        assert xmin == pytest.approx(row["xmin"], rel=1e-3)
        assert alpha == pytest.approx(row["alpha"], rel=1e-3)
        assert ks == pytest.approx(row["D"], rel=1e-3, abs=1e-4)
        assert alpha_hat(alpha, eigs) == pytest.approx(row["alpha_weighted"], rel=1e-3)
        assert stable_rank(eigs) == pytest.approx(row["stable_rank"], rel=1e-3)
        assert eigs.max().item() == pytest.approx(row["lambda_max"], rel=1e-4)


@pytest.mark.parametrize("farms", [False, True])
def test_esd_does_not_depend_on_the_thread_count(farms):
    """LAPACK's SVD rounds differently on more threads; the spectra (and so AlphaQ's alphas and plans) are
    computed on one thread: bit-identical whatever torch's thread setting."""
    w = torch.randn(384, 1152, generator=torch.Generator().manual_seed(0))
    saved = torch.get_num_threads()
    try:
        got = {}
        for n in (1, 2):
            torch.set_num_threads(n)
            got[n] = esd(w, farms=farms)
        assert torch.equal(got[1], got[2])
    finally:
        torch.set_num_threads(saved)
