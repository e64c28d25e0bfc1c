"""ttq.methods.hqq: HQQ's optimiser through ttq's codes / scale / zero (skips when hqq is not installed)."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from ttq.errors import MissingDependency
from ttq.formats.affine import QuantSpec, dequantize
from ttq.methods.hqq import hqq_native, hqq_quantize
from ttq.methods.rtn import rtn

needs_hqq = pytest.mark.skipif(importlib.util.find_spec("hqq") is None, reason="hqq not installed (pip install 'ttq[hqq]')")
BITS = [2, 3, 4]
GROUPS = [32, 64, 128]


def _random(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if kind == "gauss":
        return torch.randn(48, 256, generator=g)
    # heavy tails with a few outliers, as in LLM weights; d_in = 320 is not a multiple of 128
    w = torch.randn(48, 320, generator=g) * torch.rand(48, 320, generator=g).pow(4) * 4
    w[torch.rand(48, 320, generator=g) < 0.01] *= 20
    return w


@pytest.fixture(scope="module")
def stories_weights(stories_dir) -> dict[str, torch.Tensor]:
    """Every linear weight of stories260K's first two blocks (d_in 64 and 172: 172 is no multiple of 32/64/128)."""
    from safetensors.torch import load_file

    return {k: v.float() for k, v in load_file(stories_dir / "model.safetensors").items()
            if v.dim() == 2 and k.startswith(("model.layers.0.", "model.layers.1."))}


def _errors(w: torch.Tensor, spec: QuantSpec) -> tuple[float, float, float, float]:
    """(HQQ's, RTN's) squared Frobenius error and mean absolute error."""
    codes, scale, zero = hqq_quantize(w, spec)
    w_hqq = dequantize(codes, scale, zero, spec.group_size)
    w_rtn = rtn(w, spec)
    return ((w - w_hqq).pow(2).sum().item(), (w - w_rtn).pow(2).sum().item(),
            (w - w_hqq).abs().mean().item(), (w - w_rtn).abs().mean().item())


@needs_hqq
@pytest.mark.parametrize("kind", ["gauss", "heavy"])
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("bits", BITS)
def test_hqq_error_at_most_rtn_on_random_weights(kind, bits, group_size):
    l2_hqq, l2_rtn, l1_hqq, l1_rtn = _errors(_random(kind), QuantSpec(bits=bits, group_size=group_size))
    assert l2_hqq <= l2_rtn and l1_hqq <= l1_rtn
    assert l2_hqq < 0.97 * l2_rtn  # a real improvement, not a tie (measured 0.76-0.96)


@needs_hqq
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("bits", BITS)
def test_hqq_error_at_most_rtn_on_stories260k(stories_weights, bits, group_size):
    spec = QuantSpec(bits=bits, group_size=group_size)
    totals = torch.zeros(4)
    for name, w in stories_weights.items():
        l2_hqq, l2_rtn, l1_hqq, l1_rtn = _errors(w, spec)
        assert l2_hqq <= l2_rtn and l1_hqq <= l1_rtn, name
        totals += torch.tensor([l2_hqq, l2_rtn, l1_hqq, l1_rtn])
    assert totals[0] < 0.97 * totals[1]  # over the 14 matrices (measured 0.85-0.94)


@needs_hqq
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("bits", BITS)
def test_dequantized_equals_hqqs_own_dequantization(bits, group_size):
    """ttq's ``codes * S + Z`` equals HQQ's ``Quantizer.dequantize`` ((W_q - z) * s) of HQQ's own run."""
    from hqq.core.quantize import Quantizer

    w = _random("gauss")[:, :256]
    codes, scale, zero = hqq_quantize(w, QuantSpec(bits=bits, group_size=group_size))
    w_q, meta = Quantizer.quantize(w, nbits=bits, channel_wise=True, group_size=group_size, optimize=True,
                                   round_zero=False, axis=1, bitpack=False, device="cpu")
    theirs = Quantizer.dequantize(w_q, {**meta, "compute_dtype": torch.float32})
    ours = dequantize(codes, scale, zero, group_size)
    assert torch.equal(codes.float(), w_q.reshape(w.shape))  # HQQ's codes, as they are
    assert (ours - theirs).abs().max().item() <= 1e-5


@needs_hqq
@pytest.mark.parametrize("group_size", [128, -1])
def test_short_last_group_and_per_channel(group_size):
    """d_in = 320 at g = 128: groups of 128, 128, 64 per row, each HQQ's; g = -1: one group per row."""
    from hqq.core.quantize import Quantizer

    w = _random("heavy")
    spec = QuantSpec(bits=3, group_size=group_size)
    codes, s, z = hqq_native(w, spec)
    n_groups = 3 if group_size == 128 else 1
    assert codes.dtype == torch.uint8 and codes.shape == w.shape and int(codes.max()) <= 7
    assert s.shape == z.shape == (48, n_groups)
    if group_size == 128:  # the last 64 columns are HQQ's run on them alone, as one group per row
        w_q, meta = Quantizer.quantize(w[:, 256:], nbits=3, channel_wise=True, group_size=64, optimize=True,
                                       round_zero=False, axis=1, bitpack=False, device="cpu")
        assert torch.equal(codes[:, 256:].float(), w_q) and torch.allclose(s[:, 2:], meta["scale"])
    c2, scale, zero = hqq_quantize(w, spec)
    assert torch.equal(c2, codes) and torch.allclose(scale, s) and torch.allclose(zero, -z * s)


@needs_hqq
def test_constant_group_is_exact_and_result_is_deterministic():
    w = _random("gauss")[:8, :64].clone()
    w[:, :32] = 0.25  # a constant group in every row
    spec = QuantSpec(bits=2, group_size=32)
    codes, scale, zero = hqq_quantize(w, spec)
    w_hat = dequantize(codes, scale, zero, 32)
    assert torch.allclose(w_hat[:, :32], w[:, :32], atol=1e-6)
    again = hqq_quantize(w, spec)
    assert all(torch.equal(a, b) for a, b in zip((codes, scale, zero), again))


@needs_hqq
@pytest.mark.parametrize("spec,msg", [
    (QuantSpec(bits=3, symmetric=True), "asymmetric integer format only"),
    (QuantSpec(bits=4, fmt="nf4"), "asymmetric integer format only"),
    (QuantSpec(bits=3, nu=0.9), "asymmetric integer format only"),
    (QuantSpec(bits=7), "HQQ quantizes to 2, 3, 4, 5, 6, 8 bits, not 7"),
])
def test_formats_hqq_does_not_produce(spec, msg):
    with pytest.raises(ValueError, match=msg):
        hqq_quantize(torch.randn(4, 64), spec)


@needs_hqq
def test_non_finite_weights_are_refused():
    w = torch.randn(4, 64)
    w[1, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        hqq_quantize(w, QuantSpec(bits=3, group_size=32))


def test_missing_hqq_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "hqq.core.quantize", None)  # import hqq.core.quantize -> ImportError
    with pytest.raises(MissingDependency, match=r"method 'hqq' needs the hqq package .*pip install 'ttq\[hqq\]'"):
        hqq_quantize(torch.randn(4, 64), QuantSpec(bits=3, group_size=32))
