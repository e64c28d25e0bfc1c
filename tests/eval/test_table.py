"""Table cells, the resumable cache and the markdown layout."""

from __future__ import annotations

import json

import pytest
import torch

from ttq.config import AWQConfig, RTNConfig, TTQConfig
from ttq.eval.table import build_cells, markdown_tables, run_cells
from ttq.methods.scaling import ScaleSpec


def test_build_cells_paper_order():
    cells = build_cells(["fp", "rtn", "awq", "ttq"], [2, 3], [32], [0, 16], [("c4", 2**17), ("c4", 2048)], ScaleSpec(), 2048)
    labels = [c.label for c in cells]
    assert labels[:6] == ["FP", "RTN", "AWQ (C4 Calib, 2^17)", "AWQ (C4 Calib, 2^11)", "TTQ (r=0)", "TTQ (r=16)"]
    assert len(cells) == 1 + 2 * 5
    assert isinstance(cells[1].config, RTNConfig) and isinstance(cells[2].config, AWQConfig)
    assert isinstance(cells[5].config, TTQConfig) and cells[5].config.rank == 16 and cells[5].bits == 2


def test_unknown_method_refused():
    with pytest.raises(ValueError, match="allowed: fp, rtn, awq, awq_search, gptq"):
        build_cells(["fp", "qat"], [3], [32], [0], [], ScaleSpec(), 512)


def test_run_cells_caches_and_resumes(stories_model, tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(0)
    windows = {"wikitext2": torch.randint(3, 500, (2, 64), generator=g)}
    cells = build_cells(["fp", "rtn", "ttq"], [4], [32], [0], [], ScaleSpec(), 64)
    first = run_cells(stories_model, None, "stories-test", cells, windows, cache=tmp_path, progress=False)
    assert len(first) == 3 and len(list(tmp_path.glob("*.json"))) == 3
    assert first[0]["method"] == "FP" and first[1]["ppl"] > first[0]["ppl"] * 0.9

    def boom(*a, **k):
        raise AssertionError("cached cells must not be re-evaluated")

    monkeypatch.setattr("ttq.eval.table.perplexity", boom)
    again = run_cells(stories_model, None, "stories-test", cells, windows, cache=tmp_path, progress=False)
    assert [r["ppl"] for r in again] == [r["ppl"] for r in first]
    md = markdown_tables(again, ["wikitext2"])
    assert "| RTN |" in md and "| TTQ (r=0) |" in md and "FP (WT2:" in md
    assert json.loads(next(tmp_path.glob("*.json")).read_text())["n_windows"] == 2


def test_forward_overhead_restores_the_model(stories_model):
    from ttq.config import TTQConfig
    from ttq.eval.table import forward_overhead
    from ttq.nn import TTQLinear

    o = forward_overhead(stories_model, torch.randint(0, 500, (1, 64)), TTQConfig(), repeats=1)
    assert o["fp_seconds"] > 0 and o["quantized_seconds"] > 0 and o["seqlen"] == 64
    assert o["ratio"] == pytest.approx(o["quantized_seconds"] / o["fp_seconds"])
    assert not any(isinstance(m, TTQLinear) for m in stories_model.modules())


def test_held_out_rows_are_cached_per_process_options(stories_model, stories_tokenizer, tmp_path):
    """Prompt mode packs the weights (float16 scale / zero with the option half_params): a held-out row computed
    under one option value is never served under another."""
    from tests.conftest import shared_dir
    from ttq import options
    from ttq.data import eval_windows, load_text, tokenize

    data = shared_dir() / "data"
    if not (data / "wikitext2" / "wiki.test.raw").is_file():
        pytest.skip("shared data missing")
    text = tokenize(stories_tokenizer, load_text("wikitext2", data_dir=data), cache=False)
    windows = {"wikitext2": eval_windows(text, 256, max_windows=1)}
    cells = build_cells(["ttq"], [8], [32], [0], [], ScaleSpec(), 256)
    with options.using(half_params=False):
        full = run_cells(stories_model, None, "stories-test", cells, windows, cache=tmp_path, progress=False,
                         prompt_tokens=64)
    with options.using(half_params=True):
        half = run_cells(stories_model, None, "stories-test", cells, windows, cache=tmp_path, progress=False,
                         prompt_tokens=64)
        again = run_cells(stories_model, None, "stories-test", cells, windows, cache=tmp_path, progress=False,
                          prompt_tokens=64)
    assert len(list(tmp_path.glob("*.json"))) == 2  # one row per option value
    assert half[0]["ppl"] != full[0]["ppl"]  # float16 scale / zero: another grid
    assert half[0]["ppl"] == pytest.approx(full[0]["ppl"], rel=1e-2)  # two 8-bit grids 2^-11 apart
    assert again[0]["ppl"] == half[0]["ppl"]
