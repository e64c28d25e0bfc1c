"""Models bigger than memory (:mod:`ttq.offload`): stories260K dispatched by accelerate with most of its
blocks offloaded to disk quantizes, calibrates and evaluates exactly like the same model in memory, keeps
its full-precision weights off memory, and ``restore_`` gives it back still offloaded."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

import ttq
from tests.conftest import shared_dir
from ttq.cache import model_fingerprint
from ttq.errors import ConfigError, ModelError
from ttq.eval.ppl import perplexity
from ttq.offload import dispatch_kwargs, execution_device, is_offloaded, memory_bytes, offload_hook, onloaded
from ttq.patch.blocks import block_linears
from ttq.patch.capture import collect_layer_stats

BUDGET = "500KB"  # stories260K: ~1 MB of float32 weights; embeddings + block 0 stay in memory, blocks 1-4 on disk
SPEC = ttq.QuantSpec(bits=3, group_size=32)
TOL = 1e-5


def _dispatched(path, tmp_path) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map="auto",
                                                max_memory={"cpu": BUDGET}, offload_folder=str(tmp_path)).eval()


@pytest.fixture()
def offloaded(stories_dir, tmp_path) -> nn.Module:
    return _dispatched(stories_dir, tmp_path / "offload")


@pytest.fixture(scope="module")
def windows() -> torch.Tensor:
    return torch.randint(3, 512, (3, 64), generator=torch.Generator().manual_seed(0))  # (n, seqlen)


def _logits(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model(x, use_cache=False).logits


def _offloaded_layers(model) -> dict[str, nn.Module]:
    """The block linears whose weights accelerate loads at forward time."""
    return {n: m for n, m in block_linears(model).items() if offload_hook(m) is not None}


def _resident_fp_weights(model) -> list[str]:
    """Full-precision linear weights of the offloaded blocks that are materialized (should be none)."""
    blocks = [k for k, v in model.hf_device_map.items() if v == "disk" and ".layers." in f"{k}."]
    return [n for n, p in model.named_parameters()
            if n.startswith(tuple(f"{b}." for b in blocks)) and p.dim() == 2 and p.device.type != "meta"]


def test_dispatch_offloads_blocks_to_disk(offloaded, stories_model, windows):
    disk = [k for k, v in offloaded.hf_device_map.items() if v == "disk" and k.startswith("model.layers.")]
    assert len(disk) >= 3, offloaded.hf_device_map
    assert is_offloaded(offloaded) and not is_offloaded(stories_model)
    assert next(offloaded.model.layers[4].parameters()).device.type == "meta"  # what the old code took for the device
    assert execution_device(offloaded) == execution_device(stories_model) == torch.device("cpu")
    assert model_fingerprint(offloaded) == model_fingerprint(stories_model)  # offloaded weights read through hooks
    assert torch.equal(_logits(offloaded, windows[:1]), _logits(stories_model, windows[:1]))
    assert len(_offloaded_layers(offloaded)) == 28  # 4 blocks x 7 linears


def _config(method: str):
    return {
        "rtn": ttq.RTNConfig(quant=SPEC),
        "awq": ttq.AWQConfig(quant=SPEC, alphas=(0.0, 0.25, 0.5, 0.75, 1.0)),
        "ttq": ttq.TTQConfig(quant=SPEC, rank=0),
        "ttq_r4": ttq.TTQConfig(quant=SPEC, rank=4),
        "gptq_sequential": ttq.GPTQConfig(quant=SPEC, sequential=True),
    }[method]


def _calibration(method: str, model, windows):
    if method == "awq":
        return collect_layer_stats(model, block_linears(model), windows, p=2.0)
    if method == "gptq_sequential":
        return windows  # block-by-block calibration takes the token windows
    return None


@pytest.mark.parametrize("method", ["rtn", "awq", "ttq", "ttq_r4", "gptq_sequential"])
def test_quantize_offloaded_matches_in_memory(method, offloaded, stories_model, windows):
    cfg = _config(method)
    x = windows[:1]
    fp = _logits(stories_model, x)
    calib_mem, calib_off = _calibration(method, stories_model, windows), _calibration(method, offloaded, windows)
    if method == "awq":  # the calibration statistics themselves agree
        for name, lc in calib_mem.items():
            torch.testing.assert_close(calib_off[name].gram, lc.gram, rtol=TOL, atol=TOL)
    plan_mem = ttq.quantize_(stories_model, cfg, calibration=calib_mem)
    plan_off = ttq.quantize_(offloaded, cfg, calibration=calib_off)
    assert list(plan_off) == list(plan_mem) and len(plan_off) == 35
    assert _resident_fp_weights(offloaded) == []  # quantizing materialized no full-precision weight for good
    q_mem, q_off = _logits(stories_model, x), _logits(offloaded, x)
    assert (q_mem - fp).abs().max() > 1e-3  # 3-bit quantization changed the model
    torch.testing.assert_close(q_off, q_mem, rtol=TOL, atol=TOL)
    assert _resident_fp_weights(offloaded) == []  # nor did the forward (test-time methods fetch W per forward)
    layer = offloaded.model.layers[3].self_attn.q_proj
    assert getattr(layer, "_residual", None) is None and getattr(layer, "_w_cache", None) is None  # nor W-sized caches
    assert offload_hook(layer.original) is not None  # the original layer keeps its accelerate hook
    assert ttq.restore_(offloaded) == ttq.restore_(stories_model) == 35
    restored = offloaded.model.layers[3].self_attn.q_proj
    assert type(restored) is nn.Linear and restored.weight.device.type == "meta" and offload_hook(restored) is not None
    assert torch.equal(_logits(offloaded, x), fp)  # back to the original model, still offloaded


@pytest.mark.parametrize("method", ["rtn", "ttq"])
def test_perplexity_offloaded_matches_in_memory(method, offloaded, stories_model, windows):
    cfg = _config(method)
    ttq.quantize_(stories_model, cfg)
    ttq.quantize_(offloaded, cfg)
    mem, off = perplexity(stories_model, windows), perplexity(offloaded, windows)
    assert off.ppl == pytest.approx(mem.ppl, rel=TOL) and off.n_tokens == mem.n_tokens


def test_prompt_mode_generation_offloaded(offloaded, stories_model, windows):
    cfg = ttq.TTQConfig(quant=ttq.QuantSpec(bits=4, group_size=32))
    outs = []
    for model in (stories_model, offloaded):
        ttq.quantize_(model, cfg)
        ttq.runtime.set_mode(model, "prompt")
        outs.append(model.generate(windows[:1, :16], max_new_tokens=8, do_sample=False))
    assert torch.equal(outs[0], outs[1])
    assert _resident_fp_weights(offloaded) == []


def test_layer_on_meta_without_hook_is_refused(stories_model):
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(shared_dir() / "models" / "stories260K"))
    with pytest.raises(ModelError, match="meta device and no accelerate offload hook"):
        ttq.quantize_(empty, ttq.RTNConfig(quant=SPEC))
    with pytest.raises(ModelError, match="meta device"), onloaded(empty.model.layers[0].mlp.up_proj, "up_proj"):
        pass


def test_conv1d_offloaded(tmp_path):
    """GPT-2's Conv1D layers: the handler sees a transposed view of the onloaded weight, fetched transposed."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=64, n_layer=4, n_head=4, vocab_size=128, n_positions=64, bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "gpt2")
    mem = AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2").eval()
    off = AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2", device_map="auto", max_memory={"cpu": "250KB"},
                                               offload_folder=str(tmp_path / "o")).eval()
    assert "disk" in off.hf_device_map.values()
    x = torch.randint(0, 128, (1, 32), generator=torch.Generator().manual_seed(1))
    fp = _logits(mem, x)
    for q in (ttq.RTNConfig(quant=SPEC), ttq.TTQConfig(quant=SPEC, rank=2)):
        ttq.quantize_(mem, q)
        ttq.quantize_(off, q)
        torch.testing.assert_close(_logits(off, x), _logits(mem, x), rtol=TOL, atol=TOL)
        ttq.restore_(mem)
        ttq.restore_(off)
        assert torch.equal(_logits(off, x), fp)


