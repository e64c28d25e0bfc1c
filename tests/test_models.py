"""ttq.models: the synthetic-shapes Llama used by ``ttq bench --synthetic``."""

from __future__ import annotations

import pytest
import torch

from ttq.models import synthetic_llama


def test_synthetic_llama_shapes_and_determinism(stories_tokenizer):
    m = synthetic_llama(stories_tokenizer, hidden=256, intermediate=640, layers=2, head_dim=64, seed=3)
    cfg = m.config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (256, 640, 2)
    assert cfg.vocab_size == len(stories_tokenizer) and cfg.num_attention_heads == 4
    blk = m.model.layers[0]
    assert tuple(blk.mlp.down_proj.weight.shape) == (256, 640) and tuple(blk.self_attn.q_proj.weight.shape) == (256, 256)
    assert not m.training and m.lm_head.weight.data_ptr() != m.model.embed_tokens.weight.data_ptr()
    again = synthetic_llama(stories_tokenizer, hidden=256, intermediate=640, layers=2, head_dim=64, seed=3)
    assert torch.equal(m.model.layers[1].mlp.up_proj.weight, again.model.layers[1].mlp.up_proj.weight)
    other = synthetic_llama(stories_tokenizer, hidden=256, intermediate=640, layers=2, head_dim=64, seed=4)
    assert not torch.equal(m.model.layers[1].mlp.up_proj.weight, other.model.layers[1].mlp.up_proj.weight)
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        logits = m(ids).logits
    assert logits.shape == (1, 4, len(stories_tokenizer)) and torch.isfinite(logits).all()


@pytest.mark.parametrize("kw,msg", [
    (dict(hidden=250), "multiple of head_dim"),
    (dict(layers=0), "layers must be a positive integer"),
    (dict(intermediate=True), "intermediate must be a positive integer"),
])
def test_synthetic_llama_bad_shapes(stories_tokenizer, kw, msg):
    args = dict(hidden=256, intermediate=512, layers=1, head_dim=64) | kw
    with pytest.raises(ValueError, match=msg):
        synthetic_llama(stories_tokenizer, **args)
