"""Tests of online subspace tracking for test-time decomposition (src/ttq/methods/online_lowrank.py)."""

from __future__ import annotations

import pytest
import torch

from ttq.methods.online_lowrank import (
    isvd_update,
    oja_update,
    power_update,
    principal_angle,
    projection_factors,
    scaled_factors,
)

D, R = 32, 4


def _source(seed: int):
    """Synthetic covariance with a clear top-R subspace: eigenvalues 10, 8, 6, 5, then 1."""
    g = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(D, D, generator=g))[0]
    ev = torch.cat([torch.tensor([10.0, 8.0, 6.0, 5.0]), torch.ones(D - R)])

    def sample(n: int) -> torch.Tensor:
        return (torch.randn(n, D, generator=g) * ev.sqrt()) @ q.T  # (n, D), covariance q diag(ev) q^T

    return sample, q[:, :R]


def _start(seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(D, R, generator=torch.Generator().manual_seed(seed)))[0]


def test_oja_converges_to_top_eigenvectors() -> None:
    sample, top = _source(0)
    u = _start(1)
    assert principal_angle(u, top) > 1.0
    for _ in range(40):
        u = oja_update(u, sample(256), lr=1.0)
    torch.testing.assert_close(u.T @ u, torch.eye(R), atol=1e-5, rtol=0)
    assert principal_angle(u, top) < 0.15


def test_oja_chunked_steps_stream_within_one_sequence() -> None:
    sample, top = _source(2)
    u = oja_update(_start(3), sample(8192)[None], lr=1.0, chunk=256)  # (1, T, d): 32 steps in one call
    assert principal_angle(u, top) < 0.15


def test_isvd_converges_and_matches_batch_svd() -> None:
    sample, top = _source(4)
    u, sv = _start(5), torch.zeros(R)
    batches = [sample(256) for _ in range(6)]
    for xb in batches:
        u, sv = isvd_update(u, sv, xb)
    assert principal_angle(u, top) < 0.15
    # the first update with no history is the exact top-R subspace of that batch
    u1, sv1 = isvd_update(_start(5), torch.zeros(R), batches[0])
    _, s_ref, vh = torch.linalg.svd(batches[0], full_matrices=False)
    assert principal_angle(u1, vh[:R].T) < 1e-3
    torch.testing.assert_close(sv1, s_ref[:R], rtol=1e-4, atol=1e-4)


def test_isvd_full_rank_is_exact() -> None:
    """With r = d nothing is truncated: singular values equal those of all data seen."""
    sample, _ = _source(6)
    xs = [sample(50) for _ in range(3)]
    u, sv = torch.linalg.qr(torch.randn(D, D))[0], torch.zeros(D)
    for xb in xs:
        u, sv = isvd_update(u, sv, xb)
    torch.testing.assert_close(sv, torch.linalg.svdvals(torch.cat(xs)), rtol=1e-3, atol=1e-3)


def test_isvd_decay_forgets() -> None:
    sample, _ = _source(7)
    u, sv = isvd_update(_start(8), torch.zeros(R), sample(256))
    _, sv_half = isvd_update(u, sv, torch.zeros(1, D), decay=0.25)  # no new energy: values scale by sqrt(decay)
    torch.testing.assert_close(sv_half, sv * 0.5, rtol=1e-4, atol=1e-4)


def test_projection_factors() -> None:
    w = torch.randn(20, D)
    u = _start(9)
    b, a = projection_factors(w, u)
    torch.testing.assert_close(b @ a, w @ u @ u.T)
    assert torch.equal(a, u.T)


def test_power_update_finds_top_right_singular_subspace() -> None:
    g = torch.Generator().manual_seed(11)
    w = torch.randn(40, D, generator=g) @ torch.diag(torch.linspace(3.0, 0.1, D))
    vh = torch.linalg.svd(w, full_matrices=False)[2]
    u = _start(12)
    for _ in range(60):
        u = power_update(u, w)
    assert principal_angle(u, vh[:R].T) < 1e-2
    assert principal_angle(power_update(_start(12), w, iters=0), vh[:R].T) < 1e-4  # 0 = exact SVD


def test_scaled_factors_best_in_subspace() -> None:
    g = torch.Generator().manual_seed(13)
    w, s = torch.randn(20, D, generator=g), torch.rand(D, generator=g) + 0.5
    u = power_update(_start(14), w * s, iters=0)
    b, a = scaled_factors(w, s, u)
    uu, sv, vv = torch.linalg.svd(w * s, full_matrices=False)
    torch.testing.assert_close(b @ a * s, (uu[:, :R] * sv[:R]) @ vv[:R], atol=1e-4, rtol=1e-4)


def test_bad_input() -> None:
    u, x = _start(10), torch.randn(5, D)
    with pytest.raises(ValueError, match="learning rate must be positive"):
        oja_update(u, x, lr=0.0)
    with pytest.raises(ValueError, match="chunk must be a positive"):
        oja_update(u, x, chunk=0)
    with pytest.raises(ValueError, match=r"decay \(forgetting factor\) must be in \(0, 1\]"):
        isvd_update(u, torch.zeros(R), x, decay=1.5)
    with pytest.raises(ValueError, match="at least one token"):
        oja_update(u, torch.zeros(0, D))
    with pytest.raises(ValueError, match="power iterations must be a non-negative integer"):
        power_update(u, torch.randn(8, D), iters=-1)
    with pytest.raises(ValueError, match="do not fit a weight"):
        scaled_factors(torch.randn(8, D), torch.ones(D - 1), u)
    with pytest.raises(ValueError, match="subspace basis has 32 rows, the weight has d_in=16"):
        projection_factors(torch.randn(4, 16), u)
