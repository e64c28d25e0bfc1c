"""llm-awq's scale and clip searches as pure tensor functions (src/ttq/methods/awq_search.py): the grids, the
scale, the per-group partial-output error, and clipping never worse than no clipping on its own objective."""

from __future__ import annotations

import pytest
import torch

from ttq.errors import ConfigError
from ttq.formats.affine import QuantSpec, qdq
from ttq.methods.awq_search import (
    activation_mean,
    awq_scale,
    clip_ratios,
    clip_search,
    clip_weight,
    grid_search,
    group_max,
    group_output_error,
    scale_grid,
    scaled_fake_quant,
)


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_grids_are_llm_awqs() -> None:
    assert scale_grid(20) == tuple(i / 20 for i in range(20)) and scale_grid(1) == (0.0,)
    ratios = clip_ratios(20, 0.5)
    assert len(ratios) == 10 and ratios[0] == 1.0 and ratios[-1] == pytest.approx(0.55)


@pytest.mark.parametrize("call", [
    lambda: scale_grid(0), lambda: scale_grid(True), lambda: clip_ratios(0, 0.5),
    lambda: clip_ratios(20, 0.0), lambda: clip_ratios(20, 1.0), lambda: clip_ratios(20, -0.1),
    lambda: clip_ratios(1, 0.5),  # int(0.5 * 1) = 0 candidates: an empty grid
    lambda: grid_search(lambda a: a, ()), lambda: awq_scale(torch.ones(3), 5.0),
    lambda: activation_mean(torch.zeros(0, 4)),
], ids=["n_grid0", "n_grid_bool", "clip_grid0", "shrink0", "shrink1", "shrink_neg", "empty_clip_grid",
        "empty_alphas", "alpha_range", "no_tokens"])
def test_bad_input_is_refused(call) -> None:
    with pytest.raises(ConfigError):
        call()


def test_awq_scale_is_normalised_and_alpha0_is_ones() -> None:
    x_mean = activation_mean(_rand(50, 16).exp())  # (T, d) -> (d,)
    assert torch.equal(awq_scale(x_mean, 0.0), torch.ones(16))
    s = awq_scale(x_mean, 0.7)
    assert float(s.max() * s.min()) == pytest.approx(1.0, rel=1e-5)
    ratio = (s / x_mean.pow(0.7))  # a common factor only
    assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-5)


def test_grid_search_takes_the_first_minimum() -> None:
    res = grid_search(lambda a: (a - 0.3) ** 2 if a != 0.5 else 0.0, (0.0, 0.25, 0.5, 0.75))
    assert res["alpha"] == 0.5 and res["loss"] == 0.0 and len(res["losses"]) == 4
    assert grid_search(lambda a: 1.0, (0.0, 0.5))["alpha"] == 0.0


def test_scaled_fake_quant_alpha0_is_rtn() -> None:
    w, spec = _rand(8, 64), QuantSpec(bits=3, group_size=32)
    assert torch.equal(scaled_fake_quant(w, torch.ones(64), spec), qdq(w, spec))
    with pytest.raises(ConfigError):
        scaled_fake_quant(w, torch.ones(63), spec)


@pytest.mark.parametrize("group_size", [32, 24, -1])  # 24: a short last group of 64 columns
def test_group_output_error_matches_a_loop(group_size: int) -> None:
    e, x = _rand(5, 64, seed=1), _rand(7, 64, seed=2)
    got = group_output_error(e, x, group_size, chunk=100)  # forces several row slices
    g = 64 if group_size == -1 else group_size
    cols = [slice(a, min(a + g, 64)) for a in range(0, 64, g)]
    want = torch.stack([((x[:, c] @ e[:, c].T) ** 2).mean(0) for c in cols], dim=1)  # (d_out, G)
    assert got.shape == want.shape and torch.allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("group_size", [32, 24, -1])
@pytest.mark.parametrize("symmetric", [False, True])
def test_clipping_never_worse_than_none(bits: int, group_size: int, symmetric: bool) -> None:
    spec = QuantSpec(bits=bits, group_size=group_size, symmetric=symmetric)
    w = _rand(48, 64, seed=bits)
    w[:, 3] *= 8  # outliers: clipping pays off in some groups
    x = _rand(128, 64, seed=10 + bits)
    ratios = clip_ratios(20, 0.5)
    res = clip_search(w, x, spec, ratios)
    assert res["loss"] <= res["loss_noclip"] + 1e-9
    assert res["loss"] < res["loss_noclip"]  # random weights: some group gains
    m = group_max(w, group_size)
    assert bool((res["max_val"] <= m + 1e-6).all())
    grid = torch.tensor(ratios)
    assert bool(torch.isclose(res["ratio"].reshape(-1, 1), grid.reshape(1, -1)).any(1).all())  # ratios of the grid
    # the reported objective is the chosen clipped weight's
    e = qdq(clip_weight(w, res["max_val"], group_size), spec) - w
    assert float(group_output_error(e, x, group_size).sum()) == pytest.approx(res["loss"], rel=1e-4)


def test_clip_search_refuses_bad_ratios_and_inputs() -> None:
    w, x, spec = _rand(4, 32), _rand(8, 32), QuantSpec(bits=3, group_size=32)
    for ratios in [(), (1.0, 0.0), (1.5,)]:
        with pytest.raises(ConfigError):
            clip_search(w, x, spec, ratios)
    with pytest.raises(ConfigError):
        clip_search(w, _rand(8, 31), spec, (1.0,))
    with pytest.raises(ConfigError):
        clip_weight(w, torch.ones(4, 2), 32)
