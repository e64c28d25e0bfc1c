"""Caches keyed by content (ttq.cache): a changed text, model or calibration text is never served an old
result; cache files are never unpickled; an unwritable cache degrades to no caching."""

from __future__ import annotations

import json
import logging
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import shared_dir
from ttq import cache
from ttq.calibrate import calibrate
from ttq.cli import main
from ttq.config import CalibSpec

DATA = shared_dir() / "data"


@pytest.fixture()
def data_copy(tmp_path) -> Path:
    """A private copy of the WikiText-2 files (tests change it)."""
    if not (DATA / "wikitext2" / "wiki.test.raw").is_file():
        pytest.skip("shared data missing")
    dst = tmp_path / "data"
    shutil.copytree(DATA / "wikitext2", dst / "wikitext2")
    return dst


@pytest.fixture()
def cache_env(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "ttq-cache"
    monkeypatch.setenv("TTQ_CACHE_DIR", str(d))
    return d


def _ppl(model: Path, data: Path, out: Path, methods: str = "fp", results_cache: Path | None = None) -> dict:
    rc = main(["ppl", "--model", str(model), "--seqlen", "128", "--max-windows", "2", "--bits", "3", "--rank", "0",
               "--methods", methods, "--calib", "wikitext2:512", "--datasets", "wikitext2", "--data-dir", str(data),
               "--cache", str(results_cache) if results_cache else "", "--out", str(out)])
    assert rc == 0
    return {r["method"]: r["ppl"] for r in json.loads(Path(str(out) + ".json").read_text())}


def _noisy_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    w = load_file(dst / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    w = {k: v + 0.05 * torch.randn(v.shape, generator=g) if v.dtype.is_floating_point and v.dim() == 2 else v
         for k, v in w.items()}
    save_file(w, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_result_rows_follow_the_evaluated_text(stories_dir, data_copy, tmp_path, cache_env):
    rows = tmp_path / "rows"
    before = _ppl(stories_dir, data_copy, tmp_path / "a", results_cache=rows)["FP"]
    test_file = data_copy / "wikitext2" / "wiki.test.raw"
    lines = test_file.read_text().split("\n")
    test_file.write_text("\n".join(lines[200:] + lines[:200]))  # another text (same characters)
    after = _ppl(stories_dir, data_copy, tmp_path / "b", results_cache=rows)["FP"]
    fresh = _ppl(stories_dir, data_copy, tmp_path / "c")["FP"]  # no results cache
    assert after == fresh and abs(after - before) > 1e-3  # before the fix: the old value came back


def test_models_with_the_same_folder_name_share_nothing(stories_dir, data_copy, tmp_path, cache_env):
    a = tmp_path / "a" / stories_dir.name
    shutil.copytree(stories_dir, a)
    b = _noisy_copy(stories_dir, tmp_path / "b" / stories_dir.name)
    rows = tmp_path / "rows"
    pa = _ppl(a, data_copy, tmp_path / "pa", "fp,awq", rows)
    pb = _ppl(b, data_copy, tmp_path / "pb", "fp,awq", rows)  # same name, same caches
    shutil.rmtree(cache_env)
    fresh = _ppl(b, data_copy, tmp_path / "pf", "fp,awq")  # nothing cached
    assert pb == fresh
    assert abs(pb["FP"] - pa["FP"]) > 1e-3 and abs(pb["AWQ (WT2 Calib, 2^9)"] - pa["AWQ (WT2 Calib, 2^9)"]) > 1e-3


def test_calibration_cache_follows_the_text_not_its_length(stories_model, stories_tokenizer, data_copy, cache_env):
    spec = CalibSpec("wikitext2", 512, seqlen=128)
    first = calibrate(stories_model, stories_tokenizer, spec, data_dir=data_copy, model_key="m")
    valid = data_copy / "wikitext2" / "wiki.valid.raw"
    text = valid.read_text()
    lines = text.split("\n")
    valid.write_text("\n".join(lines[::-1]))  # same length, other text
    assert len(valid.read_text()) == len(text)
    second = calibrate(stories_model, stories_tokenizer, spec, data_dir=data_copy, model_key="m")
    fresh = calibrate(stories_model, stories_tokenizer, spec, data_dir=data_copy)  # no cache
    name = next(iter(first))
    assert torch.equal(second[name].gram, fresh[name].gram)
    assert not torch.equal(second[name].gram, first[name].gram)


def test_calibration_cache_is_safetensors_and_shares_equal_statistics(stories_model, stories_tokenizer, cache_env):
    if not (DATA / "wikitext2").is_dir():
        pytest.skip("shared data missing")
    spec = CalibSpec("wikitext2", 256, seqlen=128)
    fresh = calibrate(stories_model, stories_tokenizer, spec, data_dir=DATA, model_key="m")
    files = list((cache_env / "calib").glob("*.safetensors"))
    assert len(files) == 1 and not list((cache_env / "calib").glob("*.pt"))
    stored = load_file(files[0])
    logical = 2 * len(fresh)  # a sum and a Gram matrix per layer
    assert len(stored) < logical  # q/k/v and gate/up read the same input: stored once
    again = calibrate(stories_model, stories_tokenizer, spec, data_dir=DATA, model_key="m")
    for name, lc in fresh.items():
        assert torch.equal(again[name].gram, lc.gram) and torch.equal(again[name].stats.sum_abs_p, lc.stats.sum_abs_p)
        assert again[name].stats.n_tokens == lc.stats.n_tokens and again[name].stats.p == lc.stats.p


class _Planted:
    """Unpickling this creates a marker file: proof that a cache file ran code."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_planted_cache_file_runs_no_code(stories_model, stories_tokenizer, cache_env, tmp_path, caplog):
    if not (DATA / "wikitext2").is_dir():
        pytest.skip("shared data missing")
    spec = CalibSpec("wikitext2", 256, seqlen=128)
    fresh = calibrate(stories_model, stories_tokenizer, spec, data_dir=DATA, model_key="m")
    marker = tmp_path / "pwned"
    for path in (cache_env / "calib").glob("*.safetensors"):
        path.write_bytes(pickle.dumps(_Planted(str(marker))))
    for path in (cache_env / "tokens").glob("*.safetensors"):
        path.write_bytes(pickle.dumps(_Planted(str(marker))))
    with caplog.at_level(logging.WARNING):
        again = calibrate(stories_model, stories_tokenizer, spec, data_dir=DATA, model_key="m")
    assert not marker.exists()
    assert "unreadable cache file" in caplog.text
    name = next(iter(fresh))
    assert torch.equal(again[name].gram, fresh[name].gram)  # recomputed


def test_read_only_cache_runs_without_caching(stories_dir, data_copy, tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("TTQ_CACHE_DIR", str(blocker / "cache"))  # cannot be created, even by root
    cache._WARNED.clear()
    with caplog.at_level(logging.WARNING):
        got = _ppl(stories_dir, data_copy, tmp_path / "p", "fp,awq", results_cache=blocker / "rows")
    assert got["FP"] > 1 and got["AWQ (WT2 Calib, 2^9)"] > 1
    warned = [r.getMessage() for r in caplog.records if "not writable" in r.getMessage()]
    assert len(warned) == 3  # one each: results, tokens, calibration — not one per file


def test_model_fingerprint_sees_in_place_changes(stories_model):
    a = cache.model_fingerprint(stories_model)
    assert cache.model_fingerprint(stories_model) == a
    with torch.no_grad():
        stories_model.model.layers[0].mlp.up_proj.weight[0, 0] += 1.0
    assert cache.model_fingerprint(stories_model) != a


def test_unreadable_result_row_is_recomputed(stories_dir, data_copy, tmp_path, cache_env):
    rows = tmp_path / "rows"
    first = _ppl(stories_dir, data_copy, tmp_path / "a", results_cache=rows)["FP"]
    for f in rows.glob("*.json"):
        f.write_text('{"ppl": ')  # truncated
    assert _ppl(stories_dir, data_copy, tmp_path / "b", results_cache=rows)["FP"] == first


def test_result_rows_follow_the_code(stories_dir, data_copy, tmp_path, cache_env, monkeypatch):
    """A row cached by other code (other ttq sources or torch/transformers versions) is not served."""
    import ttq.eval.table as table

    rows = tmp_path / "rows"
    true = _ppl(stories_dir, data_copy, tmp_path / "a", results_cache=rows)["FP"]
    for f in rows.glob("*.json"):  # plant a number: served while the code is the same
        f.write_text(json.dumps({**json.loads(f.read_text()), "ppl": 12345.0}))
    assert _ppl(stories_dir, data_copy, tmp_path / "b", results_cache=rows)["FP"] == 12345.0
    monkeypatch.setattr(table, "code_fingerprint", lambda: "other code")
    assert _ppl(stories_dir, data_copy, tmp_path / "c", results_cache=rows)["FP"] == true


def test_code_fingerprint_covers_the_sources():
    assert cache.code_fingerprint() == cache.code_fingerprint()  # computed once
    root = Path(cache.__file__).parent
    assert (root / "kernels" / "csrc" / "codes.inc").suffix in cache.CODE_SUFFIXES
    assert len(cache.code_fingerprint()) == 24
