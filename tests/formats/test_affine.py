"""Tests of the groupwise affine QDQ primitives (src/ttq/formats/affine.py)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from ttq.errors import ConfigError
from ttq.formats.affine import (
    QuantSpec,
    dequantize,
    effective_group_size,
    expand_groups,
    group_params,
    num_groups,
    qdq,
    quantize,
)

BITS = list(range(2, 9))
GROUPS = [-1, 16, 32, 48, 200]  # 48 does not divide 80; 200 is wider than the layer
D_OUT, D_IN = 6, 80


def _weight(d_out: int = D_OUT, d_in: int = D_IN, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d_out, d_in, generator=g) * torch.linspace(0.1, 3.0, d_out)[:, None]
    return w.to(dtype)


def _half_step(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """S/2 on every element (d_out, d_in)."""
    scale, _ = group_params(w, spec)
    return expand_groups(scale, w.shape[1], spec.group_size) / 2


def _ref_qdq(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Independent reference: loop over column slices, eqs. 6-9 / 27-30 written out per group."""
    w = w.float()
    g = w.shape[1] if spec.group_size == -1 else spec.group_size
    out = torch.empty_like(w)
    for j in range(0, w.shape[1], g):
        blk = w[:, j : j + g]
        hi, lo = blk.max(dim=1, keepdim=True).values, blk.min(dim=1, keepdim=True).values
        if spec.symmetric:
            hi = torch.maximum(hi.abs(), lo.abs())
            lo = -hi
        if spec.nu != 1.0:
            hi, lo = (
                ((1 + spec.nu) / 2) * hi + ((1 - spec.nu) / 2) * lo,
                ((1 - spec.nu) / 2) * hi + ((1 + spec.nu) / 2) * lo,
            )
        s = (hi - lo) / spec.qmax
        codes = torch.round((blk - lo) / torch.where(s > 0, s, torch.ones_like(s))).clamp(0, spec.qmax)
        out[:, j : j + g] = codes * s + lo
    return out


# ---------------------------------------------------------------- accuracy


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("nu", [1.0, 1.25])
def test_error_at_most_half_step(bits: int, group_size: int, symmetric: bool, nu: float) -> None:
    spec = QuantSpec(bits, group_size, symmetric, nu)
    w = _weight()
    err = (qdq(w, spec) - w).abs()
    bound = _half_step(w, spec)
    assert torch.all(err <= bound * (1 + 1e-5) + 1e-6), float((err - bound).max())
    # and not trivially: the error uses a good part of the half step somewhere
    assert float(err.max()) > 0.5 * float(bound.max())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("nu", [1.0, 0.9, 1.25])
def test_matches_independent_reference(bits: int, group_size: int, symmetric: bool, nu: float) -> None:
    spec = QuantSpec(bits, group_size, symmetric, nu)
    w = _weight(seed=bits)
    got, ref = qdq(w, spec), _ref_qdq(w, spec)
    # the two compute the expanded range in different (equivalent) orders, so an element sitting on
    # a rounding tie (w - Z)/S = k + 1/2 may go either way: allow exactly those, one step apart
    step = 2 * _half_step(w, spec)
    _, zero = group_params(w, spec)
    frac = ((w - expand_groups(zero, D_IN, group_size)) / step) % 1
    off = (got - ref).abs() > 1e-5 * (1 + w.abs())
    assert float(off.float().mean()) < 0.05  # (nu = 1.25 puts each group's min and max on ties for qmax = 15, 255)
    torch.testing.assert_close((got - ref).abs()[off], step[off], rtol=1e-4, atol=0)
    assert torch.all((frac[off] - 0.5).abs() < 1e-4)
    torch.testing.assert_close(got[~off], ref[~off], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("symmetric", [False, True])
def test_clipping_nu_below_one(bits: int, symmetric: bool) -> None:
    """nu < 1 clips: in-range values keep the S/2 bound, out-of-range ones land on the clip edge."""
    spec = QuantSpec(bits, 16, symmetric, nu=0.8)
    w = _weight()
    scale, zero = group_params(w, spec)
    s, lo = expand_groups(scale, D_IN, 16), expand_groups(zero, D_IN, 16)
    hi = lo + s * spec.qmax
    out = qdq(w, spec)
    inside = (w >= lo) & (w <= hi)
    assert inside.any() and (~inside).any()
    assert torch.all((out - w).abs()[inside] <= (s / 2 * (1 + 1e-5) + 1e-6)[inside])
    torch.testing.assert_close(out[w > hi], hi[w > hi], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[w < lo], lo[w < lo], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("symmetric", [False, True])
def test_snr_gains_about_6db_per_bit(symmetric: bool) -> None:
    """Uniform quantization: each extra bit halves the step, ~6.02 dB more signal-to-noise."""
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))

    def snr_db(bits: int) -> float:
        e = qdq(w, QuantSpec(bits, 32, symmetric)) - w
        return 10 * math.log10(float(w.square().sum() / e.square().sum()))

    snrs = [snr_db(b) for b in range(3, 9)]
    gains = [b - a for a, b in itertools.pairwise(snrs)]
    assert all(5.0 < g < 7.0 for g in gains), gains


