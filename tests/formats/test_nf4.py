"""Tests of the NF4 codebook format (src/ttq/formats/nf4.py) and its dispatch through affine."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ttq.formats.affine import QuantSpec, bits_per_weight, dequantize, group_params, qdq, quantize
from ttq.formats.nf4 import NF4_LEVELS, nearest_level, nf4_codebook, nf4_quantize, normal_float_levels
from ttq.methods.scaling import ScaleSpec, scaled_qdq
from ttq.nn.linear import TTQLinear


def _w(d_out: int, d_in: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(seed)) * 0.02


def test_codebook_values_exact() -> None:
    cb = nf4_codebook()
    assert cb.shape == (16,) and cb.dtype == torch.float32
    assert torch.all(cb[1:] > cb[:-1])
    assert cb[0] == -1.0 and cb[7] == 0.0 and cb[15] == 1.0
    assert int((cb > 0).sum()) == 8 and int((cb < 0).sum()) == 7
    # bitsandbytes' published table (two entries typed independently of the source)
    assert cb[1].item() == pytest.approx(-0.6961928009986877, abs=0)
    assert cb[14].item() == pytest.approx(0.7229568362236023, abs=0)
    # the table is QLoRA's normal-quantile construction (float32 rounding of float64 quantiles)
    assert torch.allclose(cb.double(), normal_float_levels(), atol=1e-7, rtol=0)
    assert len(NF4_LEVELS) == 16


def test_codebook_round_trip_exact() -> None:
    cb = nf4_codebook()
    absmax = torch.tensor([0.5, 3.0, 0.0125])
    # each row: all 16 levels twice (group 32), times that row's absmax (the +-1 levels fix the absmax)
    w = torch.cat([cb, cb.flip(0)])[None, :] * absmax[:, None]  # (3, 32)
    spec = QuantSpec(4, 32, fmt="nf4")
    codes, scale, zero = quantize(w, spec)
    assert torch.equal(scale[:, 0], absmax)
    assert torch.equal(zero, torch.zeros_like(scale))
    assert torch.equal(codes[0, :16], torch.arange(16, dtype=torch.uint8))
    assert torch.equal(dequantize(codes, scale, zero, 32, fmt="nf4"), w)
    assert torch.equal(qdq(w, spec), w)


@pytest.mark.parametrize("group_size", [16, 64, -1])
def test_nearest_level_and_error_bound(group_size: int) -> None:
    w = _w(12, 128, seed=group_size + 5)
    spec = QuantSpec(4, group_size, fmt="nf4")
    codes, scale = nf4_quantize(w, spec)
    g = 128 if group_size == -1 else group_size
    x = w / scale.repeat_interleave(g, dim=1)
    brute = (x[..., None] - nf4_codebook()).abs().argmin(-1)  # (12, 128)
    assert torch.equal(codes.long(), brute)
    err = (qdq(w, spec) - w).abs()
    half_gap = float((nf4_codebook()[1:] - nf4_codebook()[:-1]).max() / 2)  # 0.1385
    assert torch.all(err <= half_gap * scale.repeat_interleave(g, dim=1) + 1e-7)
    assert float(err.max()) > 0


def test_nearest_level_ties_go_low() -> None:
    cb = nf4_codebook()
    mid = (cb[8] + cb[9]) / 2
    assert int(nearest_level(mid[None], cb)) == 8


def test_zero_group_and_short_last_group() -> None:
    w = _w(4, 40, seed=3)
    w[1, :32] = 0.0
    spec = QuantSpec(4, 32, fmt="nf4")
    codes, scale, zero = quantize(w, spec)
    assert scale.shape == (4, 2) and scale[1, 0] == 0
    w_hat = dequantize(codes, scale, zero, 32, fmt="nf4")
    assert torch.equal(w_hat[1, :32], torch.zeros(32))
    assert scale[0, 1] == w[0, 32:].abs().max()  # short group of 8 columns


def test_nu_multiplies_absmax() -> None:
    w = _w(4, 32, seed=4)
    s1, _ = group_params(w, QuantSpec(4, 32, fmt="nf4"))
    s2, _ = group_params(w, QuantSpec(4, 32, nu=0.9, fmt="nf4"))
    assert torch.allclose(s2, 0.9 * s1)


def test_spec_errors() -> None:
    with pytest.raises(ValueError, match="4-bit codes only"):
        QuantSpec(3, 32, fmt="nf4")
    with pytest.raises(ValueError, match="unknown quantization format"):
        QuantSpec(4, 32, fmt="nf3")
    with pytest.raises(ValueError, match="unknown quantization format"):
        dequantize(torch.zeros(2, 4, dtype=torch.uint8), torch.ones(2, 1), torch.zeros(2, 1), 4, fmt="bogus")


def test_bits_per_weight() -> None:
    assert bits_per_weight(QuantSpec(4, 64, fmt="nf4")) == 4.25
    assert bits_per_weight(QuantSpec(4, 32, fmt="nf4")) == 4.5
    assert bits_per_weight(QuantSpec(3, 32)) == 4.0  # asymmetric: fp16 scale + zero
    assert bits_per_weight(QuantSpec(3, 32, symmetric=True)) == 3.5
    assert bits_per_weight(QuantSpec(4, -1, fmt="nf4"), d_in=64) == 4.25
    with pytest.raises(ValueError, match="needs d_in"):
        bits_per_weight(QuantSpec(4, -1))


def test_methods_pick_up_nf4() -> None:
    """AWQ/TTQ's scaled QDQ and TTQLinear quantize with the spec's format unchanged."""
    w = _w(8, 64, seed=6)
    spec = QuantSpec(4, 32, fmt="nf4")
    s = torch.linspace(0.5, 2.0, 64)
    assert torch.allclose(scaled_qdq(w, s, spec), qdq(w * s, spec) / s)
    lin = nn.Linear(64, 8, bias=False)
    lin.weight.data = w.clone()
    mod = TTQLinear(lin, spec, ScaleSpec(alpha=0.0))
    x = torch.randn(1, 5, 64)
    y_ref = F.linear(x / mod.quantize_for(x)[3], qdq(w * mod.quantize_for(x)[3], spec))
    assert torch.allclose(mod(x), y_ref, atol=1e-6)
    # NF4 levels differ from the integer grid: the int-format result is not the same weight
    assert not torch.allclose(qdq(w, spec), qdq(w, QuantSpec(4, 32)))
