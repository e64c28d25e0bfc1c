"""Tests of AWP (src/ttq/methods/awp.py), its config/handlers and the on-the-fly module."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ttq
from ttq.config import AWPConfig, config_from_dict, config_to_dict
from ttq.formats.affine import QuantSpec, dequantize, qdq
from ttq.methods.awp import awp_qdq, awp_quantize, shrunk_correlation, spectral_norm
from ttq.methods.awq import output_error
from ttq.methods.scaling import ScaleSpec, scaled_qdq
from ttq.nn.awp_linear import AWPLinear
from ttq.nn.linear import StaticQuantLinear, TTQLinear
from ttq.patch.capture import collect_layer_stats
from ttq.patch.blocks import block_linears


def _correlated(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5
    x = torch.randn(n, d, generator=g) @ mix + 0.3 * torch.randn(n, d, generator=g)
    return x * torch.exp(torch.randn(d, generator=g))


def _weight(d_out: int, d_in: int, seed: int) -> torch.Tensor:
    return torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(seed)) / d_in**0.5


def test_shrunk_correlation_eq13() -> None:
    x = _correlated(64, 16, 0)
    g = x.T @ x
    c = shrunk_correlation(g, 0.25)
    eta = torch.diagonal(g).sum() / 16
    assert torch.allclose(c, 0.75 * g + 0.25 * eta * torch.eye(16))
    assert torch.allclose(torch.diagonal(c).sum(), torch.diagonal(g).sum())  # trace kept
    assert torch.allclose(shrunk_correlation(g, 1.0), eta * torch.eye(16))
    with pytest.raises(ValueError, match="lam must be in"):
        shrunk_correlation(g, 1.5)


def test_spectral_norm_power_iteration() -> None:
    x = _correlated(256, 48, 1)
    c = shrunk_correlation(x.T @ x, 0.01)
    assert spectral_norm(c) == pytest.approx(float(torch.linalg.eigvalsh(c).max()), rel=1e-3)
    assert spectral_norm(torch.zeros(4, 4)) == 0.0


@pytest.mark.parametrize("spec", [QuantSpec(3, 32), QuantSpec(2, -1), QuantSpec(4, 32, fmt="nf4")], ids=str)
def test_zero_iterations_is_rtn(spec: QuantSpec) -> None:
    x = _correlated(256, 64, 2)
    w, c = _weight(16, 64, 3), shrunk_correlation(x.T @ x, 0.01)
    assert torch.equal(awp_qdq(w, c, spec, iters=0), qdq(w, spec))
    s = torch.linspace(0.5, 2.0, 64)
    assert torch.allclose(awp_qdq(w, c, spec, iters=0, scale=s), scaled_qdq(w, s, spec))


@pytest.mark.parametrize("spec", [QuantSpec(3, 32), QuantSpec(4, 16, fmt="nvfp4")], ids=str)
def test_loss_never_increases_with_fixed_grid(spec: QuantSpec) -> None:
    x = _correlated(512, 96, 4)
    w, c = _weight(24, 96, 5), shrunk_correlation(x.T @ x, 0.01)
    *_, losses = awp_quantize(w, c, spec, iters=15, step=1.0)
    assert len(losses) == 16
    assert all(b <= a * (1 + 1e-5) for a, b in itertools.pairwise(losses))  # majorize-minimize steps
    assert losses[-1] <= losses[0]


def test_best_iterate_returned() -> None:
    x = _correlated(512, 96, 6)
    w, c = _weight(24, 96, 7), shrunk_correlation(x.T @ x, 0.01)
    codes, sc, z, losses = awp_quantize(w, c, QuantSpec(3, 32), iters=20, step=3.0)  # step 3 diverges here
    assert losses[-1] > 10 * losses[0]
    assert output_error(w, dequantize(codes, sc, z, 32), c) == pytest.approx(min(losses), rel=1e-4)


def test_literal_recomputed_grid_runs() -> None:
    x = _correlated(256, 64, 8)
    w, c = _weight(8, 64, 9), shrunk_correlation(x.T @ x, 0.01)
    *_, losses = awp_quantize(w, c, QuantSpec(3, 32), iters=5, fixed_grid=False)
    assert len(losses) == 6 and min(losses) <= losses[0]


def test_bad_input() -> None:
    w, c = torch.randn(4, 8), torch.eye(8)
    with pytest.raises(ValueError, match="expected \\(8, 8\\)"):
        awp_quantize(w, torch.eye(6), QuantSpec(3, 4))
    with pytest.raises(ValueError, match="iters"):
        awp_quantize(w, c, QuantSpec(3, 4), iters=-1)
    with pytest.raises(ValueError, match="step"):
        awp_quantize(w, c, QuantSpec(3, 4), step=0.0)
    with pytest.raises(ValueError, match="correlation matrix is zero"):
        awp_quantize(w, torch.zeros(8, 8), QuantSpec(3, 4))
    with pytest.raises(ValueError, match="scale must be positive"):
        awp_quantize(w, c, QuantSpec(3, 4), scale=torch.zeros(8))
    with pytest.raises(ValueError, match="iters"):
        AWPConfig(iters=-2)
    with pytest.raises(ValueError, match="shrink"):
        AWPConfig(shrink=2.0)


def test_config_and_calibration_need() -> None:
    assert AWPConfig().needs_calibration and not AWPConfig(online=True).needs_calibration
    cfg = AWPConfig(QuantSpec(3, 32), ScaleSpec(alpha=0.0), iters=4, step=2.0, online=True)
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_online_module_matches_ttq_at_zero_iterations() -> None:
    lin = nn.Linear(64, 16, bias=True)
    spec, sc = QuantSpec(3, 32), ScaleSpec()
    x = torch.randn(2, 7, 64)
    awp0, ttq_mod = AWPLinear(lin, spec, sc, iters=0), TTQLinear(lin, spec, sc)
    assert torch.allclose(awp0(x), ttq_mod(x), atol=1e-6)
    mod = AWPLinear(lin, spec, sc, iters=5, step=2.0)
    codes, s_q, z, s = mod.quantize_for(x[:1])
    ref = F.linear(x[:1] / s, dequantize(codes, s_q, z, 32), lin.bias)
    assert torch.allclose(mod(x[:1]), ref, atol=1e-6)


def test_stories_static_and_online(stories_model) -> None:
    ids = torch.randint(3, 500, (2, 128), generator=torch.Generator().manual_seed(0))
    calib = collect_layer_stats(stories_model, block_linears(stories_model), ids, 2.0)
    spec = QuantSpec(3, 32)
    # loss of a real layer never increases along the (fixed-grid, step 1) iteration
    name, lin = next(iter(block_linears(stories_model).items()))
    c = shrunk_correlation(calib[name].gram / calib[name].n_tokens, 0.01)
    *_, losses = awp_quantize(lin.weight.detach(), c, spec, iters=10)
    assert losses[-1] <= losses[0]
    *_, losses2 = awp_quantize(lin.weight.detach(), c, spec, iters=10, step=2.0)
    assert min(losses2) < 0.97 * losses2[0]  # a larger step moves codes off the RTN fixed point
    m = copy.deepcopy(stories_model)
    ttq.quantize_(m, AWPConfig(spec, iters=3), calibration=calib)
    mods = [mod for n, mod in m.named_modules() if n.endswith("_proj")]
    assert all(isinstance(mod, StaticQuantLinear) for mod in mods)
    assert all(mod.awp_losses[-1] <= mod.awp_losses[0] for mod in mods)
    m2 = copy.deepcopy(stories_model)
    ttq.quantize_(m2, AWPConfig(spec, iters=2, online=True))
    for model in (m, m2):
        assert torch.isfinite(model(ids[:1, :32]).logits).all()
    with pytest.raises(ValueError, match="needs calibration"):
        ttq.quantize_(copy.deepcopy(stories_model), AWPConfig(spec))