# ---------------------------------------------------------------- exactness


def _grid_weight(bits: int, group_size: int, symmetric: bool, dtype: torch.dtype, seed: int = 0):
    """Weights built on a q-bit grid with power-of-two steps (exact in float): each group holds
    codes 0 and qmax, so its min/max (or |max|) reproduce the grid's step and offset."""
    qmax = (1 << bits) - 1
    gen = torch.Generator().manual_seed(seed)
    n_g = num_groups(D_IN, group_size)
    g = effective_group_size(D_IN, group_size)
    codes = torch.randint(0, qmax + 1, (D_OUT, D_IN), generator=gen)
    codes[:, ::g] = 0
    codes[:, 1::g] = qmax
    step = 2.0 ** -torch.randint(2, 6, (D_OUT, n_g), generator=gen).float()  # (d_out, n_groups)
    if symmetric:
        zero = -step * qmax / 2  # |W|max = qmax * step / 2, still exact (a power of two times qmax)
    else:
        zero = step * torch.randint(-255 + qmax, 1, (D_OUT, n_g), generator=gen).float()  # |code + z| < 256
    w = codes.float() * expand_groups(step, D_IN, group_size) + expand_groups(zero, D_IN, group_size)
    assert torch.equal(w.to(dtype).float(), w)  # the grid is representable in dtype
    return w.to(dtype), codes


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", [-1, 16, 48])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_grid_round_trips_exactly(bits: int, group_size: int, symmetric: bool, dtype: torch.dtype) -> None:
    w, codes = _grid_weight(bits, group_size, symmetric, dtype, seed=bits)
    spec = QuantSpec(bits, group_size, symmetric)
    got_codes, _, _ = quantize(w, spec)
    assert torch.equal(got_codes.long(), codes)
    out = qdq(w, spec)
    assert out.dtype == dtype
    assert torch.equal(out, w)


@pytest.mark.parametrize("nu", [1.0, 0.9, 0.95, 1.3])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_constant_groups_asymmetric_exact(nu: float, bits: int) -> None:
    """Zero range: scale 0, no division by zero, every element dequantizes to itself."""
    c = torch.tensor([0.0, 1.0, -2.5, 0.1, 1e-3, 123.456, -7e4])[:, None]
    w = c.repeat(1, 64)  # (7, 64), every group constant
    spec = QuantSpec(bits, 16, symmetric=False, nu=nu)
    codes, scale, _ = quantize(w, spec)
    assert torch.all(scale == 0)
    assert torch.equal(codes, torch.zeros_like(codes))
    out = qdq(w, spec)
    assert torch.isfinite(out).all()
    assert torch.equal(out, w)


def test_constant_block_in_mixed_row() -> None:
    """Only one group of a row constant: it is exact, the others still quantize."""
    w = _weight()
    w[:, 16:32] = 0.37
    out = qdq(w, QuantSpec(3, 16))
    assert torch.equal(out[:, 16:32], w[:, 16:32])
    assert not torch.equal(out[:, :16], w[:, :16])


