"""GGUF export (src/ttq/export/gguf.py): GGML blocks from ttq's codes, the type each setting maps to, and the
file read back by the gguf reader, by transformers' GGUF loader and by llama.cpp (llama-cpp-python)."""

from __future__ import annotations

import math

import pytest
import torch

import ttq
from tests.export.conftest import calibration, ids
from ttq.errors import ConfigError, OutputExistsError
from ttq.export import export, export_spec, quantize_for_export
from ttq.export.gguf import decode, encode_layer, q4_1_blocks, q5_1_blocks, q8_0_blocks
from ttq.export.weights import QuantizedWeight
from ttq.formats.affine import QuantSpec, quantize

gguf = pytest.importorskip("gguf")


def _codes(r: int, c: int, hi: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, hi + 1, (r, c), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def _params(r: int, nb: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(r, nb, generator=g) * 0.01).half(), (torch.randn(r, nb, generator=g) * 0.05).half()


@pytest.mark.parametrize("kind,encoder,hi", [("Q4_1", q4_1_blocks, 15), ("Q5_1", q5_1_blocks, 31)])
def test_affine_blocks_decode_as_ggml(kind: str, encoder, hi: int) -> None:
    """``w = q d + m`` block by block, as gguf's reference dequantizer (ggml's layout) reads it."""
    codes = _codes(6, 128, hi)
    d, m = _params(6, 4)
    got = decode(kind, encoder(codes, d, m))
    want = codes.float() * d.float().repeat_interleave(32, 1) + m.float().repeat_interleave(32, 1)
    assert torch.equal(got, want)


def test_q8_0_blocks_decode_as_ggml() -> None:
    x = torch.randint(-128, 128, (5, 96), generator=torch.Generator().manual_seed(2)).to(torch.int8)
    d, _ = _params(5, 3)
    assert torch.equal(decode("Q8_0", q8_0_blocks(x, d)), x.float() * d.float().repeat_interleave(32, 1))


# (bits, group_size, symmetric, fmt, d_in) -> (GGML type, how)
MAPPING = [
    (4, 32, False, "int", 128, "Q4_1", "exact"),
    (4, 64, False, "int", 128, "Q4_1", "exact"),
    (4, 128, False, "int", 128, "Q4_1", "exact"),
    (4, -1, False, "int", 128, "Q4_1", "exact"),
    (3, 32, False, "int", 128, "Q4_1", "exact"),  # 3-bit codes are 4-bit codes below 8
    (2, 32, False, "int", 128, "Q4_1", "exact"),
    (4, 32, True, "int", 128, "Q4_1", "exact"),
    (4, 32, False, "int_zp", 128, "Q4_1", "exact"),
    (5, 32, False, "int", 128, "Q5_1", "exact"),
    (8, 32, True, "int_zp", 128, "Q8_0", "exact"),
    (7, 32, True, "int", 128, "Q8_0", "exact"),
    (6, 64, True, "int", 128, "Q8_0", "exact"),
    (8, 32, False, "int", 128, "Q8_0", "re-encoded"),
    (8, 32, True, "int", 128, "Q8_0", "re-encoded"),
    (6, 32, False, "int", 128, "Q8_0", "re-encoded"),
    (4, 16, False, "int", 128, "Q8_0", "re-encoded"),  # two scales per block of 32
    (4, 32, False, "int", 100, "F32", "dense"),  # rows not a multiple of 32
]


@pytest.mark.parametrize("bits,group_size,symmetric,fmt,d_in,kind,how", MAPPING,
                         ids=[f"{m[3]}{m[0]}{'s' if m[2] else ''}-g{m[1]}-{m[4]}" for m in MAPPING])
def test_each_setting_maps_to_its_type(bits, group_size, symmetric, fmt, d_in, kind, how) -> None:
    spec = QuantSpec(bits=bits, group_size=group_size, symmetric=symmetric, fmt=fmt)
    w = torch.randn(24, d_in, generator=torch.Generator().manual_seed(3)) * 0.05
    qw = QuantizedWeight(*quantize(w, spec), spec)
    got_kind, data, got_how = encode_layer("layer", qw)
    assert (got_kind, got_how) == (kind, how)
    w_ttq, w_gguf = qw.dequantize(), decode(got_kind, data).reshape(w.shape)
    rel = float((w_gguf - w_ttq).norm() / w_ttq.norm())
    if how == "exact":  # only the float16 rounding of d and m (2^-11 relative each)
        assert rel < 2e-3 and float((w_gguf - w_ttq).abs().max()) < 2e-3 * float(w_ttq.abs().max())
    elif how == "dense":
        assert torch.equal(w_gguf, w_ttq)
    else:  # ggml's Q8_0 of ttq's weights: within half a Q8_0 step
        assert float((w_gguf - w_ttq).abs().max()) <= float(w_ttq.abs().max()) / 127 * 0.51


def test_codebook_formats_are_refused() -> None:
    spec = QuantSpec(bits=4, group_size=32, fmt="nf4")
    qw = QuantizedWeight(*quantize(torch.randn(4, 64), spec), spec)
    with pytest.raises(ConfigError, match="integer grids"):
        encode_layer("layer", qw)


@pytest.fixture()
def awq_gguf(tmp_path, stories_model, stories_dir):
    """stories260K, AWQ 4-bit g32 with its input scales folded, exported to GGUF; (model, path, report)."""
    spec = export_spec(QuantSpec(bits=4, group_size=32), "gguf")
    _, folds = quantize_for_export(stories_model, ttq.AWQConfig(quant=spec, alphas=(0.0, 0.5, 1.0)),
                                   calibration=calibration(stories_model))
    out = tmp_path / "m.gguf"
    report = export(stories_model, out, "gguf", vocab=stories_dir, folds=folds)
    return stories_model, out, report


@torch.no_grad()
def test_awq_export_reads_back(awq_gguf, stories_dir) -> None:
    """Tensor names and metadata as convert_hf_to_gguf.py writes them; every weight as ttq's up to float16."""
    model, out, report = awq_gguf
    assert report.folded == 15 and len(report.rtn_fallbacks) == 5  # o_proj: grouped-query attention, no fold
    assert report.count("exact") == 30 and report.count("dense") == 5  # down_proj: 172 columns, F32
    assert report.worst()[1] < 2e-3
    r = gguf.GGUFReader(str(out))
    names = {t.name: t for t in r.tensors}
    want = {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{i}.{n}.weight" for i in range(5) for n in ("attn_norm", "ffn_norm", "attn_q", "attn_k", "attn_v",
                                                           "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
    assert set(names) == want  # tied LM head: no output.weight
    assert names["blk.0.attn_q.weight"].tensor_type.name == "Q4_1"
    assert names["blk.0.ffn_down.weight"].tensor_type.name == "F32"
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("tokenizer.ggml.t")}
    assert f["general.architecture"] == "llama" and f["llama.block_count"] == 5
    assert f["llama.attention.head_count"] == 8 and f["llama.attention.head_count_kv"] == 4
    assert f["llama.rope.dimension_count"] == 8 and f["tokenizer.ggml.model"] == "llama" and f["general.file_type"] == 3
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor(model_file=str(stories_dir / "tokenizer.model"))
    assert r.fields["tokenizer.ggml.tokens"].contents()[:300] == [sp.IdToPiece(i) for i in range(300)]
    # q rows are in llama.cpp's rotary order: un-permuted they are ttq's (folded) q_proj up to float16 d, m
    from ttq.export.gguf import permute_rows

    t = names["blk.1.attn_q.weight"]
    w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())  # (64, 64)
    inv = torch.argsort(permute_rows(torch.arange(64), 8))
    ref = model.get_submodule("model.layers.1.self_attn.q_proj").dequantized_weight()
    assert float((w[inv] - ref).abs().max()) < 2e-3 * float(ref.abs().max())
    norm = torch.from_numpy(names["blk.1.attn_norm.weight"].data.copy())  # the folded norm: weight / s
    assert torch.equal(norm, model.model.layers[1].input_layernorm.weight.detach())


