"""compressed-tensors export (src/ttq/export/compressed.py): packing, the exact / re-encoded / widened / dense
cases, and the folder loaded back by ``transformers.AutoModelForCausalLM.from_pretrained`` with the
compressed-tensors package (no ttq involved in the loading) giving ttq's own logits."""

from __future__ import annotations

import json

import pytest
import torch

import ttq
from tests.export.conftest import calibration, ids
from ttq.config import AWQConfig, GPTQConfig, RTNConfig, TTQConfig
from ttq.errors import ConfigError, OutputExistsError
from ttq.export import export, quantize_for_export
from ttq.export.compressed import pack_int32, to_ct
from ttq.export.weights import QuantizedWeight
from ttq.formats.affine import QuantSpec, quantize


def _zp(bits: int = 4, group_size: int = 32, symmetric: bool = False) -> QuantSpec:
    """An ``int_zp`` spec (made inside a test: the format is registered by the fixture)."""
    return QuantSpec(bits=bits, group_size=group_size, symmetric=symmetric, fmt="int_zp")


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("cols", [32, 64, 100, 172])
def test_pack_int32_is_compressed_tensors_packing(bits: int, cols: int) -> None:
    ct = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    u = torch.randint(0, 2**bits, (9, cols), generator=torch.Generator().manual_seed(bits), dtype=torch.uint8)
    signed = (u.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)
    assert torch.equal(pack_int32(u, bits), ct.pack_to_int32(signed, bits))
    assert torch.equal(pack_int32(u.t().contiguous(), bits).t(), ct.pack_to_int32(signed, bits, packed_dim=0))


@pytest.mark.parametrize("bits,widths,stored", [(3, (4, 8), 4), (2, (4, 8), 4), (5, (4, 8), 8),
                                                (3, (2, 3, 4, 5, 6, 7, 8), 3)])
@pytest.mark.parametrize("symmetric", [False, True])
def test_widening_is_exact(bits: int, widths, stored: int, symmetric: bool) -> None:
    spec = _zp(bits, 32, symmetric)
    qw = QuantizedWeight(*quantize(torch.randn(8, 64, generator=torch.Generator().manual_seed(0)), spec), spec)
    layer, how = to_ct("l", qw, widths)
    assert how == "exact" and layer.bits == stored and layer.symmetric == symmetric
    assert torch.equal(layer.dequantize(), qw.dequantize())


def test_float_zero_is_re_encoded() -> None:
    spec = QuantSpec(bits=4, group_size=32)  # ttq's "int": Z = min, not on an integer zero-point grid
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    qw = QuantizedWeight(*quantize(w, spec), spec)
    layer, how = to_ct("l", qw, (4, 8))
    assert how == "re-encoded" and layer.bits == 4
    step = qw.scale.repeat_interleave(32, 1)
    assert torch.all((layer.dequantize() - qw.dequantize()).abs() <= step * 0.5 + 1e-6)  # at most half a step


def _load(out):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()


CASES = {  # id -> () -> (config, overrides, export options)
    "rtn4_g32": lambda: (RTNConfig(quant=_zp()), None, {}),
    "rtn8_g128_sym": lambda: (RTNConfig(quant=_zp(8, 128, True)), None, {}),
    "rtn2_channel_sym": lambda: (RTNConfig(quant=_zp(2, -1, True)), None, {}),
    "rtn3_g64_vllm": lambda: (RTNConfig(quant=_zp(3, 64)), None, {}),
    "rtn3_g64_native": lambda: (RTNConfig(quant=_zp(3, 64)), None, {"widths": "native"}),
    "awq4_folded": lambda: (AWQConfig(quant=_zp(), alphas=(0.0, 0.5, 1.0)), None, {}),
    "gptq4_act_order_static": lambda: (GPTQConfig(quant=_zp(), act_order=True, static_groups=True), None,
                                       {"actorder": "weight"}),
    "bit_plan_sym": lambda: (RTNConfig(quant=_zp(4, 32, True)),
                             {"*.mlp.*": RTNConfig(quant=_zp(8, 64, True)), "*.layers.0.*": None}, {}),
}


@torch.no_grad()
@pytest.mark.parametrize("case", list(CASES))
def test_loads_in_transformers_with_ttq_logits(tmp_path, stories_model, stories_tokenizer, case) -> None:
    """Bit for bit: the loaded model's logits equal ttq's (after folding) for every int_zp setting."""
    config, overrides, options = CASES[case]()
    calib = calibration(stories_model) if config.needs_calibration else None
    if overrides is None:
        _, folds = quantize_for_export(stories_model, config, calibration=calib)
    else:  # a bit plan: mixed widths, some layers left in full precision
        ttq.quantize_(stories_model, config, overrides=overrides)
        folds = None
    out = tmp_path / "ct"
    report = export(stories_model, out, "compressed-tensors", tokenizer=stories_tokenizer, folds=folds, **options)
    ref = stories_model(ids()).logits
    got = _load(out)(ids()).logits
    assert torch.equal(got, ref), f"max |diff| {(got - ref).abs().max().item():.3g}"
    assert report.worst() == (0.0, 0.0) and report.count("re-encoded") == 0
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "compressed-tensors" and qcfg["format"] == "pack-quantized"
    assert "lm_head" in qcfg["ignore"]
    if config.quant.group_size == 32:  # down_proj (172 columns) has a partial group: full precision, ignored
        assert "model.layers.1.mlp.down_proj" in qcfg["ignore"] and report.count("dense") >= 4
        assert any("no partial groups (172 columns in groups of" in n for n in report.notes)
    widths = {g["weights"]["num_bits"] for g in qcfg["config_groups"].values()}
    if case == "rtn3_g64_vllm":
        assert widths == {4} and any("stored exactly in the next width" in n for n in report.notes)
    if case == "rtn3_g64_native":
        assert widths == {3}
    if case == "awq4_folded":
        assert report.folded == 15 and len(report.rtn_fallbacks) == 5
    if case == "bit_plan_sym":
        assert widths == {4, 8} and len(qcfg["config_groups"]) == 2
        assert "model.layers.0.self_attn.q_proj" in qcfg["ignore"]  # left in full precision by the plan
        assert all(t != ["Linear"] for t in (g["targets"] for g in qcfg["config_groups"].values()))
    if case == "gptq4_act_order_static":
        assert qcfg["config_groups"]["group_0"]["weights"]["actorder"] == "weight"


