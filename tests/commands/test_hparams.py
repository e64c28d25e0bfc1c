"""``ttq hparams`` (src/ttq/commands/hparams.py) on the real tiny stories260K model: outputs and bad input."""

from __future__ import annotations

import json

import pytest

from ttq.cli import build_parser, main
from ttq.errors import ConfigError, OutputExistsError


def _argv(stories_dir, out, *extra) -> list[str]:
    return ["hparams", "--model", str(stories_dir), "--bits", "3", "--alphas", "0.5", "--lams", "0.4,0.8", "--ps", "2",
            "--forms", "shrinkage", "--datasets", "wikitext2", "--seqlen", "64", "--max-windows", "1", "--top", "1",
            "--out", str(out), *extra]


def test_hparams_writes_appended_suffixes_and_refuses_to_overwrite(stories_dir, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "hp.1"  # appended: hp.1.md, not hp.md
    assert main(_argv(stories_dir, out, "--plot")) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hp.1.json", "hp.1.md", "hp.1.png"]
    rows = json.loads((tmp_path / "hp.1.json").read_text())
    assert [(r["bits"], r["alpha"], r["lam"], r["p"]) for r in rows] == [(3, 0.5, 0.4, 2.0), (3, 0.5, 0.8, 2.0)]
    assert all(1.0 < r["avg_ppl"] < 1e4 for r in rows)
    md = (tmp_path / "hp.1.md").read_text()
    assert md.count("| 3 | 1 | shrinkage | 0.5 |") == 1 and "| 3 | 2 |" not in md  # --top 1
    assert (tmp_path / "hp.1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    for extra in (["--plot"], []):  # the .md/.json are taken either way
        args = build_parser().parse_args(_argv(stories_dir, out, *extra))
        with pytest.raises(OutputExistsError, match=r"hp\.1\.md.*pass --overwrite"):
            args.func(args)  # refused before the model is loaded or the grid is run
    assert (tmp_path / "hp.1.md").read_text() == md
    assert main(_argv(stories_dir, out, "--overwrite")) == 0
    assert (tmp_path / "hp.1.md").read_text() == md


def test_hparams_plot_file_is_checked_too(stories_dir, tmp_path):
    (tmp_path / "hp.png").write_bytes(b"old")  # only the histogram file exists
    args = build_parser().parse_args(_argv(stories_dir, tmp_path / "hp", "--plot"))
    with pytest.raises(OutputExistsError, match=r"hp\.png"):
        args.func(args)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hp.png"]


@pytest.mark.parametrize(
    "flag,value,msg",
    [
        ("--top", "0", "must be at least 1, got 0"),
        ("--max-windows", "-1", "must be 0 or more, got -1"),
        ("--rank", "-2", "must be 0 or more, got -2"),
        ("--seqlen", "1", "must be at least 2"),
        ("--group-size", "0", "must be a positive integer or -1"),
    ],
)
def test_hparams_bad_numbers_are_argparse_errors(capsys, flag, value, msg):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["hparams", flag, value])
    assert e.value.code == 2
    assert f"argument {flag}: {msg}" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra,msg",
    [
        (["--forms", "shrinkage", "--lams", "2"], "has no valid setting"),
        (["--bits", "9"], r"bits must be an integer in 2\.\.8, got 9"),
        (["--datasets", "wt2"], "unknown dataset 'wt2'"),
    ],
)
def test_hparams_bad_grid_is_refused_before_loading(stories_dir, tmp_path, extra, msg):
    args = build_parser().parse_args(["hparams", "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "h"),
                                      *extra])
    with pytest.raises(ConfigError if "valid" in msg else ValueError, match=msg):
        args.func(args)  # the model path does not exist: the check comes first
    assert list(tmp_path.iterdir()) == []
