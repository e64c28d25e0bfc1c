"""Tests of the generic walker and the method handlers (src/ttq/patch/walker.py, src/ttq/quantizers/)
on tiny random models of several Hugging Face families (built from configs, no download)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
import torch.nn as nn
import transformers as T

import ttq  # noqa: F401  (registers the handlers)
from ttq.config import AWQConfig, RTNConfig, TTQConfig
from ttq.formats.affine import QuantSpec
from ttq.nn.linear import StaticQuantLinear, TTQLinear
from ttq.patch.blocks import block_linears, find_blocks
from ttq.patch.walker import name_filter, quantize_, restore_

VOCAB = 128
SMALL = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
)


def _config(family: str):
    if family == "llama":
        return T.LlamaConfig(**SMALL)
    if family == "qwen3":
        return T.Qwen3Config(**SMALL, head_dim=16)
    if family == "gemma3":
        return T.Gemma3TextConfig(**SMALL, head_dim=16, sliding_window=8)
    if family == "mistral":
        return T.MistralConfig(**SMALL)
    if family == "opt":
        return T.OPTConfig(
            hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
            word_embed_proj_dim=64, max_position_embeddings=64,
        )  # fmt: skip
    if family == "qwen3_moe":
        return T.Qwen3MoeConfig(**SMALL, head_dim=16, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2)
    if family == "mixtral":
        return T.MixtralConfig(**SMALL, num_local_experts=4, num_experts_per_tok=2)
    raise KeyError(family)


# family -> (block list path, linear layers per block)
DENSE = {
    "llama": ("model.layers", 7),
    "qwen3": ("model.layers", 7),
    "gemma3": ("model.layers", 7),
    "mistral": ("model.layers", 7),
    "opt": ("model.decoder.layers", 6),
}


_BUILT: dict[str, nn.Module] = {}


def _model(family: str) -> nn.Module:
    """A fresh copy of the family's tiny random model (built once per session, seeded)."""
    if family not in _BUILT:
        torch.manual_seed(0)
        _BUILT[family] = T.AutoModelForCausalLM.from_config(_config(family)).eval()
    return copy.deepcopy(_BUILT[family])


