"""The opt-in int8-activation kernels ``cpu_q4_i8`` and ``cpu_q8_i8`` (ttq.kernels.cpu_i8;
packed_mm_q4i8 / packed_mm_q8i8 in csrc/ttq_cpu.cpp), one parametrized suite over both layouts.

Two references:

* :func:`i8_reference` rounds ``x / s`` to int8 exactly as the kernels do (per 32 columns,
  ``sx = absmax / 127``, round half to even) and evaluates the kernels' algebra in float64
  with codes centred at ``c = 2^(bits-1)``:
  ``y = sum_i S (q_i - c) sx xq_i + sum_i (Z + c S) x_i / s_i``.  The integer path is exact,
  so the kernels match it up to float32 summation order (bound 1e-5 relative).
* ``reference_linear`` (dequantize the same codes, float32 ``F.linear``).  Rounding ``x / s``
  to int8 moves each input by ``|d_i| <= sx / 2`` and only the ``S (q - c)`` part of each
  weight sees it, so ``|y_r - y_ref_r| <= sum_i |S (q_i - c)| sx_t(i) / 2`` (checked
  elementwise).  For independent uniform rounding errors the expected error is
  ``sqrt(sum_i (S (q_i - c))^2 sx^2 / 12)``; with Gaussian inputs (absmax of 32 ~ 2.2 sigma)
  that is ~0.5% of ||y|| for 4-bit codes (bound 1e-2 asserted) and ~0.5-1% for 8-bit codes
  (bound 2e-2).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from ttq import options
from ttq.formats.affine import QuantSpec
from ttq.kernels import cpu_build
from ttq.kernels.api import pack_ttq, packed_linear, registered_layouts, select_layout, unpack
from ttq.kernels.reference import reference_linear
from ttq.methods.lowrank import svd_factors

_OK = cpu_build.load()
if _OK:
    from ttq.kernels.cpu_i8 import i8_available

    _OK = i8_available()  # AVX-512 VNNI, or AVX2 (run this file with TTQ_KERNEL_MARCH=x86-64-v3 to test those)
pytestmark = pytest.mark.skipif(not _OK, reason="ttq C++ CPU kernels with AVX-512 VNNI or AVX2 unavailable")


@dataclass(frozen=True)
class Layout:
    """One int8-activation layout under test and what differs between the two."""

    name: str
    base: str  # the exact layout whose tensors it reads
    bits: int  # the code width the shared cases use
    shapes: tuple  # (d_out, d_in, group_size)
    n_error_shapes: int  # how many of ``shapes`` the error-vs-exact-reference test runs
    max_rel_err: float  # relative error vs the exact reference on Gaussian layers
    extreme_rel: float  # bound vs i8_reference when x / s spans 14 decades
    packed_cols: int  # qweight bytes per row for d_in = 200
    default_shape: tuple  # a weight shape layout=None serves with the base layout
    unsupported: tuple  # (bits, group_size, message) that must raise


Q4 = Layout("cpu_q4_i8", "cpu_q4", 4,
            ((45, 300, 32), (37, 200, -1), (33, 1000, 64), (19, 96, 96), (70, 544, 128), (5, 4096, 32)),
            6, 1e-2, 1e-5, 112, (64, 256),
            ((3, 32, "4-bit"), (8, 32, "4-bit"), (4, 16, "multiple of 32"), (4, 48, "multiple of 32")))
# cpu_q8_i8 shapes: row tails of 16 / 48 bytes in the last 64-byte load, windows of 512 columns partly
# filled, one group per row, groups spanning several tiles / windows, the LM head's 576 columns
Q8 = Layout("cpu_q8_i8", "cpu_q8", 8,
            ((45, 300, 32), (37, 200, -1), (33, 1000, 64), (19, 96, 96), (70, 576, 32), (23, 528, 32),
             (6, 1040, 160), (5, 4096, 128), (3, 16, -1)),
            # x / s over 14 decades: the float32 zero-point term cancels against the rest; the exact
            # cpu_q8 kernel is 5e-5..8e-5 off a float64 product there (seeds 6..11), cpu_q8_i8 2e-5..3e-5
            6, 2e-2, 1e-4, 208, (64, 576),
            ((4, 32, "5..8-bit"), (2, 32, "5..8-bit"), (8, 16, "multiple of 32"), (8, 48, "multiple of 32")))
LAYOUTS = [pytest.param(Q4, id=Q4.name), pytest.param(Q8, id=Q8.name)]
SHAPE_CASES = [pytest.param(lay, *shape, id=f"{lay.name}-{'x'.join(map(str, shape))}")
               for lay in (Q4, Q8) for shape in lay.shapes]
ERROR_CASES = [pytest.param(lay, *shape, id=f"{lay.name}-{'x'.join(map(str, shape))}")
               for lay in (Q4, Q8) for shape in lay.shapes[:lay.n_error_shapes]]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def _int8_acts(xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(xq * sx (..., d_in) float64, sx per column (..., d_in)) as the kernels round ``xs``."""
    d_in = xs.shape[-1]
    nb = -(-d_in // 32)
    xp = torch.zeros(*xs.shape[:-1], nb * 32)
    xp[..., :d_in] = xs
    xb = xp.reshape(*xs.shape[:-1], nb, 32)  # (..., nb, 32)
    sx = xb.abs().amax(-1, keepdim=True) / 127  # float32, as the kernels
    xq = torch.where(sx > 0, torch.round(xb / torch.where(sx > 0, sx, torch.ones_like(sx))), torch.zeros_like(xb))
    xd = (xq.double() * sx.double()).reshape(*xs.shape[:-1], nb * 32)[..., :d_in]
    return xd, sx.expand_as(xb).reshape(*xs.shape[:-1], nb * 32)[..., :d_in].double()


def _params(packed):
    codes, scale, zero = unpack(packed)
    d_in = packed.shape[1]
    g = d_in if packed.group_size == -1 or packed.group_size >= d_in else packed.group_size
    gi = torch.arange(d_in) // g
    return codes.double(), scale[:, gi].double(), zero[:, gi].double()  # per column (d_out, d_in)


def i8_reference(x, packed, s=None, bias=None, b=None, a=None) -> torch.Tensor:
    """The kernels' result in float64 (int8-rounded x / s, exact zero-point and rank-r terms)."""
    xf = x.float()
    xs = xf / s.float() if s is not None else xf
    xd, _ = _int8_acts(xs)
    q, S, Z = _params(packed)
    c = 2 ** (packed.bits - 1)
    y = xd @ (S * (q - c)).T + xs.double() @ (Z + c * S).T
    if b is not None:
        y = y + (xf.double() @ a.double().T) @ b.double().T
    if bias is not None:
        y = y + bias.double()
    return y


def worst_case_error(x, packed, s=None) -> torch.Tensor:
    """sum_i |S (q_i - c)| sx_t(i) / 2 per output: the largest |y - y_ref| int8 rounding can cause."""
    xf = x.float()
    xs = xf / s.float() if s is not None else xf
    _, sx = _int8_acts(xs)
    q, S, _ = _params(packed)
    return (sx / 2) @ (S * (q - 2 ** (packed.bits - 1))).abs().T


def _within_bound(y, y_ref, bound) -> bool:
    return bool(((y.double() - y_ref.double()).abs() <= bound + 1e-5 * y_ref.abs().max()).all())


def _case(d_out, d_in, seed, dtype=torch.float32, s_kind="ones"):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(d_out, d_in, generator=g) * 0.05).to(dtype)
    if s_kind == "ones":
        s = torch.ones(d_in)
    elif s_kind == "random":
        s = torch.rand(d_in, generator=g) * 2 + 0.1
    else:  # extreme: 14 decades
        s = torch.rand(d_in, generator=g) * 2 + 0.1
        s[::7] = 1e-7
        s[3::11] = 1e7
    return w, s, g


