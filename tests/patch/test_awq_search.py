"""The llm-awq block engine (src/ttq/patch/awq_search.py) on stories260K and tiny random models of each
family: which groups apply, search never worse than alpha = 0 (RTN) on the module output error it minimises,
clipping never worse than none on its objective, restore, and save/load round trip."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import ttq
from ttq.errors import ConfigError
from ttq.formats.affine import QuantSpec, qdq
from ttq.nn.linear import StaticQuantLinear
from ttq.patch.awq_search import awq_search_replace, block_groups
from ttq.quantizers.awq import AWQConfig, AWQSearchConfig
from ttq.quantizers.rtn import RTNConfig

Q3 = QuantSpec(bits=3, group_size=32)
SMALL = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
         "vocab_size": 128, "max_position_embeddings": 64}


def _windows(n: int = 3, t: int = 32, vocab: int = 500, seed: int = 7) -> torch.Tensor:
    return torch.randint(3, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def _tiny(family: str) -> torch.nn.Module:
    import transformers as T

    cfg = {
        "llama_mha": lambda: T.LlamaConfig(**SMALL, num_key_value_heads=4),
        "mistral": lambda: T.MistralConfig(**SMALL, num_key_value_heads=2),
        "qwen3": lambda: T.Qwen3Config(**SMALL, num_key_value_heads=2, head_dim=16),
        "gemma3": lambda: T.Gemma3TextConfig(**SMALL, num_key_value_heads=2, head_dim=16, sliding_window=8),
        "opt": lambda: T.OPTConfig(hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
                                   vocab_size=128, word_embed_proj_dim=64, max_position_embeddings=64),
    }[family]()
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


# family -> {relative linear names of a scale group: inspected module}
GROUPS = {
    "llama_mha": {("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"): "self_attn",
                  ("self_attn.o_proj",): "self_attn.o_proj", ("mlp.gate_proj", "mlp.up_proj"): "mlp",
                  ("mlp.down_proj",): "mlp.down_proj"},
    "opt": {("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"): "self_attn",
            ("self_attn.out_proj",): "self_attn.out_proj", ("fc1",): "fc1", ("fc2",): "fc2"},
}
GQA = {("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"): "self_attn", ("mlp.gate_proj", "mlp.up_proj"): "mlp",
       ("mlp.down_proj",): "mlp.down_proj"}  # grouped-query attention: no v -> o group (llm-awq's condition)
PREV_MLP = {"llama_mha": "post_attention_layernorm", "mistral": "post_attention_layernorm",
            "qwen3": "post_attention_layernorm", "gemma3": "pre_feedforward_layernorm"}


def _reports(model, cfg, windows, **kw):
    linears = ttq.block_linears(model)
    return awq_search_replace(model, linears, {n: cfg for n in linears}, windows, **kw)


@torch.no_grad()
@pytest.mark.parametrize("family", ["llama_mha", "mistral", "qwen3", "gemma3", "opt"])
def test_families_groups_and_search_never_worse(family: str) -> None:
    model = _tiny(family)
    prefix, blocks = ttq.patch.find_blocks(model)
    names = {n.split(".", 3)[-1] if prefix == "model.layers" else n.split(".", 4)[-1]
             for n in ttq.block_linears(model) if n.startswith(f"{prefix}.0.")}
    got = {tuple(members): g.inspect for g, _, members in block_groups(blocks[0], names)}
    assert got == GROUPS.get(family, GQA)
    if family in PREV_MLP:
        prev = {g.inspect: p for g, p, _ in block_groups(blocks[0], names)}
        assert prev["mlp"] == PREV_MLP[family]
    ref = model(_windows(1, 16, 128)).logits
    reports = _reports(model, AWQSearchConfig(quant=Q3, n_grid=5), _windows(2, 32, 128))
    assert len(reports) == 2
    for rep in reports:
        assert set(rep["loss"]) == set(got.values())
        for searched, rtn in rep["loss"].values():
            assert searched <= rtn  # alpha = 0 is RTN and is a candidate
        for clipped, unclipped in rep["clip"].values():
            assert clipped <= unclipped
        assert not any(k.rpartition(".")[2] in ("q_proj", "k_proj") for k in rep["clip"])  # llm-awq skips q/k
    n_quantized = sum(isinstance(m, StaticQuantLinear) for m in blocks.modules())
    assert n_quantized == sum(isinstance(m, torch.nn.Linear) for m in blocks.modules()) > 0  # one per .original
    assert torch.isfinite(model(_windows(1, 16, 128)).logits).all()
    ttq.restore_(model)
    assert torch.equal(model(_windows(1, 16, 128)).logits, ref)


@torch.no_grad()
def test_stories_search_matches_independent_rtn_error(stories_model) -> None:
    """The engine's alpha = 0 loss is the MLP's output MSE with RTN gate/up, recomputed here by hand; the searched
    alpha is never worse; every layer is a StaticQuantLinear, with input scales where a group applies."""
    model, windows = stories_model, _windows()
    mlp = model.model.layers[0].mlp
    hidden = {}
    h = mlp.register_forward_pre_hook(lambda m, a: hidden.setdefault(len(hidden), a[0].clone()))
    for w in range(windows.shape[0]):
        model(windows[w : w + 1], use_cache=False)
    h.remove()
    ref = [mlp(x) for x in hidden.values()]
    g0, u0 = mlp.gate_proj.weight.data.clone(), mlp.up_proj.weight.data.clone()
    mlp.gate_proj.weight.data, mlp.up_proj.weight.data = qdq(g0, Q3), qdq(u0, Q3)
    rtn = sum(float((mlp(x) - r).square().sum()) for x, r in zip(hidden.values(), ref)) / sum(r.numel() for r in ref)
    mlp.gate_proj.weight.data, mlp.up_proj.weight.data = g0, u0

    plan = ttq.quantize_(model, AWQSearchConfig(quant=Q3), calibration=windows)
    assert len(plan) == 35 and all(isinstance(model.get_submodule(n), StaticQuantLinear) for n in plan)
    layer0 = model.model.layers[0]
    assert layer0.self_attn.o_proj.input_scale is None  # GQA: o_proj clipped, not scaled
    assert layer0.self_attn.q_proj.awq_alpha == layer0.self_attn.v_proj.awq_alpha  # one shared scale
    if layer0.mlp.gate_proj.awq_alpha > 0:
        assert torch.equal(layer0.mlp.gate_proj.input_scale, layer0.mlp.up_proj.input_scale)
    ttq.restore_(model)
    rep = _reports(model, AWQSearchConfig(quant=Q3), windows)[0]
    searched, got_rtn = rep["loss"]["mlp"]
    assert got_rtn == pytest.approx(rtn, rel=1e-5) and searched <= got_rtn
    assert all(c <= u for c, u in rep["clip"].values())


@torch.no_grad()
def test_quantized_inputs_and_clip_off_differ(stories_model) -> None:
    windows = _windows()
    a = _reports(stories_model, AWQSearchConfig(quant=Q3, n_grid=4, inputs="quantized", clip=False), windows)
    assert all(r["clip"] == {} for r in a)
    ttq.restore_(stories_model)
    b = _reports(stories_model, AWQSearchConfig(quant=Q3, n_grid=4, clip=False), windows)
    assert a[0]["loss"] == b[0]["loss"]  # block 0 sees the same inputs either way
    assert a[-1]["loss"] != b[-1]["loss"]


def test_mixing_and_misuse(stories_model) -> None:
    windows = _windows()
    cfg = AWQSearchConfig(quant=Q3, n_grid=2)
    plan = ttq.quantize_(stories_model, cfg, calibration=windows, overrides={"*.down_proj": RTNConfig(quant=Q3)})
    assert plan["model.layers.0.mlp.down_proj"] == RTNConfig(quant=Q3)
    ttq.restore_(stories_model)
    with pytest.raises(ConfigError, match="separate call"):
        ttq.quantize_(stories_model, cfg, calibration=windows, overrides={"*.down_proj": AWQConfig(quant=Q3)})
    with pytest.raises(ValueError, match="token"):
        ttq.quantize_(stories_model, cfg, calibration={})  # statistics instead of token ids
    with pytest.raises(ConfigError, match="inputs"):
        linears = ttq.block_linears(stories_model)
        awq_search_replace(stories_model, linears, {n: AWQSearchConfig(inputs="quantized") if "mlp" in n else cfg
                                                    for n in linears}, windows)


@torch.no_grad()
def test_save_load_round_trip(tmp_path, stories_model) -> None:
    plan = ttq.quantize_(stories_model, AWQSearchConfig(quant=Q3, n_grid=4), calibration=_windows())
    ids = _windows(2, 24)
    ref = stories_model(ids).logits
    ttq.save_pretrained(stories_model, tmp_path / "ckpt", plan=plan)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert torch.equal(loaded(ids).logits, ref)
    for name, cfg in plan.items():
        mod = loaded.get_submodule(name)
        assert isinstance(mod, StaticQuantLinear) and mod.ttq_config == cfg
        assert (mod.input_scale is None) == (stories_model.get_submodule(name).input_scale is None)


@torch.no_grad()
def test_moe_experts_are_clipped_and_quantized() -> None:
    """Experts are in no scale group: clipped (when tokens reach them) and quantized; restore gives them back."""
    from ttq.tiny_moe import tiny_moe

    model = tiny_moe("qwen3_moe")
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    ref = model(ids).logits
    plan = ttq.quantize_(model, AWQSearchConfig(quant=QuantSpec(bits=3, group_size=16), n_grid=3), calibration=ids)
    assert any(".experts." in n for n in plan) and torch.isfinite(model(ids).logits).all()
    ttq.restore_(model)
    assert torch.equal(model(ids).logits, ref)