def _ids(batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits


def _outside_state(model: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """Every parameter/buffer outside the decoder blocks (embeddings, final norm, LM head)."""
    return {k: v.clone() for k, v in model.state_dict().items() if not k.startswith(prefix + ".")}


CONFIGS = {
    "rtn4": RTNConfig(QuantSpec(4, 32)),
    "rtn8_sym_pc": RTNConfig(QuantSpec(8, -1, symmetric=True)),
    "ttq": TTQConfig(QuantSpec(4, 32)),
    "ttq_r4": TTQConfig(QuantSpec(4, 32), rank=4),
}


@pytest.mark.parametrize("family", list(DENSE))
@pytest.mark.parametrize("method", list(CONFIGS))
def test_quantize_and_restore(family: str, method: str) -> None:
    cfg = CONFIGS[method]
    model = _model(family)
    ids = _ids()
    ref = _logits(model, ids)
    path, per_block = DENSE[family]
    prefix, blocks = find_blocks(model)
    assert prefix == path and len(blocks) == 2
    before = block_linears(model)
    assert len(before) == 2 * per_block
    outside = _outside_state(model, prefix)

    plan = quantize_(model, cfg)

    assert set(plan) == set(before) and all(c is cfg for c in plan.values())
    want_cls = TTQLinear if isinstance(cfg, TTQConfig) else StaticQuantLinear
    for name in before:
        mod = model.get_submodule(name)
        assert isinstance(mod, want_cls), name
        assert mod.original is before[name]
    for name, mod in blocks.named_modules():  # no plain linear left in the blocks except the kept originals
        if isinstance(mod, nn.Linear):
            assert name.endswith(".original"), name
    assert isinstance(model.get_output_embeddings(), nn.Linear)  # LM head untouched
    assert isinstance(model.get_input_embeddings(), nn.Embedding)
    for k, v in _outside_state(model, prefix).items():
        assert torch.equal(v, outside[k]), k
    assert block_linears(model) == {}  # the kept originals are not candidates again

    out = _logits(model, ids)
    assert out.shape == (2, 12, VOCAB) and torch.isfinite(out).all()
    assert not torch.equal(out, ref)  # it did quantize
    rel = float((out - ref).norm() / ref.norm())
    assert rel < (0.02 if method == "rtn8_sym_pc" else 0.5), rel

    assert restore_(model) == len(before)
    assert torch.equal(_logits(model, ids), ref)  # bit-identical
    assert block_linears(model) == before


@pytest.mark.parametrize(
    "patterns,suffixes",
    [
        ("*.mlp.*", {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}),
        (["*.self_attn.*", "!*.o_proj"], {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"}),
        (["*q_proj", "*down_proj"], {"self_attn.q_proj", "mlp.down_proj"}),
        ("!*.mlp.*", {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"}),
    ],
)
def test_name_filter(patterns, suffixes: set[str]) -> None:
    model = _model("llama")
    plan = quantize_(model, RTNConfig(), filter_fn=name_filter(patterns))
    assert {n.split(".", 3)[3] for n in plan} == suffixes and len(plan) == 2 * len(suffixes)
    for name, mod in block_linears(model).items():
        assert name not in plan and type(mod) is nn.Linear


def test_name_filter_layer_index_and_empty() -> None:
    model = _model("llama")
    plan = quantize_(model, RTNConfig(), filter_fn=name_filter("model.layers.1.*"))
    assert len(plan) == 7 and all(n.startswith("model.layers.1.") for n in plan)
    assert name_filter(None) is None and name_filter([]) is None


def test_filter_fn_callable() -> None:
    model = _model("llama")
    seen = []

    def square_only(name: str, mod: nn.Module) -> bool:
        seen.append(name)
        return mod.in_features == mod.out_features

    plan = quantize_(model, RTNConfig(), filter_fn=square_only)
    assert len(seen) == 14
    assert sorted(n.split(".", 3)[3] for n in plan) == ["self_attn.o_proj"] * 2 + ["self_attn.q_proj"] * 2


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_filter_matching_nothing_raises(family: str) -> None:
    model = _model(family)
    with pytest.raises(ValueError, match="no linear layer of the decoder blocks matched the filter"):
        quantize_(model, RTNConfig(), filter_fn=name_filter("*.no_such_layer"))
    with pytest.raises(ValueError, match="matched the filter"):
        quantize_(model, RTNConfig(), filter_fn=name_filter("lm_head"))  # the head is not a block linear
    assert len(block_linears(model)) == 2 * DENSE[family][1]  # nothing changed


def test_overrides() -> None:
    model = _model("llama")
    base, attn = TTQConfig(QuantSpec(4, 32)), RTNConfig(QuantSpec(8, 16))
    plan = quantize_(model, base, overrides={"*.down_proj": None, "*.self_attn.*": attn, "*": base})
    assert len(plan) == 12
    for i in range(2):
        layer = model.model.layers[i]
        assert type(layer.mlp.down_proj) is nn.Linear  # None: skipped
        assert isinstance(layer.mlp.up_proj, TTQLinear) and plan[f"model.layers.{i}.mlp.up_proj"] is base
        assert isinstance(layer.self_attn.k_proj, StaticQuantLinear) and layer.self_attn.k_proj.spec.bits == 8
        assert plan[f"model.layers.{i}.self_attn.k_proj"] is attn
    assert torch.isfinite(_logits(model, _ids())).all()


def test_overrides_first_match_wins() -> None:
    model = _model("llama")
    a, b = RTNConfig(QuantSpec(3, 32)), RTNConfig(QuantSpec(5, 32))
    plan = quantize_(model, RTNConfig(), overrides={"*.q_proj": a, "*proj": b})
    assert plan["model.layers.0.self_attn.q_proj"] is a and plan["model.layers.0.mlp.up_proj"] is b


def test_two_passes_then_restore() -> None:
    """quantize_ twice with disjoint filters, then restore_: everything back, bit for bit."""
    model = _model("llama")
    ids = _ids()
    ref = _logits(model, ids)
    p1 = quantize_(model, RTNConfig(), filter_fn=name_filter("*.mlp.*"))
    p2 = quantize_(model, TTQConfig())  # only what is still a plain linear
    assert len(p1) == 6 and len(p2) == 8 and not set(p1) & set(p2)
    assert restore_(model) == 14
    assert torch.equal(_logits(model, ids), ref)


def test_awq_without_calibration_raises() -> None:
    model = _model("llama")
    with pytest.raises(ValueError, match=r"method 'awq' needs calibration data; pass calibration="):
        quantize_(model, AWQConfig(), calibration=None)
    with pytest.raises(ValueError, match="needs calibration data"):  # also when only an override asks for it
        quantize_(model, RTNConfig(), overrides={"*.mlp.*": AWQConfig()})
    assert all(type(m) is nn.Linear for m in block_linears(model).values())  # checked before touching anything


def test_awq_missing_layer_calibration_raises() -> None:
    model = _model("llama")
    with pytest.raises(ValueError, match=r"no calibration statistics for layer 'model.layers.0.self_attn.q_proj'"):
        quantize_(model, AWQConfig(), calibration={})


@pytest.mark.parametrize("rank", [65, 40])
def test_ttq_rank_too_large_raises_and_leaves_model_untouched(rank: int) -> None:
    """rank 40 fits q_proj (64 x 64) but not k_proj (32 x 64): the error comes before any swap."""
    model = _model("llama")
    with pytest.raises(ValueError, match=r"rank must be an integer in 0\.\.(64|32) \(= min of weight shape"):
        quantize_(model, TTQConfig(rank=rank))
    assert len(block_linears(model)) == 14
    assert all(type(m) is nn.Linear for m in block_linears(model).values())


def test_nothing_left_to_quantize() -> None:
    model = _model("opt")
    quantize_(model, RTNConfig())
    with pytest.raises(ValueError, match=r"hold no \(unquantized\) nn.Linear"):
        quantize_(model, RTNConfig())


def test_unregistered_config_raises() -> None:
    @dataclass(frozen=True)
    class Unknown:
        name: ClassVar[str] = "unknown"

    with pytest.raises(ValueError, match="no handler registered for config Unknown"):
        quantize_(_model("llama"), Unknown())


def test_find_blocks_fallback_and_error() -> None:
    class Cfg:
        num_hidden_layers = 3

    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = Cfg()
            self.embed = nn.Embedding(10, 8)
            self.stack = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(3)])
            self.head = nn.Linear(8, 10)

    prefix, blocks = find_blocks(Odd())
    assert prefix == "stack" and len(blocks) == 3
    assert sorted(block_linears(Odd())) == ["stack.0.0", "stack.1.0", "stack.2.0"]
    with pytest.raises(ValueError, match="could not find the decoder blocks of Sequential"):
        find_blocks(nn.Sequential(nn.Linear(4, 4)))


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_moe_attention_and_every_expert_are_linears(family: str) -> None:
    """transformers v5 MoE blocks: the fused 3-D experts are found (kind "experts"), quantize_ turns them
    into one linear per expert (ttq.patch.experts) and restore_ gives back the very same tensors; the router
    is not an nn.Linear and stays as it was."""
    model = _model(family)
    ids = _ids()
    ref = _logits(model, ids)
    lin = block_linears(model)
    assert {n.split(".", 3)[3] for n in lin} == {
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
    }
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert any(v.dim() == 3 for v in before.values())  # fused expert weights (n_experts, ., .)
    plan = quantize_(model, TTQConfig(QuantSpec(4, 32)))
    n_experts = model.config.num_experts if family == "qwen3_moe" else model.config.num_local_experts
    assert len(plan) == 8 + 2 * 2 * n_experts
    assert not any(k.endswith(".gate") for k in plan)
    out = _logits(model, ids)
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
    assert restore_(model) == len(plan) and torch.equal(_logits(model, ids), ref)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
