"""Tests of the test-time pruning module and its handler (src/ttq/nn/prune_linear.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import ttq
from ttq.config import PruneConfig
from ttq.formats.affine import QuantSpec
from ttq.methods.pruning import prune_mask
from ttq.nn.prune_linear import TTQPruneLinear


def _linear(d_in: int, d_out: int, seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(d_in, d_out)


def _x(shape: tuple, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * torch.exp(torch.randn(shape[-1], generator=g))


def test_sparsity_zero_without_quant_is_the_layer() -> None:
    lin, x = _linear(32, 16, 0), _x((1, 12, 32), 1)
    with torch.no_grad():
        assert torch.equal(TTQPruneLinear(lin, 0.0)(x), lin(x))


@pytest.mark.parametrize("kw", [{"sparsity": 0.5}, {"n_m": (2, 4)}, {"sparsity": 0.5, "spec": QuantSpec(4, 32)}])
def test_effective_weight_pattern_per_sequence(kw: dict) -> None:
    lin, x = _linear(64, 24, 2), _x((2, 30, 64), 3)
    mod = TTQPruneLinear(lin, **kw)
    with torch.no_grad():
        y = mod(x)
        for i in range(2):  # each sequence gets its own mask
            w = mod.effective_weight(x[i : i + 1])
            keep = prune_mask(lin.weight, x[i].norm(dim=0), kw.get("sparsity"), kw.get("n_m"))
            assert torch.equal(w != 0, keep)
            assert float((w == 0).float().mean()) == 0.5
            torch.testing.assert_close(y[i : i + 1], x[i : i + 1] @ w.T + lin.bias)


def test_module_bad_input() -> None:
    lin = _linear(12, 4, 4)
    with pytest.raises(ValueError, match="M=8 needs M to divide the input dimension, got d_in=12"):
        TTQPruneLinear(lin, n_m=(2, 8))
    with pytest.raises(ValueError, match=r"sparsity must be a number in \[0, 1\)"):
        TTQPruneLinear(lin, 1.2)
    with pytest.raises(ValueError, match="unknown order"):
        TTQPruneLinear(lin, 0.5, order="x")


@pytest.mark.slow
def test_stories_prune_walker(stories_model) -> None:
    model = stories_model
    ids = torch.randint(0, 512, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    # M = 8 does not divide the MLP down projection's d_in = 172: a clear error, nothing replaced
    with pytest.raises(ValueError, match="M=8 needs M to divide the input dimension, got d_in=172"):
        ttq.quantize_(model, PruneConfig(n_m=(4, 8)))
    assert ttq.restore_(model) == 0
    errs = {}
    for cfg in (PruneConfig(sparsity=0.0), PruneConfig(sparsity=0.5), PruneConfig(n_m=(2, 4), quant=QuantSpec(4, 32))):
        ttq.quantize_(model, cfg)
        with torch.no_grad():
            errs[cfg] = float((model(ids).logits - ref).pow(2).mean())
        assert ttq.restore_(model) == 35
    assert errs[PruneConfig(sparsity=0.0)] == 0.0
    assert 0.0 < errs[PruneConfig(sparsity=0.5)] < errs[PruneConfig(n_m=(2, 4), quant=QuantSpec(4, 32))]
