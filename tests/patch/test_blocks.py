"""Where the quantizable parameters are (src/ttq/patch/blocks.py): 2-D linear weights of nn.Linear and of
transformers' Conv1D (GPT-2 family), 3-D fused expert tensors of mixture-of-experts blocks; tiny random
models built from configs (no download)."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as T
from transformers.pytorch_utils import Conv1D

import ttq
from ttq.config import RTNConfig, TTQConfig
from ttq.formats.affine import QuantSpec
from ttq.nn.linear import StaticQuantLinear, TTQLinear
from ttq.patch.blocks import Conv1DLinear, block_linears, targets, walk


def _gpt2():
    cfg = T.GPT2Config(vocab_size=128, n_positions=64, n_embd=64, n_layer=2, n_head=4)
    torch.manual_seed(0)
    return T.GPT2LMHeadModel(cfg).eval()


def _qwen3_moe():
    cfg = T.Qwen3MoeConfig(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                           num_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    return T.Qwen3MoeForCausalLM(cfg).eval()


IDS = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(1))


def test_conv1d_layers_are_candidates():
    model = _gpt2()
    lin = block_linears(model)
    assert len(lin) == 8 and all(isinstance(m, Conv1D) for m in lin.values())  # c_attn, c_proj, c_fc, mlp.c_proj
    assert {n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1] for n in lin} >= {"attn.c_attn", "mlp.c_fc"}


def test_conv1d_view_is_the_same_linear_map():
    model = _gpt2()
    conv = model.transformer.h[0].attn.c_attn
    view = Conv1DLinear(conv)
    x = torch.randn(3, 64)
    torch.testing.assert_close(view(x), conv(x), rtol=1e-6, atol=1e-6)
    assert view.weight.shape == (192, 64) and view.weight.data_ptr() == conv.weight.data_ptr()  # no copy


@pytest.mark.parametrize("config", [RTNConfig(quant=QuantSpec(bits=8, group_size=32)),
                                    TTQConfig(quant=QuantSpec(bits=8, group_size=32))])
def test_gpt2_is_quantized_and_restored(config):
    model = _gpt2()
    with torch.no_grad():
        ref = model(IDS).logits
    before = copy.deepcopy(model.state_dict())
    plan = ttq.quantize_(model, config)
    assert len(plan) == 8
    kind = StaticQuantLinear if isinstance(config, RTNConfig) else TTQLinear
    assert isinstance(model.transformer.h[1].mlp.c_fc, kind)
    with torch.no_grad():
        q = model(IDS).logits
    rel = float((q - ref).norm() / ref.norm())
    assert 0 < rel < 0.02  # 8-bit: close to the float model, but quantized
    assert ttq.restore_(model) == 8
    assert isinstance(model.transformer.h[1].mlp.c_fc, Conv1D)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, ref)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_gpt2_at_2_bits_moves_the_logits():
    model = _gpt2()
    with torch.no_grad():
        ref = model(IDS).logits
        ttq.quantize_(model, RTNConfig(quant=QuantSpec(bits=2, group_size=32)))
        q = model(IDS).logits
    assert float((q - ref).norm() / ref.norm()) > 0.02


def test_expert_tensors_are_found_then_quantized_per_expert():
    model = _qwen3_moe()
    found = list(targets(model))
    experts = [t for t in found if t.kind == "experts"]
    assert [(t.name, t.parameter, tuple(t.tensor.shape)) for t in experts[:2]] == [
        ("model.layers.0.mlp.experts", "gate_up_proj", (4, 64, 64)),
        ("model.layers.0.mlp.experts", "down_proj", (4, 64, 32))]
    assert len(experts) == 4 and all(t.layout == "out_in" for t in experts)
    assert {p for _, p, _ in walk(model)} == {"weight", "gate_up_proj", "down_proj"}
    before = model.model.layers[0].mlp.experts.gate_up_proj.detach().clone()
    plan = ttq.quantize_(model, RTNConfig())
    # q, k, v, o of 2 blocks + 4 experts x (gate_up, down) x 2 blocks; the router is not a linear layer
    assert len(plan) == 8 + 16
    assert "model.layers.1.mlp.experts.down_proj.3" in plan
    assert ttq.restore_(model) == 24
    assert torch.equal(model.model.layers[0].mlp.experts.gate_up_proj, before)
