"""The NaN/Inf check of a test-time layer's weight (ttq.nn.linear.WeightWatch): once when the layer wraps
the weight, again only after it changes; never per forward (src/ttq/nn/linear.py, lowrank_linear.py)."""

from __future__ import annotations

import pytest
import torch

import ttq
import ttq.nn.linear as linear_mod
from ttq.formats import affine
from ttq.methods.lowrank import svd_factors
from ttq.nn.linear import TTQLinear
from ttq.nn.lowrank_linear import LowRankTTQLinear, OnlineLowRankTTQLinear

SPEC, SCALE = ttq.QuantSpec(bits=3, group_size=16), ttq.ScaleSpec()


def _make(kind: str, lin: torch.nn.Linear):
    if kind == "ttq":
        return TTQLinear(lin, SPEC, SCALE, rank=2)
    if kind == "lowrank":  # factors of a finite weight of the same shape
        return LowRankTTQLinear(lin, SPEC, SCALE, *svd_factors(lin.weight.detach().nan_to_num(0, 0, 0), 2))
    return OnlineLowRankTTQLinear(lin, SPEC, SCALE, rank=2)


@pytest.fixture
def counted(monkeypatch):
    """Counts weight checks: the layers' (ttq.nn.linear.check_finite) and quantize's (affine.check_finite)."""
    calls = {"layer": 0, "quantize": 0}

    def counter(name, real):
        def wrapped(t, what):
            calls[name] += 1
            return real(t, what)
        return wrapped

    monkeypatch.setattr(linear_mod, "check_finite", counter("layer", linear_mod.check_finite))
    monkeypatch.setattr(affine, "check_finite", counter("quantize", affine.check_finite))
    return calls


@pytest.mark.parametrize("kind", ["ttq", "lowrank", "online"])
def test_weight_checked_at_wrap_time_and_after_a_change_only(kind, counted):
    torch.manual_seed(0)
    lin = torch.nn.Linear(48, 24)
    layer = _make(kind, lin)
    assert counted == {"layer": 1, "quantize": 0}  # at wrap time
    x = torch.randn(2, 5, 48)
    with torch.no_grad():
        first = layer(x)
        for _ in range(3):
            layer(x)
        assert counted == {"layer": 1, "quantize": 0}  # no pass over the weight per forward
        layer.weight.mul_(2)  # an in-place change: checked once more, and the layer follows it
        changed = layer(x)
        layer(x)
    assert counted == {"layer": 2, "quantize": 0}
    assert not torch.allclose(changed, first)


@pytest.mark.parametrize("kind", ["ttq", "lowrank", "online"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight_is_refused_naming_the_shape(kind, bad):
    lin = torch.nn.Linear(48, 24)
    with torch.no_grad():
        lin.weight[3, 4] = bad
    with pytest.raises(ValueError, match=r"weight of shape \(24, 48\) of a TTQ layer contains 1 NaN/Inf"):
        _make(kind, lin)
    with torch.no_grad():
        lin.weight[3, 4] = 0.0
    layer = _make(kind, lin)
    with torch.no_grad():
        layer(torch.randn(1, 4, 48))
        layer.weight[0, 0] = bad  # a later in-place change is caught at the next forward
        with pytest.raises(ValueError, match=r"weight of shape \(24, 48\) of a TTQ layer contains 1 NaN/Inf"):
            layer(torch.randn(1, 4, 48))


def test_residual_follows_an_in_place_change():
    """TTQLinear's cached residual W - B A is recomputed when W changes (same output as a fresh layer)."""
    torch.manual_seed(1)
    lin = torch.nn.Linear(48, 24)
    layer = TTQLinear(lin, SPEC, SCALE, rank=2)
    x = torch.randn(1, 6, 48)
    with torch.no_grad():
        layer(x)
        layer.weight.add_(0.5)
        fresh = TTQLinear(lin, SPEC, SCALE, rank=2)
        fresh.lr_b.copy_(layer.lr_b)
        fresh.lr_a.copy_(layer.lr_a)
        assert torch.equal(layer(x), fresh(x))


def test_activations_still_checked_per_forward():
    layer = TTQLinear(torch.nn.Linear(48, 24), SPEC, SCALE)
    x = torch.randn(1, 4, 48)
    x[0, 1, 2] = float("nan")
    with torch.no_grad(), pytest.raises(ValueError, match="activations contains 1 NaN/Inf"):
        layer(x)


def test_quantize_check_keyword():
    """quantize keeps its check for direct callers; check=False (after a one-time check) skips it."""
    w = torch.randn(8, 32)
    w[1, 1] = float("nan")
    with pytest.raises(ValueError, match="weight contains 1 NaN/Inf"):
        affine.quantize(w, SPEC)
    codes, scale, zero = affine.quantize(w, SPEC, check=False)
    assert codes.shape == (8, 32) and scale.shape == zero.shape == (8, 2)
    ok = torch.randn(8, 32)
    assert all(torch.equal(a, b) for a, b in zip(affine.quantize(ok, SPEC), affine.quantize(ok, SPEC, check=False)))


@pytest.mark.parametrize("kind", ["ttq", "lowrank", "online"])
def test_layers_built_in_inference_mode(kind, counted):
    """Inference-mode weights have no version counter: the check keys on their storage alone."""
    with torch.inference_mode():
        lin = torch.nn.Linear(48, 24)
        layer = _make(kind, lin)
        x = torch.randn(1, 5, 48)
        y = layer(x)
        assert torch.equal(layer(x), y) or kind == "online"  # the online layer adapts between calls
    assert counted["layer"] == 1
