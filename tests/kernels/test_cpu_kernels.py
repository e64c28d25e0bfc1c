"""Compiled CPU kernels (ttq.kernels.cpu, csrc/ttq_cpu.cpp) against the plain-PyTorch oracle.

Codes must equal ``ttq.formats.affine.quantize`` of ``W * s`` exactly; products must match the
reference dequantize-then-matmul on the same packed weights.  Skipped when the extension cannot be
built on this machine (the fallback itself is tested in test_api.py).
"""

from __future__ import annotations

import pytest
import torch

from ttq import options
from ttq.formats.affine import QuantSpec, quantize
from ttq.kernels import cpu, cpu_build
from ttq.kernels.api import pack_ttq, packed_linear, unpack
from ttq.kernels.reference import dequantize_packed, reference_linear
from ttq.methods.lowrank import svd_factors
from ttq.methods.scaling import scaled_quantize

pytestmark = pytest.mark.skipif(not cpu_build.load(), reason=f"ttq C++ CPU kernels unavailable: {cpu_build.error()}")

LAYOUT = {2: "cpu_q2", 3: "cpu_q3", 4: "cpu_q4", 6: "cpu_q8", 8: "cpu_q8"}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def _case(d_out: int, d_in: int, seed: int, dtype=torch.float32, extreme: bool = False):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(d_out, d_in, generator=g) * 0.05).to(dtype)
    s = torch.rand(d_in, generator=g) * 2 + 0.1
    if extreme:  # the activation scale spans 14 decades
        s[::7] = 1e-7
        s[3::11] = 1e7
    return w, s


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("group_size", [16, 32, 64, 128, -1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_codes_equal_affine_quantize(bits, group_size, dtype):
    d_out, d_in = 37, 200  # odd rows; 200 is not a multiple of 32/64/128/ a tile: short last group + padding
    w, s = _case(d_out, d_in, bits * 1000 + group_size, dtype)
    spec = QuantSpec(bits=bits, group_size=group_size)
    packed = pack_ttq(w, s, spec)
    assert packed.layout == LAYOUT[bits]
    codes, scale, zero = scaled_quantize(w.float(), s, spec)
    got_codes, got_scale, got_zero = unpack(packed)
    assert torch.equal(got_codes, codes)
    assert torch.equal(got_scale, scale) and torch.equal(got_zero, zero)
    assert packed.scale.dtype == torch.float32
    # compiled dequantization = the oracle's, bit for bit
    assert torch.equal(cpu.dequantize(packed), dequantize_packed(packed))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 128])
@pytest.mark.parametrize("n_tokens", [1, 3, 4, 7, 20, 40])  # > 32: tiled dequantize + mm
def test_linear_matches_reference(bits, group_size, n_tokens):
    d_out, d_in = 45, 300
    w, s = _case(d_out, d_in, 7 + bits)
    packed = pack_ttq(w, s, QuantSpec(bits=bits, group_size=group_size))
    x = torch.randn(2, n_tokens, d_in, generator=torch.Generator().manual_seed(n_tokens))
    y = packed_linear(x, packed, s)
    assert y.shape == (2, n_tokens, d_out) and y.dtype == torch.float32
    # row-major like F.linear: a transposed result once made SDPA round differently downstream, so
    # TTQ's prompt-mode quantization (discontinuous in its inputs) drifted from the reference path
    assert y.is_contiguous()
    assert _rel(y, reference_linear(x, packed, s)) < 1e-5  # float32, another summation order


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [16, 32, 48, 64, 96, 128, 256, -1])
@pytest.mark.parametrize("d_in", [256, 304, 656])
def test_span_tiles_match_reference(bits, group_size, d_in):
    """The 4- / 8-bit products read 64-byte spans (avx512.inc, span_tile) where the group size is a multiple
    of a block's columns that divides a span or is a multiple of it, else blocks: every case, full and
    partial last spans, 1-4 tokens (the tile's batch widths) and 9, tail rows, float16 scale / zero and rank r."""
    d_out = 23  # 5 tiles of 4 rows + 3 tail rows (one 8-bit token: tiles of 1 row)
    w, s = _case(d_out, d_in, bits * 7 + group_size + d_in)
    spec = QuantSpec(bits=bits, group_size=group_size)
    b, a = svd_factors(w, 3)
    # one 8-bit group per row: S sum(c x) and Z sum(x) cancel to ~1e-5 (the block tile's error there too)
    tol = 5e-5 if bits == 8 and group_size == -1 else 1e-5
    for half in (False, True):
        packed = cpu.pack(LAYOUT[bits], w, s, spec, b, a, half_params=half)
        for n in (1, 2, 3, 4, 9):
            x = torch.randn(n, d_in, generator=torch.Generator().manual_seed(n))
            assert _rel(packed_linear(x, packed, s, None, b, a), reference_linear(x, packed, s, None, b, a)) < tol


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs(dtype):
    w, s = _case(64, 96, 3, dtype)
    packed = pack_ttq(w, s, QuantSpec(bits=4, group_size=32))
    for n in (1, 12, 40):
        x = torch.randn(n, 96).to(dtype)
        y = packed_linear(x, packed, s)
        assert y.dtype == dtype
        # both compute in float32 and round once to the output dtype
        assert _rel(y, reference_linear(x, packed, s)) < 4e-3


