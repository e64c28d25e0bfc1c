"""``ttq export`` (src/ttq/commands/export.py) on the real tiny stories260K model: the two formats, the TTQ snapshot,
and the bad inputs (exit status 2 and one line)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from tests.export.conftest import export_tables  # noqa: F401  (autouse: the registry tables restored after each test)
from ttq.cli import main

SUMMARY = re.compile(r"exported (\d+) quantized layers to (.+) \((gguf|compressed-tensors pack-quantized), "
                     r"([\d.]+) MB\)")
TEXT = "Once upon a time there was a little girl who loved the sea. She went to the beach every day. " * 8


@pytest.fixture()
def text_file(tmp_path):
    path = tmp_path / "domain.txt"
    path.write_text(TEXT)
    return path


@torch.no_grad()
def test_ttq_snapshot_to_compressed_tensors(tmp_path, stories_dir, text_file, capsys) -> None:
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    out = tmp_path / "ct"
    rc = main(["export", "--model", str(stories_dir), "--method", "ttq", "--from-text", str(text_file),
               "--seqlen", "64", "--bits", "4", "--group-size", "32", "--format", "compressed-tensors",
               "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    m = SUMMARY.search(printed)
    assert m is not None and int(m.group(1)) == 35
    assert "exact: 30 layer(s), max |dW| 0, max relative 0" in printed
    assert "input scales folded into 15 preceding op(s); 5 layer(s)" in printed and "vllm serve" in printed
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(3, 500, (1, 16), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loaded(ids).logits).all()
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    weights = qcfg["config_groups"]["group_0"]["weights"]
    assert weights["num_bits"] == 4 and weights["group_size"] == 32 and weights["symmetric"] is False


def test_rtn_to_gguf_and_the_re_encode_message(tmp_path, stories_dir, capsys) -> None:
    out = tmp_path / "m.gguf"
    assert main(["export", "--model", str(stories_dir), "--bits", "6", "--format", "gguf", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "30 Q8_0" in printed and "re-encoded: 30 layer(s)" in printed and "llama-cli -m" in printed
    assert out.read_bytes()[:4] == b"GGUF"
    # an existing output: refused before the model loads; --overwrite replaces it
    assert main(["export", "--model", str(stories_dir), "--format", "gguf", "--out", str(out)]) == 2
    assert "exists; pass overwrite=True (--overwrite)" in capsys.readouterr().err
    assert main(["export", "--model", str(stories_dir), "--format", "gguf", "--out", str(out), "--overwrite"]) == 0
    assert "30 Q4_1" in capsys.readouterr().out


def test_awq_three_bit_is_widened_for_vllm(tmp_path, stories_dir, capsys) -> None:
    out = tmp_path / "ct"
    rc = main(["export", "--model", str(stories_dir), "--method", "awq", "--bits", "3", "--calib", "c4",
               "--calib-tokens", "256", "--format", "compressed-tensors", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "3-bit codes stored exactly in the next width of 4/8" in printed and "30 int4 asym g32" in printed


@pytest.mark.parametrize("args,message", [
    (["--format", "onnx"], "unknown export format 'onnx'; allowed: compressed-tensors, gguf"),
    (["--format", "gguf", "--method", "ttq"], "--method ttq exports a snapshot: give the text"),
    (["--format", "gguf", "--from-text", "x.txt"], "--from-text is the TTQ snapshot's text (--method ttq)"),
    (["--format", "gguf", "--method", "ttq", "--from-text", "/nonexistent/t.txt"], "/nonexistent/t.txt"),
    (["--format", "gguf", "--vocab-from", "/tmp"], "no tokenizer llama.cpp can use at /tmp"),
])
def test_bad_input(tmp_path, stories_dir, capsys, args, message) -> None:
    out = tmp_path / "out"
    assert main(["export", "--model", str(stories_dir), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
