"""``ttq bench`` (src/ttq/commands/bench.py) and its measurements (src/ttq/eval/bench.py): structure and
consistency of the reported numbers, never speed thresholds."""

from __future__ import annotations

import json
import os

import pytest
import torch

from ttq.cli import build_parser, main
from ttq.errors import ConfigError
from ttq.eval import bench, llamacpp
from ttq.formats.affine import QuantSpec


def test_shapes_cover_appendix_h_and_smollm2():
    names = {n for n, _, _ in bench.all_shapes()}
    assert {(o, i) for _, o, i in bench.QWEN3_QPROJ} >= {(2048, 1024), (2048, 2048), (4096, 2560), (4096, 4096),
                                                         (5120, 5120)}
    assert {(o, i) for _, o, i in bench.SMOLLM2} == {(576, 576), (192, 576), (1536, 576), (576, 1536)}
    assert "4096x11008" in names


def test_median_time_counts_calls():
    calls = []
    t = bench.median_time(lambda: calls.append(1), repeats=5, warmup=2)
    assert len(calls) == 7 and t >= 0


def test_quantization_and_matmul_rows():
    shapes = [("tiny", 64, 96)]
    rows = bench.bench_quantization(shapes, bits=[4], group_sizes=[32], repeats=2)
    assert len(rows) == 1
    r = rows[0]
    assert r["quant_over_fp32"] == pytest.approx(r["quant_ms"] / r["fp32_gemv_ms"])
    rows = bench.bench_matmul(shapes, bits=[4, 2], group_sizes=[32], ranks=[0, 4], repeats=2)
    assert [(r["bits"], r["rank"]) for r in rows if r["layout"] not in bench.OPT_IN_LAYOUTS] == [(4, 0), (4, 4),
                                                                                                 (2, 0), (2, 4)]
    extra = bench._opt_in_layouts(QuantSpec(bits=4, group_size=32), (64, 96))  # cpu_q4_i8 rows where VNNI exists
    assert [(r["bits"], r["rank"], r["layout"]) for r in rows if r["layout"] in bench.OPT_IN_LAYOUTS] == [
        (4, rank, lay) for rank in (0, 4) for lay in extra]
    for r in rows:
        assert r["speedup_fp32"] == pytest.approx(r["fp32_ms"] / r["ms"])
        assert r["mbytes"] > 0


def test_timed_generate_splits_prefill_and_decode(stories_model):
    ids = torch.tensor([[1, 403, 407, 261, 378]])
    t = bench.timed_generate(stories_model, ids, 6)
    assert t.prompt_tokens == 5 and t.new_tokens == 6 and t.output_ids.shape == (1, 11)
    assert t.prefill_s > 0 and t.decode_s > 0
    assert t.decode_tps == pytest.approx(5 / t.decode_s)


def test_timed_generate_exact_runs_past_eos_without_masking_it(stories_model):
    ids = torch.tensor([[1, 403, 407, 261, 378]])
    free = bench.timed_generate(stories_model, ids, 6, exact=False)
    first_new = int(free.output_ids[0, 5])
    saved = stories_model.generation_config.eos_token_id
    stories_model.generation_config.eos_token_id = first_new  # greedy decoding picks "EOS" at once
    try:
        stopped = bench.timed_generate(stories_model, ids, 6, exact=False)
        exact = bench.timed_generate(stories_model, ids, 6)
    finally:
        stories_model.generation_config.eos_token_id = saved
    assert stopped.output_ids.shape == (1, 6)  # without exact, generation ends at that token
    assert exact.new_tokens == 6 and torch.equal(exact.output_ids, free.output_ids)  # same tokens, EOS not masked
    assert stories_model.generation_config.eos_token_id == saved  # the model's own config is untouched