@pytest.mark.parametrize("bits", BITS)
def test_constant_groups_symmetric(bits: int) -> None:
    """Symmetric: an all-zero group has zero range (exact); a constant c != 0 has range 2|c|
    and comes back to within float rounding (c > 0 maps to code qmax, c < 0 to code 0)."""
    c = torch.tensor([0.0, 1.0, -2.5, 0.1, 3.3, -0.7])[:, None]
    w = c.repeat(1, 32)
    spec = QuantSpec(bits, 16, symmetric=True)
    codes, scale, _ = quantize(w, spec)
    assert torch.all(scale[0] == 0) and torch.all(scale[1:] > 0)
    assert torch.all(codes[c[:, 0] > 0] == spec.qmax) and torch.all(codes[c[:, 0] <= 0] == 0)
    out = qdq(w, spec)
    assert torch.equal(out[0], w[0]) and torch.equal(out[c[:, 0] < 0], w[c[:, 0] < 0])
    torch.testing.assert_close(out, w, rtol=2e-7, atol=0)


# ---------------------------------------------------------------- granularity


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("wide", [D_IN, D_IN + 1, 4096])
def test_group_at_least_row_is_per_channel(bits: int, wide: int) -> None:
    w = _weight()
    a = quantize(w, QuantSpec(bits, wide))
    b = quantize(w, QuantSpec(bits, -1))
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert a[1].shape == (D_OUT, 1)


@pytest.mark.parametrize(
    "d_in,group_size,n_groups", [(576, 128, 5), (80, 48, 2), (100, 33, 4), (64, 64, 1), (64, 32, 2)]
)
def test_short_last_group(d_in: int, group_size: int, n_groups: int) -> None:
    """When g does not divide d_in the last group is shorter; each group equals per-channel QDQ of its slice."""
    w = _weight(4, d_in, seed=3)
    spec = QuantSpec(4, group_size)
    codes, scale, zero = quantize(w, spec)
    assert num_groups(d_in, group_size) == n_groups
    assert scale.shape == zero.shape == (4, n_groups) and codes.shape == (4, d_in)
    last = w[:, (n_groups - 1) * group_size :]
    assert last.shape[1] == d_in - (n_groups - 1) * group_size
    torch.testing.assert_close(scale[:, -1], (last.amax(1) - last.amin(1)) / 15, rtol=1e-6, atol=0)
    assert torch.equal(zero[:, -1], last.amin(1))
    out = qdq(w, spec)
    for j in range(0, d_in, group_size):
        sl = slice(j, j + group_size)
        assert torch.equal(out[:, sl], qdq(w[:, sl].contiguous(), QuantSpec(4, -1)))


@pytest.mark.parametrize(
    "d_in,group_size,eff,n", [(80, -1, 80, 1), (80, 16, 16, 5), (80, 48, 48, 2), (80, 80, 80, 1), (80, 81, 80, 1)]
)
def test_group_size_table(d_in: int, group_size: int, eff: int, n: int) -> None:
    assert effective_group_size(d_in, group_size) == eff
    assert num_groups(d_in, group_size) == n


# ---------------------------------------------------------------- formulas and layout


@pytest.mark.parametrize("bits", [2, 3, 8])
@pytest.mark.parametrize("nu", [1.0, 0.95, 1.5])
def test_group_params_formulas(bits: int, nu: float) -> None:
    """Asymmetric eqs. 8-9, symmetric eqs. 29-30, both after the expansion of eqs. 27-28."""
    w = _weight(3, 32, seed=4)
    qmax = 2**bits - 1
    hi, lo = w.reshape(3, 2, 16).amax(-1), w.reshape(3, 2, 16).amin(-1)
    a, b = (1 + nu) / 2, (1 - nu) / 2
    s, z = group_params(w, QuantSpec(bits, 16, False, nu))
    torch.testing.assert_close(s, ((a * hi + b * lo) - (b * hi + a * lo)) / qmax)
    torch.testing.assert_close(z, b * hi + a * lo)
    m = torch.maximum(hi.abs(), lo.abs())
    s, z = group_params(w, QuantSpec(bits, 16, True, nu))
    torch.testing.assert_close(s, 2 * nu * m / qmax)
    torch.testing.assert_close(z, -nu * m)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", GROUPS)