def _pack(lay: Layout, w, s, group_size=32, b=None, a=None, bits=None):
    bits = lay.bits if bits is None else bits
    return pack_ttq(w, s, QuantSpec(bits=bits, group_size=group_size), *(() if b is None else (b, a)), layout=lay.name)


@pytest.mark.parametrize("lay,d_out,d_in,group_size", SHAPE_CASES)
@pytest.mark.parametrize("n_tokens", [1, 3, 5])
@pytest.mark.parametrize("s_kind", ["ones", "random"])
def test_integer_path_is_exact(lay, d_out, d_in, group_size, n_tokens, s_kind):
    w, s, g = _case(d_out, d_in, d_in + n_tokens, s_kind=s_kind)
    packed = _pack(lay, w, s, group_size)
    x = torch.randn(n_tokens, d_in, generator=g)
    y = packed_linear(x, packed, s)
    assert y.shape == (n_tokens, d_out) and y.dtype == torch.float32
    assert _rel(y, i8_reference(x, packed, s)) < 1e-5  # float32 sums in another order


@pytest.mark.parametrize("bits", [5, 6, 7])
def test_narrower_codes_share_the_q8_layout(bits):
    w, s, g = _case(29, 448, bits, s_kind="random")
    packed = _pack(Q8, w, s, 64, bits=bits)
    assert int(unpack(packed)[0].max()) == 2 ** bits - 1
    x = torch.randn(3, 448, generator=g)
    assert _rel(packed_linear(x, packed, s), i8_reference(x, packed, s)) < 1e-5


