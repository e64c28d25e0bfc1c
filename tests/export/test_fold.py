"""Folding input scales into the preceding op (src/ttq/export/fold.py): which relations hold, that folding keeps
the logits, the round-to-nearest fallback, and the joint AWQ alpha of layers that share one fold."""

from __future__ import annotations

import pytest
import torch

import ttq
from tests.export.conftest import calibration, ids
from ttq.config import AWQConfig, RTNConfig
from ttq.export import fold_, plan_folds, quantize_for_export
from ttq.export.pipeline import joint_alphas
from ttq.formats.affine import QuantSpec
from ttq.methods.awq import awq_search
from ttq.nn.linear import StaticQuantLinear

Q4 = QuantSpec(bits=4, group_size=32)


def _tiny(model_type: str, **kw) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    base = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 4, "head_dim": 16, "vocab_size": 128}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **{**base, **kw})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # random norm weights: folding must keep them right
                p.uniform_(0.5, 1.5)
    return model


def test_stories_relations(stories_model) -> None:
    """Llama with grouped-query attention (8 heads, 4 value heads): no v -> o fold."""
    folds = plan_folds(stories_model)
    by_source = {f.source.split(".", 3)[-1]: f for f in folds if f.source.startswith("model.layers.2.")}
    assert set(by_source) == {"input_layernorm", "post_attention_layernorm", "mlp.up_proj"}
    assert by_source["input_layernorm"].targets == tuple(f"model.layers.2.self_attn.{p}_proj" for p in "qkv")
    assert by_source["mlp.up_proj"].kind == "rows" and len(folds) == 15


@torch.no_grad()
def test_full_attention_folds_v_into_o_and_keeps_logits() -> None:
    model = _tiny("llama")
    assert any(f.source.endswith("v_proj") for f in plan_folds(model))
    windows = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))
    from ttq.patch.capture import collect_layer_stats

    calib = collect_layer_stats(model, ttq.block_linears(model), windows, 2.0)
    _, folds = quantize_for_export(model, AWQConfig(quant=Q4, alphas=(0.5, 1.0)), calibration=calib)
    ref = model(ids(length=16) % 128).logits
    result = fold_(model, folds)
    assert len(result.folded) == 8 and result.rtn == [] and result.max_logit_change < 1e-5
    assert torch.allclose(model(ids(length=16) % 128).logits, ref, rtol=0, atol=1e-5 * float(ref.abs().max()))
    assert not any(getattr(m, "input_scale", None) is not None for m in model.modules())


@torch.no_grad()
def test_gemma3_norms() -> None:
    """Gemma3: ``post_attention_layernorm`` normalises the attention output (not folded into the MLP), the MLP reads
    ``pre_feedforward_layernorm``; its RMSNorm multiplies by ``1 + weight``."""
    model = _tiny("gemma3_text", num_key_value_heads=1, sliding_window=16)
    sources = {f.source.split(".", 3)[-1] for f in plan_folds(model)}
    assert sources == {"input_layernorm", "pre_feedforward_layernorm", "mlp.up_proj"}
    from ttq.patch.capture import collect_layer_stats

    windows = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))
    calib = collect_layer_stats(model, ttq.block_linears(model), windows, 2.0)
    _, folds = quantize_for_export(model, AWQConfig(quant=Q4, alphas=(0.5, 1.0)), calibration=calib)
    ref = model(ids(length=16) % 128).logits
    result = fold_(model, folds)
    assert len(result.folded) == 6 and result.max_logit_change < 1e-5
    assert torch.allclose(model(ids(length=16) % 128).logits, ref, rtol=0, atol=1e-5 * float(ref.abs().max()))


@torch.no_grad()
def test_layers_with_different_scales_fall_back_to_rtn(stories_model) -> None:
    """ttq's own AWQ (one alpha per layer) may give q/k/v different scales: they cannot share one norm, so they
    (and o_proj, under grouped-query attention) are re-quantized with round-to-nearest; the rest fold."""
    calib = calibration(stories_model)
    ttq.quantize_(stories_model, AWQConfig(quant=Q4, alphas=(1.0,)), calibration=calib,
                  overrides={"*.q_proj": AWQConfig(quant=Q4, alphas=(0.0,))})
    result = fold_(stories_model)
    assert len(result.rtn) == 20 and len(result.folded) == 10  # q, k, v, o of 5 blocks; gate/up and down fold
    q = stories_model.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(q, StaticQuantLinear) and q.input_scale is None and q.export_fallback == "rtn"
    rtn = ttq.methods.rtn.rtn(q.original.weight, Q4)
    assert torch.equal(q.dequantized_weight(), rtn)


@torch.no_grad()
def test_joint_alpha_minimises_the_summed_loss(stories_model) -> None:
    calib = calibration(stories_model)
    cfg = AWQConfig(quant=Q4, alphas=(0.0, 0.25, 0.5, 0.75, 1.0))
    group = tuple(f"model.layers.1.self_attn.{p}_proj" for p in "qkv")
    alpha = joint_alphas(stories_model, [group], cfg, calib)[group[0]]
    totals = {}
    for a in cfg.alphas:
        totals[a] = sum(awq_search(stories_model.get_submodule(n).weight, calib[n].stats, calib[n].gram, Q4,
                                   cfg.scale, (a,))["loss"] for n in group)
    assert alpha == min(totals, key=totals.get)


def test_rtn_needs_no_fold(stories_model) -> None:
    _, folds = quantize_for_export(stories_model, RTNConfig(quant=Q4))
    result = fold_(stories_model, folds)
    assert result.folded == [] and result.rtn == []


def test_loaded_checkpoint_without_weights_cannot_fall_back(tmp_path, stories_model) -> None:
    from transformers import AutoModelForCausalLM

    from ttq.errors import ModelError

    calib = calibration(stories_model)
    plan = ttq.quantize_(stories_model, AWQConfig(quant=Q4, alphas=(0.5,)), calibration=calib)
    ttq.save_pretrained(stories_model, tmp_path / "awq", plan=plan)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "awq")
    with pytest.raises(ModelError, match="no full-precision weight to re-quantize"):
        fold_(loaded)  # o_proj cannot fold and a loaded checkpoint keeps no full-precision weight