def test_codes_layout_and_dequantize(bits: int, group_size: int) -> None:
    w = _weight(seed=5)
    spec = QuantSpec(bits, group_size)
    codes, scale, zero = quantize(w, spec)
    n = num_groups(D_IN, group_size)
    assert codes.dtype == torch.uint8 and codes.shape == (D_OUT, D_IN)
    assert scale.dtype == zero.dtype == torch.float32 and scale.shape == zero.shape == (D_OUT, n)
    assert int(codes.min()) == 0 and int(codes.max()) == spec.qmax  # asymmetric: min -> 0, max -> qmax
    g = effective_group_size(D_IN, group_size)
    by_hand = torch.stack(
        [codes[:, j].float() * scale[:, j // g] + zero[:, j // g] for j in range(D_IN)], dim=1
    )  # eq. 7 column by column
    assert torch.equal(dequantize(codes, scale, zero, group_size), by_hand)
    assert dequantize(codes, scale, zero, group_size, torch.bfloat16).dtype == torch.bfloat16
    # precomputed parameters give the same codes
    assert torch.equal(quantize(w, spec, scale, zero)[0], codes)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_low_precision_inputs(dtype: torch.dtype, bits: int, symmetric: bool) -> None:
    """bf16/fp16 weights: math in float32 (same codes as the float32 copy), output back in dtype."""
    w = _weight(dtype=dtype, seed=6)
    spec = QuantSpec(bits, 16, symmetric)
    c16, s16, z16 = quantize(w, spec)
    c32, s32, z32 = quantize(w.float(), spec)
    assert torch.equal(c16, c32) and torch.equal(s16, s32) and torch.equal(z16, z32)
    out = qdq(w, spec)
    assert out.dtype == dtype
    exact = dequantize(c32, s32, z32, 16)
    assert torch.equal(out, exact.to(dtype))
    eps = torch.finfo(dtype).eps
    bound = _half_step(w, spec) + eps * exact.abs()
    assert torch.all((out.float() - w.float()).abs() <= bound * (1 + 1e-5))


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("bits", [0, 1, 9, 16, -4])
def test_bad_bits(bits) -> None:
    with pytest.raises(ValueError, match=r"bits must be an integer in 2\.\.8"):
        QuantSpec(bits=bits)


@pytest.mark.parametrize("group_size", [0, -2, -32])
def test_bad_group_size(group_size) -> None:
    with pytest.raises(ValueError, match=r"group_size must be a positive integer or -1"):
        QuantSpec(group_size=group_size)


@pytest.mark.parametrize(
    "kwargs,msg",
    [
        ({"symmetric": "false"}, r"QuantSpec: symmetric must be true or false \(a bool\), got 'false' \(str\)"),
        ({"symmetric": 0}, r"symmetric must be true or false \(a bool\), got 0 \(int\)"),
        ({"bits": 4.0}, r"QuantSpec: bits must be an integer, got 4\.0 \(float\)"),
        ({"bits": True}, r"bits must be an integer, got True \(bool\)"),
        ({"bits": "4"}, r"bits must be an integer, got '4' \(str\)"),
        ({"group_size": 16.0}, r"group_size must be an integer, got 16\.0"),
        ({"group_size": False}, r"group_size must be an integer, got False"),
        ({"nu": "1.0"}, r"nu must be a number, got '1\.0' \(str\)"),
        ({"nu": True}, r"nu must be a number, got True \(bool\)"),
        ({"fmt": 4}, r"fmt must be a string, got 4 \(int\)"),
    ],
)
def test_wrong_field_types_are_refused(kwargs: dict, msg: str) -> None:
    """A wrong-typed value is a ConfigError naming the field, the value and the type; never truthy."""
    with pytest.raises(ConfigError, match=msg):
        QuantSpec(**kwargs)


def test_int_nu_is_a_number() -> None:
    assert QuantSpec(nu=1).nu == 1 and QuantSpec(symmetric=True).symmetric is True


@pytest.mark.parametrize("nu", [0.0, -1.0, 5.0, float("nan")])
def test_bad_nu(nu: float) -> None:
    with pytest.raises(ValueError, match=r"nu .* must be in \(0, 4\]"):
        QuantSpec(nu=nu)


@pytest.mark.parametrize("shape", [(0, 16), (4, 0), (0, 0)])
def test_empty_weight(shape: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="weight is empty"):
        qdq(torch.empty(shape), QuantSpec())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_finite_weight(bad: float, dtype: torch.dtype) -> None:
    w = _weight(dtype=dtype)
    w[2, 5] = bad
    w[3, 7] = bad
    with pytest.raises(ValueError, match=r"weight contains 2 NaN/Inf"):
        quantize(w, QuantSpec())


@pytest.mark.parametrize("shape", [(16,), (2, 3, 16)])
def test_weight_not_2d(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="expected a 2-D weight"):
        quantize(torch.randn(shape), QuantSpec())