def test_asymmetric_bit_plan_is_written_for_vllm(tmp_path, stories_model) -> None:
    """Mixed asymmetric widths: one config group per scheme with its layers listed (what vLLM reads); the report
    says transformers cannot load it."""
    ttq.quantize_(stories_model, RTNConfig(quant=_zp()), overrides={"*.mlp.*": RTNConfig(quant=_zp(8, 64))})
    report = export(stories_model, tmp_path / "ct", "compressed-tensors")
    qcfg = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    groups = {(g["weights"]["num_bits"], g["weights"]["group_size"]): g["targets"]
              for g in qcfg["config_groups"].values()}
    assert set(groups) == {(4, 32), (8, 64)} and "dequantize" not in qcfg
    assert "model.layers.2.self_attn.k_proj" in groups[(4, 32)] and "model.layers.2.mlp.up_proj" in groups[(8, 64)]
    assert any("vLLM loads this, transformers" in n for n in report.notes)


@torch.no_grad()
def test_float_zero_model_is_re_encoded(tmp_path, stories_model) -> None:
    """ttq's own float-zero grid: written re-encoded, the report says by how much, the model still loads."""
    ttq.quantize_(stories_model, RTNConfig(quant=QuantSpec(bits=4, group_size=64)))
    report = export(stories_model, tmp_path / "ct", "compressed-tensors")
    assert report.count("re-encoded") == 30 and 0 < report.worst()[1] < 0.2
    assert any("re-encoded on the integer zero-point grid" in n for n in report.notes)
    assert "re-encoded: 30 layer(s)" in report.summary()
    ref, got = stories_model(ids()).logits, _load(tmp_path / "ct")(ids()).logits
    assert torch.isfinite(got).all() and float((got - ref).abs().max() / ref.abs().max()) < 0.5  # a second rounding


def test_refusals(tmp_path, stories_model) -> None:
    calib = calibration(stories_model)
    ttq.quantize_(stories_model, GPTQConfig(quant=_zp(), act_order=True), calibration=calib)  # dynamic groups
    with pytest.raises(ConfigError, match="act-order on dynamic groups"):
        export(stories_model, tmp_path / "a", "compressed-tensors")
    ttq.restore_(stories_model)
    ttq.quantize_(stories_model, TTQConfig(quant=_zp()))
    with pytest.raises(ConfigError, match="test-time method quantizes from each input"):
        export(stories_model, tmp_path / "b", "compressed-tensors")
    ttq.restore_(stories_model)
    ttq.quantize_(stories_model, RTNConfig(quant=QuantSpec(bits=4, group_size=32, fmt="nf4")))
    with pytest.raises(ConfigError, match="writes integer grids"):
        export(stories_model, tmp_path / "c", "compressed-tensors")
    assert not any(p.name in "abc" for p in tmp_path.iterdir())


def test_output_rules(tmp_path, stories_model) -> None:
    ttq.quantize_(stories_model, RTNConfig(quant=_zp()))
    out = tmp_path / "ct"
    export(stories_model, out, "compressed-tensors")
    with pytest.raises(OutputExistsError, match="exists; pass overwrite=True"):
        export(stories_model, out, "compressed-tensors")
    export(stories_model, out, "compressed-tensors", overwrite=True)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("keep")
    with pytest.raises(ConfigError, match="holds no checkpoint"):
        export(stories_model, other, "compressed-tensors", overwrite=True)
    assert (other / "mine.txt").read_text() == "keep"


@torch.no_grad()
@pytest.mark.parametrize("family,block,names", [("qwen3_moe", "mlp", ("gate_proj", "up_proj", "down_proj")),
                                                ("mixtral", "block_sparse_moe", ("w1", "w3", "w2"))])
def test_moe_experts_get_their_family_names(tmp_path, family, block, names) -> None:
    """Per-expert linears are written with the family's names (Qwen3-MoE ``experts.<e>.gate_proj / up_proj /
    down_proj``, Mixtral ``block_sparse_moe.experts.<e>.w1 / w3 / w2``; gate_up split by rows), what vLLM and
    transformers' compressed-tensors MoE loading read; symmetric experts load exactly."""
    from ttq.tiny_moe import tiny_moe

    model = tiny_moe(family)
    ttq.quantize_(model, RTNConfig(quant=_zp(4, 32, True)))
    export(model, tmp_path / "moe", "compressed-tensors")
    from safetensors import safe_open

    with safe_open(tmp_path / "moe" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor(f"model.layers.0.{block}.experts.3.{names[0]}.weight_shape").tolist() == [32, 64]
    assert {f"model.layers.1.{block}.experts.3.{p}.weight_packed" for p in names} <= keys
    assert not any(".gate_up_proj" in k for k in keys) and f"model.layers.0.{block}.gate.weight" in keys
    ref = model(ids(length=12) % 120).logits
    assert torch.equal(_load(tmp_path / "moe")(ids(length=12) % 120).logits, ref)