def test_lowrank_and_bias():
    w, s = _case(70, 100, 11)
    b, a = svd_factors(w, 5)
    bias = torch.randn(70)
    packed = pack_ttq(w, s, QuantSpec(bits=3, group_size=32), b, a)
    # the packed codes are those of the residual W - B A
    assert torch.equal(unpack(packed)[0], scaled_quantize(w - b @ a, s, QuantSpec(bits=3, group_size=32))[0])
    for n in (1, 5, 16, 40):
        x = torch.randn(n, 100)
        assert _rel(packed_linear(x, packed, s, bias, b, a), reference_linear(x, packed, s, bias, b, a)) < 1e-5


@pytest.fixture
def half_params_on():
    """The option half_params on for one test (what TTQ_HALF_PARAMS=1 sets at start-up)."""
    with options.using(half_params=True):
        yield


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("offset", [0.0, 30.0])
def test_half_params_option(bits, offset, half_params_on):
    """float16 scale / zero: the codes are chosen against the stored (rounded) values, so every weight stays within
    half a step of its grid; with codes of the float32 parameters a group far from 0 (offset 30) would move by up
    to 2^-11 * 30, most of a 4-bit step here."""
    w, s = _case(37, 200, bits)
    w = w + offset / s  # (W + offset / s) diag(s): every scaled weight near `offset`
    spec = QuantSpec(bits=bits, group_size=32)
    packed = pack_ttq(w, s, spec)
    _, scale, zero = scaled_quantize(w, s, spec)
    got_codes, got_scale, got_zero = unpack(packed)
    assert packed.scale.dtype == torch.float16  # every bit width
    assert torch.equal(got_scale, scale.half().float()) and torch.equal(got_zero, zero.half().float())
    codes = quantize(w.float() * s, spec, got_scale, got_zero)[0]  # affine codes against the stored values
    assert torch.equal(got_codes, codes)
    err = (cpu.dequantize(packed) - w.float() * s).abs()
    step = torch.repeat_interleave(got_scale, 32, dim=1)[:, :200]
    edge = 2 ** -10 * (zero.abs() + spec.qmax * scale)  # the clamped ends: the rounded grid is a little shorter
    assert (err <= step / 2 * (1 + 1e-4) + torch.repeat_interleave(edge, 32, dim=1)[:, :200]).all()
    inside = (got_codes > 0) & (got_codes < spec.qmax)
    assert (err[inside] <= step[inside] / 2 * (1 + 1e-4) + 1e-5).all()
    assert torch.equal(cpu.dequantize(packed), dequantize_packed(packed))
    for n in (1, 9, 40):
        x = torch.randn(n, 200)
        assert _rel(packed_linear(x, packed, s), reference_linear(x, packed, s)) < 1e-5


