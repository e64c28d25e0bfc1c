"""Fused CPU quantize / dequantize to unpacked codes (src/ttq/kernels/cpu_codes.py, csrc/codes.inc):
bit-identical to the eager formulas of ttq.formats.affine, and one op per call instead of ~20 parallel ones."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ttq.formats.affine import QuantSpec, dequantize, expand_groups, group_params, quantize
from ttq.kernels import cpu_build, cpu_codes

needs_ext = pytest.mark.skipif(not cpu_build.load(), reason=f"ttq CPU extension unavailable: {cpu_build.error()}")


def _weight(d_out: int = 96, d_in: int = 520, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    """Rows of different ranges, a constant group, exact ties (.5 steps); 520 columns: a short last group."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d_out, d_in, generator=g) * torch.rand(d_out, 1, generator=g) * 3
    w[0, :64] = 0.25  # constant groups: scale 0
    w[1] = torch.arange(d_in) % 16 / 2  # values on the grid: rounding ties
    return w.to(dtype)


def _eager(w: torch.Tensor, spec: QuantSpec):
    scale, zero = group_params(w, spec)
    return quantize(w, spec, scale, zero)  # precomputed parameters: the eager formula


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("symmetric,nu", [(False, 1.0), (True, 1.0), (False, 0.9), (True, 1.25)])
@pytest.mark.parametrize("group_size", [32, 24, 128, -1])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_fused_quantize_equals_eager(bits, group_size, symmetric, nu, dtype):
    spec = QuantSpec(bits=bits, group_size=group_size, symmetric=symmetric, nu=nu)
    w = _weight(dtype=dtype)
    fused = cpu_codes.quantize_codes(w, spec)
    assert fused is not None
    for got, want in zip(fused, _eager(w, spec)):
        assert got.dtype == want.dtype and torch.equal(got, want)
    assert [t.dtype for t in quantize(w, spec)] == [torch.uint8, torch.float32, torch.float32]


@needs_ext
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("group_size", [32, 24, -1])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_fused_dequantize_equals_eager(bits, group_size, param_dtype):
    codes, scale, zero = _eager(_weight(), QuantSpec(bits=bits, group_size=group_size))
    scale, zero = scale.to(param_dtype), zero.to(param_dtype)
    d_in = codes.shape[1]
    want = codes.float() * expand_groups(scale, d_in, group_size) + expand_groups(zero, d_in, group_size)
    got = cpu_codes.dequantize_codes(codes, scale, zero, group_size)
    assert got is not None and got.dtype == torch.float32 and torch.equal(got, want)
    assert torch.equal(dequantize(codes, scale, zero, group_size, torch.bfloat16), want.to(torch.bfloat16))


