"""``ttq generate`` (src/ttq/commands/generate.py) on the real tiny stories260K model."""

from __future__ import annotations

import re

import pytest

from ttq.cli import main


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
    assert main(["generate", "--model", str(stories_dir), "--prompt", "x", "--max-new-tokens", "0"]) == 2
    assert "--max-new-tokens must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "--model", str(stories_dir), "--prompt", "x", "--method", "gptq"])
    assert main(["generate", "--model", str(stories_dir), "--prompt", "x", "--max-new-tokens", "2", "--layout", "bogus"]) == 2
    assert "no kernel registered for layout 'bogus'" in capsys.readouterr().err
    assert main(["generate", "--model", str(stories_dir), "--prompt", "x", "--max-new-tokens", "2", "--lm-head-bits", "1"]) == 2
    assert main(["generate", "--model", str(stories_dir), "--prompt", "x", "--max-new-tokens", "2", "--layout", "u8",
                 "--half-params"]) == 2  # the reference layout keeps float32 scale / zero
    assert "bits must be an integer in 2..8, got 1" in capsys.readouterr().err
