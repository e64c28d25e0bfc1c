"""``ttq quantize`` (src/ttq/commands/quantize.py) on the real tiny stories260K model."""

from __future__ import annotations

import json
import re

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import ttq
from ttq.cli import main

SUMMARY = re.compile(r"saved (\d+) quantized layers to (.+): model\.safetensors ([\d.]+) MB = ([\d.]+)% of the "
                     r"full-precision ([\d.]+) MB \(quantized layers ([\d.]+) MB vs ([\d.]+) MB\)")


@torch.no_grad()
def test_quantize_saves_a_loadable_checkpoint(tmp_path, stories_dir, stories_model, capsys):
    out = tmp_path / "rtn4"
    rc = main(["quantize", "--model", str(stories_dir), "--method", "rtn", "--bits", "4", "--group-size", "32",
               "--out", str(out)])
    assert rc == 0
    m = SUMMARY.search(capsys.readouterr().out)
    assert m is not None and int(m.group(1)) == 35 and float(m.group(4)) < 50
    loaded = AutoModelForCausalLM.from_pretrained(out)
    ttq.quantize_(stories_model, ttq.RTNConfig(quant=ttq.QuantSpec(bits=4, group_size=32)))
    ids = torch.randint(3, 500, (1, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(loaded(ids).logits, stories_model(ids).logits)
    assert AutoTokenizer.from_pretrained(out)("Once upon a time")["input_ids"]  # the tokenizer is saved too

    # an existing folder: refused (status 2, one line) before the model loads; --overwrite replaces it
    assert main(["quantize", "--model", str(stories_dir), "--out", str(out)]) == 2
    assert "exists; pass overwrite=True (--overwrite)" in capsys.readouterr().err
    config = json.dumps({"method": "ttq", "quant": {"bits": 3, "group_size": 32}, "rank": 2})
    assert main(["quantize", "--model", str(stories_dir), "--config", config, "--out", str(out), "--overwrite"]) == 0
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["configs"] == [{"method": "ttq", "quant": {"bits": 3, "group_size": 32, "symmetric": False, "nu": 1.0,
                                                           "fmt": "int"},
                                "scale": {"alpha": 0.5, "lam": 0.4, "p": 2.0, "form": "shrinkage"}, "rank": 2}]


def test_quantize_bad_config(tmp_path, stories_dir, capsys):
    assert main(["quantize", "--model", str(stories_dir), "--config", "{nope", "--out", str(tmp_path / "x")]) == 2
    assert "--config: invalid JSON" in capsys.readouterr().err
    assert main(["quantize", "--model", str(stories_dir), "--config", '{"method": "zzz"}', "--out",
                 str(tmp_path / "x")]) == 2
    assert "unknown method 'zzz'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
