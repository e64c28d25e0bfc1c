"""Fused decode products of layers sharing an input (src/ttq/nn/fused.py): the same outputs and greedy tokens
as the unfused layers, bit for bit, and a clean fallback wherever fusion does not apply."""

from __future__ import annotations

import copy

import pytest
import torch

import ttq
from ttq import runtime
from ttq.formats.affine import QuantSpec
from ttq.kernels import cpu_build
from ttq.kernels.api import pack_linear
from ttq.nn.fused import FusedGroup, SharedInputLinear, fuse_shared_inputs, stack_packed, unfuse

needs_kernels = pytest.mark.skipif(not cpu_build.load(), reason="ttq C++ kernels unavailable")


def _quantized(model, bits=4, rank=0, layout=None, refresh=0):
    ttq.quantize_(model, ttq.TTQConfig(quant=QuantSpec(bits=bits, group_size=32), rank=rank))
    runtime.set_mode(model, "prompt", layout=layout, refresh_every=refresh)
    return model


def _generate(model, ids, n=8):
    runtime.reset(model)
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                              min_new_tokens=n, output_scores=True, return_dict_in_generate=True)


@needs_kernels
@pytest.mark.parametrize("layout", [None, "cpu_q4_i8"])
@pytest.mark.parametrize("bits", [4, 2])
def test_fused_decode_gives_the_unfused_tokens_and_logits(stories_model, layout, bits):
    from ttq.kernels.api import select_layout

    if layout is not None:
        if bits != 4:
            pytest.skip("cpu_q4_i8 holds 4-bit codes")
        try:
            select_layout(QuantSpec(bits=4, group_size=32), (64, 64), "cpu", torch.float32, layout)
        except ValueError as e:
            pytest.skip(str(e))
    ids = torch.randint(3, 500, (1, 12), generator=torch.Generator().manual_seed(0))
    plain = _quantized(stories_model, bits=bits, layout=layout)
    fused = copy.deepcopy(plain)
    assert fuse_shared_inputs(fused) == 2 * len(fused.model.layers)  # q/k/v and gate/up of every block
    want, got = _generate(plain, ids), _generate(fused, ids)
    assert torch.equal(want.sequences, got.sequences)
    for a, b in zip(want.scores, got.scores):
        assert torch.equal(a, b)  # bit-identical logits at every step
    group = fused.model.layers[0].self_attn.q_proj.group
    assert group.current() and group.sizes == [64, 32, 32]  # the fused product ran
    assert unfuse(fused) == 5 * len(fused.model.layers)
    assert not any(isinstance(m, SharedInputLinear) for m in fused.modules())
    assert torch.equal(_generate(fused, ids).sequences, want.sequences)


@needs_kernels
@pytest.mark.parametrize("kw", [dict(rank=4), dict(refresh=2)])
def test_groups_that_cannot_fuse_fall_back_to_their_layers(stories_model, kw):
    ids = torch.randint(3, 500, (1, 12), generator=torch.Generator().manual_seed(1))
    plain = _quantized(stories_model, **kw)
    fused = copy.deepcopy(plain)
    fuse_shared_inputs(fused)
    assert torch.equal(_generate(plain, ids).sequences, _generate(fused, ids).sequences)
    assert fused.model.layers[0].self_attn.q_proj.group.linear is None  # nothing stacked: per-layer products


@needs_kernels
def test_stacked_product_rows_are_the_members_products():
    g = torch.Generator().manual_seed(0)
    s = torch.rand(96, generator=g) + 0.5
    ws = [torch.randn(d, 96, generator=g) for d in (64, 32, 48)]
    lins = [pack_linear(w, s, QuantSpec(bits=3, group_size=32), half_params=True) for w in ws]
    packed = stack_packed([lin.packed for lin in lins])
    assert packed.shape == (144, 96)
    stacked = lins[0].kernel.decoder(packed, s, None, None, None)
    x = torch.randn(1, 1, 96, generator=g)
    assert torch.equal(stacked(x), torch.cat([lin.decoder(x) for lin in lins], dim=-1))


def test_group_of_unquantized_layers_does_nothing():
    assert FusedGroup([]).linear is None
    assert fuse_shared_inputs(torch.nn.Sequential(torch.nn.Linear(4, 4))) == 0


