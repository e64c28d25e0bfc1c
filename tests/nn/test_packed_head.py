"""The opt-in packed LM head (src/ttq/nn/packed_head.py, ttq.runtime.quantize_lm_head) on stories260K."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ttq
from ttq import runtime
from ttq.formats.affine import QuantSpec, qdq
from ttq.nn.packed_head import PackedHeadLinear


@pytest.mark.parametrize("bits", [8, 4])
def test_head_matches_rtn_reference(stories_model, bits):
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = stories_model(ids).logits
        head = stories_model.get_output_embeddings()
        h = stories_model.model(ids).last_hidden_state
        rtn = F.linear(h, qdq(head.weight, QuantSpec(bits=bits, group_size=32)))
        new = runtime.quantize_lm_head(stories_model, bits=bits, group_size=32)
        out = stories_model(ids).logits
    assert isinstance(stories_model.get_output_embeddings(), PackedHeadLinear) and new.packed.bits == bits
    # the packed kernel computes the RTN head exactly (up to float summation order)
    assert torch.allclose(out, rtn, rtol=1e-4, atol=1e-4 * rtn.abs().max().item())
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < (0.01 if bits == 8 else 0.2)
    assert ttq.restore_(stories_model) == 1
    assert type(stories_model.get_output_embeddings()) is nn.Linear
    with torch.no_grad():
        assert torch.equal(stories_model(ids).logits, ref)


def test_head_with_ttq_blocks_generates_same_as_reference(stories_model):
    """Quantized head + prompt-mode TTQ blocks: the packed decode gives the reference's greedy tokens."""
    ids = torch.randint(0, 512, (1, 32), generator=torch.Generator().manual_seed(1))
    ttq.quantize_(stories_model, ttq.TTQConfig(quant=QuantSpec(bits=4, group_size=32)))
    runtime.quantize_lm_head(stories_model, bits=8)
    runtime.set_mode(stories_model, "prompt")
    fast = stories_model.generate(ids, max_new_tokens=12, do_sample=False)
    runtime.set_mode(stories_model, "prompt", reference=True)
    ref = stories_model.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(fast, ref)
    assert ttq.restore_(stories_model) > 1


def test_head_bad_input(stories_model):
    runtime.quantize_lm_head(stories_model)
    with pytest.raises(ValueError, match="already quantized"):
        runtime.quantize_lm_head(stories_model)
    with pytest.raises(ValueError, match="no nn.Linear output head"):
        runtime.quantize_lm_head(nn.Sequential(nn.Linear(4, 4)))
    ttq.restore_(stories_model)
    with pytest.raises(ValueError, match="bits"):
        runtime.quantize_lm_head(stories_model, bits=1)
    with pytest.raises(ValueError, match="integer format"):
        PackedHeadLinear(nn.Linear(32, 8), QuantSpec(bits=4, group_size=32, fmt="nf4"))
    with pytest.raises(ValueError, match=r"half_params must be True, False or None, got 'yes'"):
        runtime.quantize_lm_head(stories_model, half_params="yes")
    with pytest.raises(ValueError, match="half_params=True needs a cpu_q\\* layout"):
        runtime.quantize_lm_head(stories_model, layout="u8", half_params=True)
    assert type(stories_model.get_output_embeddings()) is nn.Linear  # a refused head leaves the model as it was


def test_restore_blocks_only_keeps_the_head(stories_model):
    n = len(ttq.quantize_(stories_model, ttq.RTNConfig(quant=QuantSpec(bits=4, group_size=32))))
    runtime.quantize_lm_head(stories_model)
    assert ttq.restore_(stories_model, blocks_only=True) == n
    assert isinstance(stories_model.get_output_embeddings(), PackedHeadLinear)
    assert ttq.restore_(stories_model) == 1


@pytest.mark.parametrize("bits", [8, 4])
def test_head_binds_once_and_equals_packed_linear(bits):
    """The head holds one bound PackedLinear; its output is packed_linear's, bit for bit, for decode- and
    prefill-shaped inputs (the bound one-token decoder included)."""
    from ttq.kernels.api import PackedLinear, packed_linear

    torch.manual_seed(0)
    lin = nn.Linear(64, 40)
    head = PackedHeadLinear(lin, QuantSpec(bits=bits, group_size=32))
    assert isinstance(head.linear, PackedLinear) and head.packed is head.linear.packed
    with torch.no_grad():
        for x in (torch.randn(1, 1, 64), torch.randn(2, 1, 64), torch.randn(1, 9, 64)):
            assert torch.equal(head(x), packed_linear(x, head.packed, head.ones, lin.bias))


def test_half_params_head(stories_model):
    """half_params=True stores the head's scale / zero in float16 (cpu_q* layouts): fewer bytes, logits as close
    to the float head's as the float32-parameter head's; False keeps float32 whatever the process option says."""
    from ttq import options
    from ttq.kernels import cpu_build
    from ttq.kernels.api import unpack

    if not cpu_build.load():
        pytest.skip("the C++ kernels are not available here")
    ids = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), options.using(half_params=True):
        ref = stories_model(ids).logits
        full = runtime.quantize_lm_head(stories_model, bits=8, group_size=32, half_params=False)
        out_full = stories_model(ids).logits
        ttq.restore_(stories_model)
        half = runtime.quantize_lm_head(stories_model, bits=8, group_size=32, half_params=True)
        out_half = stories_model(ids).logits
        ttq.restore_(stories_model)
    assert full.packed.scale.dtype == torch.float32 and half.packed.scale.dtype == torch.float16
    assert half.packed.zero.dtype == torch.float16
    moved = (unpack(half.packed)[0].int() - unpack(full.packed)[0].int()).abs()
    assert moved.max() <= 1 and moved.float().mean() < 0.1  # codes of the rounded grid: a few move by one step
    assert full.linear.nbytes() - half.linear.nbytes() == 4 * full.packed.scale.numel()  # 2 bytes less per scale, zero

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    # two 8-bit grids a 2^-11 rounding apart: each as close to the float head as the other
    assert 0 < rel(out_half, out_full) < 5e-3
    assert rel(out_half, ref) < 1.1 * rel(out_full, ref) < 0.01
