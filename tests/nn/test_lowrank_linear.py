"""Tests of the low-rank TTQ modules, their configs and handlers (src/ttq/nn/lowrank_linear.py,
src/ttq/quantizers/lowrank.py: the Appendix E configs and handlers)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

import ttq
from ttq.config import (
    OnlineLowRankTTQConfig,
    PruneConfig,
    TTQConfig,
    TTQLowRankConfig,
    config_from_dict,
    config_to_dict,
)
from ttq.formats.affine import QuantSpec
from ttq.methods.lowrank import svd_factors
from ttq.methods.online_lowrank import principal_angle, scaled_factors
from ttq.methods.scaling import ChannelStats, ScaleSpec, input_scale
from ttq.nn.linear import TTQLinear
from ttq.nn.lowrank_linear import LowRankTTQLinear, OnlineLowRankTTQLinear
from ttq.patch.capture import collect_layer_stats


def _linear(d_in: int, d_out: int, seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(d_in, d_out, bias=True)


def _x(shape: tuple, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * torch.exp(torch.randn(shape[-1], generator=g))


@pytest.mark.parametrize("rank", [0, 4])
def test_svd_factors_match_ttqlinear(rank: int) -> None:
    lin, x = _linear(64, 48, 0), _x((2, 20, 64), 1)
    spec, sc = QuantSpec(3, 32), ScaleSpec()
    b, a = svd_factors(lin.weight.detach(), rank)
    with torch.no_grad():
        torch.testing.assert_close(LowRankTTQLinear(lin, spec, sc, b, a)(x), TTQLinear(lin, spec, sc, rank)(x))


def test_lowrank_module_rejects_mismatched_factors() -> None:
    lin = _linear(16, 8, 2)
    with pytest.raises(ValueError, match="do not fit a weight of shape"):
        LowRankTTQLinear(lin, QuantSpec(), ScaleSpec(), torch.zeros(8, 2), torch.zeros(3, 16))


def test_online_module_tracks_inputs_and_resets() -> None:
    lin = _linear(32, 24, 3)
    g = torch.Generator().manual_seed(4)
    basis = torch.linalg.qr(torch.randn(32, 32, generator=g))[0]
    x = (torch.randn(1, 400, 32, generator=g) * torch.cat([torch.full((4,), 5.0), torch.full((28,), 0.2)])) @ basis.T
    for rule in ("oja", "isvd"):
        mod = OnlineLowRankTTQLinear(lin, QuantSpec(4, 32), ScaleSpec(), rank=4, rule=rule, lr=5.0)
        u0 = mod.u.clone()
        with torch.no_grad():
            for _ in range(3):
                y = mod(x)
        assert mod.n_updates == 3 and y.shape == (1, 400, 24)
        assert principal_angle(mod.u, basis[:, :4]) < 0.1  # the loud input subspace
        assert torch.isfinite(y).all()
        mod.reset()
        assert torch.equal(mod.u, u0) and mod.n_updates == 0


def test_online_rank_zero_is_plain_ttq() -> None:
    lin, x = _linear(32, 16, 5), _x((1, 10, 32), 6)
    spec, sc = QuantSpec(3, 16), ScaleSpec()
    with torch.no_grad():
        torch.testing.assert_close(OnlineLowRankTTQLinear(lin, spec, sc, 0)(x), TTQLinear(lin, spec, sc, 0)(x))


def test_online_projection_reproduces_inputs_in_the_tracked_subspace() -> None:
    """B A = W U U^T: for inputs that lie in a rank-r subspace, the low-rank path alone gives W x."""
    lin = _linear(64, 48, 7)
    g = torch.Generator().manual_seed(8)
    basis = torch.linalg.qr(torch.randn(64, 8, generator=g))[0]
    x = torch.randn(1, 256, 8, generator=g) @ basis.T  # (1, 256, 64) in span(basis)
    mod = OnlineLowRankTTQLinear(lin, QuantSpec(2, 32), ScaleSpec(), 8, rule="isvd")
    with torch.no_grad():
        mod(x)
        b, a = mod.weight @ mod.u, mod.u.T
        torch.testing.assert_close(x @ a.T @ b.T, x @ lin.weight.T, atol=1e-4, rtol=1e-4)


def test_online_asvd_exact_matches_scaled_svd() -> None:
    """rule="asvd", power_iters=0: B A = svd_r[W S] S^-1 with S the prompt's C_lam^(1/2); power steps approach it."""
    lin, x = _linear(48, 40, 9), _x((1, 200, 48), 10)
    sc = ScaleSpec()
    s = input_scale(ChannelStats.from_activations(x, sc.p), ScaleSpec(alpha=1.0, lam=sc.lam))
    u, sv, vh = torch.linalg.svd(lin.weight.detach() * s, full_matrices=False)
    best = (u[:, :6] * sv[:6]) @ vh[:6] / s  # (d_out, d_in)
    exact = OnlineLowRankTTQLinear(lin, QuantSpec(3, 16), sc, 6, rule="asvd", power_iters=0)
    power = OnlineLowRankTTQLinear(lin, QuantSpec(3, 16), sc, 6, rule="asvd", power_iters=1)
    with torch.no_grad():
        exact(x)
        gaps = []
        for _ in range(30):
            power(x)  # warm-started: one step per forward on the same prompt
            gaps.append(principal_angle(power.u, exact.u))
    with pytest.raises(ValueError, match="needs the diagonal scale s"):
        exact.update(x)
    b, a = scaled_factors(lin.weight.detach(), s, exact.u)
    torch.testing.assert_close(b @ a, best, atol=1e-4, rtol=1e-4)
    assert gaps[-1] < 0.1 and gaps[-1] < gaps[0]


