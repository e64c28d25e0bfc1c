"""Save and load every method on the real tiny model: the same module types, identical logits, packed
static layers without a full-precision copy, sizes, and the output-folder rules."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import ttq
from ttq.checkpoint.format import read_header
from ttq.config import (
    AWPConfig,
    AWQConfig,
    GPTQConfig,
    OnlineLowRankTTQConfig,
    PruneConfig,
    RTNConfig,
    TTQConfig,
    TTQLowRankConfig,
)
from ttq.errors import ConfigError, OutputExistsError
from ttq.formats.affine import QuantSpec
from ttq.methods.refine import RefineSpec
from ttq.methods.scaling import ScaleSpec
from ttq.patch.capture import collect_layer_stats

Q3, Q4 = QuantSpec(bits=3, group_size=32), QuantSpec(bits=4, group_size=32)

# (id, config, overrides): static methods first, then test-time ones
CASES = [
    ("rtn4", RTNConfig(quant=Q4), None),
    ("rtn3", RTNConfig(quant=Q3), None),
    ("rtn2_sym_per_channel", RTNConfig(quant=QuantSpec(bits=2, group_size=-1, symmetric=True)), None),
    ("rtn8_g128", RTNConfig(quant=QuantSpec(bits=8, group_size=128)), None),
    ("rtn_nf4", RTNConfig(quant=QuantSpec(bits=4, group_size=32, fmt="nf4")), None),
    ("rtn_fp4", RTNConfig(quant=QuantSpec(bits=4, group_size=32, fmt="fp4")), None),
    ("rtn_nvfp4", RTNConfig(quant=QuantSpec(bits=4, group_size=16, fmt="nvfp4")), None),
    ("awq3", AWQConfig(quant=Q3, alphas=(0.0, 0.5, 1.0)), None),
    ("gptq3", GPTQConfig(quant=Q3), None),
    ("gptq3_act_order", GPTQConfig(quant=Q3, act_order=True), None),
    ("gptq3_scaled", GPTQConfig(quant=Q3, scale=ScaleSpec()), None),
    ("awp3", AWPConfig(quant=Q3, iters=2), None),
    ("bit_plan", RTNConfig(quant=Q4), {"*.mlp.*": RTNConfig(quant=Q3), "*.self_attn.o_proj": RTNConfig(
        quant=QuantSpec(bits=2, group_size=16)), "*.layers.0.*": None}),
    ("ttq3", TTQConfig(quant=Q3), None),
    ("ttq3_r4", TTQConfig(quant=Q3, rank=4), None),
    ("ttq3_r4_refined", TTQConfig(quant=Q3, rank=4, refine=RefineSpec(alpha_grid=(0.25, 0.5), clip_grid=(0.9,),
                                                                     prompt_lowrank=True)), None),
    ("ttq_mixed_with_rtn", TTQConfig(quant=Q3, rank=2), {"*.mlp.down_proj": RTNConfig(quant=Q4)}),
    ("ttq_lowrank", TTQLowRankConfig(quant=Q3, rank=4, init="alternating", iters=1, factor_quant=Q4), None),
    ("ttq_online", OnlineLowRankTTQConfig(quant=Q3, rank=4, rule="isvd", decay=0.9), None),
    ("awp_online", AWPConfig(quant=Q3, iters=1, online=True), None),
    ("prune_2_4_ttq", PruneConfig(n_m=(2, 4), quant=Q4), None),
    ("prune_half", PruneConfig(sparsity=0.5), None),
]
STATIC = {"rtn4", "rtn3", "rtn2_sym_per_channel", "rtn8_g128", "rtn_nf4", "rtn_fp4", "rtn_nvfp4", "awq3", "gptq3",
          "gptq3_act_order", "gptq3_scaled", "awp3", "bit_plan"}


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(seed))


def _quantized(stories_model, config, overrides):
    calib = None
    if any(getattr(c, "needs_calibration", False) for c in [config, *(overrides or {}).values()] if c is not None):
        windows = torch.randint(3, 500, (4, 64), generator=torch.Generator().manual_seed(7))
        calib = collect_layer_stats(stories_model, ttq.block_linears(stories_model), windows, 2.0)
    plan = ttq.quantize_(stories_model, config, overrides=overrides, calibration=calib)
    return stories_model, plan


@torch.no_grad()
@pytest.mark.parametrize("case,config,overrides", CASES, ids=[c[0] for c in CASES])
def test_save_load_identical_logits(tmp_path, stories_model, case, config, overrides):
    model, plan = _quantized(stories_model, config, overrides)
    if case == "ttq_online":
        model(_ids(1))  # the tracked subspace moves: its current state is what gets saved
    out = tmp_path / "ckpt"
    report = ttq.save_pretrained(model, out, plan=plan)
    ref = model(_ids()).logits
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert not loaded.training
    got = loaded(_ids()).logits
    assert torch.equal(got, ref), f"max |diff| {(got - ref).abs().max().item():.3g}"

    before = {n: type(m) for n, m in model.named_modules() if n in plan}
    after = {n: type(m) for n, m in loaded.named_modules() if n in plan}
    assert after == before and report.layers == len(plan)
    for name, cfg in plan.items():  # each layer remembers its method config
        assert loaded.get_submodule(name).ttq_config == cfg

    header = read_header(out / "model.safetensors")
    assert not any(".original." in k for k in header)
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert set(qcfg["layers"]) == set(plan) and qcfg["format_version"] == 1
    for name in plan:
        info = header[f"{name}.weight"]
        assert len(info["shape"]) == 1  # never a loadable 2-D weight (plain transformers refuses it)
        if case in STATIC:  # packed codes only: no full-precision copy of the quantized weight
            rec = qcfg["layers"][name]
            bits, n = rec["args"]["quant"]["bits"], rec["args"]["in_features"] * rec["args"]["out_features"]
            assert info["dtype"] == "U8" and info["shape"] == [n if bits == 8 else -(-n // 8) * bits]
            assert all(header[f"{name}.{t}"]["dtype"] != "F32" or t != "weight" for t in rec["tensors"])
    if case in STATIC:
        assert report.file_bytes < report.fp_bytes and report.layer_bytes < 0.6 * report.layer_fp_bytes
        assert qcfg["layers"][next(iter(plan))]["method"] == plan[next(iter(plan))].name


@torch.no_grad()
def test_sizes_and_no_plan(tmp_path, stories_model, stories_dir):
    """4-bit g32 RTN: ~6 bits per weight with float32 scale and zero; without a plan every layer is recorded
    with the config quantize_ left on it (``ttq_config``), and a module that lost it by its module only."""
    ttq.quantize_(stories_model, RTNConfig(quant=Q4), overrides={"*.mlp.*": TTQConfig(quant=Q3, rank=2)})
    assert stories_model.get_submodule("model.layers.1.self_attn.q_proj").ttq_config == RTNConfig(quant=Q4)
    del stories_model.get_submodule("model.layers.0.self_attn.q_proj").ttq_config  # e.g. built by hand
    report = ttq.save_pretrained(stories_model, tmp_path / "c")
    fp_file = (stories_dir / "model.safetensors").stat().st_size
    assert abs(report.fp_bytes - fp_file) < 0.01 * fp_file  # the computed full-precision size is the real file's
    qcfg = json.loads((tmp_path / "c" / "config.json").read_text())["quantization_config"]
    attn = qcfg["layers"]["model.layers.0.self_attn.q_proj"]
    mlp = qcfg["layers"]["model.layers.0.mlp.up_proj"]
    assert attn["method"] is None and attn["config"] is None and attn["module"] == "static"
    other = qcfg["layers"]["model.layers.1.self_attn.q_proj"]
    assert other["method"] == "rtn" and qcfg["configs"][other["config"]]["quant"]["bits"] == 4
    assert mlp["method"] == "ttq" and qcfg["configs"][mlp["config"]]["rank"] == 2
    d_out, d_in = 64, 64  # q_proj: codes 4 bits + (scale, zero) float32 per 32 weights = 6 bits per weight
    header = read_header(tmp_path / "c" / "model.safetensors")
    q = sum(_nbytes(header[f"model.layers.0.self_attn.q_proj.{t}"]) for t in attn["tensors"])
    assert q == d_out * d_in * 6 // 8
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "c")
    assert torch.equal(loaded(_ids()).logits, stories_model(_ids()).logits)
    ttq.save_pretrained(loaded, tmp_path / "again")  # a loaded model saves again, configs and all
    again = json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]
    assert again["layers"] == qcfg["layers"] and again["configs"] == qcfg["configs"]


def _nbytes(info: dict) -> int:
    begin, end = info["data_offsets"]
    return end - begin


def test_output_folder_rules(tmp_path, stories_model, stories_tokenizer):
    ttq.quantize_(stories_model, RTNConfig(quant=Q4))
    out = tmp_path / "ckpt"
    ttq.save_pretrained(stories_model, out, tokenizer=stories_tokenizer)
    assert (out / "tokenizer_config.json").is_file() and (out / "generation_config.json").is_file()
    with pytest.raises(OutputExistsError, match="overwrite=True"):
        ttq.save_pretrained(stories_model, out)
    (out / "marker").write_text("old")
    ttq.save_pretrained(stories_model, out, overwrite=True)  # replaces a checkpoint folder
    assert not (out / "marker").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError):
        ttq.save_pretrained(stories_model, other)
    with pytest.raises(ConfigError, match="holds no ttq checkpoint"):
        ttq.save_pretrained(stories_model, other, overwrite=True)  # never replaces another kind of folder
    assert (other / "notes.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left


def test_refuses_unquantized_and_packed_head(tmp_path, stories_model):
    with pytest.raises(ConfigError, match="no ttq-quantized layer"):
        ttq.save_pretrained(stories_model, tmp_path / "a")
    ttq.quantize_(stories_model, TTQConfig(quant=Q4))
    ttq.runtime.quantize_lm_head(stories_model, bits=8)
    with pytest.raises(ConfigError, match="LM head is packed"):
        ttq.save_pretrained(stories_model, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
