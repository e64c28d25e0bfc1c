"""Tests of the quantization-time table (src/ttq/eval/qtime.py) and ``ttq qtime`` on stories260K."""

from __future__ import annotations

import json

import pytest

from tests.conftest import shared_dir
from ttq.cli import main
from ttq.config import AWPConfig, CalibSpec, PruneConfig, RTNConfig, TTQConfig
from ttq.eval.qtime import is_test_time
from ttq.formats.affine import QuantSpec

DATA = shared_dir() / "data"


@pytest.mark.parametrize("make, expected", [
    (lambda q, cs: TTQConfig(quant=q), True),
    (lambda q, cs: AWPConfig(quant=q, online=True), True),
    (lambda q, cs: PruneConfig(sparsity=0.5), True),
    (lambda q, cs: RTNConfig(quant=q), False),
])
def test_is_test_time(stories_model, make, expected) -> None:
    """Read from the quantized modules (they carry a token_mask), whatever the method: HQQ, a static method
    without calibration, is not timed per prompt."""
    import ttq

    q = QuantSpec(bits=3, group_size=32)
    cs = CalibSpec(dataset="wikitext2", n_tokens=512, seqlen=128)
    assert not is_test_time(stories_model)
    ttq.quantize_(stories_model, make(q, cs))
    assert is_test_time(stories_model) is expected
    ttq.restore_(stories_model)
    assert not is_test_time(stories_model)


def test_qtime_cli(stories_dir, tmp_path, capsys):
    if not (DATA / "wikitext2" / "wiki.test.raw").is_file():
        pytest.skip("shared data missing")
    out = tmp_path / "qt"
    rc = main(["qtime", "--model", str(stories_dir), "--seqlen", "128", "--methods", "rtn,awq,gptq,gptq_onepass,ttq", "--rank", "0",
               "--calib", "wikitext2:512", "--repeats", "1", "--data-dir", str(DATA), "--out", str(out)])
    assert rc == 0
    rows = {r["method"]: r for r in json.loads(out.with_suffix(".json").read_text())}
    assert set(rows) == {"RTN", "AWQ (WT2 Calib, 2^9)", "GPTQ (WT2 Calib, 2^9)", "GPTQ one-pass (WT2 Calib, 2^9)",
                         "TTQ (r=0)"}
    awq, gptq = rows["AWQ (WT2 Calib, 2^9)"], rows["GPTQ one-pass (WT2 Calib, 2^9)"]
    assert awq["calib_seconds"] > 0 and awq["calib_seconds"] == gptq["calib_seconds"]  # one calibration, shared
    seq = rows["GPTQ (WT2 Calib, 2^9)"]  # block-sequential: its calibration runs inside quantize_, so only the
    assert seq["quantize_seconds"] > 0 and seq["calib_seconds"] >= 0  # token windows count as calibration
    # (no comparison of two timings: under load the one-pass row, with its shared calibration, can take longer)
    assert rows["RTN"]["calib_seconds"] == 0 and rows["RTN"]["per_prompt_seconds"] is None
    t = rows["TTQ (r=0)"]
    assert t["per_prompt_seconds"] == pytest.approx(t["quantized_forward_seconds"] - t["fp_forward_seconds"])
    for r in rows.values():
        assert r["total_seconds"] == pytest.approx(r["calib_seconds"] + r["quantize_seconds"])
        if r["rss_start_mb"] is not None:  # Linux: the peak of the row is at least what it started with
            assert r["peak_rss_mb"] >= r["rss_start_mb"] * 0.99 > 0
    text = capsys.readouterr().out
    assert "| GPTQ (WT2 Calib, 2^9) | 3 | 32 |" in text and "| peak RSS MB |" in text


def test_qtime_bad_input(stories_dir, capsys):
    assert main(["qtime", "--model", str(stories_dir), "--methods", "fp"]) == 2
    assert "'fp' has nothing to time" in capsys.readouterr().err
    assert main(["qtime", "--model", str(stories_dir), "--repeats", "0"]) == 2
    assert "--repeats must be >= 1" in capsys.readouterr().err
