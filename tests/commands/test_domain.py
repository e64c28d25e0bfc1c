"""Tests of ``ttq domain`` (src/ttq/commands/domain.py) and its tables (src/ttq/eval/domain.py)."""

from __future__ import annotations

import argparse
import json

import pytest

from ttq.cli import build_parser, main
from ttq.commands.domain import _lengths
from ttq.errors import ConfigError, OutputExistsError
from ttq.eval.domain import check_calibration_lengths, cross_table, domain_cells, length_table, unique_cells
from ttq.methods.scaling import ScaleSpec


def test_length_parsing() -> None:
    assert _lengths("11-13") == [2048, 4096, 8192]
    assert _lengths("2^11,4096, 100") == [2048, 4096, 100]
    with pytest.raises(argparse.ArgumentTypeError, match="is not N, 2\\^K or K1-K2"):
        _lengths("2^x")
    assert _lengths("2^100") == [2**100]  # parsed; refused against the calibration text (below)


@pytest.mark.parametrize(
    "text,msg",
    [
        ("2^100000000000", r"exponent K of 2\^K must be in 0\.\.1024, got 100000000000"),  # not a 12 GB integer
        ("11-5000", r"exponent K of 2\^K must be in 0\.\.1024, got 5000"),
        ("17-11", r"K1-K2 needs K1 <= K2"),
        ("0", r"calibration lengths must be positive token counts, got '0'"),
        ("4096,-3", r"is not N, 2\^K or K1-K2|must be positive"),
        (",", r"no calibration length"),
    ],
)
def test_bad_lengths(text: str, msg: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=msg):
        _lengths(text)


def test_calibration_length_is_refused_beyond_the_text() -> None:
    check_calibration_lengths({"ptb": [2**17]}, {"ptb": 100_000})  # up to twice the text: overlapping windows
    check_calibration_lengths({"c4": [2**11, 10_000]}, {"c4": 5_000})
    with pytest.raises(ConfigError, match=r"calibration length 2\^100 \(1267650600228229401496703205376 tokens\) is "
                                          r"longer than the c4 calibration text allows: it has 5000 tokens, so at most "
                                          r"10000 \(2 x the text, 2\^13 as a power of two\) can be drawn"):
        check_calibration_lengths({"c4": [2**11, 2**100]}, {"c4": 5_000})
    with pytest.raises(ConfigError, match=r"length 10001 \(10001 tokens\) is longer than the ptb calibration"):
        check_calibration_lengths({"c4": [2**11], "ptb": [10_001]}, {"c4": 5_000, "ptb": 5_000})


@pytest.mark.parametrize(
    "flag,value,msg",
    [
        ("--max-windows", "-1", "must be 0 or more, got -1"),
        ("--seqlen", "1", "must be at least 2"),
        ("--seqlen", "0", "must be at least 1, got 0"),
        ("--bits", "0", "must be at least 1, got 0"),
        ("--group-size", "0", "must be a positive integer or -1"),
        ("--lengths", "2^5000", "exponent K of 2^K must be in 0..1024"),
    ],
)
def test_bad_numbers_are_argparse_errors(capsys, flag: str, value: str, msg: str) -> None:
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["domain", flag, value])
    assert e.value.code == 2
    assert f"argument {flag}: {msg}" in capsys.readouterr().err


def _cells(cross=("wikitext2", "c4")):
    return domain_cells(3, 32, [0, 16], "c4", [2**11, 2**17], list(cross), 2**17, ScaleSpec(), 512)


def test_domain_cells_and_dedupe() -> None:
    ttq_cells, length_cells, cross_cells = _cells()
    assert [c.label for c in ttq_cells] == ["TTQ (r=0)", "TTQ (r=16)"]
    assert [c.label for c in length_cells] == ["AWQ (C4 Calib, 2^11)", "AWQ (C4 Calib, 2^17)"]
    assert [c.label for c in cross_cells] == ["AWQ (WT2 Calib, 2^17)", "AWQ (C4 Calib, 2^17)"]
    assert all(c.bits == 3 and c.group_size == 32 for c in ttq_cells + length_cells + cross_cells)
    assert [c.config.calib.n_tokens for c in length_cells] == [2048, 131072]
    assert all(c.config.calib.seqlen == 512 for c in length_cells)
    cells = unique_cells(ttq_cells, length_cells, cross_cells)
    assert len(cells) == 5  # AWQ (C4 Calib, 2^17) appears once
    assert _cells(cross=())[2] == []
    with pytest.raises(ConfigError, match="calibration lengths must be positive token counts"):
        domain_cells(3, 32, [0], "c4", [0], [], 2**17, ScaleSpec(), 512)