def test_zero_range_groups_dequantize_exactly():
    w, s = _case(8, 64, 5)
    w[0] = 0.3  # a constant row: every group has zero range
    w[1, :32] = -2.0
    packed = pack_ttq(w, torch.ones(64), QuantSpec(bits=2, group_size=32))
    deq = dequantize_packed(packed)
    assert torch.equal(deq[0], torch.full((64,), 0.3))
    assert torch.equal(deq[1, :32], torch.full((32,), -2.0))
    assert torch.equal(unpack(packed)[0][0], torch.zeros(64, dtype=torch.uint8))


def test_extreme_scale_keeps_float32_params(half_params_on):
    w, s = _case(33, 160, 9, extreme=True)
    spec = QuantSpec(bits=4, group_size=32)
    packed = pack_ttq(w, s, spec)
    assert packed.scale.dtype == torch.float32  # 1e7 * w overflows float16's range for scale/zero
    codes, scale, zero = scaled_quantize(w, s, spec)
    got = unpack(packed)
    assert torch.equal(got[0], codes) and torch.equal(got[1], scale) and torch.equal(got[2], zero)
    x = torch.randn(1, 160)
    assert _rel(packed_linear(x, packed, s), reference_linear(x, packed, s)) < 1e-5


@pytest.mark.parametrize("symmetric,nu", [(True, 1.0), (False, 0.9), (True, 1.2)])
def test_symmetric_and_range_expansion(symmetric, nu):
    w, s = _case(21, 128, 13)
    spec = QuantSpec(bits=3, group_size=32, symmetric=symmetric, nu=nu)
    packed = pack_ttq(w, s, spec)
    codes, scale, zero = scaled_quantize(w, s, spec)
    assert torch.equal(unpack(packed)[0], codes)
    assert torch.equal(unpack(packed)[1], scale)


def test_pack_into_reuses_buffers():
    w, s = _case(40, 128, 17)
    spec = QuantSpec(bits=4, group_size=32)
    first = pack_ttq(w, s, spec)
    ptr = first.qweight.data_ptr()
    s2 = s.flip(0)
    again = pack_ttq(w, s2, spec, out=first)
    assert again.qweight.data_ptr() == ptr
    assert torch.equal(unpack(again)[0], scaled_quantize(w, s2, spec)[0])


