"""Evaluation / calibration texts: protocol joins, file resolution, overlap refusal."""

from __future__ import annotations

import pytest

from tests.conftest import shared_dir
from ttq.data import CALIB_FILES, DATASETS, EVAL_FILES, check_dataset, check_disjoint, load_text, resolve_file

DATA = shared_dir() / "data"
needs_data = pytest.mark.skipif(not (DATA / EVAL_FILES["ptb"]).is_file(), reason="shared data missing")


@needs_data
def test_wikitext2_protocol_join():
    text = load_text("wikitext2", data_dir=DATA)
    raw = (DATA / EVAL_FILES["wikitext2"]).read_text()
    rows = raw.split("\n")[:-1]
    assert len(rows) == 4358  # HF row count of wikitext-2-raw-v1 test
    assert text.startswith("\n\n = Robert Boulter = \n\n\n\n\n Robert Boulter is")  # "" row, "\n\n", title row
    assert text.count("\n\n") >= 4357


@needs_data
def test_ptb_and_c4_joins():
    ptb = load_text("ptb", data_dir=DATA)
    assert ptb.startswith("no it was n't black monday but while")
    assert "\n" not in ptb and "  " not in ptb
    c4 = load_text("c4", data_dir=DATA)
    assert c4.startswith("The woman who died after falling from a bridge")


@needs_data
@pytest.mark.parametrize("name", DATASETS)
def test_calibration_text_is_disjoint_from_eval(name):
    calib = load_text(name, calibration=True, data_dir=DATA)
    for other in DATASETS:
        check_disjoint(calib, load_text(other, data_dir=DATA), name, other)  # must not raise


@needs_data
def test_overlapping_calibration_is_refused():
    ev = load_text("ptb", data_dir=DATA)
    with pytest.raises(ValueError, match="overlaps the evaluation text"):
        check_disjoint(ev[10_000:60_000], ev, "ptb", "ptb")


@needs_data
def test_overlap_is_found_across_joins_and_line_breaks():
    """The PTB test file as it is on disk (one sentence a line) against PTB's evaluation text (joined by spaces)."""
    raw = (DATA / EVAL_FILES["ptb"]).read_text()[:50_000]
    assert "\n" in raw and raw not in load_text("ptb", data_dir=DATA)
    with pytest.raises(ValueError, match="overlaps the evaluation text 'ptb'"):
        check_disjoint(raw, load_text("ptb", data_dir=DATA), "file:ptb.txt", "ptb")


@needs_data
def test_overlap_is_found_when_the_evaluated_text_is_a_small_part_of_the_calibration_text():
    """Passages of the evaluated text are looked up in the calibration text too: probes drawn only from a large
    calibration text would miss a small evaluated text inside it."""
    evaluated = load_text("ptb", data_dir=DATA)[100_000:103_000]
    calib = load_text("ptb", calibration=True, data_dir=DATA) + " " + evaluated
    with pytest.raises(ValueError, match=r"overlaps the evaluation text 'file:legal.txt' \(\d+/128 probe"):
        check_disjoint(calib, evaluated, "ptb", "file:legal.txt")


def test_missing_file_says_where_it_looked(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        resolve_file(CALIB_FILES["c4"], tmp_path)
    msg = str(e.value)
    assert str(tmp_path) in msg and "--data-dir" in msg and "TTQ_DATA_DIR" in msg


def test_env_var_data_dir(tmp_path, monkeypatch):
    (tmp_path / "ptb").mkdir()
    (tmp_path / "ptb" / "ptb.test.txt").write_text(" a b c \n d e \n")
    monkeypatch.setenv("TTQ_DATA_DIR", str(tmp_path))
    assert load_text("ptb") == "a b c d e"


def test_unknown_dataset_and_source():
    with pytest.raises(ValueError, match="allowed: wikitext2, ptb, c4, file:PATH, jsonl:PATH:FIELD, hf:ID"):
        check_dataset("imagenet")
    with pytest.raises(ValueError, match="unknown data source"):
        load_text("ptb", source="ftp")


def test_empty_text_refused(tmp_path):
    (tmp_path / "ptb").mkdir()
    (tmp_path / "ptb" / "ptb.test.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="empty"):
        load_text("ptb", data_dir=tmp_path)