@pytest.mark.parametrize("lay,d_out,d_in,group_size", ERROR_CASES)
def test_error_vs_exact_reference_is_int8_rounding(lay, d_out, d_in, group_size):
    w, s, g = _case(d_out, d_in, 3 * d_in)
    packed = _pack(lay, w, s, group_size)
    x = torch.randn(3, d_in, generator=g)
    y, y_ref = packed_linear(x, packed, s), reference_linear(x, packed, s)
    assert 1e-4 < _rel(y, y_ref) < lay.max_rel_err  # nonzero (x really is rounded) and within the derived bound
    assert _within_bound(y, y_ref, worst_case_error(x, packed, s))


@pytest.mark.parametrize("lay", LAYOUTS)
@pytest.mark.parametrize("n_tokens", [1, 3, 32])
def test_batches_up_to_small_batch(lay, n_tokens):
    w, s, g = _case(41, 576, 12, s_kind="random")
    packed = _pack(lay, w, s)
    x = torch.randn(n_tokens, 576, generator=g)
    y = packed_linear(x, packed, s)
    assert _rel(y, i8_reference(x, packed, s)) < 1e-5
    for i in (0, n_tokens - 1):  # each token's result does not depend on the others in its tile
        assert _rel(y[i:i + 1], packed_linear(x[i:i + 1], packed, s)) < 1e-6


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("lay", LAYOUTS)
def test_large_batch_uses_the_dense_path(lay, bf16, monkeypatch):
    """Prefill-sized inputs: the exact float32 dense path, or its bfloat16 form on CPUs with native bfloat16."""
    from ttq.kernels import cpu

    monkeypatch.setattr(cpu, "native_bf16", lambda: bf16)
    w, s, g = _case(40, 300, 1, s_kind="random")
    packed = _pack(lay, w, s)
    x = torch.randn(2, 20, 300, generator=g)  # 40 tokens > cpu.SMALL_BATCH
    y = packed_linear(x, packed, s)
    assert y.shape == (2, 20, 40) and y.dtype == torch.float32
    ref = reference_linear(x, packed, s)
    if bf16:  # x / s and the weights rounded to bfloat16 (8 significant bits), float32 sums
        assert 1e-5 < _rel(y, ref) < 1e-2
    else:
        assert _rel(y, ref) < 1e-5


