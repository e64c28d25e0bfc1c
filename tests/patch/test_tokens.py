"""Pad tokens stay out of the test-time statistics (ttq.patch.tokens), on the real stories260K model.

A right-padded row of a batch must give the logits of the same row run alone: causal attention
keeps pads out of the real tokens' context, and the activation statistic must leave them out too.
"""

from __future__ import annotations

import pytest
import torch

import ttq
from ttq import runtime
from ttq.config import AWPConfig, OnlineLowRankTTQConfig, PruneConfig, TTQLowRankConfig
from ttq.patch.tokens import TokenMask, real_tokens

LONG = [1, 403, 407, 261, 378, 261, 286, 270, 118, 259, 45, 423, 300, 301, 302, 303]
SHORT = [1, 99, 407, 261, 44, 51]
PAD = 0


def _batch():
    ids = torch.full((2, len(LONG)), PAD)
    ids[0] = torch.tensor(LONG)
    ids[1, : len(SHORT)] = torch.tensor(SHORT)
    mask = (torch.arange(len(LONG))[None] < torch.tensor([[len(LONG)], [len(SHORT)]])).long()  # right padding
    return ids, mask


def _reset(model):
    for m in model.modules():  # stateful layers (online low-rank) start each comparison fresh
        if m is not model and callable(getattr(m, "reset", None)) and hasattr(m, "original"):
            m.reset()


def _padded_vs_alone(model, ids=None, mask=None):
    """Largest logit difference of SHORT's tokens: as the last row of a right-padded batch vs alone."""
    if ids is None:
        ids, mask = _batch()
    with torch.no_grad():
        _reset(model)
        batched = model(input_ids=ids, attention_mask=mask).logits[-1, : len(SHORT)]
        _reset(model)
        alone = model(input_ids=torch.tensor([SHORT])).logits[0]
    return (batched - alone).abs().max().item()


def _single_padded():
    n_pad = 7
    return torch.tensor([SHORT + [PAD] * n_pad]), torch.tensor([[1] * len(SHORT) + [0] * n_pad])


QUANT = ttq.QuantSpec(bits=3, group_size=32)
CONFIGS = {
    "ttq": ttq.TTQConfig(quant=QUANT),
    "ttq_r8": ttq.TTQConfig(quant=QUANT, rank=8),
    "ttq_lowrank": TTQLowRankConfig(quant=QUANT, rank=8),
    "awp_online": AWPConfig(quant=QUANT, online=True, iters=2),
    "prune": PruneConfig(sparsity=0.5, quant=QUANT),
    "ttq_online": OnlineLowRankTTQConfig(quant=QUANT, rank=4, rule="asvd"),
}


def test_unquantized_padded_row_equals_alone(stories_model):
    assert _padded_vs_alone(stories_model) < 1e-4  # the protocol itself is exact up to float noise


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_per_sequence_statistic_ignores_padding(stories_model, name):
    ttq.quantize_(stories_model, CONFIGS[name])
    assert _padded_vs_alone(stories_model, *_single_padded()) < 1e-3  # before the fix: ~1 (pads in the statistic)
    if name != "ttq_online":  # stateful: a batch's second row sees the state the first row left
        assert _padded_vs_alone(stories_model) < 1e-3


def test_statistic_without_mask_changes_with_padding(stories_model):
    """The same batch without its attention mask counts the pads: the row moves (this is what the mask fixes)."""
    ttq.quantize_(stories_model, CONFIGS["ttq"])
    ids, _ = _batch()
    with torch.no_grad():
        unmasked = stories_model(input_ids=ids).logits[1, : len(SHORT)]
        alone = stories_model(input_ids=torch.tensor([SHORT])).logits[0]
    assert (unmasked - alone).abs().max().item() > 1e-2


def test_prompt_mode_shared_statistic_ignores_padding(stories_model):
    """Prompt mode: one s over the batch's real tokens; a right-padded single prompt equals the unpadded one."""
    ttq.quantize_(stories_model, CONFIGS["ttq"])
    runtime.set_mode(stories_model, "prompt", reference=True)
    ids, mask = _single_padded()
    with torch.no_grad():
        padded = stories_model(input_ids=ids, attention_mask=mask).logits[0, : len(SHORT)]
        runtime.reset(stories_model)
        alone = stories_model(input_ids=torch.tensor([SHORT])).logits[0]
    assert (padded - alone).abs().max().item() < 1e-3


def test_mask_is_cleared_after_the_call(stories_model):
    ttq.quantize_(stories_model, CONFIGS["ttq"])
    ids, mask = _batch()
    with torch.no_grad():
        stories_model(input_ids=ids, attention_mask=mask)
    holder = stories_model._ttq_token_mask
    assert holder.mask is None


def test_token_mask_rows_and_real_tokens():
    holder = TokenMask()
    x = torch.randn(2, 3, 4)
    assert holder.rows(x) is None  # no mask given
    holder.mask = torch.tensor([[True, True, True, True, True], [False, False, True, True, True]])
    assert holder.rows(x) is None  # KV cache: the current tokens are the mask's last 3, all real
    holder.mask = torch.tensor([[True, True, True, True, False], [True, True, True, True, True]])
    keep = holder.rows(x)
    assert keep.tolist() == [[True, True, False], [True, True, True]]
    assert real_tokens(x, keep).shape == (5, 4)
    assert torch.equal(real_tokens(x[0], keep[0]), x[0, :2])
    xs = x[0]
    assert real_tokens(xs, torch.zeros(3, dtype=torch.bool)) is xs  # an all-pad row: its own tokens
    holder.mask = torch.ones(3, 5, dtype=torch.bool)  # another batch size: not this input's mask
    assert holder.rows(x) is None


def test_rows_are_computed_once_per_call_and_length():
    holder = TokenMask()
    holder.mask = torch.tensor([[True, True, False], [True, True, True]])
    x = torch.randn(2, 3, 4)
    first = holder.rows(x)
    assert first is holder.rows(torch.randn(2, 3, 8))  # another layer of the same call: the same mask object
    holder.mask = torch.ones(2, 3, dtype=torch.bool)  # a new call forgets the last one's rows
    assert holder.rows(x) is None
