"""``ttq qtime`` (src/ttq/commands/qtime.py): --out / --overwrite (the table itself: tests/eval/test_qtime.py)."""

from __future__ import annotations

import json

import pytest

from ttq.cli import build_parser, main
from ttq.errors import OutputExistsError


def _argv(stories_dir, out, *extra) -> list[str]:
    return ["qtime", "--model", str(stories_dir), "--methods", "rtn", "--seqlen", "64", "--repeats", "1",
            "--out", str(out), *extra]


def test_qtime_writes_appended_suffixes_and_refuses_to_overwrite(stories_dir, tmp_path):
    out = tmp_path / "qt.1"
    assert main(_argv(stories_dir, out)) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qt.1.json", "qt.1.md"]
    assert [r["method"] for r in json.loads((tmp_path / "qt.1.json").read_text())] == ["RTN"]
    md = (tmp_path / "qt.1.md").read_text()

    args = build_parser().parse_args(_argv(stories_dir, out))
    with pytest.raises(OutputExistsError, match=r"qt\.1\.md, .*qt\.1\.json; pass --overwrite"):
        args.func(args)  # refused before the model is loaded
    (tmp_path / "qt.1.json").write_text("old")
    assert main(_argv(stories_dir, out, "--overwrite")) == 0
    assert "RTN" in (tmp_path / "qt.1.md").read_text() and "RTN" in md  # rewritten (timings differ per run)
    assert json.loads((tmp_path / "qt.1.json").read_text())[0]["method"] == "RTN"


def test_qtime_seqlen_below_two_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["qtime", "--seqlen", "1"])
    assert "argument --seqlen: must be at least 2" in capsys.readouterr().err