def test_bench_cli_all_parts(stories_dir, tmp_path, capsys):
    out = tmp_path / "bench"
    rc = main(["bench", "--parts", "a,b,c", "--shapes", "smollm2", "--bits", "4", "--ranks", "0", "--repeats", "1",
               "--model", str(stories_dir), "--prompt-tokens", "16", "--new-tokens", "4", "--lm-head-bits", "8", "--gen-layouts", "u8", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "## (a)" in text and "## (b)" in text and "## (c)" in text
    data = json.loads(out.with_suffix(".json").read_text())
    assert len(data["quantization"]) == 4
    assert len([r for r in data["matmul"] if r["layout"] not in bench.OPT_IN_LAYOUTS]) == 4
    gen = {r["config"]: r for r in data["generation"]}
    assert list(gen) == ["fp32", "bf16", "ttq 4-bit r=0", "ttq 4-bit r=0 + head 8-bit", "ttq 4-bit r=0 + head 8-bit [u8]"]
    assert gen["ttq 4-bit r=0 + head 8-bit [u8]"]["same_as_reference"] is True
    assert gen["fp32"]["same_as_reference"] is None
    # packed decode gives the dequantize-then-matmul oracle's greedy tokens (same quantized weights)
    assert gen["ttq 4-bit r=0"]["same_as_reference"] is True and gen["ttq 4-bit r=0 + head 8-bit"]["same_as_reference"] is True
    assert gen["fp32"]["decode_vs_fp32"] == pytest.approx(1.0)
    assert gen["ttq 4-bit r=0"]["quant_s"] > 0 and gen["ttq 4-bit r=0"]["new_tokens"] == 4
    assert gen["fp32"]["quant_s"] is None and gen["bf16"]["quant_over_prefill"] is None  # nothing quantized: "-"
    assert "nan" not in text.lower().split("|") and "| nan |" not in text
    # weights read per decode step: the 8-bit packed head reads about a quarter of the float32 head's bytes
    roof = data["read_bandwidth_gbps"]
    assert roof > 0 and "memory read bandwidth here" in text
    for r in gen.values():
        assert r["weights_gbps"] == pytest.approx(r["decode_mb"] * 1e6 * 3 / r["decode_s"] / 1e9)
        assert r["of_bandwidth"] == pytest.approx(r["weights_gbps"] / roof)
    assert gen["bf16"]["decode_mb"] == pytest.approx(gen["fp32"]["decode_mb"] / 2, rel=1e-3)
    assert gen["ttq 4-bit r=0 + head 8-bit"]["decode_mb"] < gen["ttq 4-bit r=0"]["decode_mb"] < gen["fp32"]["decode_mb"]
    assert out.with_suffix(".md").read_text().startswith("# ttq bench") and out.with_suffix(".md").read_text().count("# ttq bench") == 1


def test_bench_bad_part(capsys):
    assert main(["bench", "--parts", "d"]) == 2
    assert "unknown bench part" in capsys.readouterr().err


def test_bench_cli_synthetic_model(stories_dir, tmp_path, capsys):
    out = tmp_path / "syn"
    rc = main(["bench", "--parts", "c", "--bits", "4", "--ranks", "0", "--repeats", "1", "--model", str(stories_dir),
               "--synthetic", "128,256,2", "--prompt-tokens", "16", "--new-tokens", "4", "--no-llamacpp",
               "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "synthetic Llama 128/256/2" in text and "random weights" in text
    gen = {r["config"]: r for r in json.loads(out.with_suffix(".json").read_text())["generation"]}
    assert list(gen) == ["fp32", "bf16", "ttq 4-bit r=0"]
    assert gen["ttq 4-bit r=0"]["same_as_reference"] is True and gen["ttq 4-bit r=0"]["new_tokens"] == 4


def test_bench_cli_synthetic_needs_three_sizes(stories_dir, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--parts", "c", "--model", str(stories_dir), "--synthetic", "128,256"])
    assert e.value.code == 2 and "HIDDEN,INTERMEDIATE,LAYERS" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flag,value,msg",
    [
        ("--batch", "0", "must be at least 1, got 0"),
        ("--batch", "-2", "must be at least 1, got -2"),
        ("--repeats", "0", "must be at least 1, got 0"),
        ("--prompt-tokens", "0", "must be at least 1, got 0"),
        ("--new-tokens", "0", "must be at least 1, got 0"),
        ("--new-tokens", "1", "must be at least 2 to time decode"),
        ("--threads", "-1", "must be 0 or more, got -1"),
        ("--busy", "0", "must be at least 1, got 0"),
        ("--bits", "4,9", "each value must be a bit width in 2..8, got 9"),
        ("--bits", "0", "each value must be a bit width in 2..8, got 0"),
        ("--bits", ",", "expected at least one value (a bit width in 2..8), got ','"),
        ("--group-size", "32,0", "each value must be a positive group size or -1 (per output channel), got 0"),
        ("--group-size", "-2", "got -2"),
        ("--ranks", "0,-1", "each value must be a rank of 0 or more, got -1"),
        ("--lm-head-bits", "1", "must be 0 (keep the head) or a bit width in 2..8, got 1"),
        ("--lm-head-bits", "-8", "must be 0 or more, got -8"),
        ("--synthetic", "128,0,2", "HIDDEN,INTERMEDIATE,LAYERS[,HEAD_DIM]"),
    ],
)
def test_bench_bad_numbers_are_argparse_errors(capsys, flag, value, msg):
    """0 or negative counts used to run (--batch 0 timed empty products) or silently became the default."""
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["bench", flag, value])
    assert e.value.code == 2
    assert f"argument {flag}: " in (err := capsys.readouterr().err) and msg in err


def test_bench_explicit_numbers_are_kept():
    args = build_parser().parse_args(["bench", "--quick", "--repeats", "1", "--prompt-tokens", "1", "--new-tokens", "2",
                                      "--group-size=-1,32", "--ranks", "0", "--threads", "0"])
    assert (args.repeats, args.prompt_tokens, args.new_tokens, args.group_size, args.ranks) == (1, 1, 2, [-1, 32], [0])
    from ttq.commands.bench import _default

    assert _default(1, True, 512, 128) == 1 and _default(None, True, 512, 128) == 128


@pytest.mark.parametrize("parts,extra,msg", [
    ("load", ["--prompt-tokens", "100000"], "part load: --prompt-tokens = 100000 exceeds the model's context of 512"),
    ("c", ["--prompt-tokens", "500", "--new-tokens", "20"], "--prompt-tokens + --new-tokens = 520 exceeds the model's "
                                                            "context of 512"),
])
def test_bench_refuses_lengths_beyond_the_context_before_timing(stories_dir, capsys, parts, extra, msg):
    assert main(["bench", "--parts", f"a,{parts}", "--shapes", "smollm2", "--model", str(stories_dir), *extra]) == 2
    captured = capsys.readouterr()
    assert msg in captured.err and "ask for at most 512" in captured.err
    assert "## (a)" not in captured.out  # refused right after loading the model, before any timing


def test_bench_out_appends_suffixes_and_refuses_existing_files_before_the_run(stories_dir, tmp_path, capsys):
    prefix = tmp_path / "runs" / "exp.1"
    argv = ["bench", "--parts", "load", "--model", str(stories_dir), "--synthetic", "64,128,1,32", "--prompt-tokens",
            "16", "--repeats", "1", "--out", str(prefix)]
    assert main(argv) == 0
    assert sorted(p.name for p in prefix.parent.iterdir()) == ["exp.1.json", "exp.1.md"]  # not exp.md / exp.json
    capsys.readouterr()
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "--overwrite" in captured.err and "# ttq bench" not in captured.out  # refused before the run
    assert main([*argv, "--overwrite"]) == 0


def test_generation_needs_two_new_tokens(stories_model, stories_tokenizer):
    with pytest.raises(ConfigError, match="at least 2 to time decode"):
        bench.bench_generation(stories_model, stories_tokenizer, prompt_tokens=8, new_tokens=1, bits=[4], ranks=[0])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_busy_processes_run_inside_the_block_and_are_killed_after_it():
    with bench.busy_processes(2) as pids:
        assert len(pids) == 2 and all(_alive(p) for p in pids)
    assert not any(_alive(p) for p in pids)
    with pytest.raises(KeyError), bench.busy_processes(1) as pids:
        raise KeyError("an error inside the block")
    assert not _alive(pids[0])


def test_bench_cli_load_part(stories_dir, tmp_path, capsys):
    """Part load: the base and per-sequence TTQ forwards, alone and next to a busy process, with their ratios."""
    out = tmp_path / "load"
    rc = main(["bench", "--parts", "load", "--model", str(stories_dir), "--synthetic", "128,256,2", "--prompt-tokens",
               "32", "--repeats", "1", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "## (load) one forward of 32 tokens" in text and "1 busy process(es)" in text
    rows = {r["config"]: r for r in json.loads((tmp_path / "load.json").read_text())["load"]}
    assert list(rows) == ["fp32", "ttq 3-bit g32 per-sequence"]
    for r in rows.values():
        assert r["quiet_s"] > 0 and r["busy_s"] > 0 and r["busy_processes"] == 1 and r["tokens"] == 32
        assert r["slowdown"] == pytest.approx(r["busy_s"] / r["quiet_s"])
        assert r["busy_vs_base"] == pytest.approx(r["busy_s"] / rows["fp32"]["busy_s"])
    assert rows["fp32"]["quiet_vs_base"] == 1.0


@pytest.fixture()
def stories_gguf(stories_dir, tmp_path):
    """stories260K exported to GGUF (RTN 4-bit) by ``ttq export``: a model llama.cpp can run."""
    out = tmp_path / "stories.gguf"
    assert main(["export", "--model", str(stories_dir), "--bits", "4", "--format", "gguf", "--out", str(out)]) == 0
    return out


def test_bench_cli_llamacpp_rows(stories_dir, stories_gguf, tmp_path, capsys):
    pytest.importorskip("llama_cpp")
    out = tmp_path / "cpp"
    rc = main(["bench", "--parts", "c", "--bits", "4", "--ranks", "0", "--repeats", "1", "--model", str(stories_dir),
               "--prompt-tokens", "16", "--new-tokens", "5", "--gguf", str(stories_gguf), "--threads", "1", "--fused",
               "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "decode x llama.cpp" in text and "prefill x llama.cpp" in text
    gen = {r["config"]: r for r in json.loads(out.with_suffix(".json").read_text())["generation"]}
    assert list(gen) == ["fp32", "bf16", "ttq 4-bit r=0", "ttq 4-bit r=0 fused", "llama.cpp stories.gguf"]
    cpp = gen["llama.cpp stories.gguf"]
    assert cpp["decode_mb"] * 1e6 == llamacpp.decode_bytes(stories_gguf)
    assert cpp["weights_gbps"] == pytest.approx(cpp["decode_mb"] * 1e6 * 4 / cpp["decode_s"] / 1e9)
    assert cpp["new_tokens"] == 5 and cpp["prompt_tokens"] == 16 and cpp["threads"] == 1
    assert cpp["decode_vs_llamacpp"] == pytest.approx(1.0) and cpp["prefill_vs_llamacpp"] == pytest.approx(1.0)
    for r in gen.values():  # every row as a ratio to llama.cpp and to fp32, from the same run
        assert r["decode_vs_llamacpp"] == pytest.approx(r["decode_tps"] / cpp["decode_tps"])
        assert r["prefill_vs_llamacpp"] == pytest.approx(r["prefill_tps"] / cpp["prefill_tps"])
        assert r["prefill_vs_fp32"] == pytest.approx(r["prefill_tps"] / gen["fp32"]["prefill_tps"])
    # fusing q/k/v and gate/up changes no token
    assert gen["ttq 4-bit r=0 fused"]["same_as_reference"] is True and gen["ttq 4-bit r=0 fused"]["same_as_fp32"] == \
        gen["ttq 4-bit r=0"]["same_as_fp32"]


def test_bench_cli_llamacpp_skipped_with_one_line(stories_dir, stories_gguf, tmp_path, capsys, monkeypatch):
    from ttq.eval import llamacpp

    base = ["bench", "--parts", "c", "--bits", "4", "--ranks", "0", "--repeats", "1", "--model", str(stories_dir),
            "--prompt-tokens", "8", "--new-tokens", "3", "--no-llamacpp"]
    monkeypatch.setattr(llamacpp, "missing", lambda: "llama.cpp rows skipped: the package llama-cpp-python is not "
                                                     "installed (pip install llama-cpp-python)")
    assert main(base[:-1] + ["--gguf", str(stories_gguf), "--out", str(tmp_path / "a")]) == 0
    text = capsys.readouterr().out
    assert text.count("llama.cpp rows skipped: the package llama-cpp-python is not installed") == 1
    gen = json.loads((tmp_path / "a.json").read_text())["generation"]
    assert [r["config"] for r in gen] == ["fp32", "bf16", "ttq 4-bit r=0"]
    assert all(r["decode_vs_llamacpp"] is None for r in gen)
    assert main(base[:-1]) == 0  # a Hugging Face folder has no GGUF file: one line says so
    assert "is not a GGUF model (pass --gguf PATH" in capsys.readouterr().out
    assert main(base) == 0  # --no-llamacpp: not a word about it
    assert "llama.cpp" not in capsys.readouterr().out.split("## (c)")[0]


def test_bench_cli_synthetic_gets_a_gguf_of_its_own_weights(stories_dir, tmp_path, capsys, monkeypatch):
    """--synthetic without --gguf: llama.cpp runs a GGUF of the synthetic model's own random weights (Q4_1 codes of
    the same weights, Q8_0 head), written once into the cache and reused; the model is restored after the export."""
    pytest.importorskip("llama_cpp")
    gguf = pytest.importorskip("gguf")
    monkeypatch.setenv("TTQ_CACHE_DIR", str(tmp_path / "cache"))
    args = ["bench", "--parts", "c", "--bits", "4", "--ranks", "0", "--repeats", "1", "--model", str(stories_dir),
            "--synthetic", "64,128,2,16", "--prompt-tokens", "8", "--new-tokens", "3", "--threads", "1"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    assert "llama.cpp rows skipped" not in capsys.readouterr().out
    files = list((tmp_path / "cache" / "gguf").glob("synthetic-*.gguf"))
    assert len(files) == 1
    gen = {r["config"]: r for r in json.loads((tmp_path / "a.json").read_text())["generation"]}
    assert f"llama.cpp {files[0].name}" in gen and gen["fp32"]["decode_vs_llamacpp"] > 0
    reader = gguf.GGUFReader(str(files[0]))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["output.weight"] == "Q8_0" and types["blk.0.attn_q.weight"] == "Q4_1"
    assert types["blk.1.ffn_down.weight"] == "Q4_1" and types["token_embd.weight"] == "F32"
    assert int(reader.fields["llama.embedding_length"].contents()) == 64
    stamp = files[0].stat().st_mtime_ns
    assert main(args + ["--out", str(tmp_path / "b")]) == 0  # the same weights (seed 0): the file is reused
    assert files[0].stat().st_mtime_ns == stamp and len(list(files[0].parent.iterdir())) == 1


def test_synthetic_gguf_restores_the_model_and_matches_rtn(stories_dir, tmp_path):
    """The synthetic GGUF holds the model's own RTN 4-bit codes (exact Q4_1) and leaves the model unchanged."""
    gguf = pytest.importorskip("gguf")
    from ttq.eval.llamacpp import synthetic_gguf
    from ttq.formats.affine import QuantSpec
    from ttq.methods.rtn import rtn
    from ttq.models import load_model, synthetic_llama

    _, tok = load_model(str(stories_dir))
    model = synthetic_llama(tok, 64, 128, 2, head_dim=16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = synthetic_gguf(model, stories_dir, folder=tmp_path)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    reader = gguf.GGUFReader(str(path))
    t = {x.name: x for x in reader.tensors}["blk.0.ffn_down.weight"]  # not permuted (q/k are)
    w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type)).reshape(64, 128)
    ref = rtn(before["model.layers.0.mlp.down_proj.weight"], QuantSpec(bits=4, group_size=32))
    assert (w - ref).abs().max() <= 2e-3 * ref.abs().max()  # float16 d and m
    head = {x.name: x for x in reader.tensors}["output.weight"]
    h = torch.from_numpy(gguf.quants.dequantize(head.data, head.tensor_type)).reshape(-1, 64)
    assert (h - before["lm_head.weight"]).abs().max() <= before["lm_head.weight"].abs().max() / 127 + 1e-6


def test_bench_cli_missing_gguf_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    from ttq import models

    def never(*a, **k):
        raise AssertionError("the model was loaded before --gguf was checked")

    monkeypatch.setattr(models, "load_model", never)
    rc = main(["bench", "--parts", "c", "--gguf", str(tmp_path / "nope.gguf"), "--out", str(tmp_path / "x")])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"--gguf {tmp_path / 'nope.gguf'}: no such file" in err and "path of a .gguf file" in err


def test_bench_cli_compiled_rows(stories_dir, tmp_path, capsys):
    """--compile adds a compiled twin of every row but bf16, with its warm-up time; compiled decoding gives the
    eager row's tokens (fused products included) and the reference path's."""
    out = tmp_path / "comp"
    rc = main(["bench", "--parts", "c", "--bits", "4", "--ranks", "0", "--repeats", "1", "--model", str(stories_dir),
               "--prompt-tokens", "16", "--new-tokens", "6", "--fused", "--compile", "--no-llamacpp",
               "--out", str(out)])
    assert rc == 0
    assert "compile s (warm-up)" in capsys.readouterr().out
    gen = {r["config"]: r for r in json.loads(out.with_suffix(".json").read_text())["generation"]}
    assert list(gen) == ["fp32", "fp32 compiled", "bf16", "ttq 4-bit r=0", "ttq 4-bit r=0 compiled",
                         "ttq 4-bit r=0 fused", "ttq 4-bit r=0 fused compiled"]
    for name in ("fp32", "ttq 4-bit r=0", "ttq 4-bit r=0 fused"):
        twin = gen[f"{name} compiled"]
        assert twin["compile_note"] is None and twin["compile_s"] > 0, twin["compile_note"]
        assert twin["same_as_fp32"] == gen[name]["same_as_fp32"] and twin["new_tokens"] == 6
        assert gen[name]["compile_s"] is None
    assert gen["fp32 compiled"]["same_as_fp32"] is True
    assert gen["ttq 4-bit r=0 compiled"]["same_as_reference"] is True
    assert gen["ttq 4-bit r=0 fused compiled"]["same_as_reference"] is True


def test_bench_cli_16_bit_cache_rows(stories_dir, tmp_path, capsys):
    """--kv-cache-dtype adds a twin of every compiled row whose static cache is 16-bit; it needs --compile (refused
    before the model loads)."""
    out = tmp_path / "kv"
    rc = main(["bench", "--parts", "c", "--bits", "4", "--ranks", "0", "--repeats", "1", "--model", str(stories_dir),
               "--prompt-tokens", "16", "--new-tokens", "6", "--compile", "--kv-cache-dtype", "float16",
               "--no-llamacpp", "--out", str(out)])
    assert rc == 0
    gen = {r["config"]: r for r in json.loads(out.with_suffix(".json").read_text())["generation"]}
    assert list(gen) == ["fp32", "fp32 compiled", "fp32 compiled kv float16", "bf16", "ttq 4-bit r=0",
                         "ttq 4-bit r=0 compiled", "ttq 4-bit r=0 compiled kv float16"]
    for name in ("fp32 compiled kv float16", "ttq 4-bit r=0 compiled kv float16"):
        assert gen[name]["compile_note"] is None and gen[name]["compile_s"] > 0 and gen[name]["new_tokens"] == 6
    capsys.readouterr()
    rc = main(["bench", "--parts", "c", "--kv-cache-dtype", "float16", "--model", str(tmp_path / "never-loaded")])
    assert rc == 2
    assert "--kv-cache-dtype float16 sets the static cache of compiled decode steps; add --compile" in \
        capsys.readouterr().err


def test_bench_cli_refinement_rows(stories_dir, tmp_path, capsys):
    """--refines adds the widest TTQ rows quantized with those refinements in prompt mode: their tokens equal the
    reference path on the same (refined) packed weights; prompt-SVD alone has no r = 0 row, as in ttq ppl."""
    out = tmp_path / "ref"
    rc = main(["bench", "--parts", "c", "--bits", "4", "--ranks", "0,4", "--repeats", "1", "--model", str(stories_dir),
               "--prompt-tokens", "16", "--new-tokens", "5", "--refines", "ttq_clip,ttq_svd", "--no-llamacpp",
               "--out", str(out)])
    assert rc == 0
    gen = {r["config"]: r for r in json.loads(out.with_suffix(".json").read_text())["generation"]}
    assert list(gen)[-3:] == ["TTQ+clip 4-bit r=0", "TTQ+clip 4-bit r=4", "TTQ+prompt-SVD 4-bit r=4"]
    for name in list(gen)[-3:]:
        assert gen[name]["same_as_reference"] is True and gen[name]["quant_over_prefill"] > 0
    capsys.readouterr()


def test_bench_cli_unknown_refinement_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    import ttq.models

    monkeypatch.setattr(ttq.models, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    rc = main(["bench", "--parts", "c", "--refines", "ttq_clip,ttq_magic"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "ttq_magic" in err and "ttq_clip" in err and "allowed" in err


def test_generation_rows_run_in_their_dtype_whatever_the_base(stories_dir, monkeypatch):
    """--dtype bfloat16: the fp32 row still runs a float32 model and the bf16 row a bfloat16 one (the caller's model
    is left in its dtype); the TTQ rows quantize the model as loaded."""
    from ttq.models import load_model

    model, tok = load_model(str(stories_dir), dtype=torch.bfloat16)
    seen = []
    real = bench.timed_generate

    def spy(m, *a, **k):
        seen.append(next(m.parameters()).dtype)
        return real(m, *a, **k)

    monkeypatch.setattr(bench, "timed_generate", spy)
    rows = bench.bench_generation(model, tok, prompt_tokens=8, new_tokens=3, bits=(4,), ranks=(0,), repeats=1)
    assert [r["config"] for r in rows] == ["fp32", "bf16", "ttq 4-bit r=0"]
    assert seen[:2] == [torch.float32, torch.float32] and seen[2:4] == [torch.bfloat16, torch.bfloat16]
    assert next(model.parameters()).dtype == torch.bfloat16


def test_synthetic_without_a_tokenizer_source_skips_llamacpp_with_one_line(tmp_path, monkeypatch):
    """--synthetic with a --model that has neither a GGUF file nor a SentencePiece tokenizer.model: no GGUF can be
    written, so the llama.cpp row is skipped with a line saying what to pass instead."""
    import argparse

    from ttq.commands.bench import _llamacpp_gguf
    from ttq.eval import llamacpp

    monkeypatch.setattr(llamacpp, "missing", lambda: None)
    monkeypatch.setattr(llamacpp, "synthetic_gguf", lambda *a, **k: pytest.fail("no GGUF should be written"))
    args = argparse.Namespace(no_llamacpp=False, synthetic=[64, 128, 2], gguf=None, model=str(tmp_path), gguf_file=None)
    gguf, why = _llamacpp_gguf(args, model=None)
    assert gguf is None
    assert why.startswith("llama.cpp rows skipped: the synthetic model's GGUF takes its tokenizer") and "--gguf" in why


@pytest.mark.parametrize("mbytes,repeats", [(0, 5), (8, 0)])
def test_read_bandwidth_refuses_nothing_to_measure(mbytes, repeats):
    with pytest.raises(ConfigError, match="needs at least 1 MB and 1 repeat"):
        bench.read_bandwidth_gbps(mbytes, repeats)
    assert bench.read_bandwidth_gbps(8, 2) > 0


def test_bench_generation_refuses_a_cache_dtype_it_cannot_use():
    """The library entry point refuses an unknown cache dtype, and one without compiled rows, before any row runs
    (no model is needed to get there)."""
    from ttq.errors import ConfigError

    with pytest.raises(ConfigError, match="KV cache dtype must be one of float32, bfloat16, float16, got 'int8'"):
        bench.bench_generation(None, None, compiled=True, kv_dtype="int8")
    with pytest.raises(ConfigError, match="a KV cache dtype applies to compiled decode steps only"):
        bench.bench_generation(None, None, kv_dtype="float16")


def test_half_params_reach_the_packed_head(stories_model, stories_tokenizer):
    """half_params=True: every packed product of the row, the 8-bit head included, stores float16 scale / zero,
    so a decode step reads exactly 4 bytes less per group than with float32 ones."""
    from ttq.formats.spec import num_groups
    from ttq.kernels import cpu_build

    if not cpu_build.load():
        pytest.skip("the C++ kernels are not available here")
    kw = {"prompt_tokens": 8, "new_tokens": 2, "bits": (4,), "ranks": (0,), "repeats": 1, "head_bits": 8}
    rows = {h: {r["config"]: r for r in bench.bench_generation(stories_model, stories_tokenizer, half_params=h, **kw)}
            for h in (False, True)}
    groups = sum(num_groups(m.in_features, 32) * m.out_features for m in stories_model.modules()
                 if isinstance(m, torch.nn.Linear))  # every block linear and the head
    row = "ttq 4-bit r=0 + head 8-bit"
    assert (rows[False][row]["decode_mb"] - rows[True][row]["decode_mb"]) * 1e6 == pytest.approx(4 * groups, abs=1)
    head_groups = num_groups(stories_model.config.hidden_size, 32) * stories_model.config.vocab_size
    body = rows[False]["ttq 4-bit r=0"]["decode_mb"] - rows[True]["ttq 4-bit r=0"]["decode_mb"]
    assert body * 1e6 == pytest.approx(4 * (groups - head_groups), abs=1)


def test_part_c_rows_keeps_the_named_rows_and_the_baselines():
    """--row picks part (c) rows by their printed label (fp32 and bf16 stay: every ratio needs them); a label that
    names no row is refused with the labels there are, before any row runs."""
    from ttq.errors import ConfigError

    label = "ttq 4-bit r=0 + head 8-bit [cpu_q4_i8] fused compiled"
    every = bench.part_c_rows((4,), (0,), 8, ("cpu_q4_i8",), fused=True, compiled=True)
    assert len(every) == 15 and label in [c.label for c in every]
    rows = bench.part_c_rows((4,), (0,), 8, ("cpu_q4_i8",), fused=True, compiled=True, only=(label,))
    assert [c.label for c in rows] == ["fp32", "bf16", label]
    assert rows[2].fused and rows[2].compiled and rows[2].layout == "cpu_q4_i8" and rows[2].kind == "ttq+head"
    with pytest.raises(ConfigError, match=r"no part \(c\) row is named 'ttq 4-bit r=0 fused'; with these options the "
                                          r"rows are: 'fp32', 'bf16', 'ttq 4-bit r=0'"):
        bench.part_c_rows((4,), (0,), only=("ttq 4-bit r=0 fused",))
    with pytest.raises(ConfigError, match="no part"):  # the library entry point checks before it needs a model
        bench.bench_generation(None, None, bits=(4,), ranks=(0,), only=("nope",))


def test_the_row_option_is_checked_before_the_model_loads(monkeypatch):
    from ttq.commands import bench as command

    monkeypatch.setattr(command, "_load_model", lambda args: pytest.fail("the model should not load"))
    assert main(["bench", "--parts", "c", "--bits", "4", "--ranks", "0", "--row", "ttq 3-bit r=0"]) == 2
    assert main(["bench", "--parts", "a", "--row", "ttq 4-bit r=0"]) == 2