@needs_kernels
def test_members_become_row_views_of_one_stack_and_repack_into_it(stories_model):
    """After a prefill the members' packed rows live in the group's stack (no second copy); a prompt packed
    without a reset writes into the same memory, and a reset drops the stack until the next prefill."""
    ids = torch.randint(3, 500, (1, 12), generator=torch.Generator().manual_seed(2))
    model = _quantized(stories_model)
    fuse_shared_inputs(model)
    attn = model.model.layers[0].self_attn
    group = attn.q_proj.group
    _generate(model, ids, n=2)
    assert group.current()
    stack = group.linear.packed
    assert stack.shape == (128, 64)
    for name in ("q_proj", "k_proj", "v_proj"):
        p = getattr(attn, name).inner.prompt.packed
        assert p.qweight._base is stack.qweight and p.scale._base is stack.scale and p.zero._base is stack.zero
    ptr = stack.qweight.data_ptr()
    with torch.no_grad():  # a new prompt, no reset: the members re-pack in place, the stack follows
        model(torch.randint(3, 500, (1, 9), generator=torch.Generator().manual_seed(3)))
    assert group.current() and group.linear.packed.qweight.data_ptr() == ptr
    want = torch.cat([getattr(attn, n).inner.prompt.linear(torch.ones(1, 1, 64)) for n in ("q_proj", "k_proj", "v_proj")], -1)
    assert torch.equal(group.linear(torch.ones(1, 1, 64)), want)  # the stack holds the new prompt's rows
    runtime.reset(model)
    assert group.linear is None and not group.current()


@needs_kernels
def test_scale_dtypes_that_differ_stack_in_float32():
    g = torch.Generator().manual_seed(4)
    s = torch.rand(64, generator=g) + 0.5
    lins = [pack_linear(torch.randn(d, 64, generator=g), s, QuantSpec(bits=4, group_size=32), half_params=h)
            for d, h in ((32, True), (16, False))]
    assert lins[0].packed.scale.dtype == torch.float16 and lins[1].packed.scale.dtype == torch.float32
    packed = stack_packed([lin.packed for lin in lins])
    assert packed.scale.dtype == torch.float32 and packed.zero.dtype == torch.float32
    stacked = lins[0].kernel.decoder(packed, s, None, None, None)
    x = torch.randn(1, 1, 64, generator=g)
    assert torch.equal(stacked(x), torch.cat([lin.decoder(x) for lin in lins], dim=-1))


@needs_kernels
def test_members_packed_with_different_scales_are_refused(stories_model):
    model = _quantized(stories_model)
    fuse_shared_inputs(model)
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        model(torch.randint(3, 500, (1, 9), generator=torch.Generator().manual_seed(5)))
    k = attn.k_proj.inner.prompt
    lin = k.linear
    k.linear = pack_linear(attn.k_proj.inner.weight.detach(), lin.s * 2, attn.k_proj.inner.spec)
    attn.q_proj.group.drop()
    with pytest.raises(RuntimeError, match="different TTQ scales s; call ttq.nn.fused.unfuse"):
        attn.q_proj.group.sync()


@needs_kernels
def test_after_a_reset_members_pack_straight_into_the_stack(stories_model, monkeypatch):
    """Only a group's first prompt copies: after a reset the members pack the next prompt into their row views
    of the stack (same memory, no stacking copy), and the stacked product gives that prompt's outputs."""
    from ttq.nn import fused

    copies = []
    monkeypatch.setattr(fused, "stack_packed", lambda parts: (copies.append(len(parts)), stack_packed(parts))[1])
    model = _quantized(stories_model)
    fuse_shared_inputs(model)
    mlp = model.model.layers[1].mlp
    group = mlp.gate_proj.group
    _generate(model, torch.randint(3, 500, (1, 10), generator=torch.Generator().manual_seed(6)), n=2)
    ptrs = (group.linear.packed.qweight.data_ptr(), group.linear.packed.scale.data_ptr())
    assert copies == [3, 2] * 5  # the first prompt: q/k/v and gate/up of each of the 5 blocks
    runtime.reset(model)
    _generate(model, torch.randint(3, 500, (1, 11), generator=torch.Generator().manual_seed(7)), n=2)
    assert group.current() and (group.linear.packed.qweight.data_ptr(), group.linear.packed.scale.data_ptr()) == ptrs
    assert len(copies) == 10  # none for the second prompt
    x = torch.randn(1, 1, 64, generator=torch.Generator().manual_seed(8))
    want = torch.cat([mlp.gate_proj.inner.prompt.linear(x), mlp.up_proj.inner.prompt.linear(x)], -1)
    assert torch.equal(group.linear(x), want)
    unpacked = [mlp.gate_proj.inner.prompt.linear.packed, mlp.up_proj.inner.prompt.linear.packed]
    assert all(p.qweight._base is group.linear.packed.qweight for p in unpacked)
