"""``ttq generate`` (src/ttq/commands/generate.py) on the real tiny stories260K model."""

from __future__ import annotations

import re

import pytest
import torch

from ttq.cli import build_parser, main
from ttq.commands.generate import speeds
from ttq.eval.bench import GenTiming


@pytest.mark.parametrize("method,extra", [("ttq", ["--bits", "3", "--rank", "4"]), ("fp", []), ("rtn", ["--bits", "4"]),
                                          ("ttq", ["--lm-head-bits", "8", "--layout", "u8"]), ("ttq", ["--half-params"])])
def test_generate_streams_text_and_speeds(stories_dir, capsys, method, extra):
    rc = main(["generate", "--model", str(stories_dir), "--prompt", "Once upon a time", "--max-new-tokens", "8",
               "--method", method, *extra])
    assert rc == 0
    out = capsys.readouterr().out
    assert out.startswith("Once upon a time")
    m = re.search(r"prefill: (\d+) tokens in [\d.]+ s \(([\d.]+) tokens/s\); decode: (\d+) tokens in [\d.]+ s "
                  r"\(([\d.]+) tokens/s\)", out)
    assert m is not None, out
    assert int(m.group(1)) >= 4 and 1 <= int(m.group(3)) <= 8
    assert float(m.group(2)) > 0 and float(m.group(4)) > 0
    assert (f"[{method}" in out) and (("mode=prompt" in out) == (method == "ttq"))
    assert ("head 8-bit]" in out) == ("--lm-head-bits" in extra)
    layouts = re.search(r" layouts ([\w, ]+?) x(\d+)", out)  # the packed layouts the decode steps ran on
    assert (layouts is not None) == (method == "ttq"), out
    if layouts is not None:
        assert int(layouts.group(2)) == 35  # every linear layer of stories260K's 5 blocks
        if "--layout" in extra:
            assert layouts.group(1) == "u8"


def test_generate_greedy_is_deterministic(stories_dir, capsys):
    args = ["generate", "--model", str(stories_dir), "--prompt", "The cat", "--max-new-tokens", "6", "--bits", "4"]
    main(args)
    first = capsys.readouterr().out.split("\n[")[0]
    main(args)
    assert capsys.readouterr().out.split("\n[")[0] == first
    assert len(first) > len("The cat")
    main(args + ["--mode", "per_sequence"])  # every decode step re-quantizes from its one token
    assert "mode=per_sequence" in capsys.readouterr().out