@pytest.mark.parametrize("lay", LAYOUTS)
def test_packed_tensors_are_the_base_layouts(lay):
    w, s, _ = _case(37, 200, 2, s_kind="random")
    spec = QuantSpec(bits=lay.bits, group_size=32)
    pi, pb = pack_ttq(w, s, spec, layout=lay.name), pack_ttq(w, s, spec, layout=lay.base)
    assert pi.layout == lay.name and pb.layout == lay.base
    assert pi.qweight.shape == (37, lay.packed_cols)  # cpu_q4: 16 bytes / 32 columns; cpu_q8: rows padded to 16
    assert torch.equal(pi.qweight, pb.qweight) and torch.equal(pi.scale, pb.scale) and torch.equal(pi.zero, pb.zero)
    for ti, tb in zip(unpack(pi), unpack(pb)):
        assert torch.equal(ti, tb)
    out = pack_ttq(w * 2, s, spec, layout=lay.name, out=pi)  # pack_into reuses the buffers
    assert out.qweight.data_ptr() == pi.qweight.data_ptr()
    assert torch.equal(out.scale, pack_ttq(w * 2, s, spec, layout=lay.base).scale)


@pytest.mark.parametrize("lay", LAYOUTS)
def test_zero_range_groups(lay):
    w, s, g = _case(9, 128, 4)
    w[:, :32] = 0.3  # every row's first group is constant: S = 0, W_hat = Z exactly
    w[2] = -1.0  # a whole constant row
    packed = _pack(lay, w, s)
    assert (unpack(packed)[1][:, 0] == 0).all()
    x = torch.randn(1, 128, generator=g)
    y = packed_linear(x, packed, s)
    assert _rel(y, i8_reference(x, packed, s)) < 1e-5
    assert abs(y[0, 2].item() - (-x.sum()).item()) < 1e-4  # constant row: only the exact zero-point term


@pytest.mark.parametrize("lay", LAYOUTS)
def test_zero_input_block_and_zero_input(lay):
    w, s, g = _case(8, 96, 5)
    packed = _pack(lay, w, s)
    x = torch.randn(1, 96, generator=g)
    x[0, 32:64] = 0  # absmax 0: sx = 0, the tile contributes nothing
    assert _rel(packed_linear(x, packed, s), i8_reference(x, packed, s)) < 1e-5
    assert torch.equal(packed_linear(torch.zeros(1, 96), packed, s), torch.zeros(1, 8))


@pytest.mark.parametrize("lay", LAYOUTS)
def test_extreme_scale(lay):
    w, s, g = _case(21, 300, 6, s_kind="extreme")
    packed = _pack(lay, w, s)
    x = torch.randn(2, 300, generator=g)
    y = packed_linear(x, packed, s)
    assert torch.isfinite(y).all()
    assert _rel(y, i8_reference(x, packed, s)) < lay.extreme_rel
    assert _within_bound(y, reference_linear(x, packed, s), worst_case_error(x, packed, s))