@torch.no_grad()
def test_transformers_gguf_loader_matches_ttq(awq_gguf) -> None:
    """transformers' own GGUF reader (dequantizing, un-permuting q/k) gives ttq's logits up to float16 d, m."""
    from transformers import AutoModelForCausalLM

    model, out, _ = awq_gguf
    loaded = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32).eval()
    ref, got = model(ids()).logits, loaded(ids()).logits
    assert float((got - ref).abs().max() / ref.abs().max()) < 5e-3


@torch.no_grad()
def test_llama_cpp_perplexity_matches_ttq(awq_gguf) -> None:
    """llama.cpp (llama-cpp-python, CPU) on the exported file: the same next-token log-likelihood as ttq's model
    on the same token windows, within 1% in perplexity (llama.cpp multiplies Q4_1 weights with 8-bit activations)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    model, out, _ = awq_gguf
    windows = ids(seed=5, batch=2, length=128)
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=128, logits_all=True, n_threads=1, verbose=False)
    nll_ttq, nll_cpp, n = 0.0, 0.0, 0
    for w in windows:
        logits = model(w[None]).logits[0, :-1].double()  # (T-1, V)
        nll_ttq -= float(torch.log_softmax(logits, -1).gather(1, w[1:, None]).sum())
        llm.reset()
        llm.eval(w.tolist())
        cpp = torch.tensor(llm.scores[: len(w) - 1], dtype=torch.float64)
        nll_cpp -= float(torch.log_softmax(cpp, -1).gather(1, w[1:, None]).sum())
        n += len(w) - 1
        assert float((cpp - logits).abs().max()) < 0.05 * float(logits.abs().max())
    llm.close()
    ppl_ttq, ppl_cpp = math.exp(nll_ttq / n), math.exp(nll_cpp / n)
    assert abs(ppl_cpp / ppl_ttq - 1) < 0.01, (ppl_ttq, ppl_cpp)


def test_tokenizer_copied_from_a_gguf_file(tmp_path, awq_gguf) -> None:
    """A model loaded from GGUF (the default SmolLM2) gets its tokenizer keys copied from that file, as they are."""
    model, first, _ = awq_gguf
    second = tmp_path / "again.gguf"
    export(model, second, "gguf", vocab=first)
    a, b = gguf.GGUFReader(str(first)).fields, gguf.GGUFReader(str(second)).fields
    keys = [k for k in a if k.startswith("tokenizer.")]
    assert len(keys) >= 6 and keys == [k for k in b if k.startswith("tokenizer.")]
    for k in keys:
        assert a[k].contents() == b[k].contents() and a[k].types == b[k].types, k


def test_output_rules(tmp_path, stories_model, stories_dir) -> None:
    ttq.quantize_(stories_model, ttq.RTNConfig(quant=QuantSpec(bits=4, group_size=32)))
    out = tmp_path / "m.gguf"
    out.write_text("taken")
    with pytest.raises(OutputExistsError, match="exists; pass overwrite=True"):
        export(stories_model, out, "gguf", vocab=stories_dir)
    assert out.read_text() == "taken"
    export(stories_model, out, "gguf", vocab=stories_dir, overwrite=True)
    assert out.read_bytes()[:4] == b"GGUF"
    with pytest.raises(ConfigError, match="is a folder"):
        export(stories_model, tmp_path, "gguf", vocab=stories_dir)
    with pytest.raises(ConfigError, match="unknown export format 'onnx'; allowed: compressed-tensors, gguf"):
        export(stories_model, tmp_path / "x", "onnx")
    with pytest.raises(ConfigError, match=r"no tokenizer llama\.cpp can use"):
        export(stories_model, tmp_path / "y.gguf", "gguf", vocab=tmp_path)
    from ttq.export.gguf import save_gguf

    with pytest.raises(ConfigError, match="head_type 'Q4_0' is not one of F32, Q8_0"):
        save_gguf(stories_model, tmp_path / "z.gguf", stories_dir, head_type="Q4_0")
    assert not (tmp_path / "z.gguf").exists()


def test_moe_is_refused(tmp_path, stories_dir) -> None:
    from ttq.tiny_moe import tiny_moe

    model = tiny_moe("qwen3_moe")
    ttq.quantize_(model, ttq.RTNConfig(quant=QuantSpec(bits=4, group_size=32)))
    with pytest.raises(ConfigError, match="model types llama, mistral"):
        export(model, tmp_path / "m.gguf", "gguf", vocab=stories_dir)
