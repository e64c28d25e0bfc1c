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
    assert group._bound is not None and group._sizes == [64, 32, 32]  # the fused product ran
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
    assert fused.model.layers[0].self_attn.q_proj.group._bound is None  # nothing stacked: per-layer products


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
    assert FusedGroup([])._tried == ()
    assert fuse_shared_inputs(torch.nn.Sequential(torch.nn.Linear(4, 4))) == 0