# ---------------------------------------------------------------- configs, handlers, walker


CONFIGS = [
    TTQLowRankConfig(),
    TTQLowRankConfig(
        QuantSpec(2, 64), ScaleSpec(0.6), 8, "asvd", 3, 0.2, True, QuantSpec(4, 16), "A", 0.5, "B", "activation"
    ),
    PruneConfig(),
    PruneConfig(n_m=(2, 4), quant=QuantSpec(4, 32), order="quantize_then_mask", score="magnitude"),
    OnlineLowRankTTQConfig(),
    OnlineLowRankTTQConfig(QuantSpec(3, 32), ScaleSpec(), 4, "isvd", 2.0, 0.9, 128),
    OnlineLowRankTTQConfig(rule="asvd", power_iters=0),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.name)
def test_config_round_trip(cfg) -> None:
    back = config_from_dict(json.loads(json.dumps(config_to_dict(cfg))))
    assert back == cfg and type(back) is type(cfg) and hash(back) == hash(cfg)


def test_config_calibration_needs_and_defaults() -> None:
    assert TTQLowRankConfig(init="asvd").needs_calibration
    assert TTQLowRankConfig(factor_prune=0.5, factor_prune_score="activation").needs_calibration
    assert not TTQLowRankConfig(init="alternating").needs_calibration
    assert not TTQLowRankConfig(factor_prune=0.5).needs_calibration
    assert PruneConfig(n_m=(1, 4)).sparsity == 0.75
    assert {"ttq_lowrank", "prune", "ttq_online"} <= set(ttq.METHODS)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: TTQLowRankConfig(init="pca"), "init must be one of svd, asvd, alternating"),
        (lambda: TTQLowRankConfig(rank=-1), "rank must be a non-negative integer"),
        (lambda: TTQLowRankConfig(factor_quant_which="AB"), "factor_quant_which must be one of A, B, both"),
        (lambda: TTQLowRankConfig(factor_prune=1.0), r"sparsity must be a number in \[0, 1\)"),
        (lambda: TTQLowRankConfig(asvd_lam=2.0), r"asvd_lam .* must be in \[0, 1\]"),
        (lambda: TTQLowRankConfig(iters=-2), "iters must be a non-negative integer"),
        (lambda: PruneConfig(sparsity=-0.5), r"sparsity must be a number in \[0, 1\)"),
        (lambda: PruneConfig(n_m=(5, 4)), "needs 1 <= N <= M, got 5:4"),
        (lambda: PruneConfig(sparsity=0.9, n_m=(2, 4)), "n_m=2:4 implies sparsity 0.5"),
        (lambda: PruneConfig(order="random"), "order must be one of"),
        (lambda: OnlineLowRankTTQConfig(rule="pca"), "rule must be one of oja, isvd, asvd"),
        (lambda: OnlineLowRankTTQConfig(power_iters=-1), "power_iters must be a non-negative integer"),
        (lambda: OnlineLowRankTTQConfig(lr=0.0), "lr .* must be positive"),
        (lambda: OnlineLowRankTTQConfig(decay=0.0), r"decay .* must be in \(0, 1\]"),
        (lambda: OnlineLowRankTTQConfig(chunk=0), "chunk must be a positive"),
    ],
)
def test_config_bad_input(make, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.slow
def test_stories_variants(stories_model) -> None:
    model = stories_model
    ids = torch.randint(0, 512, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    q3 = QuantSpec(3, 32)
    quantized = {}
    for cfg in (
        TTQConfig(quant=q3, rank=8),
        TTQLowRankConfig(quant=q3, rank=8),
        TTQLowRankConfig(quant=q3, rank=8, init="alternating", iters=2),
        OnlineLowRankTTQConfig(quant=q3, rank=8, rule="isvd"),
        OnlineLowRankTTQConfig(quant=q3, rank=8, rule="asvd"),
    ):
        ttq.quantize_(model, cfg)
        with torch.no_grad():
            quantized[(cfg.name, getattr(cfg, "init", None))] = model(ids).logits
        assert ttq.restore_(model) == 35
    torch.testing.assert_close(quantized[("ttq_lowrank", "svd")], quantized[("ttq", None)])  # SVD init = core TTQ r
    for out in quantized.values():
        assert torch.isfinite(out).all() and float((out - ref).pow(2).mean()) < float(ref.pow(2).mean())
    # ASVD needs calibration: a clear error without it, a working model with it
    with pytest.raises(ValueError, match="needs calibration data"):
        ttq.quantize_(model, TTQLowRankConfig(quant=q3, rank=8, init="asvd"))
    from ttq.quantizers.lowrank import _ttq_lowrank

    with pytest.raises(ValueError, match="needs calibration statistics"):
        _ttq_lowrank(nn.Linear(8, 8), "weight", TTQLowRankConfig(rank=2, init="asvd"), None)
    calib = collect_layer_stats(model, ttq.block_linears(model), ids, 2.0)
    ttq.quantize_(
        model, TTQLowRankConfig(quant=q3, rank=8, init="asvd", factor_quant=QuantSpec(4, 32)), calibration=calib
    )
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    ttq.restore_(model)