def test_non_finite_weight_is_refused():
    w, s = _case(8, 64, 1)
    w[3, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        pack_ttq(w, s, QuantSpec(bits=4, group_size=32))


def test_unsupported_group_size_falls_back_or_raises():
    w, s = _case(8, 96, 2)
    spec = QuantSpec(bits=4, group_size=24)  # not a multiple of the 16-column chunk
    assert pack_ttq(w, s, spec).layout == "u8"
    with pytest.raises(ValueError, match="multiple of 16"):
        pack_ttq(w, s, spec, layout="cpu_q4")
    with pytest.raises(ValueError, match="no compiled kernel"):
        pack_ttq(w, s, spec, strict=True)
    with pytest.raises(ValueError, match="4-bit codes"):
        pack_ttq(w, s, QuantSpec(bits=3, group_size=32), layout="cpu_q4")


def test_layout_sizes():
    w, s = _case(4, 576, 3)
    sizes = {b: pack_ttq(w, s, QuantSpec(bits=b, group_size=32)).qweight.shape[1] for b in (2, 3, 4, 8)}
    assert sizes == {2: 9 * 16, 3: 5 * 48, 4: 18 * 16, 8: 576}  # 576 columns: 64/128/32/16-column tiles


@pytest.mark.parametrize("binding", ["pybind", "torch.ops"])
@pytest.mark.parametrize("layout,bits", [("cpu_q4", 4), ("cpu_q3", 3), ("cpu_q8", 8), ("cpu_q4_i8", 4), ("cpu_q8_i8", 8)])
def test_bound_product_equals_the_op(layout, bits, binding, monkeypatch):
    """The decode fast path (BoundProduct, no dispatcher; or its torch.ops twin for builds without Python
    headers) computes exactly the torch.ops product, for any leading shape, and hands back None for
    inputs it does not take."""
    from ttq.kernels.api import get_kernel

    if binding == "torch.ops":
        monkeypatch.setattr(cpu_build, "module", lambda: None)

    kernel = get_kernel(layout, "cpu")
    if layout.endswith("_i8") and not kernel.available():
        pytest.skip("int8-activation kernels need AVX-512 VNNI or AVX2")
    w, s = _case(45, 200, bits)
    b, a = svd_factors(w, 3)
    bias = torch.randn(45)
    p = pack_ttq(w - b @ a, s, QuantSpec(bits=bits, group_size=32), layout=layout)
    op = {"cpu_q4_i8": "packed_mm_q4i8", "cpu_q8_i8": "packed_mm_q8i8"}.get(layout, "packed_mm")
    bound = cpu.bind_small_batch(op, p, s, bias, b, a)
    one = kernel.decoder(p, s, bias, b, a)  # prompt mode's: one token per sequence
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 1, 200, generator=g)
    extra = () if op == "packed_mm_q4i8" else (bits,)
    want = getattr(torch.ops.ttq_cpu, op)(x.reshape(3, 200), s, p.qweight, p.scale, p.zero, *extra, 32, 45, 200,
                                          bias, b, a).reshape(3, 1, 45)
    assert torch.equal(bound(x), want) and torch.equal(one(x), want)
    assert torch.equal(bound(x[0, 0]), want[0, 0])  # (d_in,) -> (d_out,)
    assert torch.equal(bound(x.bfloat16()), getattr(torch.ops.ttq_cpu, op)(
        x.reshape(3, 200).bfloat16(), s, p.qweight, p.scale, p.zero, *extra, 32, 45, 200, bias, b, a).reshape(3, 1, 45))
    x5 = torch.randn(1, 5, 200, generator=g)
    assert one(x5) is None and bound(x5) is not None  # a 5-token prefill is not a decode step
    assert bound(torch.randn(cpu.SMALL_BATCH + 1, 200)) is None  # prefill-sized: the caller's dense path
    assert bound(torch.randn(0, 200)) is None
    with pytest.raises(ValueError, match="input has 199 features, packed weight expects 200"):
        bound(torch.randn(1, 199))
    import copy

    twin = copy.deepcopy(one)  # a deep-copied model keeps a working decode path
    assert torch.equal(twin(x), want)


def test_bound_product_bad_arguments(monkeypatch):
    w, s = _case(8, 64, 0)
    p = pack_ttq(w, s, QuantSpec(bits=4, group_size=32), layout="cpu_q4")
    with pytest.raises(ValueError, match="unknown op 'packed_mm_q5'.*allowed: packed_mm, packed_mm_q4i8"):
        cpu.bind_small_batch("packed_mm_q5", p, s, None, None, None)
    with monkeypatch.context() as m:
        m.setattr(cpu_build, "module", lambda: None)
        with pytest.raises(ValueError, match="unknown op 'packed_mm_q5'.*allowed: packed_mm, packed_mm_q4i8"):
            cpu.bind_small_batch("packed_mm_q5", p, s, None, None, None)
    with pytest.raises(ValueError, match="must be positive"):
        cpu_build.module().BoundProduct("packed_mm", s, p.qweight, p.scale, p.zero, 4, 32, 8, 64, None, None, None,
                                        0, False)