def test_generate_bad_input(stories_dir, capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--model", str(stories_dir), "--prompt", "x", "--method", "gptq"])
    assert main(["generate", "--model", str(stories_dir), "--prompt", "x", "--max-new-tokens", "2", "--layout", "bogus"]) == 2
    assert "no kernel registered for layout 'bogus'" in capsys.readouterr().err
    assert main(["generate", "--model", str(stories_dir), "--prompt", "x", "--max-new-tokens", "2", "--lm-head-bits", "1"]) == 2
    assert main(["generate", "--model", str(stories_dir), "--prompt", "x", "--max-new-tokens", "2", "--layout", "u8",
                 "--half-params"]) == 2  # the reference layout keeps float32 scale / zero
    assert "bits must be an integer in 2..8, got 1" in capsys.readouterr().err


def test_generate_one_token_prints_no_nan(stories_dir, capsys):
    """One new token is the prefill's own: there is no decode step, so no decode speed (was "nan tokens/s")."""
    assert main(["generate", "--model", str(stories_dir), "--prompt", "Once upon a time", "--max-new-tokens", "1",
                 "--method", "rtn"]) == 0
    out = capsys.readouterr().out
    speed_line = out.strip().splitlines()[-1]
    assert "nan" not in speed_line and "inf" not in speed_line, speed_line
    assert re.fullmatch(r".*\] prefill: \d+ tokens in [\d.]+ s \([\d.]+ tokens/s\); "
                        r"decode: n/a \(one token: no decode step\)", speed_line), out


def test_speeds_never_nan():
    ids = torch.zeros(1, 1, dtype=torch.long)
    one = "prefill: 5 tokens in 0.500 s (10.0 tokens/s); decode: n/a (one token: no decode step)"
    assert speeds(GenTiming(5, 1, 0.5, 0.0, ids)) == one
    assert speeds(GenTiming(5, 0, 0.5, 0.0, ids)).endswith("decode: n/a (no new token: no decode step)")
    zero = "prefill: 5 tokens in 0.000 s (n/a); decode: 3 tokens in 0.000 s (n/a)"  # a zero interval: no speed
    assert speeds(GenTiming(5, 3, 0.0, 0.0, ids)) == zero
    assert speeds(GenTiming(4, 5, 2.0, 2.0, ids)).endswith("decode: 5 tokens in 2.000 s (2.0 tokens/s)")  # 4 steps


@pytest.mark.parametrize(
    "flag,value,msg",
    [
        ("--max-new-tokens", "0", "must be at least 1, got 0"),
        ("--max-new-tokens", "-5", "must be at least 1, got -5"),
        ("--max-new-tokens", "1.5", "expected a positive integer, got '1.5'"),
        ("--bits", "0", "must be at least 1, got 0"),
        ("--bits", "-4", "must be at least 1, got -4"),
        ("--group-size", "0", "must be a positive integer or -1 (per output channel), got 0"),
        ("--group-size", "-32", "must be a positive integer or -1 (per output channel), got -32"),
        ("--rank", "-1", "must be 0 or more, got -1"),
        ("--refresh-every", "-1", "must be 0 or more, got -1"),
        ("--threads", "-2", "must be 0 or more, got -2"),
        ("--lm-head-bits", "-8", "must be 0 or more, got -8"),
    ],
)
def test_generate_bad_numbers_are_argparse_errors(capsys, flag, value, msg):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["generate", "--prompt", "x", flag, value])
    assert e.value.code == 2
    assert f"argument {flag}: {msg}" in capsys.readouterr().err


def test_generate_zero_and_minus_one_are_kept():
    args = build_parser().parse_args(["generate", "--prompt", "x", "--group-size", "-1", "--rank", "0",
                                      "--refresh-every", "0", "--threads", "0", "--lm-head-bits", "0"])
    assert (args.group_size, args.rank, args.refresh_every, args.threads, args.lm_head_bits) == (-1, 0, 0, 0, 0)


@pytest.mark.parametrize("prompt,msg", [("", "the prompt is empty"), ("   ", "the prompt is empty"),
                                        ("word " * 600, "exceeds the model's context of 512 tokens")])
def test_generate_refuses_empty_or_too_long_prompts(stories_dir, capsys, prompt, msg):
    rc = main(["generate", "--model", str(stories_dir), "--prompt", prompt, "--max-new-tokens", "4"])
    err = capsys.readouterr().err
    assert rc == 2 and msg in err and "Traceback" not in err


def test_without_hqq_the_parser_builds_and_ttq_hqq_says_what_to_install(stories_dir, capsys, monkeypatch):
    """CI has no hqq: building the CLI parser must not need it (listing --method choices built
    every row, and TTQ+HQQ's row refused without the package), and choosing ttq_hqq names the extra."""
    import sys

    monkeypatch.setitem(sys.modules, "hqq", None)  # `import hqq...` now raises ImportError
    monkeypatch.setitem(sys.modules, "hqq.core", None)
    monkeypatch.setitem(sys.modules, "hqq.core.quantize", None)
    parser = build_parser()
    choices = next(a.choices for sp in parser._subparsers._group_actions for name, p in sp.choices.items()
                   if name == "generate" for a in p._actions if a.dest == "method")
    assert "ttq_hqq" in choices and "ttq" in choices
    rc = main(["generate", "--model", str(stories_dir), "--prompt", "Once upon a time", "--max-new-tokens", "2",
               "--method", "ttq_hqq", "--bits", "4"])
    err = capsys.readouterr().err
    assert rc != 0
    assert "pip install 'ttq[hqq]'" in err and "Traceback" not in err


