"""The dequantized-weight cache of static quantized layers (src/ttq/nn/linear.py DequantCachedLinear)."""

from __future__ import annotations

import torch
import torch.nn as nn

from ttq.formats.affine import QuantSpec, quantize
from ttq.nn.gptq_linear import PermutedQuantLinear
from ttq.nn.linear import StaticQuantLinear


def _layers():
    torch.manual_seed(0)
    lin = nn.Linear(64, 8)
    spec = QuantSpec(bits=4, group_size=32)
    codes, scale, zero = quantize(lin.weight.detach(), spec)
    perm = torch.arange(64)
    twin = nn.Linear(64, 8)
    twin.load_state_dict(lin.state_dict())  # each layer owns its bias (a move converts it in place)
    return lin, StaticQuantLinear(lin, codes, scale, zero, spec), PermutedQuantLinear(twin, codes.clone(), scale.clone(),
                                                                                     zero.clone(), spec, perm)


def test_cache_follows_dtype_moves():
    lin, static, permuted = _layers()
    x = torch.randn(3, 64)
    for mod in (static, permuted):
        y32 = mod(x)
        assert mod.dequantized_weight() is mod.dequantized_weight()  # cached
        mod.to(torch.float64)  # a move drops the cache; the next forward rebuilds from the moved buffers
        assert mod._w_cache is None
        y64 = mod(x.double())
        assert y64.dtype == torch.float64 and torch.allclose(y64.float(), y32, atol=1e-5)
    # identity permutation: both layers compute the same weight
    assert torch.equal(static.dequantized_weight(), permuted.dequantized_weight())
    assert torch.allclose(static.dequantized_weight(), _layers()[1].dequantized_weight(), rtol=1e-6, atol=1e-7)
