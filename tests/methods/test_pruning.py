"""Tests of test-time activation-aware pruning (src/ttq/methods/pruning.py)."""

from __future__ import annotations

import pytest
import torch

from ttq.formats.affine import QuantSpec, qdq
from ttq.methods.pruning import (
    check_n_m,
    check_sparsity,
    masked_qdq,
    n_m_mask,
    prune_mask,
    prune_ttq,
    unstructured_mask,
    wanda_score,
)
from ttq.methods.scaling import ChannelStats, ScaleSpec, input_scale, scaled_qdq


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _weight(d_out: int, d_in: int, seed: int) -> torch.Tensor:
    return torch.randn(d_out, d_in, generator=_gen(seed)) / d_in**0.5


def _acts(t: int, d: int, seed: int) -> torch.Tensor:
    g = _gen(seed)
    return torch.randn(t, d, generator=g) * torch.exp(torch.randn(d, generator=g) * 1.5)


@pytest.mark.parametrize("sparsity,d_in", [(0.5, 64), (0.25, 64), (0.9, 40), (0.3, 50)])
def test_unstructured_exact_sparsity_keeps_top_scores(sparsity: float, d_in: int) -> None:
    w, x = _weight(16, d_in, 0), _acts(128, d_in, 1)
    xn = x.norm(dim=0)
    keep = prune_mask(w, xn, sparsity)
    k = int(sparsity * d_in)
    assert ((~keep).sum(1) == k).all()  # exactly floor(sparsity * d_in) zeros in every row
    score = w.abs() * xn
    kept_min = torch.where(keep, score, torch.inf).amin(1)
    dropped_max = torch.where(~keep, score, -torch.inf).amax(1)
    assert (kept_min >= dropped_max).all()


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (3, 4)])
def test_n_m_pattern_keeps_top_n_of_every_m(n: int, m: int) -> None:
    w, x = _weight(12, 32, 2), _acts(64, 32, 3)
    xn = x.norm(dim=0)
    keep = prune_mask(w, xn, n_m=(n, m))
    groups = keep.reshape(12, 32 // m, m)
    assert (groups.sum(-1) == n).all()
    score = (w.abs() * xn).reshape(12, 32 // m, m)
    kept_min = torch.where(groups, score, torch.inf).amin(-1)
    dropped_max = torch.where(~groups, score, -torch.inf).amax(-1)
    assert (kept_min >= dropped_max).all()


def test_activation_awareness_changes_the_choice() -> None:
    w = torch.tensor([[1.0, 0.5, 0.2, 0.1]])
    x = torch.tensor([[0.01, 0.01, 10.0, 10.0]])  # loud channels 2 and 3
    assert unstructured_mask(wanda_score(w, x.norm(dim=0)), 0.5).tolist() == [[False, False, True, True]]
    assert unstructured_mask(wanda_score(w, None), 0.5).tolist() == [[True, True, False, False]]
    assert n_m_mask(wanda_score(w, x.norm(dim=0)), (2, 4)).tolist() == [[False, False, True, True]]


def test_sparsity_zero_is_the_identity() -> None:
    w, x = _weight(8, 32, 4), _acts(16, 32, 5)
    assert torch.equal(prune_ttq(w, x, 0.0), w)
    assert torch.equal(prune_ttq(w, x, None), w)
    assert torch.equal(prune_ttq(w, x, n_m=(4, 4)), w)
    spec, sc = QuantSpec(3, 16), ScaleSpec()
    s = input_scale(ChannelStats.from_activations(x, 2.0), sc)
    torch.testing.assert_close(prune_ttq(w, x, 0.0, spec=spec, scale=sc), scaled_qdq(w, s, spec))


def test_masked_qdq_uses_kept_range_and_zeros_pruned() -> None:
    w = _weight(8, 64, 6)
    assert torch.equal(masked_qdq(w, torch.ones_like(w, dtype=torch.bool), QuantSpec(3, 16)), qdq(w, QuantSpec(3, 16)))
    keep = prune_mask(w, None, 0.5)
    out = masked_qdq(w, keep, QuantSpec(3, 16))
    assert torch.equal(out[~keep], torch.zeros(int((~keep).sum())))
    wk = torch.where(keep, w, torch.nan).reshape(8, 4, 16)
    step = (wk.nan_to_num(-9).amax(-1) - wk.nan_to_num(9).amin(-1)) / 7  # kept range / (2^3 - 1)
    err = (out - w).abs().reshape(8, 4, 16)
    assert (torch.where(keep.reshape(8, 4, 16), err, 0) <= step[..., None] / 2 + 1e-6).all()


@pytest.mark.parametrize("order", ["prune_then_quantize", "quantize_then_mask"])
@pytest.mark.parametrize("pattern", [{"sparsity": 0.5}, {"n_m": (2, 4)}])
def test_prune_then_ttq_pattern_and_error(order: str, pattern: dict) -> None:
    w, x = _weight(16, 64, 7), _acts(100, 64, 8)
    out = prune_ttq(w, x, spec=QuantSpec(4, 32), order=order, **pattern)
    keep = prune_mask(w, x.norm(dim=0), pattern.get("sparsity"), pattern.get("n_m"))
    assert torch.equal(out != 0, keep)  # pruned exactly zero; kept weights survive 4-bit QDQ as non-zero here
    rel = float((out - w * keep).norm() / (w * keep).norm())
    assert rel < 0.12  # 4-bit quantization error on the kept weights


def test_bad_input() -> None:
    w, x = _weight(4, 12, 9), _acts(8, 12, 10)
    for s in (-0.1, 1.0, 1.5, True, "0.5", float("nan")):
        with pytest.raises(ValueError, match=r"sparsity must be a number in \[0, 1\)"):
            check_sparsity(s)
    with pytest.raises(ValueError, match="needs 1 <= N <= M, got 3:2"):
        check_n_m((3, 2))
    with pytest.raises(ValueError, match="needs 1 <= N <= M, got 0:4"):
        check_n_m((0, 4))
    with pytest.raises(ValueError, match="pair of integers"):
        check_n_m((2.0, 4))
    with pytest.raises(ValueError, match="M=8 needs M to divide the input dimension, got d_in=12"):
        prune_ttq(w, x, n_m=(2, 8))
    with pytest.raises(ValueError, match="unknown order"):
        prune_ttq(w, x, 0.5, order="mask_first")
    with pytest.raises(ValueError, match="unknown pruning score"):
        prune_ttq(w, x, 0.5, score="random")
    with pytest.raises(ValueError, match=r"x_norm has shape \(11,\)"):
        wanda_score(w, torch.ones(11))