def test_generate_compile_prints_the_eager_text(stories_dir, capsys):
    args = ["generate", "--model", str(stories_dir), "--prompt", "Once upon a time", "--max-new-tokens", "10",
            "--bits", "4"]
    assert main(args) == 0
    eager = capsys.readouterr().out
    assert main([*args, "--compile"]) == 0
    fast = capsys.readouterr().out
    assert "compiled decode (warm-up" in fast
    assert fast.split("\n[")[0] == eager.split("\n[")[0]  # the same streamed text


def test_generate_compile_with_a_16_bit_cache(stories_dir, capsys):
    args = ["generate", "--model", str(stories_dir), "--prompt", "Once upon a time", "--max-new-tokens", "6",
            "--bits", "4", "--kv-cache-dtype", "float16"]
    assert main(args) == 2
    assert "--kv-cache-dtype float16 sets the static cache of compiled decode steps; add --compile" in \
        capsys.readouterr().err
    assert main([*args, "--compile"]) == 0
    assert "compiled decode, float16 KV cache (warm-up" in capsys.readouterr().out


def test_generate_compile_falls_back_with_refresh(stories_dir, capsys, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="ttq.compiled"):
        rc = main(["generate", "--model", str(stories_dir), "--prompt", "Once upon a time", "--max-new-tokens", "4",
                   "--refresh-every", "2", "--compile"])
    assert rc == 0
    assert "eager decode (could not compile)" in capsys.readouterr().out
    assert any("refresh_every" in r.getMessage() for r in caplog.records if r.name == "ttq.compiled")


def test_an_int8_activation_layout_gives_the_packed_head_its_int8_layout(stories_model):
    """`ttq generate --layout cpu_q4_i8 --lm-head-bits 8` packs the head as `ttq bench`'s int8 rows do
    (cpu_q8_i8), not in the exact default layout; other layouts keep the default head."""
    from ttq.commands.generate import quantize_for_generation
    from ttq.kernels.cpu_i8 import i8_available
    from ttq.methods.scaling import ScaleSpec
    from ttq.patch import restore_

    if not i8_available():
        pytest.skip("no int8-activation kernels on this CPU")
    quantize_for_generation(stories_model, "ttq", 4, 32, 0, ScaleSpec(), "prompt", 0, head_bits=8, layout="cpu_q4_i8")
    assert stories_model.get_output_embeddings().packed.layout == "cpu_q8_i8"
    restore_(stories_model)
    quantize_for_generation(stories_model, "ttq", 4, 32, 0, ScaleSpec(), "prompt", 0, head_bits=8, layout="cpu_q4")
    assert stories_model.get_output_embeddings().packed.layout != "cpu_q8_i8"


def test_fused_decoding_is_the_default_and_gives_the_unfused_text(stories_dir, capsys):
    """Prompt mode fuses q/k/v and gate/up (ttq.nn.fused) unless --no-fuse: the same greedy text either way."""
    args = ["generate", "--model", str(stories_dir), "--prompt", "The little dog", "--max-new-tokens", "8"]
    assert main(args) == 0
    fused = capsys.readouterr().out.split("\n[")[0]
    assert main(args + ["--no-fuse"]) == 0
    assert capsys.readouterr().out.split("\n[")[0] == fused


def test_quantize_for_generation_fuses_shared_inputs_in_prompt_mode_only(stories_model):
    import copy

    from ttq.commands.generate import quantize_for_generation
    from ttq.methods.scaling import ScaleSpec
    from ttq.nn.fused import SharedInputLinear

    def wrapped(m):
        return sum(isinstance(x, SharedInputLinear) for x in m.modules())

    per_seq = copy.deepcopy(stories_model)
    quantize_for_generation(stories_model, "ttq", 4, 32, 0, ScaleSpec(), "prompt", 0)
    assert wrapped(stories_model) == 5 * 5  # q/k/v and gate/up of the 5 blocks
    quantize_for_generation(per_seq, "ttq", 4, 32, 0, ScaleSpec(), "per_sequence", 0)
    assert wrapped(per_seq) == 0
