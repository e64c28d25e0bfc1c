"""Tests of FP4 E2M1 with micro-scaling (src/ttq/formats/fp4.py): fp4, NVFP4, MXFP4."""

from __future__ import annotations

import pytest
import torch

from ttq.formats.affine import QuantSpec, bits_per_weight, dequantize, qdq, quantize
from ttq.formats.fp4 import (
    E4M3_MAX,
    e2m1_decode,
    e2m1_encode,
    e2m1_values,
    e8m0_scale,
    fp4_params,
    nvfp4_tensor_scale,
    round_e4m3,
)


def _w(d_out: int, d_in: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(seed)) * 0.02


def _e4m3_grid() -> torch.Tensor:
    """All non-negative finite FP8-E4M3 (fn) values, from the bit layout (bias 7, no inf, S.1111.111 = NaN)."""
    vals = []
    for e in range(16):
        for m in range(8):
            if e == 15 and m == 7:
                continue
            vals.append(m / 8 * 2.0**-6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7))
    return torch.tensor(sorted(vals), dtype=torch.float64)


def _sqnr_db(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    return float(10 * torch.log10(w.pow(2).sum() / (w - w_hat).pow(2).sum()))


def test_e2m1_grid_exact() -> None:
    v = e2m1_values()
    assert v[:8].tolist() == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    assert v[8:].tolist() == [-0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
    codes = torch.arange(16, dtype=torch.uint8)
    assert torch.equal(e2m1_decode(e2m1_encode(e2m1_decode(codes))), e2m1_decode(codes))
    assert torch.equal(e2m1_encode(v[:8]), codes[:8])  # code = magnitude index, bit 3 = sign
    assert torch.equal(e2m1_encode(v[9:]), codes[9:])


def test_e2m1_rounding_ties_to_even_and_saturation() -> None:
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, 100.0, -0.75, -5.0, 0.26, 4.9])
    expect = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, -1.0, -4.0, 0.5, 4.0]
    assert e2m1_decode(e2m1_encode(x)).tolist() == expect


def test_e4m3_rounding_matches_enumerated_grid() -> None:
    grid = _e4m3_grid()
    assert grid.max() == E4M3_MAX and grid.numel() == 127
    x = torch.exp(torch.empty(4000).uniform_(-12, 6.2, generator=torch.Generator().manual_seed(0)))
    idx = (x.double()[:, None] - grid[None, :]).abs().argmin(1)
    assert torch.equal(round_e4m3(x).double(), grid[idx])
    # exact points, a tie to even (17 lies between 16 and 18) and saturation
    assert round_e4m3(torch.tensor([448.0, 500.0, 17.0, 0.0, 2.0**-9])).tolist() == [448.0, 448.0, 16.0, 0.0, 2.0**-9]


def test_mxfp4_scales_are_powers_of_two() -> None:
    w = _w(16, 256, seed=1) * torch.logspace(-3, 3, 16)[:, None]
    spec = QuantSpec(4, 32, fmt="mxfp4")
    _codes, scale, zero = quantize(w, spec)
    e = torch.log2(scale)
    assert torch.equal(e, e.round()) and e.min() >= -127 and e.max() <= 127
    amax = w.abs().reshape(16, 8, 32).amax(-1)
    ratio = amax / scale
    assert torch.all((ratio >= 4) & (ratio < 8))  # OCP: 2^(floor(log2 amax) - 2)
    assert torch.equal(zero, torch.zeros_like(zero))
    assert e8m0_scale(torch.tensor([0.0])).item() == 2.0**-127


def test_nvfp4_scales_e4m3_times_tensor_scale() -> None:
    w = _w(8, 64, seed=2)
    spec = QuantSpec(4, 16, fmt="nvfp4")
    scale = fp4_params(w, spec)
    t = nvfp4_tensor_scale(w)
    assert t.item() == pytest.approx(w.abs().max().item() / (6 * 448), rel=1e-6)
    block = scale / t
    assert torch.allclose(round_e4m3(block), block, rtol=1e-6, atol=0)  # on the E4M3 grid (up to fp32 division)
    assert block.max() <= E4M3_MAX and block.max() >= 0.9 * E4M3_MAX  # the largest block uses the range
    bare = fp4_params(w, spec, tensor_scale=False)
    assert torch.equal(round_e4m3(bare), bare)
    # without the per-tensor scale, 0.002-sized weights need E4M3 subnormal scales: much worse
    small = w / 10
    bare = fp4_params(small, spec, tensor_scale=False)
    wq_bare = dequantize(quantize(small, spec, bare)[0], bare, torch.zeros_like(bare), 16, fmt="nvfp4")
    assert _sqnr_db(small, qdq(small, spec)) > _sqnr_db(small, wq_bare) + 3


@pytest.mark.parametrize(
    ("fmt", "group_size", "min_db"),
    [("fp4", 32, 16.0), ("fp4", 16, 17.0), ("nvfp4", 16, 17.0), ("mxfp4", 32, 14.0)],
)
def test_fp4_sqnr_and_error_bound(fmt: str, group_size: int, min_db: float) -> None:
    w = _w(32, 256, seed=3)
    spec = QuantSpec(4, group_size, fmt=fmt)
    codes, scale, zero = quantize(w, spec)
    w_hat = dequantize(codes, scale, zero, group_size, fmt=fmt)
    assert torch.equal(w_hat, qdq(w, spec))
    assert _sqnr_db(w, w_hat) > min_db
    s = scale.repeat_interleave(group_size, dim=1)
    # E2M1 rounding error: at most a quarter step near 0 and a fifth of |x| above (saturation aside)
    inside = (w.abs() <= 6 * s)
    err = (w - w_hat).abs()
    assert torch.all(err[inside] <= (0.25 * s + w.abs() / 5)[inside] + 1e-9)


def test_fp4_round_trip_of_grid_values() -> None:
    v = e2m1_values()
    w = torch.cat([v, v.flip(0)])[None, :] * torch.tensor([[0.25], [2.0]])  # (2, 32), amax = 6 * scale
    for spec in (QuantSpec(4, 32, fmt="fp4"), QuantSpec(4, 32, fmt="mxfp4"), QuantSpec(4, 16, fmt="nvfp4")):
        assert torch.equal(qdq(w, spec), w), spec.fmt


def test_format_group_and_bits_errors() -> None:
    with pytest.raises(ValueError, match="groups of 16"):
        QuantSpec(4, 32, fmt="nvfp4")
    with pytest.raises(ValueError, match="groups of 32"):
        QuantSpec(4, -1, fmt="mxfp4")
    with pytest.raises(ValueError, match="4-bit codes only"):
        QuantSpec(2, 16, fmt="nvfp4")
    with pytest.raises(ValueError, match="4-bit codes only"):
        QuantSpec(8, 32, fmt="fp4")
    with pytest.raises(ValueError, match="fp4_params handles"):
        fp4_params(torch.ones(2, 32), QuantSpec(4, 32, fmt="nf4"))


def test_bits_per_weight_fp4() -> None:
    assert bits_per_weight(QuantSpec(4, 16, fmt="nvfp4")) == 4.5
    assert bits_per_weight(QuantSpec(4, 32, fmt="mxfp4")) == 4.25
    assert bits_per_weight(QuantSpec(4, 32, fmt="fp4")) == 4.5