def _fake_results(cells, datasets):
    return [
        {
            "method": c.label,
            "bits": c.bits,
            "group_size": c.group_size,
            "dataset": d,
            "ppl": 10.0 + i + 0.5 * j,
            "n_windows": 2,
        }
        for i, c in enumerate(cells)
        for j, d in enumerate(datasets)
    ]


def test_length_table_layout() -> None:
    ttq_cells, length_cells, cross_cells = _cells()
    res = _fake_results(unique_cells(ttq_cells, length_cells, cross_cells), ["wikitext2", "ptb"])
    text = length_table(res, ttq_cells, length_cells, "c4", ["wikitext2", "ptb"])
    lines = text.splitlines()
    assert lines[0] == "Calibration length: TTQ (no calibration) vs AWQ calibrated on C4 (q=3, g=32)"
    assert lines[2] == "| Eval | TTQ (r=0) | TTQ (r=16) | AWQ 2^11 | AWQ 2^17 |"
    assert lines[4] == "| WT2 | 10.00 | 11.00 | 12.00 | 13.00 |"
    assert lines[5] == "| PTB | 10.50 | 11.50 | 12.50 | 13.50 |"
    cross = cross_table(res, ttq_cells, cross_cells, ["wikitext2", "ptb"])
    assert "| AWQ (WT2 Calib, 2^17) | 3 | 32 | 14.00 | 14.50 | 14.25 |" in cross
    assert "AWQ (C4 Calib, 2^11)" not in cross


def test_cli_parser_has_domain() -> None:
    from ttq.cli import build_parser

    args = build_parser().parse_args(["domain", "--lengths", "11-12", "--cross", "wikitext2,ptb"])
    assert args.lengths == [2048, 4096] and args.cross == ["wikitext2", "ptb"] and args.cross_length == [2**17]
    assert args.func.__module__ == "ttq.commands.domain"


def _domain_argv(stories_dir, out, *extra) -> list[str]:
    return ["domain", "--model", str(stories_dir), "--rank", "0", "--seqlen", "64", "--max-windows", "1",
            "--cache", "", "--out", str(out), *extra]


@pytest.mark.slow
def test_domain_end_to_end(stories_dir, tmp_path) -> None:
    out = tmp_path / "exp.1"  # the suffix is appended: exp.1.md, not exp.md
    rc = main(_domain_argv(stories_dir, out, "--lengths", "2^7"))
    assert rc == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp.1.json", "exp.1.md"]
    text = (tmp_path / "exp.1.md").read_text()
    assert "| Eval | TTQ (r=0) | AWQ 2^7 |" in text
    rows = json.loads((tmp_path / "exp.1.json").read_text())
    assert [r["method"] for r in rows] == ["TTQ (r=0)", "AWQ (C4 Calib, 2^7)"]
    assert all(r["dataset"] == "wikitext2" and 1.0 < r["ppl"] < 1e4 for r in rows)

    args = build_parser().parse_args(_domain_argv(stories_dir, out, "--lengths", "2^7"))
    with pytest.raises(OutputExistsError, match=r"exp\.1\.md.*pass --overwrite"):  # refused before the model loads
        args.func(args)
    assert (tmp_path / "exp.1.md").read_text() == text
    (tmp_path / "exp.1.md").write_text("old")
    assert main(_domain_argv(stories_dir, out, "--lengths", "2^7", "--overwrite")) == 0
    assert (tmp_path / "exp.1.md").read_text() == text


def test_domain_refuses_calibration_longer_than_the_text(stories_dir, tmp_path, capsys) -> None:
    """``--lengths 2^100`` used to warn and start a calibration of hours; now it is refused with the limit."""
    args = build_parser().parse_args(_domain_argv(stories_dir, tmp_path / "dom", "--lengths", "2^11,2^100"))
    with pytest.raises(ConfigError, match=r"calibration length 2\^100 \(\d+ tokens\) is longer than the c4 calibration "
                                          r"text allows: it has \d+ tokens, so at most \d+ \(2 x the text"):
        args.func(args)
    assert list(tmp_path.iterdir()) == []  # nothing written
    args = build_parser().parse_args(_domain_argv(stories_dir, tmp_path / "dom", "--lengths", "2^7", "--cross", "ptb",
                                                 "--cross-length", "2^40"))
    with pytest.raises(ConfigError, match=r"calibration length 2\^40 .* ptb calibration text"):
        args.func(args)


def test_domain_bad_dataset_is_a_clear_error(capsys) -> None:
    assert main(["domain", "--calib", "wt2"]) == 2  # checked before any model is loaded
    assert "unknown dataset 'wt2'; allowed: wikitext2, ptb, c4" in capsys.readouterr().err
