"""Prompt mode's explicit steps (src/ttq/nn/prompt.py): PromptState.prefill / decode and its counters."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F

import ttq
from ttq.kernels.reference import dequantize_packed, reference_linear
from ttq.methods.ttq import ttq_linear, ttq_scale
from ttq.nn.linear import TTQLinear
from ttq.nn.prompt import PromptOptions, PromptState


def _layer(rank: int = 0, bits: int = 4, seed: int = 0, dtype=torch.float32) -> TTQLinear:
    torch.manual_seed(seed)
    lin = torch.nn.Linear(96, 40, bias=True).to(dtype)
    return TTQLinear(lin, ttq.QuantSpec(bits=bits, group_size=32), ttq.ScaleSpec(), rank=rank)


def _x(*shape: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * torch.exp(torch.randn(shape[-1], generator=g))


@pytest.mark.parametrize("layout", [None, "u8"])
@pytest.mark.parametrize("rank", [0, 4])
def test_prefill_then_decode_equal_the_reference_path(layout, rank):
    """The named steps: prefill packs once from the prompt's tokens; its output and every decode step equal
    the dequantize-then-matmul oracle on the same packed weights (to float32 summation order)."""
    layer = _layer(rank)
    layer.set_mode("prompt", PromptOptions(layout=layout))
    state = layer.prompt
    prompt, steps = _x(1, 9, 96), [_x(1, 1, 96, seed=10 + i) for i in range(4)]
    with torch.no_grad():
        state.prefill(prompt)
        lin = state.linear
        assert state.n_quantizations == 1 and torch.equal(state.s, ttq_scale(prompt, layer.scale_spec))
        got = [state.linear(prompt)] + [state.decode(x) for x in steps]
        want = [reference_linear(x, lin.packed, lin.s, layer.bias, lin.b, lin.a) for x in [prompt] + steps]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    assert state.n_quantizations == 1 and state.linear is lin  # decode steps reuse the prompt's packing


def test_steps_equal_the_forward_dispatch():
    """forward() in prompt mode is prefill (many tokens) then decode (one token), bit for bit."""
    a, b = _layer(4), _layer(4)
    for m in (a, b):
        m.set_mode("prompt")
    prompt, steps = _x(2, 7, 96), [_x(2, 1, 96, seed=20 + i) for i in range(3)]
    with torch.no_grad():
        fwd = [a(prompt)] + [a(x) for x in steps]
        b.prompt.prefill(prompt)
        named = [b.prompt.linear(prompt)] + [b.prompt.decode(x) for x in steps]
    assert all(torch.equal(f, n) for f, n in zip(fwd, named))


def test_reference_prefill_equals_per_sequence_math():
    """With the u8 layout the prefill's packed weights are the per-sequence quantizer's codes."""
    layer = _layer(2)
    x = _x(1, 12, 96)
    with torch.no_grad():
        per_seq = layer(x)
        layer.set_mode("prompt", PromptOptions(layout="u8"))
        prompt = layer(x)
        s = ttq_scale(x, layer.scale_spec)
        direct = ttq_linear(x, layer.residual_weight(), layer.lr_b, layer.lr_a, s, layer.spec, layer.bias)
    assert torch.equal(per_seq, direct)
    torch.testing.assert_close(prompt, per_seq, rtol=1e-5, atol=1e-5)
    codes = layer.prompt.packed.qweight
    from ttq.methods.ttq import ttq_quantize

    assert torch.equal(codes, ttq_quantize(layer.residual_weight(), s, layer.spec)[0])


def test_counters_timings_and_reset():
    layer = _layer()
    layer.set_mode("prompt", PromptOptions(layout="u8", refresh_every=3))
    state = layer.prompt
    assert state.linear is None and state.packed is None and state.s is None
    with pytest.raises(RuntimeError, match="before any prefill"):
        state.decode(_x(1, 1, 96))
    with torch.no_grad():
        layer(_x(1, 5, 96))
        assert (state.n_quantizations, state.steps, state.stats.n_tokens) == (1, 0, 5)
        for i in range(7):  # refreshes after steps 3 and 6
            layer(_x(1, 1, 96, seed=30 + i))
        assert (state.n_quantizations, state.steps, state.stats.n_tokens) == (3, 1, 12)
        assert state.linear.decoder is None  # refresh_every: every step passes through decode()
    assert state.seconds > 0
    layer.reset()
    assert state.linear is None and state.n_quantizations == 0 and state.seconds == 0.0 and state.stats is None
    with torch.no_grad():
        layer(_x(1, 1, 96))  # nothing packed: even a one-token forward is a prefill
    assert state.n_quantizations == 1 and state.seconds > 0


def test_set_mode_replaces_the_state():
    layer = _layer()
    layer.set_mode("prompt", PromptOptions(layout="u8"))
    with torch.no_grad():
        layer(_x(1, 4, 96))
    old = layer.prompt
    layer.set_mode("prompt", PromptOptions(layout="u8", reference=True))
    assert layer.prompt is not old and layer.prompt.linear is None and layer.prompt.options.reference


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copy_decodes_from_its_own_state(how):
    """A copy keeps its own packed tensors and counters: re-prefilling the original changes neither."""
    layer = _layer(3)
    layer.set_mode("prompt", PromptOptions(layout="u8"))
    x1 = _x(1, 1, 96, seed=5)
    with torch.no_grad():
        layer(_x(1, 6, 96))
        before = layer(x1)
        twin = copy.deepcopy(layer) if how == "deepcopy" else pickle.loads(pickle.dumps(layer))
        assert twin.prompt is not layer.prompt and twin.prompt.packed.qweight is not layer.prompt.packed.qweight
        assert twin.prompt.weights.__self__ is twin  # the copy quantizes its own weights
        layer(_x(1, 6, 96, seed=9) * 4 + 1)  # the original re-quantizes (in place where the kernel can)
        assert not torch.equal(layer(x1), before)
        assert torch.equal(twin(x1), before)
        assert twin.prompt.n_quantizations == 1 and layer.prompt.n_quantizations == 2
        twin(_x(1, 6, 96, seed=9) * 4 + 1)  # and the copy re-quantizes from its own weights
        assert torch.equal(twin(x1), layer(x1))


def test_token_mask_leaves_pads_out_of_the_prefill():
    """The layer hands the prefill only the real tokens of a padded batch."""
    from ttq.patch.tokens import TokenMask

    layer = _layer()
    layer.set_mode("prompt", PromptOptions(layout="u8"))
    layer.token_mask = TokenMask()
    x = _x(2, 5, 96)
    layer.token_mask.mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    with torch.no_grad():
        layer(x)
    real = torch.cat([x[0], x[1, :3]])
    assert torch.equal(layer.prompt.s, ttq_scale(real, layer.scale_spec))


def test_state_is_usable_on_its_own():
    """PromptState needs only a weights function: (w_res, bias, b, a)."""
    torch.manual_seed(0)
    w, bias = torch.randn(16, 64), torch.randn(16)
    spec, sc = ttq.QuantSpec(bits=3, group_size=32), ttq.ScaleSpec()
    state = PromptState(lambda: (w, bias, None, None), spec, sc, PromptOptions(layout="u8"))
    x = _x(1, 8, 64)
    state.prefill(x)
    s = ttq_scale(x, sc)
    want = F.linear(x / s, dequantize_packed(state.packed), bias)
    torch.testing.assert_close(state.decode(x[:, :1]), want[:, :1], rtol=1e-5, atol=1e-5)
