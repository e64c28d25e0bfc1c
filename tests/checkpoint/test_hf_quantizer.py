"""Loading through transformers: bad checkpoints are clear ttq errors, a checkpoint loaded without
``import ttq`` is refused (never a silently unquantized model), MoE experts saved per expert."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import ttq
from ttq.config import RTNConfig, TTQConfig
from ttq.errors import ConfigError, DataNotFoundError, ModelError
from ttq.formats.affine import QuantSpec

Q4 = QuantSpec(bits=4, group_size=32)


@pytest.fixture()
def checkpoint(tmp_path, stories_model) -> Path:
    ttq.quantize_(stories_model, RTNConfig(quant=Q4), overrides={"*.mlp.*": TTQConfig(quant=Q4, rank=2)})
    out = tmp_path / "ckpt"
    ttq.save_pretrained(stories_model, out)
    return out


def _edit_config(folder: Path, edit) -> None:
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    edit(cfg["quantization_config"])
    path.write_text(json.dumps(cfg))


def _both_loaders(folder: Path, error: type, match: str) -> None:
    """ttq.load_pretrained and plain transformers both raise the same ttq error."""
    with pytest.raises(error, match=match):
        ttq.load_pretrained(folder)
    with pytest.raises(error, match=match):
        AutoModelForCausalLM.from_pretrained(folder)


def test_load_pretrained(checkpoint, stories_model, caplog):
    model = ttq.load_pretrained(checkpoint)
    ids = torch.randint(3, 500, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, stories_model(ids).logits)
    assert model.config.quantization_config.quant_method == "ttq"
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, :5] = 0  # a left-padded sequence: its pads stay out of the TTQ layers' statistic, as before saving
    batch = torch.cat([ids, ids.roll(3, dims=1)])
    with torch.no_grad():
        assert torch.equal(model(batch, attention_mask=mask).logits, stories_model(batch, attention_mask=mask).logits)
    with pytest.raises(ValueError, match="not serializable"):  # transformers' own save would lose the format
        model.save_pretrained(checkpoint.parent / "hf")
    assert "ttq.save_pretrained(model, folder)" in caplog.text


def test_not_a_ttq_checkpoint(tmp_path, stories_dir):
    with pytest.raises(DataNotFoundError):
        ttq.load_pretrained(tmp_path / "missing")
    with pytest.raises(ModelError, match="no config.json"):
        ttq.load_pretrained(tmp_path)
    with pytest.raises(ModelError, match="not a ttq checkpoint"):
        ttq.load_pretrained(stories_dir)
    with pytest.raises(ConfigError, match="quantization_config"):
        ttq.load_pretrained(stories_dir, quantization_config={"quant_method": "ttq"})


def test_newer_format_version(checkpoint):
    _edit_config(checkpoint, lambda q: q.update(format_version=99))
    _both_loaders(checkpoint, ModelError, "format version 99.*upgrade ttq")


def test_unknown_method(checkpoint):
    _edit_config(checkpoint, lambda q: q["configs"][0].update(method="frobnicate"))
    _both_loaders(checkpoint, ModelError, "unknown method 'frobnicate'")


def test_unknown_module_kind_and_field(checkpoint):
    def edit(q):
        next(iter(q["layers"].values()))["module"] = "hologram"

    _edit_config(checkpoint, edit)
    _both_loaders(checkpoint, ModelError, "unknown module kind 'hologram'")
    _edit_config(checkpoint, lambda q: q.update(shiny=True))
    _both_loaders(checkpoint, ModelError, "unknown quantization_config field")


def test_truncated_safetensors(checkpoint):
    path = checkpoint / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    _both_loaders(checkpoint, ModelError, "model.safetensors is truncated")


def test_missing_tensor(checkpoint):
    from safetensors.torch import load_file, save_file

    path = checkpoint / "model.safetensors"
    tensors = load_file(path)
    del tensors["model.layers.1.self_attn.k_proj.weight_scale"]
    save_file(tensors, path, metadata={"format": "pt"})
    _both_loaders(checkpoint, ModelError, r"lacks tensor model\.layers\.1\.self_attn\.k_proj\.weight_scale")


@pytest.mark.parametrize("method", ["rtn", "ttq"])
def test_without_import_ttq_the_load_is_refused(tmp_path, stories_model, method):
    """transformers alone only warns about the unknown quant_method; the 1-D layer weights then fail its
    size check, so the checkpoint is refused instead of loading as an unquantized model."""
    config = RTNConfig(quant=Q4) if method == "rtn" else TTQConfig(quant=Q4)  # TTQ stores the FP weight: flattened
    ttq.quantize_(stories_model, config)
    ttq.save_pretrained(stories_model, tmp_path / "c")
    code = ("import sys\n"
            "from transformers import AutoModelForCausalLM\n"
            f"try:\n    AutoModelForCausalLM.from_pretrained({str(tmp_path / 'c')!r})\n"
            "except RuntimeError as e:\n    print('REFUSED', 'ttq' in sys.modules, e); sys.exit(3)\n"
            "print('LOADED')\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, check=False)
    assert run.returncode == 3, run.stdout + run.stderr
    assert "REFUSED False" in run.stdout and "mismatched" in (run.stdout + run.stderr).lower()


@torch.no_grad()
@pytest.mark.parametrize("config", [RTNConfig(quant=QuantSpec(bits=3, group_size=16)),
                                    TTQConfig(quant=QuantSpec(bits=3, group_size=16), rank=2)], ids=["rtn", "ttq"])
def test_moe_experts_saved_per_expert(tmp_path, config):
    """Experts unfused by quantize_ are ordinary quantized linears (``...experts.gate_up_proj.3``): saved and
    loaded by module name like any other layer, the fused modules unfused again on loading."""
    from ttq.patch.experts import RoutedExperts
    from ttq.tiny_moe import tiny_moe

    model = tiny_moe("qwen3_moe")
    plan = ttq.quantize_(model, config)
    experts = [n for n in plan if ".experts." in n]
    assert "model.layers.0.mlp.experts.gate_up_proj.3" in experts
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    ref = model(ids).logits
    ttq.save_pretrained(model, tmp_path / "moe", plan=plan)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "moe")
    assert any(isinstance(m, RoutedExperts) for m in loaded.modules())
    assert type(loaded.get_submodule(experts[0])) is type(model.get_submodule(experts[0]))
    assert torch.equal(loaded(ids).logits, ref)


@torch.no_grad()
def test_load_in_another_dtype(checkpoint):
    """``dtype=`` casts the layer weights and biases with the model; codes, scales and zeros keep their storage."""
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16)
    static, test_time = model.model.layers[0].self_attn.q_proj, model.model.layers[0].mlp.up_proj
    assert static._dtype == torch.bfloat16 and static.scale.dtype == torch.float32 and static.codes.dtype == torch.uint8
    assert test_time.weight.dtype == torch.bfloat16 and test_time.lr_b.dtype == torch.bfloat16
    ids = torch.randint(3, 500, (1, 16), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(model(ids).logits).all()
