"""Heavy-tail (HT-SR) metrics of weight matrices: AlphaQ and WeightWatcher.

AlphaQ (calibration-free bit allocation for MoE quantization, Superone77/AlphaQ)
ranks weight matrices by how heavy-tailed their empirical spectral density
(ESD) is; WeightWatcher (``weightwatcher`` on PyPI) and AlphaPruning fit the
same power law.  Everything here is a pure function of tensors and returns
plain data, for a bit allocator to consume.

ESD
    ``lambda = svdvals(W) ** 2`` -- the eigenvalues of ``W^T W`` of the float32
    weight, *no* ``1/N`` normalisation (the alphas below are scale invariant),
    sorted ascending.  FARMS mode (AlphaQ's default, aspect-ratio debiasing):
    cut ``W`` into non-overlapping ``block x block`` sub-blocks (remainder rows /
    columns dropped), sample up to ``max_blocks`` of them with a *seeded*
    generator (the authors' sampler is unseeded) and pool their squared singular
    values; the whole matrix when ``min(m, n) < block``.

Hill estimator (AlphaQ), ``n`` eigenvalues sorted ascending, 0-based::

    k = clip(max(k_min, floor(fraction * n)), 1, n - 1)
    alpha = 1 + k / sum_{i=1..k} ln(lambda[n - i] / lambda[n - k - 1])

Power-law MLE (WeightWatcher / AlphaPruning / Clauset et al.), density
``p(lambda) ~ lambda^-alpha`` for ``lambda >= x_min``; for each candidate
``x_min = lambda_i`` with the ``n_i = N - i`` eigenvalues above it::

    alpha_i = 1 + n_i / sum_{j >= i} ln(lambda_j / lambda_i)
    D_i = max_{j >= i} | 1 - (lambda_j / lambda_i)^(1 - alpha_i) - (j - i) / n_i |

and ``x_min`` is the candidate with the smallest Kolmogorov-Smirnov distance
``D_i`` (WeightWatcher's ``WWFit``, including its one-sided empirical CDF
``(j - i) / n_i``).  ``xmin_search="peak"`` only tries candidates in
``[0.95, 1.5] x`` the left edge of the fullest bin of a 100-bin histogram of
``log10 lambda`` (WeightWatcher's ``fix_fingers="xmin_peak"``).

Derived: ``alpha_hat = alpha * log10(lambda_max)``, ``stable_rank =
sum(lambda) / lambda_max``, ``variance = var(W)`` (population, AlphaQ's ``v``).

Note the estimators are not interchangeable: FARMS-Hill alphas of MoE experts
are larger (~5-6.5) than whole-matrix MLE alphas (~2-4).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from ttq.methods.threads import one_cpu_thread

ESTIMATORS = ("hill", "mle")
XMIN_SEARCHES = ("full", "peak")


@dataclass(frozen=True)
class MatrixMetrics:
    """Heavy-tail metrics of one weight matrix (plain data; see ``to_dict``)."""

    alpha: float
    alpha_hat: float
    stable_rank: float
    variance: float
    n_eigs: int
    estimator: str

    def to_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


def _check_weight(w: torch.Tensor, ndims: tuple[int, ...] = (2,)) -> torch.Tensor:
    """Validate a weight tensor and return it as float32."""
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(w).__name__}")
    if w.ndim not in ndims:
        want = " or ".join(f"{d}-D" for d in ndims)
        raise ValueError(
            f"weight must be {want} (out, in){' or (E, out, in)' if 3 in ndims else ''}, got shape {tuple(w.shape)}"
        )
    if w.numel() == 0:
        raise ValueError(f"weight is empty, shape {tuple(w.shape)}")
    w = w.detach().float()
    if not bool(torch.isfinite(w).all()):
        raise ValueError("weight contains NaN or Inf")
    return w


def _check_eigs(eigs: torch.Tensor, min_count: int = 2) -> torch.Tensor:
    """Validate eigenvalues and return them sorted ascending in float64."""
    if not isinstance(eigs, torch.Tensor):
        raise TypeError(f"eigs must be a torch.Tensor, got {type(eigs).__name__}")
    if eigs.ndim != 1:
        raise ValueError(f"eigs must be 1-D, got shape {tuple(eigs.shape)}")
    if eigs.numel() < min_count:
        raise ValueError(f"need at least {min_count} eigenvalues, got {eigs.numel()}")
    eigs = eigs.detach().double()
    if not bool(torch.isfinite(eigs).all()):
        raise ValueError("eigs contain NaN or Inf")
    if bool((eigs < 0).any()):
        raise ValueError(f"eigs must be non-negative (squared singular values), min is {eigs.min().item():.3g}")
    return torch.sort(eigs).values


def farms_blocks(shape: tuple[int, int], block: int = 128, max_blocks: int = 256, seed: int = 0) -> torch.Tensor:
    """Which ``block x block`` sub-blocks FARMS samples from an ``(m, n)`` matrix.

    Blocks are numbered row-major over the ``(m // block, n // block)`` grid;
    when there are more than ``max_blocks`` of them, ``max_blocks`` are drawn
    without replacement with ``torch.Generator().manual_seed(seed)``.

    Returns:
        ``(k, 2)`` int64 tensor of (block row, block column), sorted row-major;
        empty ``(0, 2)`` when ``min(m, n) < block`` (whole-matrix fallback).
    """
    if block < 1 or max_blocks < 1:
        raise ValueError(f"block and max_blocks must be >= 1, got block={block}, max_blocks={max_blocks}")
    m, n = shape
    rows, cols = m // block, n // block
    count = rows * cols
    if count == 0:
        return torch.zeros(0, 2, dtype=torch.long)
    if count > max_blocks:
        gen = torch.Generator().manual_seed(seed)
        ids = torch.sort(torch.randperm(count, generator=gen)[:max_blocks]).values
    else:
        ids = torch.arange(count)
    return torch.stack([ids // cols, ids % cols], dim=1)


def esd(w: torch.Tensor, farms: bool = True, block: int = 128, max_blocks: int = 256, seed: int = 0) -> torch.Tensor:
    """Empirical spectral density: eigenvalues of ``W^T W``, sorted ascending.

    Args:
        w: ``(m, n)`` weight; computed in float32 on its device.
        farms: pool the squared singular values of sampled sub-blocks
            (``farms_blocks``) instead of the whole matrix; the whole matrix is
            used anyway when ``min(m, n) < block``.
        block, max_blocks, seed: FARMS block size, sample size and seed.

    Returns:
        1-D float32 tensor: ``min(m, n)`` eigenvalues (whole matrix) or
        ``k * block`` (FARMS with ``k`` blocks).
    """
    w = _check_weight(w)
    blocks = farms_blocks(tuple(w.shape), block, max_blocks, seed) if farms else torch.zeros(0, 2, dtype=torch.long)
    with one_cpu_thread(w.device):  # LAPACK rounds differently on more threads: the same spectrum anywhere
        if blocks.shape[0] == 0:
            sv = torch.linalg.svdvals(w)  # (min(m, n),)
        else:
            rows, cols = w.shape[0] // block, w.shape[1] // block
            grid = w[: rows * block, : cols * block].reshape(rows, block, cols, block).transpose(1, 2)  # (R, C, b, b)
            picked = grid[blocks[:, 0].to(w.device), blocks[:, 1].to(w.device)]  # (k, b, b)
            sv = torch.linalg.svdvals(picked).reshape(-1)  # (k * b,)
    return torch.sort(sv.square()).values


def hill_alpha(eigs: torch.Tensor, fraction: float = 0.1, k_min: int = 10) -> float:
    """Hill estimator of the density exponent on the top ``fraction`` of ``eigs`` (AlphaQ).

    ``k = clip(max(k_min, floor(fraction * n)), 1, n - 1)``;
    ``alpha = 1 + k / sum_{i=1..k} ln(lambda[n-i] / lambda[n-k-1])``.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    lam = _check_eigs(eigs, min_count=2)
    n = lam.numel()
    k = min(max(max(k_min, math.floor(fraction * n)), 1), n - 1)
    ref = lam[n - k - 1]
    if ref <= 0:
        raise ValueError(
            f"Hill reference eigenvalue lambda[n-k-1] (n={n}, k={k}) is zero: too few non-zero eigenvalues"
        )
    total = torch.log(lam[n - k :] / ref).sum().item()
    if total <= 0:
        raise ValueError(f"the top {k} eigenvalues all equal the reference one: no tail to fit")
    return 1.0 + k / total


def _ks_distances(x: torch.Tensor, cand: torch.Tensor, chunk_elems: int = 1 << 22) -> tuple[torch.Tensor, torch.Tensor]:
    """MLE alpha and KS distance for each candidate index into ascending ``x`` (float64)."""
    big_n = x.numel()
    log_x = torch.log(x)
    suffix = torch.flip(torch.cumsum(torch.flip(log_x, [0]), 0), [0])  # suffix[i] = sum_{j>=i} log x_j
    n_tail = (big_n - cand).double()
    alphas = 1.0 + n_tail / (suffix[cand] - n_tail * log_x[cand])  # sum 0 -> inf
    dists = torch.ones_like(alphas)
    j = torch.arange(big_n, device=x.device)
    step = max(1, chunk_elems // big_n)
    for s in range(0, cand.numel(), step):
        i, a, nt = cand[s : s + step], alphas[s : s + step], n_tail[s : s + step]
        ratio = x[None, :] / x[i, None]  # (c, N)
        fit_cdf = 1.0 - ratio ** (1.0 - a[:, None])
        emp_cdf = (j[None, :] - i[:, None]) / nt[:, None]
        gap = torch.where(j[None, :] >= i[:, None], (fit_cdf - emp_cdf).abs(), torch.zeros_like(ratio))
        ok = torch.isfinite(a) & (a > 1.0)
        dists[s : s + step] = torch.where(ok, gap.amax(dim=1), torch.ones_like(a))
    return alphas, dists


def powerlaw_alpha(
    eigs: torch.Tensor, xmin_search: str = "full", threshold: float = 1e-5
) -> tuple[float, float, float]:
    """Continuous power-law MLE with ``x_min`` chosen by the smallest KS distance.

    Matches WeightWatcher's default fit (``WWFit``): eigenvalues ``<= threshold``
    are dropped (its ``EVALS_THRESH``), every remaining eigenvalue but the
    largest is a candidate ``x_min`` (``"full"``), or only those within
    ``[0.95, 1.5] x`` the histogram peak of ``log10 lambda`` (``"peak"``).
    Vectorised over candidates in chunks; cost O(N^2) for N eigenvalues.

    Returns:
        ``(alpha, x_min, ks_distance)`` with density ``p(lambda) ~ lambda^-alpha``.
    """
    if xmin_search not in XMIN_SEARCHES:
        raise ValueError(f"xmin_search must be one of {XMIN_SEARCHES}, got {xmin_search!r}")
    lam = _check_eigs(eigs, min_count=2)
    x = lam[lam > threshold]
    if x.numel() < 2:
        raise ValueError(f"need at least 2 eigenvalues above threshold={threshold}, got {x.numel()}")
    cand = torch.arange(x.numel() - 1, device=x.device)
    if xmin_search == "peak":
        logs = torch.log10(x)
        lo, hi = logs[0].item(), logs[-1].item()
        counts = torch.histc(logs, bins=100, min=lo, max=hi)
        edges = torch.linspace(lo, hi, 101, dtype=torch.float64)
        peak = 10.0 ** edges[int(torch.argmax(counts))].item()  # left edge of the fullest bin
        near = cand[(x[:-1] >= 0.95 * peak) & (x[:-1] <= 1.5 * peak)]
        cand = near if near.numel() > 0 else cand[x[:-1] >= 0.95 * peak][:1]
        if cand.numel() == 0:
            raise ValueError("no x_min candidate near the ESD peak (the peak is at the largest eigenvalue)")
    alphas, dists = _ks_distances(x, cand)
    best = int(torch.argmin(dists))
    return float(alphas[best]), float(x[cand[best]]), float(dists[best])


def alpha_hat(alpha: float, eigs: torch.Tensor) -> float:
    """WeightWatcher's alpha-hat: ``alpha * log10(lambda_max)``."""
    lam = _check_eigs(eigs, min_count=1)
    top = lam[-1].item()
    if top <= 0:
        raise ValueError("alpha_hat needs a positive largest eigenvalue")
    return alpha * math.log10(top)


def stable_rank(eigs: torch.Tensor) -> float:
    """Stable rank ``sum(lambda) / lambda_max`` (= ||W||_F^2 / ||W||_2^2 for a whole matrix)."""
    lam = _check_eigs(eigs, min_count=1)
    top = lam[-1].item()
    if top <= 0:
        raise ValueError("stable_rank needs a positive largest eigenvalue")
    return lam.sum().item() / top


def weight_variance(w: torch.Tensor) -> float:
    """Population variance of all entries of ``w`` (AlphaQ's ``v``)."""
    w = _check_weight(w, ndims=(1, 2, 3))
    return torch.var(w, correction=0).item()


def matrix_metrics(
    w: torch.Tensor,
    estimator: str = "hill",
    farms: bool = True,
    seed: int = 0,
    block: int = 128,
    max_blocks: int = 256,
) -> MatrixMetrics | list[MatrixMetrics]:
    """Heavy-tail metrics of a weight matrix, or of each expert of a fused MoE weight.

    Args:
        w: ``(out, in)`` weight, or ``(E, out, in)`` fused experts.
        estimator: ``"hill"`` (AlphaQ, top 10 %) or ``"mle"`` (WeightWatcher, full KS search).
        farms, seed, block, max_blocks: passed to ``esd``; every expert uses the same seed.

    Returns:
        One ``MatrixMetrics`` for a 2-D weight, a list of ``E`` for a 3-D one.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    w = _check_weight(w, ndims=(2, 3))
    if w.ndim == 3:
        return [matrix_metrics(w_e, estimator, farms, seed, block, max_blocks) for w_e in w]
    eigs = esd(w, farms=farms, block=block, max_blocks=max_blocks, seed=seed)
    alpha = hill_alpha(eigs) if estimator == "hill" else powerlaw_alpha(eigs)[0]
    return MatrixMetrics(
        alpha=alpha,
        alpha_hat=alpha_hat(alpha, eigs),
        stable_rank=stable_rank(eigs),
        variance=weight_variance(w),
        n_eigs=eigs.numel(),
        estimator=estimator,
    )