@pytest.mark.parametrize("lay", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_weights_and_inputs(lay, dtype):
    w, s, g = _case(33, 320, 7, dtype=dtype, s_kind="random")
    packed = _pack(lay, w, s, 64)
    x = torch.randn(3, 320, generator=g).to(dtype)
    y = packed_linear(x, packed, s)
    assert y.dtype == dtype and y.shape == (3, 33)
    eps = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11  # output rounding to x's dtype
    assert _rel(y, i8_reference(x, packed, s)) < eps


@pytest.mark.parametrize("lay", LAYOUTS)
def test_lowrank_and_bias(lay):
    w, s, g = _case(48, 256, 8, s_kind="random")
    b, a = (f.contiguous() for f in svd_factors(w, 16))
    bias = torch.randn(48, generator=g)
    packed = _pack(lay, w, s, 32, b, a)
    for n in (1, 3):
        x = torch.randn(n, 256, generator=g)
        y = packed_linear(x, packed, s, bias, b, a)
        assert _rel(y, i8_reference(x, packed, s, bias, b, a)) < 1e-5
        y_ref = reference_linear(x, packed, s, bias, b, a)  # random s: x / s is heavy-tailed, use the bound
        assert _within_bound(y, y_ref, worst_case_error(x, packed, s))


@pytest.fixture
def half_params_on():
    """The option half_params on for one test (what TTQ_HALF_PARAMS=1 sets at start-up)."""
    with options.using(half_params=True):
        yield


@pytest.mark.parametrize("lay", LAYOUTS)
def test_half_params(lay, half_params_on):
    w, s, g = _case(20, 256, 9, s_kind="random")
    packed = _pack(lay, w, s)
    assert packed.scale.dtype == torch.float16  # every bit width (the 8-bit head included)
    x = torch.randn(1, 256, generator=g)
    assert _rel(packed_linear(x, packed, s), i8_reference(x, packed, s)) < 1e-5


def test_packed_lm_head():
    from ttq import runtime
    import torch.nn as nn

    torch.manual_seed(13)
    model = nn.Module()
    head = nn.Linear(96, 70, bias=False)
    model.get_output_embeddings = lambda: model.lm_head
    model.set_output_embeddings = lambda m: setattr(model, "lm_head", m)
    model.lm_head = head
    new = runtime.quantize_lm_head(model, bits=8, group_size=32, layout=Q8.name)
    assert new.packed.layout == Q8.name and model.lm_head is new
    x = torch.randn(2, 96)
    y = new(x)
    assert _rel(y, i8_reference(x, new.packed, torch.ones(96))) < 1e-5
    assert _rel(y, head(x)) < 2e-2  # 8-bit codes + int8 activations stay close to the float head


@pytest.mark.parametrize("lay", LAYOUTS)
def test_default_selection_keeps_exact_kernel(lay):
    assert lay.name in registered_layouts("cpu")
    spec = QuantSpec(bits=lay.bits, group_size=32)
    assert select_layout(spec, lay.default_shape, "cpu", torch.float32) == lay.base
    w, s, _ = _case(16, 128, 10)
    assert pack_ttq(w, s, spec).layout == lay.base
    assert pack_ttq(w, s, spec, strict=True).layout == lay.base


@pytest.mark.parametrize("lay,bits,group_size,match",
                         [pytest.param(lay, *u, id=f"{lay.name}-{u[0]}-{u[1]}") for lay in (Q4, Q8)
                          for u in lay.unsupported])
def test_unsupported_combinations_raise(lay, bits, group_size, match):
    w, s, _ = _case(8, 128, 11)
    with pytest.raises(ValueError, match=match):
        pack_ttq(w, s, QuantSpec(bits=bits, group_size=group_size), layout=lay.name)
    # layout=None is unaffected: another kernel (or the reference) serves it
    assert pack_ttq(w, s, QuantSpec(bits=bits, group_size=group_size)).layout != lay.name


@pytest.mark.parametrize("lay", LAYOUTS)
def test_codebook_format_raises(lay):
    w, s, _ = _case(8, 128, 12)
    with pytest.raises(ValueError, match="codebook"):
        pack_ttq(w, s, QuantSpec(bits=4, group_size=32, fmt="nf4"), layout=lay.name)


def test_runtime_head_layout_follows_the_blocks_i8_layout():
    import torch.nn as nn

    from ttq.runtime import head_layout

    model = nn.Module()
    model.lm_head = nn.Linear(96, 64, bias=False)
    model.get_output_embeddings = lambda: model.lm_head
    assert head_layout("cpu_q4_i8", 8, 32, model) == Q8.name  # an "_i8" row packs the head with int8 activations
    assert head_layout("cpu_q4_i8", 4, 32, model) == Q4.name
    assert head_layout("cpu_q4_i8", 8, 16, model) is None  # g = 16: cpu_q8_i8 cannot, the default layout serves
    assert head_layout("cpu_q4", 8, 32, model) is None
    assert head_layout(None, 8, 32, model) is None