@pytest.mark.parametrize("size, expected", [("200MB", 200 * 10**6), ("1.5GiB", 3 * 2**29), ("300KB", 300_000),
                                            ("4096", 4096)])
def test_memory_bytes(size, expected):
    assert memory_bytes(size) == expected


@pytest.mark.parametrize("size", ["0", "lots", "-5MB", ""])
def test_memory_bytes_refused(size):
    with pytest.raises(ConfigError, match="memory size"):
        memory_bytes(size)


def test_dispatch_kwargs_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("TTQ_CACHE_DIR", str(tmp_path))
    kw = dispatch_kwargs("200MB", "cpu")
    assert kw["device_map"] == "auto" and kw["max_memory"] == {"cpu": 200 * 10**6}
    assert kw["offload_folder"].startswith(str(tmp_path / "offload"))


def test_load_model_max_memory(stories_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TTQ_CACHE_DIR", str(tmp_path))
    model, _ = ttq.models.load_model(str(stories_dir), **dispatch_kwargs(BUDGET))
    assert "disk" in model.hf_device_map.values() and is_offloaded(model)


@pytest.mark.slow
def test_ppl_cli_max_memory_same_table(stories_dir, tmp_path, monkeypatch, capsys):
    from ttq.cli import main

    data = shared_dir() / "data"
    if not (data / "wikitext2").is_dir():
        pytest.skip("shared data missing")
    monkeypatch.setenv("TTQ_CACHE_DIR", str(tmp_path / "cache"))
    rows = {}
    for label, extra in (("mem", []), ("off", ["--max-memory", BUDGET])):
        out = tmp_path / label
        assert main(["ppl", "--model", str(stories_dir), "--seqlen", "128", "--max-windows", "2", "--methods",
                     "fp,rtn,ttq", "--rank", "0", "--datasets", "wikitext2", "--data-dir", str(data), "--cache", "",
                     "--out", str(out), *extra]) == 0
        rows[label] = {r["method"]: r["ppl"] for r in json.loads(out.with_suffix(".json").read_text())}
    assert rows["off"].keys() == rows["mem"].keys() == {"FP", "RTN", "TTQ (r=0)"}
    for method, ppl in rows["mem"].items():
        assert rows["off"][method] == pytest.approx(ppl, rel=TOL)


def test_ppl_cli_bad_max_memory(capsys):
    from ttq.cli import main

    with pytest.raises(SystemExit) as e:
        main(["ppl", "--max-memory", "lots"])
    assert e.value.code == 2 and "memory size 'lots'" in capsys.readouterr().err
