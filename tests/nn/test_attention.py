"""Decode attention on the key/value heads (src/ttq/nn/attention.py) against transformers' SDPA function."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ttq.nn import attention


def _module(groups: int) -> nn.Module:
    m = nn.Module()
    m.num_key_value_groups = groups
    m.is_causal = True
    return m


def _inputs(q_len: int, groups: int, kv_len: int = 40, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    kv_heads, dim = 3, 16
    query = torch.randn(batch, kv_heads * groups, q_len, dim, generator=g)
    key = torch.randn(batch, kv_heads, kv_len, dim, generator=g)
    value = torch.randn(batch, kv_heads, kv_len, dim, generator=g)
    mask = torch.rand(batch, 1, q_len, kv_len, generator=g) > 0.3
    mask[..., 0] = True  # every query row sees one position at least
    return query, key, value, mask


@pytest.fixture(params=[False, True], ids=["sdpa", "kernel"])
def kernel(request, monkeypatch):
    """The single-token path through SDPA, or through the C++ op (skipped without the extension)."""
    if request.param and not attention.kernel_available():
        pytest.skip("ttq's C++ extension is not available")
    monkeypatch.setattr(attention, "_KERNEL", [request.param])
    return request.param


@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("q_len", [1, 5])
@pytest.mark.parametrize("masked", [True, False])
def test_equals_transformers_sdpa(groups, q_len, masked, kernel):
    """Same output as the repeat-the-cache SDPA path (the one transformers takes under compilation) for one
    query token (the packed path, through SDPA or the C++ op) and for prefill / no-GQA calls (delegated)."""
    q, k, v, mask = _inputs(q_len, groups)
    mask = mask if masked else None
    mod = _module(groups)
    ours, _ = attention.decode_attention(mod, q, k, v, mask, scaling=0.25)
    # the reference: keys/values repeated to one copy per query head, plain SDPA
    kk, vv = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    ref = torch.nn.functional.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, scale=0.25,
                                                           is_causal=mask is None and q_len > 1)
    ref = ref.transpose(1, 2)
    assert ours.shape == ref.shape == (2, q_len, 3 * groups, 16)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    theirs, _ = sdpa_attention_forward(mod, q, k, v, mask, scaling=0.25)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_under_compile_the_cache_is_not_repeated(kernel):
    """Compiled with a mask, the single-token call attends to the key/value heads as they are: the traced graph
    has no copy of the cache per query head (transformers' SDPA path has one: expand + reshape of k and v), and
    with the C++ op it calls the op (its fake implementation traces)."""
    q, k, v, mask = _inputs(1, 3)
    mod = _module(3)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    for fn, expect_expand in ((attention.decode_attention, False), (sdpa_attention_forward, True)):
        torch._dynamo.reset()
        graphs.clear()
        out = torch.compile(lambda *a: fn(mod, *a, scaling=0.25)[0], backend=backend, fullgraph=True)(q, k, v, mask)
        targets = [str(n.target) for gm in graphs for n in gm.graph.nodes]
        assert any("expand" in t for t in targets) == expect_expand, targets
        if fn is attention.decode_attention:
            assert any("decode_attention" in t for t in targets) == kernel, targets
        torch.testing.assert_close(out, attention.decode_attention(mod, q, k, v, mask, scaling=0.25)[0],
                                   rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


def test_soft_capping_and_dropout_are_left_to_transformers():
    """Calls the packed path does not cover go to transformers' function, which refuses soft capping itself."""
    q, k, v, mask = _inputs(1, 3)
    with pytest.raises(ValueError, match="softcap"):
        attention.decode_attention(_module(3), q, k, v, mask, softcap=30.0)


def test_use_switches_sdpa_models_only(stories_dir):
    from ttq.models import load_model

    model, _ = load_model(str(stories_dir))
    assert model.config._attn_implementation == "sdpa"
    assert attention.use(model) == "sdpa"
    assert model.config._attn_implementation == attention.NAME
    assert attention.use(model) is None  # already switched: nothing to give back
    ids = torch.tensor([[1, 400, 30, 90, 7]])
    with torch.no_grad():
        ours = model(ids).logits
        model.set_attn_implementation("sdpa")
        ref = model(ids).logits
    torch.testing.assert_close(ours, ref)


@pytest.mark.parametrize("groups", [1, 4])
def test_kernel_reads_only_the_positions_the_mask_opens(groups):
    """The C++ op never reads the cache outside [first, last] open position: NaN there leaves its output equal to
    SDPA on the open slice (SDPA itself turns it into NaN); additive float masks give the same as boolean ones; a
    row the mask closes completely gives zeros."""
    if not attention.kernel_available():
        pytest.skip("ttq's C++ extension is not available")
    g = torch.Generator().manual_seed(1)
    b, kv, dim, length = 2, 2, 32, 100
    q = torch.randn(b, kv, groups, dim, generator=g)
    k, v = torch.randn(b, kv, length, dim, generator=g), torch.randn(b, kv, length, dim, generator=g)
    mask = torch.zeros(b, 1, 1, length, dtype=torch.bool)
    mask[0, ..., :70] = True  # a static cache filled to 70
    mask[1, ..., 20:60] = True  # a sliding window
    mask[1, ..., 33] = False  # and a hole inside it
    k[0, :, 70:], v[0, :, 70:] = float("nan"), float("nan")
    k[1, :, :20], v[1, :, 60:] = float("nan"), float("nan")
    out = torch.ops.ttq_cpu.decode_attention(q, k, v, mask, 0.2)
    assert torch.isfinite(out).all()
    for i, (lo, hi) in enumerate(((0, 70), (20, 60))):
        ref = torch.nn.functional.scaled_dot_product_attention(q[i:i + 1], k[i:i + 1, :, lo:hi], v[i:i + 1, :, lo:hi],
                                                               attn_mask=mask[i:i + 1, ..., lo:hi], scale=0.2)
        torch.testing.assert_close(out[i:i + 1], ref, rtol=1e-5, atol=1e-6)
    additive = torch.zeros(b, 1, 1, length).masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(torch.ops.ttq_cpu.decode_attention(q, k, v, additive, 0.2), out, rtol=1e-6, atol=1e-7)
    closed = torch.zeros(1, 1, 1, length, dtype=torch.bool)
    assert torch.equal(torch.ops.ttq_cpu.decode_attention(q[:1], k[:1], v[:1], closed, 0.2), torch.zeros_like(q[:1]))
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.ttq_cpu.decode_attention(q.double(), k, v, mask, 0.2)
    with pytest.raises(RuntimeError, match=r"mask must be \(B or 1, 1, 1, L\)"):
        torch.ops.ttq_cpu.decode_attention(q, k, v, mask[..., :50], 0.2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("groups,dim", [(1, 32), (3, 64), (4, 24)])
def test_kernel_reads_a_16_bit_cache_as_the_widened_float32_one(dtype, groups, dim):
    """A float16 / bfloat16 cache (a narrowed static cache, ttq.compiled.narrow_cache) gives the same output as
    the float32 kernel on the same cache widened (the widening is exact, the arithmetic float32), on the 16-key
    AVX-512 path and on a head size it does not cover; k and v of different dtypes are refused."""
    if not attention.kernel_available():
        pytest.skip("ttq's C++ extension is not available")
    g = torch.Generator().manual_seed(2)
    b, kv, length = 2, 2, 77
    q = torch.randn(b, kv, groups, dim, generator=g)
    k = torch.randn(b, kv, length, dim, generator=g).to(dtype)
    v = torch.randn(b, kv, length, dim, generator=g).to(dtype)
    mask = torch.zeros(b, 1, 1, length, dtype=torch.bool)
    mask[0, ..., :50] = True
    mask[1, ..., 9:77] = True
    out = torch.ops.ttq_cpu.decode_attention(q, k, v, mask, 0.3)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.ops.ttq_cpu.decode_attention(q, k.float(), v.float(), mask, 0.3),
                               rtol=1e-6, atol=1e-6)
    with pytest.raises(RuntimeError, match="k and v must both be float32, float16 or bfloat16"):
        torch.ops.ttq_cpu.decode_attention(q, k, v.float(), mask, 0.3)


@pytest.mark.parametrize("q_len", [1, 5])
def test_a_16_bit_cache_under_a_float32_model(q_len, kernel):
    """Keys and values from a float16 cache with float32 queries: the one-token kernel reads them as they are,
    every other path (SDPA, prefill) widens them first; both equal SDPA on the widened cache."""
    q, k, v, mask = _inputs(q_len, 3)
    k16, v16 = k.half(), v.half()
    ours, _ = attention.decode_attention(_module(3), q, k16, v16, mask, scaling=0.25)
    ref, _ = sdpa_attention_forward(_module(3), q, k16.float(), v16.float(), mask, scaling=0.25)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("length", [5, 16, 77, 600])
def test_kernel_softmax_matches_float64_over_wide_scores(length):
    """The kernel's vectorized exp (AVX-512) against a float64 softmax: scores spanning hundreds (most weights
    underflow to 0), positions masked by transformers' additive minimum (not -inf), open ranges shorter than,
    equal to and longer than one 16-lane chunk."""
    if not attention.kernel_available():
        pytest.skip("ttq's C++ extension is not available")
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 2, 3, 64, generator=g) * 4
    k, v = torch.randn(1, 2, length, 64, generator=g) * 4, torch.randn(1, 2, length, 64, generator=g)
    mask = torch.zeros(1, 1, 1, length)
    mask[..., ::3] = torch.finfo(torch.float32).min
    mask[..., 1] = 0.0
    out = torch.ops.ttq_cpu.decode_attention(q, k, v, mask, 1.0)
    w = torch.softmax((q.double() @ k.double().transpose(-1, -2)) + mask.double(), dim=-1)
    ref = w @ v.double()
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
    assert torch.isfinite(out).all()
    # scores of magnitude ~100 carry float32 rounding of ~1e-5 into the weights, for SDPA as for the kernel
    err, sdpa_err = (out.double() - ref).abs().max(), (sdpa.double() - ref).abs().max()
    assert err <= 2 * sdpa_err + 1e-6, (err, sdpa_err)


