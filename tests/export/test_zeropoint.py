"""The integer zero-point format ``int_zp`` (src/ttq/export/zeropoint.py): its grid, and bit-for-bit agreement
with compressed-tensors' own quantizer and dequantizer."""

from __future__ import annotations

import pytest
import torch

from ttq.export.zeropoint import NAME, zero_point_codes
from ttq.formats.affine import QuantSpec, bits_per_weight, dequantize, quantize
from ttq.methods.gptq import gptq_quantize

BITS = (2, 3, 4, 5, 8)
GROUPS = (32, 64, 128, -1)


def _w(d_out: int = 16, d_in: int = 256, seed: int = 0) -> torch.Tensor:
    w = torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(seed)) * 0.05
    w[0, :64] = w[0, :64].abs() + 0.01  # an all-positive group: 0 is still put on the grid
    w[1, :32] = 0.0  # an all-zero group
    return w


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("bits", BITS)
def test_grid(bits: int, group_size: int, symmetric: bool) -> None:
    spec = QuantSpec(bits=bits, group_size=group_size, symmetric=symmetric, fmt=NAME)
    w = _w()
    codes, scale, zero = quantize(w, spec)
    zp = zero_point_codes(scale, zero)
    assert int(codes.max()) <= spec.qmax and torch.equal(zp, zp.round()) and 0 <= float(zp.min())
    assert float(zp.max()) <= spec.qmax
    assert torch.allclose(zero, -zp * scale, rtol=0, atol=1e-12)  # Z = -zp S: an integer zero-point
    if symmetric:
        assert torch.all(zp[scale > 0] == 2 ** (bits - 1))
    w_hat = dequantize(codes, scale, zero, group_size, fmt=NAME)
    g = w.shape[1] if group_size == -1 else group_size
    s = scale.repeat_interleave(g, dim=1)
    assert torch.all((w_hat - w).abs() <= s * 0.5 + 1e-7 + (s * 1.01 if symmetric else 0))  # rounding (+ sym clip)
    assert torch.all(w_hat[w == 0] == 0)  # 0 is on the grid: an exact zero stays zero
    assert torch.all(w_hat[1, :32] == 0)  # all-zero group
    assert bits_per_weight(spec, 256) == pytest.approx(bits + (16 + (0 if symmetric else bits)) / g)


def test_gptq_keeps_the_integer_grid() -> None:
    """GPTQ quantizes column by column with given (scale, zero): its codes stay on the int_zp grid."""
    spec = QuantSpec(bits=4, group_size=32, fmt=NAME)
    w = _w(8, 64)
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(1))
    codes, scale, zero, perm = gptq_quantize(w, x.T @ x / 256, spec, act_order=True, static_groups=True)
    assert perm is None
    zp = zero_point_codes(scale, zero)
    assert torch.allclose(zero, -zp * scale, atol=1e-12) and int(codes.max()) <= 15


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("bits", BITS)
def test_same_numbers_as_compressed_tensors(bits: int, group_size: int, symmetric: bool) -> None:
    """Scale, zero-point, codes and dequantized weights equal compressed-tensors' (min-max observer) bit for bit."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize as ct_dequantize
    from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    w = _w()
    args = QuantizationArgs(num_bits=bits, symmetric=symmetric, group_size=group_size,
                            strategy="channel" if group_size == -1 else "group")
    g = w.shape[1] if group_size == -1 else group_size
    wg = w.reshape(w.shape[0], -1, g)
    ct_scale, ct_zp = calculate_qparams(wg.amin(-1), wg.amax(-1), args)
    spec = QuantSpec(bits=bits, group_size=group_size, symmetric=symmetric, fmt=NAME)
    codes, scale, zero = quantize(w, spec)
    off = 2 ** (bits - 1)
    nonzero = scale > 0  # compressed-tensors gives an all-zero group a tiny scale instead of 0
    assert torch.equal(scale[nonzero], ct_scale[nonzero])
    if not symmetric:
        assert torch.equal(zero_point_codes(scale, zero)[nonzero], ct_zp.float()[nonzero] + off)
    ct_codes = ct_quantize(w, ct_scale, ct_zp, args, dtype=torch.int8)
    live = nonzero.repeat_interleave(g, dim=1)  # (d_out, d_in): outside the all-zero group
    assert torch.equal((codes.to(torch.int16) - off)[live], ct_codes.to(torch.int16)[live])
    ct_w = ct_dequantize(ct_codes, ct_scale, None if symmetric else ct_zp, args)
    assert torch.equal(dequantize(codes, scale, zero, group_size, fmt=NAME)[live], ct_w[live])