PORTABLE_CHECK = """
import torch
from ttq.kernels import cpu, cpu_build
from ttq.kernels.api import pack_ttq, packed_linear, unpack
from ttq.kernels.reference import reference_linear, dequantize_packed
from ttq.formats.affine import QuantSpec, quantize
from ttq import options
import sys
if sys.argv[1] == "0":  # the plain build also stands in for a Python without its headers: ops only, no binding
    cpu_build.python_headers = lambda: False
assert cpu_build.load(strict=True) and torch.ops.ttq_cpu.has_avx512() == 0
assert (cpu_build.module() is None) == (sys.argv[1] == "0")
assert torch.ops.ttq_cpu.has_avx2_gemm() == int(sys.argv[1])  # x86-64-v3: AVX2 GEMM; x86-64: portable loop
g = torch.Generator().manual_seed(0)
for half in ("0", "1"):  # float32 and float16 scale / zero
    options.configure(half_params=half == "1")
    for bits in (2, 3, 4, 8):
        for gs in (16, 128, -1):
            w = torch.randn(37, 200, generator=g) * 0.05; s = torch.rand(200, generator=g) + 0.1
            spec = QuantSpec(bits=bits, group_size=gs); p = pack_ttq(w, s, spec)
            assert p.scale.dtype == (torch.float16 if half == "1" else torch.float32)
            c, sc, zr = unpack(p)  # codes against the stored (float16-rounded with half) scale / zero
            assert torch.equal(c, quantize(w * s, spec, sc.float(), zr.float())[0])
            assert torch.equal(cpu.dequantize(p), dequantize_packed(p))
            for n in (1, 5, 12):
                x = torch.randn(n, 200, generator=g)
                y, yr = packed_linear(x, p, s), reference_linear(x, p, s)
                assert ((y - yr).norm() / yr.norm()).item() < 1e-5
# cpu_q4_i8 / cpu_q8_i8: the AVX2 maddubs kernels in the x86-64-v3 build (tests/kernels/test_cpu_i8.py checks
# them against the int8 emulation when run with TTQ_KERNEL_MARCH=x86-64-v3), refused clearly in the plain build
assert torch.ops.ttq_cpu.has_i8() == int(sys.argv[1]) and torch.ops.ttq_cpu.has_vnni() == 0
w = torch.randn(37, 336, generator=g) * 0.05; s = torch.rand(336, generator=g) + 0.1  # 336: a 16-column tail
for layout, bits in (("cpu_q4_i8", 4), ("cpu_q8_i8", 8), ("cpu_q8_i8", 6)):
    if sys.argv[1] == "1":
        for half in (False, True):
            p = pack_ttq(w, s, QuantSpec(bits=bits, group_size=-1 if bits == 6 else 32), layout=layout, half_params=half)
            for n in (1, 3, 5):
                x = torch.randn(n, 336, generator=g)
                y, yr = packed_linear(x, p, s), reference_linear(x, p, s)
                assert 0 < ((y - yr).norm() / yr.norm()).item() < 5e-2  # int8 activations: close, not exact
    else:
        try:
            pack_ttq(w, s, QuantSpec(bits=bits, group_size=32), layout=layout)
            raise AssertionError(layout + " packed without AVX2")
        except ValueError as e:
            assert "neither AVX-512 VNNI nor AVX2" in str(e), e
print("PORTABLE OK")
"""


@pytest.mark.slow
@pytest.mark.parametrize("march,avx2", [("x86-64-v3", 1), ("x86-64", 0)])
def test_portable_build_without_avx512(march, avx2):
    """The non-AVX-512 C++ paths (AVX2 + FMA, and plain C++), each built in a separate process and cache entry."""
    import os
    import platform
    import subprocess
    import sys

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86-64 only")
    env = dict(os.environ, TTQ_KERNEL_MARCH=march)
    done = subprocess.run([sys.executable, "-c", PORTABLE_CHECK, str(avx2)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert "PORTABLE OK" in done.stdout, done.stderr[-2000:]


@pytest.mark.slow
def test_i8_kernels_on_avx2_build():
    """tests/kernels/test_cpu_i8.py (int8 emulation to 1e-5, error bounds, odd sizes, bf16/fp16, zero-range
    groups, extreme D, low rank, the packed head) run whole against the AVX2 kernels of an x86-64-v3 build."""
    import os
    import platform
    import subprocess
    import sys
    from pathlib import Path

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86-64 only")
    env = dict(os.environ, TTQ_KERNEL_MARCH="x86-64-v3")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(Path(__file__).with_name("test_cpu_i8.py"))], env=env, capture_output=True, text=True,
                          timeout=900)
    tail = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-2000:]
    assert done.returncode == 0 and " passed" in tail and "skipped" not in tail, done.stdout[-3000:] + done.stderr[-2000:]