def test_a_fresh_static_cache_prefill_attends_causally_to_the_prompt_only(monkeypatch):
    """A prompt at the start of a longer (static) cache: its mask is recognised as plain causal attention (SDPA
    gets no mask and slices the cache itself), and the output equals masked SDPA over the whole cache; padding,
    an offset or a short window keep the mask."""
    import transformers.integrations.sdpa_attention as hf_sdpa

    masks = []
    monkeypatch.setattr(hf_sdpa, "sdpa_attention_forward",
                        lambda *a, **kw: (masks.append(a[4]), sdpa_attention_forward(*a, **kw))[1])
    q_len, kv_len = 6, 16
    query, key, value, _ = _inputs(q_len, 3, kv_len=kv_len)
    mask = torch.zeros(2, 1, q_len, kv_len, dtype=torch.bool)
    mask[..., :q_len] = torch.ones(q_len, q_len, dtype=torch.bool).tril()
    assert attention.causal_from_start(mask, q_len)
    want, _ = sdpa_attention_forward(_module(3), query, key, value, mask)
    got, _ = attention.decode_attention(_module(3), query, key, value, mask)
    assert torch.allclose(got, want, atol=1e-6, rtol=1e-5) and masks == [None]
    padded = mask.clone()
    padded[0, ..., 0] = False  # a left-padded first sequence
    offset = torch.zeros_like(mask)
    offset[..., : q_len + 2] = torch.ones(q_len, q_len + 2, dtype=torch.bool).tril(2)  # after 2 cached positions
    window = mask.clone()
    window[..., 5, 0] = False  # a sliding window of 5 positions
    for m in (padded, offset, window, mask.float()):
        assert not attention.causal_from_start(m, q_len)
    got, _ = attention.decode_attention(_module(3), query, key, value, window)
    want, _ = sdpa_attention_forward(_module(3), query, key, value, window)
    assert torch.allclose(got, want, atol=1e-6, rtol=1e-5) and masks[-1] is window


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_splits_long_ranges_into_chunks_whatever_the_thread_count(dtype):
    """Open ranges longer than a chunk (128 positions) are cut into chunks with softmaxes of their own and merged:
    the output matches SDPA, a chunk the mask closes completely (a 260-position hole) adds nothing, and the
    output is bit for bit the same at 1 and 2 threads (the chunks do not depend on the thread count)."""
    if not attention.kernel_available():
        pytest.skip("ttq's C++ extension is not available")
    g = torch.Generator().manual_seed(3)
    b, kv, groups, dim, length = 2, 3, 3, 64, 700
    q = torch.randn(b, kv, groups, dim, generator=g) * 3
    k = torch.randn(b, kv, length, dim, generator=g).to(dtype)
    v = torch.randn(b, kv, length, dim, generator=g).to(dtype)
    mask = torch.zeros(b, 1, 1, length, dtype=torch.bool)
    mask[0, ..., :577] = True
    mask[1, ..., 5:650] = True
    mask[1, ..., 140:400] = False  # closes the chunk of positions 261..388 entirely
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.ttq_cpu.decode_attention(q, k, v, mask, 0.125)
        torch.set_num_threads(2)
        two = torch.ops.ttq_cpu.decode_attention(q, k, v, mask, 0.125)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.float(), v.float(), attn_mask=mask, scale=0.125)
    torch.testing.assert_close(one, ref, rtol=1e-5, atol=2e-6)