class _CountOps(TorchDispatchMode):
    """Counts dispatched ops that touch a tensor of at least ``size`` elements (PyTorch runs those in parallel)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size, self.ops = size, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = [*args, *(kwargs or {}).values(), *(out if isinstance(out, (tuple, list)) else (out,))]
        if any(isinstance(t, torch.Tensor) and t.numel() >= self.size for t in flat):
            self.ops.append(str(func))
        return out


@needs_ext
def test_quantize_and_dequantize_of_a_layer_are_one_op_each():
    """A SmolLM2 gate_proj-sized weight: one op over the weight per call (the eager formulas dispatch
    ~20, each an OpenMP parallel region that stalls next to a busy process)."""
    w = torch.randn(1536, 576)
    spec = QuantSpec(bits=3, group_size=32)
    want = _eager(w, spec)
    with _CountOps(cpu_codes.MIN_FUSED_ELEMENTS) as counter:
        codes, scale, zero = quantize(w, spec)
        w_hat = dequantize(codes, scale, zero, spec.group_size)
    assert counter.ops == ["ttq_cpu.quant_codes.default", "ttq_cpu.dequant_codes.default"]
    assert all(torch.equal(a, b) for a, b in zip((codes, scale, zero), want))
    assert torch.equal(w_hat, codes.float() * expand_groups(scale, 576, 32) + expand_groups(zero, 576, 32))


@needs_ext
def test_non_finite_weights_keep_the_clear_error():
    w = _weight()
    w[5, 7] = float("nan")
    spec = QuantSpec(bits=4, group_size=32)
    assert cpu_codes.quantize_codes(w, spec) is None  # the kernel reports it; the eager path explains
    with pytest.raises(ValueError, match="NaN/Inf"):
        quantize(w, spec)


def test_eager_path_for_small_tensors_autograd_and_other_formats():
    spec = QuantSpec(bits=4, group_size=32)
    assert cpu_codes.quantize_codes(torch.randn(16, 64), spec) is None  # below PyTorch's grain: no regions anyway
    w = _weight().requires_grad_()
    assert cpu_codes.quantize_codes(w, spec) is None
    _, scale, _ = quantize(w, spec)
    assert scale.grad_fn is not None  # gradients still flow to scale / zero as before
    assert cpu_codes.quantize_codes(_weight(), QuantSpec(bits=4, group_size=32, fmt="nf4")) is None
    codes = torch.zeros(96, 520, dtype=torch.uint8)
    assert cpu_codes.dequantize_codes(codes, torch.ones(96, 3), torch.zeros(96, 3), 32) is None  # wrong group count


@needs_ext
@pytest.mark.parametrize("symmetric,nu", [(False, 1.0), (True, 1.0), (False, 0.9)])
@pytest.mark.parametrize("group_size", [32, 24, -1])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_fused_clip_search_equals_the_pytorch_search(bits, group_size, symmetric, nu):
    """clip_codes chooses the shrinks of refine.search_clip (diag score) and the codes of apply_clip; where the
    two scores nearly tie (float rounding of another summation order) either choice has the least error."""
    from ttq.methods.refine import TokenStats, apply_clip, clip_candidates, search_clip

    spec = QuantSpec(bits=bits, group_size=group_size, symmetric=symmetric, nu=nu)
    g = torch.Generator().manual_seed(bits)
    w = _weight()
    s = torch.rand(w.shape[1], generator=g) + 0.5
    x = torch.randn(40, w.shape[1], generator=g) * (torch.rand(w.shape[1], generator=g) * 3)
    tokens = TokenStats(x.square().sum(0), 40)
    grid = (1.0, 0.95, 0.9, 0.8, 0.7)
    v = w * s
    codes, sc, z, beta, err = cpu_codes.clip_codes(v, tokens.sq / s.square(), spec, clip_candidates(grid))
    want_beta = search_clip(v, s, tokens, spec, grid)
    same = beta == want_beta
    assert same.float().mean() > 0.99
    want_codes, want_sc, want_z = apply_clip(v, spec, beta)  # the codes of the fused search's own choice
    assert torch.equal(codes, want_codes) and torch.equal(sc, want_sc) and torch.equal(z, want_z)
    # the fused error is the diagonal score of its codes (within float rounding)
    from ttq.formats.affine import dequantize
    from ttq.methods.refine import _group_sums
    from ttq.formats.spec import effective_group_size

    dw = (v - dequantize(codes, sc, z, spec.group_size)) / s
    score = _group_sums(dw.square() * tokens.sq, effective_group_size(w.shape[1], group_size))
    torch.testing.assert_close(err, score, rtol=1e-4, atol=1e-6)
    # where the choices differ, the two errors are equal within rounding
    if not same.all():
        other = apply_clip(v, spec, want_beta)
        dw2 = (v - dequantize(*other, spec.group_size)) / s
        score2 = _group_sums(dw2.square() * tokens.sq, effective_group_size(w.shape[1], group_size))
        torch.testing.assert_close(score[~same], score2[~same], rtol=1e-4, atol=1e-6)


@needs_ext
def test_fused_clip_search_with_one_candidate_is_plain_quantization():
    spec = QuantSpec(bits=3, group_size=32)
    w = _weight()
    codes, sc, z, beta, err = cpu_codes.clip_codes(w, torch.ones(w.shape[1]), spec, (1.0,))
    want = quantize(w, spec)
    assert torch.equal(codes, want[0]) and torch.equal(sc, want[1]) and torch.equal(z, want[2])
    assert bool((beta == 1).all())
    torch.testing.assert_close(err.sum(), (w - dequantize(*want, 32)).square().sum(), rtol=1e-4, atol=1e-6)


def test_fused_clip_search_declines_what_it_does_not_serve():
    w = torch.randn(8, 64)
    assert cpu_codes.clip_codes(w, torch.ones(64), QuantSpec(bits=4, fmt="nf4"), (1.0,)) is None
    assert cpu_codes.clip_codes(w.double(), torch.ones(64), QuantSpec(bits=4), (1.0,)) is None
    assert cpu_codes.clip_codes(w, torch.ones(64), QuantSpec(bits=4), ()) is None


@needs_ext
def test_fused_clip_search_without_codes_gives_the_same_choice_and_errors():
    spec = QuantSpec(bits=2, group_size=32)
    w = _weight()
    hw = torch.rand(w.shape[1], generator=torch.Generator().manual_seed(3))
    grid = (1.0, 0.9, 0.8)
    full = cpu_codes.clip_codes(w, hw, spec, grid)
    bare = cpu_codes.clip_codes(w, hw, spec, grid, with_codes=False)
    assert bare[0].shape == (0, w.shape[1])
    for got, want in zip(bare[1:], full[1:]):
        assert torch.equal(got, want)


@needs_ext
def test_fused_clip_search_scales_rows_itself_exactly():
    """With s, clip_codes forms w diag(s) row by row: the same float32 products, so the same results as on w * s."""
    spec = QuantSpec(bits=3, group_size=32)
    w = _weight()
    g = torch.Generator().manual_seed(5)
    s = torch.rand(w.shape[1], generator=g) + 0.3
    hw = torch.rand(w.shape[1], generator=g)
    grid = (1.0, 0.9, 0.8)
    for with_codes in (True, False):
        a = cpu_codes.clip_codes(w * s, hw, spec, grid, with_codes)
        b = cpu_codes.clip_codes(w, hw, spec, grid, with_codes, s=s)
        for got, want in zip(b, a):
            assert torch.equal(got, want)
