"""``ttq eval`` end to end on stories260K (a few documents per task), its files, resume and bad input."""

from __future__ import annotations

import json
import sys

import pytest

from tests.conftest import shared_dir
from ttq.cli import main

DATA = shared_dir() / "data"


@pytest.fixture()
def data_dir() -> str:
    if not (DATA / "tasks" / "piqa" / "validation.hf.jsonl").is_file() or not (DATA / "wikitext2").is_dir():
        pytest.skip(f"task or text data not found under {DATA}")
    return str(DATA)


def _argv(stories_dir, data_dir, tmp_path, *extra):
    return ["eval", "--model", str(stories_dir), "--tasks", "piqa,winogrande", "--limit", "2", "--seqlen", "128",
            "--data-dir", data_dir, "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "e"), *extra]


@pytest.mark.slow
def test_eval_table_files_and_resume(stories_dir, data_dir, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    argv = _argv(stories_dir, data_dir, tmp_path, "--methods", "fp,rtn,awq,ttq", "--bits", "3", "--rank", "0",
                 "--calib", "wikitext2:512")
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| Method | q | g | PIQA | WinoGrande | Avg |" in printed
    for row in ("| FP | - | - |", "| RTN | 3 | 32 |", "| AWQ (WT2 Calib, 2^9) | 3 | 32 |", "| TTQ (r=0) | 3 | 32 |"):
        assert row in printed
    assert "first 2" in printed
    out = tmp_path / "e"
    rows = json.loads(out.with_suffix(".json").read_text())
    assert len(rows) == 8 and {r["task"] for r in rows} == {"piqa", "winogrande"}
    assert all(0 <= r["acc"] <= 1 and r["n_docs"] == 2 for r in rows)
    assert out.with_suffix(".csv").read_text().startswith("method,bits,group_size,task,acc,acc_stderr")
    assert out.with_suffix(".md").read_text().strip() == printed.strip()
    n_cached = len(list((tmp_path / "cache").glob("*.json")))
    assert n_cached == 8

    # the files exist: refused without --overwrite, before any work
    assert main(argv) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    # a rerun is served from the cache (same numbers, no new cache file)
    assert main([*argv, "--overwrite"]) == 0
    assert capsys.readouterr().out.strip() == printed.strip()
    assert len(list((tmp_path / "cache").glob("*.json"))) == n_cached


@pytest.mark.parametrize(
    "extra, msg",
    [
        (["--tasks", "piqa,mmlu"],
         "unknown task 'mmlu'; allowed: piqa, hellaswag, arc_easy, arc_challenge, winogrande, lambada_openai"),
        (["--methods", "fp,qat"], "unknown method"),
        (["--calib", "imagenet"], "imagenet"),
        (["--bits", "9"], "bits must be an integer in 2..8"),
    ],
)
def test_eval_bad_input_exit_2(stories_dir, data_dir, tmp_path, capsys, monkeypatch, extra, msg):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # refused before lm-eval is needed (or the model loads)
    assert main(_argv(stories_dir, data_dir, tmp_path, *extra)) == 2
    assert msg in capsys.readouterr().err


@pytest.mark.parametrize("limit", ["0", "-3", "x"])
def test_eval_bad_limit(stories_dir, data_dir, tmp_path, capsys, limit):
    with pytest.raises(SystemExit) as e:
        main(_argv(stories_dir, data_dir, tmp_path, "--limit", limit))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--limit" in err and ("must be at least 1" in err or "expected a positive integer" in err)


def test_eval_missing_task_data(stories_dir, tmp_path, capsys):
    assert main(_argv(stories_dir, str(tmp_path), tmp_path)) == 2
    err = capsys.readouterr().err
    assert "data of task 'piqa' not found; looked in: " in err and str(tmp_path / "tasks" / "piqa") in err
    assert not (tmp_path / "e.md").exists()


def test_eval_without_lm_eval_names_the_package(stories_dir, data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    assert main(_argv(stories_dir, data_dir, tmp_path)) == 2
    assert "pip install 'ttq[tasks]'" in capsys.readouterr().err
