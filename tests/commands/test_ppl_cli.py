"""``ttq ppl`` and ``ttq hparams`` end to end on stories260K (small), and CLI errors."""

from __future__ import annotations

import json

import pytest

from tests.conftest import shared_dir
from ttq.cli import main

DATA = shared_dir() / "data"


@pytest.fixture()
def data_dir():
    if not (DATA / "ptb" / "ptb.test.txt").is_file():
        pytest.skip("shared data missing")
    return str(DATA)


def test_ppl_table_files(stories_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "t"
    rc = main(["ppl", "--model", str(stories_dir), "--seqlen", "128", "--max-windows", "2", "--bits", "3",
               "--methods", "fp,rtn,awq,ttq", "--rank", "0", "--calib", "wikitext2:512", "--datasets", "wikitext2,ptb",
               "--data-dir", data_dir, "--cache", "", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| AWQ (WT2 Calib, 2^9) |" in printed and "| TTQ (r=0) |" in printed
    rows = json.loads(out.with_suffix(".json").read_text())
    assert {r["method"] for r in rows} == {"FP", "RTN", "AWQ (WT2 Calib, 2^9)", "TTQ (r=0)"}
    assert all(r["n_windows"] == 2 and r["ppl"] > 1 for r in rows)
    assert out.with_suffix(".csv").read_text().startswith("method,bits,group_size,dataset,ppl")


def test_ppl_held_out(stories_dir, data_dir, tmp_path, capsys):
    """--held-out K: every row scores the tokens after K; TTQ rows run in prompt mode; FP equals the scored part of
    the full forward (the paper-protocol FP row scores more tokens, so it differs)."""
    out = tmp_path / "h"
    base = ["ppl", "--model", str(stories_dir), "--seqlen", "128", "--max-windows", "2", "--bits", "3",
            "--methods", "fp,rtn,ttq", "--rank", "0,4", "--datasets", "wikitext2", "--data-dir", data_dir, "--cache", ""]
    assert main([*base, "--held-out", "64", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "held-out: the first 64 tokens of each window are the prompt" in printed
    rows = {r["method"]: r for r in json.loads(out.with_suffix(".json").read_text())}
    assert set(rows) == {"FP", "RTN", "TTQ (r=0)", "TTQ (r=4)"}
    assert all(r["prompt_tokens"] == 64 and r["ppl"] > 1 for r in rows.values())
    assert main([*base, "--methods", "fp", "--out", str(tmp_path / "p")]) == 0
    full = json.loads((tmp_path / "p").with_suffix(".json").read_text())[0]
    assert full["prompt_tokens"] is None and full["ppl"] != pytest.approx(rows["FP"]["ppl"], rel=1e-6)


def test_ppl_held_out_leaving_nothing_to_score(stories_dir, data_dir, tmp_path, capsys):
    rc = main(["ppl", "--model", str(stories_dir), "--seqlen", "64", "--max-windows", "1", "--methods", "fp",
               "--datasets", "ptb", "--data-dir", data_dir, "--cache", "", "--held-out", "64", "--out", str(tmp_path / "x")])
    assert rc == 2
    assert "--held-out 64 leaves nothing to score in 64-token windows" in capsys.readouterr().err


def test_hparams_cli(stories_dir, data_dir, tmp_path):
    out = tmp_path / "h"
    rc = main(["hparams", "--model", str(stories_dir), "--seqlen", "128", "--max-windows", "1", "--bits", "3",
               "--alphas", "0.5", "--lams", "0.4", "--ps", "2", "--forms", "shrinkage,norm", "--datasets", "wikitext2",
               "--data-dir", data_dir, "--top", "2", "--out", str(out)])
    assert rc == 0
    rows = json.loads(out.with_suffix(".json").read_text())
    assert {r["form"] for r in rows} == {"shrinkage", "norm"} and all(r["avg_ppl"] > 1 for r in rows)


@pytest.mark.parametrize(
    "argv, msg",
    [
        (["--datasets", "imagenet"], "unknown dataset"),
        (["--methods", "fp,qat"], "unknown method"),
        (["--bits", "9"], "bits must be an integer in 2..8"),
        (["--group-size", "0"], "group_size must be a positive integer or -1"),
        (["--rank", "99"], "rank must be an integer in 0..64"),
    ],
)
def test_ppl_bad_input_exit_2(stories_dir, data_dir, tmp_path, capsys, argv, msg):
    rc = main(["ppl", "--model", str(stories_dir), "--seqlen", "64", "--max-windows", "1", "--methods", "ttq",
               "--datasets", "ptb", "--data-dir", data_dir, "--cache", "", "--out", str(tmp_path / "x"), *argv])
    assert rc == 2
    assert msg in capsys.readouterr().err


def test_missing_data_dir(stories_dir, tmp_path, capsys):
    rc = main(["ppl", "--model", str(stories_dir), "--methods", "fp", "--datasets", "ptb", "--data-dir", str(tmp_path),
               "--cache", "", "--out", str(tmp_path / "x")])
    assert rc == 2
    assert "not found; looked in" in capsys.readouterr().err


def test_unknown_model(tmp_path, capsys):
    rc = main(["ppl", "--model", str(tmp_path / "nope"), "--methods", "fp"])
    assert rc == 2
    assert "neither a directory nor a .gguf file" in capsys.readouterr().err


def test_config_rows_and_bad_config(stories_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "c"
    rc = main(["ppl", "--model", str(stories_dir), "--seqlen", "128", "--max-windows", "1", "--methods", "fp",
               "--datasets", "wikitext2", "--data-dir", data_dir, "--cache", "", "--out", str(out),
               "--config", 'TTQ sym r=0={"method": "ttq", "quant": {"bits": 4, "group_size": 32, "symmetric": true}}'])
    assert rc == 0
    rows = json.loads(out.with_suffix(".json").read_text())
    assert [r["method"] for r in rows] == ["FP", "TTQ sym r=0"] and rows[1]["config"]["quant"]["symmetric"] is True
    for bad, msg in [("nolabel", "LABEL=JSON"), ("x={oops", "invalid JSON"), ("x=[1]", "LABEL=JSON"), ('x={"method": "zzz"}', "unknown method")]:
        rc = main(["ppl", "--model", str(stories_dir), "--methods", "fp", "--datasets", "wikitext2", "--data-dir", data_dir,
                   "--cache", "", "--out", str(out), "--config", bad])
        assert rc == 2 and msg in capsys.readouterr().err


def test_ppl_with_packed_lm_head(stories_dir, data_dir, tmp_path, capsys):
    """--lm-head-bits: every row (FP too) uses the RTN head; 8-bit stays close to FP, 2-bit does not."""
    ppl = {}
    for bits in (0, 8, 2):
        out = tmp_path / f"h{bits}"
        rc = main(["ppl", "--model", str(stories_dir), "--seqlen", "128", "--max-windows", "2", "--bits", "3",
                   "--methods", "fp,ttq", "--rank", "0", "--datasets", "wikitext2", "--data-dir", data_dir,
                   "--cache", str(tmp_path / "cache"), "--lm-head-bits", str(bits), "--out", str(out)])
        assert rc == 0
        ppl[bits] = {r["method"]: r["ppl"] for r in json.loads(out.with_suffix(".json").read_text())}
    assert ppl[8]["FP"] != ppl[0]["FP"] and abs(ppl[8]["FP"] / ppl[0]["FP"] - 1) < 0.01
    assert ppl[2]["FP"] > 1.1 * ppl[0]["FP"]  # separate cache rows per head setting
    assert ppl[8]["TTQ (r=0)"] != ppl[0]["TTQ (r=0)"]
    rc = main(["ppl", "--model", str(stories_dir), "--seqlen", "64", "--max-windows", "1", "--methods", "fp",
               "--datasets", "wikitext2", "--data-dir", data_dir, "--cache", "", "--lm-head-bits", "9",
               "--out", str(tmp_path / "bad")])
    assert rc == 2 and "bits must be an integer in 2..8, got 9" in capsys.readouterr().err


def _own_text(tmp_path, name: str, source: str, lines: slice) -> str:
    """Lines of a PTB file (one sentence a line) as ``tmp_path/name``; returns ``file:PATH``."""
    path = tmp_path / name
    path.write_text("\n".join((DATA / "ptb" / source).read_text().split("\n")[lines]))
    return f"file:{path}"


def test_ppl_on_your_own_text(stories_dir, data_dir, tmp_path, capsys, monkeypatch):
    """file: for evaluation and calibration: labelled by the file's stem; a calibration file that overlaps an
    evaluated file is refused."""
    monkeypatch.setenv("TTQ_CACHE_DIR", str(tmp_path / "ttq-cache"))
    legal = _own_text(tmp_path, "legal.txt", "ptb.test.txt", slice(0, 400))
    calib = _own_text(tmp_path, "calib.txt", "ptb.valid.txt", slice(0, 400))
    out = tmp_path / "own"
    rc = main(["ppl", "--model", str(stories_dir), "--seqlen", "128", "--max-windows", "2", "--bits", "3",
               "--methods", "fp,rtn,awq,ttq", "--rank", "0", "--calib", f"{calib}@512", "--datasets", f"{legal},ptb",
               "--data-dir", data_dir, "--cache", "", "--out", str(out)])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert "| Method | q | g | legal | PTB | Avg |" in printed.out and "| AWQ (calib Calib, 2^9) |" in printed.out
    rows = json.loads(out.with_suffix(".json").read_text())
    assert {r["dataset"] for r in rows} == {legal, "ptb"} and all(r["n_windows"] == 2 for r in rows)
    rc = main(["ppl", "--model", str(stories_dir), "--seqlen", "128", "--max-windows", "1", "--methods", "awq",
               "--rank", "0", "--calib", f"{legal}@512", "--datasets", legal, "--cache", "", "--out", str(tmp_path / "x")])
    assert rc == 2 and f"calibration text '{legal}' overlaps the evaluation text '{legal}'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "datasets, msg",
    [
        ("file:{tmp}/nope.txt", "no such file {tmp}/nope.txt"),
        ("txt:{tmp}/legal.txt", "'txt:' is not a source prefix"),
        ("jsonl:{tmp}/docs.jsonl", "needs a path and a text field: jsonl:PATH:FIELD"),
        ("file:{tmp}/a/legal.txt,file:{tmp}/b/legal.txt", "would share the table label 'legal'"),
        ("file:{tmp}/latin1.txt", "not UTF-8 text: byte 0xe9 at byte offset 3 (line 1)"),
        ("file:{tmp}/short.txt", "has 4 tokens, fewer than one window of 64 (--seqlen): it needs at least 64 tokens"),
    ],
)
def test_ppl_own_text_bad_input_exit_2(stories_dir, tmp_path, capsys, datasets, msg):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "legal.txt").write_text("a case " * 100)
    (tmp_path / "latin1.txt").write_bytes("Caf\u00e9".encode("latin-1"))
    (tmp_path / "short.txt").write_text("Once upon a time")
    rc = main(["ppl", "--model", str(stories_dir), "--seqlen", "64", "--max-windows", "1", "--methods", "fp",
               "--datasets", datasets.format(tmp=tmp_path), "--cache", "", "--out", str(tmp_path / "x")])
    last = capsys.readouterr().err.strip().split("\n")[-1]  # (after the model's loading bar)
    assert rc == 2 and last.startswith("ttq ppl: error: ") and msg.format(tmp=tmp_path) in last


def test_ppl_prints_the_plan_and_each_row_as_it_finishes(stories_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "q"
    rc = main(["ppl", "--model", str(stories_dir), "--seqlen", "64", "--quick", "--methods", "fp,rtn,ttq", "--rank", "0",
               "--datasets", "wikitext2,ptb", "--data-dir", data_dir, "--cache", "", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert text.startswith("Work: 3 rows x 8 windows of 64 tokens: about ")  # --quick: 4 windows per dataset
    rows = json.loads(out.with_name("q.json").read_text())
    assert {r["n_windows"] for r in rows} == {4}
    rtn = {r["dataset"]: r["ppl"] for r in rows if r["method"] == "RTN"}
    line = next(ln for ln in text.splitlines() if ln.startswith("RTN q=3 g=32: "))
    assert line == f"RTN q=3 g=32: WT2 {rtn['wikitext2']:.2f} | PTB {rtn['ptb']:.2f} | avg {(rtn['wikitext2'] + rtn['ptb']) / 2:.2f}"
    assert text.index(line) < text.index("| Method |")  # printed before the table
