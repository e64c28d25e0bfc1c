"""Tests of ``ttq domain`` (src/ttq/commands/domain.py) and its tables (src/ttq/eval/domain.py)."""

from __future__ import annotations

import argparse
import json

import pytest

from ttq.commands.domain import _lengths
from ttq.eval.domain import cross_table, domain_cells, length_table, unique_cells
from ttq.methods.scaling import ScaleSpec


def test_length_parsing() -> None:
    assert _lengths("11-13") == [2048, 4096, 8192]
    assert _lengths("2^11,4096, 100") == [2048, 4096, 100]
    with pytest.raises(argparse.ArgumentTypeError, match="is not N, 2\\^K or K1-K2"):
        _lengths("2^x")


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
    with pytest.raises(ValueError, match="calibration lengths must be positive token counts"):
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


@pytest.mark.slow
def test_domain_end_to_end(stories_dir, tmp_path) -> None:
    from ttq.cli import main

    out = tmp_path / "dom"
    rc = main(
        [
            "domain",
            "--model",
            str(stories_dir),
            "--lengths",
            "2^7",
            "--rank",
            "0",
            "--seqlen",
            "64",
            "--max-windows",
            "1",
            "--cache",
            "",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    text = out.with_suffix(".md").read_text()
    assert "| Eval | TTQ (r=0) | AWQ 2^7 |" in text
    rows = json.loads(out.with_suffix(".json").read_text())
    assert [r["method"] for r in rows] == ["TTQ (r=0)", "AWQ (C4 Calib, 2^7)"]
    assert all(r["dataset"] == "wikitext2" and 1.0 < r["ppl"] < 1e4 for r in rows)


def test_domain_bad_dataset_is_a_clear_error(capsys) -> None:
    from ttq.cli import main

    assert main(["domain", "--calib", "wt2"]) == 2  # checked before any model is loaded
    assert "unknown dataset 'wt2'; allowed: wikitext2, ptb, c4" in capsys.readouterr().err
