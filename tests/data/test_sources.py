"""Your own texts: file:PATH, jsonl:PATH:FIELD, hf:ID[...] — names, labels, calibration entries, the errors
of bad input, overlap refusal, and a changed file giving a fresh result."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch

from tests.conftest import shared_dir
from ttq.data import (
    CalibSpec,
    check_dataset,
    dataset_label,
    eval_windows,
    load_text,
    parse_calib,
    parse_source,
)
from ttq.errors import ConfigError, DataError, DataNotFoundError, MissingDependency

DATA = shared_dir() / "data"
needs_data = pytest.mark.skipif(not (DATA / "ptb" / "ptb.test.txt").is_file(), reason="shared data missing")
PROSE = "The court held that the contract was void. " * 40


@pytest.fixture()
def cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("TTQ_CACHE_DIR", str(tmp_path / "ttq-cache"))


# --- names ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, kind, target, field, config, split, label",
    [
        ("wikitext2", "builtin", "wikitext2", "", "", "", "WT2"),
        ("c4", "builtin", "c4", "", "", "", "C4"),
        ("file:/x/legal.txt", "file", "/x/legal.txt", "", "", "", "legal"),
        ("file:/x/a:b/notes.v2.md", "file", "/x/a:b/notes.v2.md", "", "", "", "notes.v2"),  # ':' in a path
        ("jsonl:/x/docs.jsonl:body", "jsonl", "/x/docs.jsonl", "body", "", "", "docs"),
        ("jsonl:/x/a:b.jsonl:text", "jsonl", "/x/a:b.jsonl", "text", "", "", "a:b"),  # the field is after the last ':'
        ("hf:owner/legal-corpus", "hf", "owner/legal-corpus", "text", "", "", "legal-corpus"),
        ("hf:wikitext:wikitext-2-raw-v1:test:text", "hf", "wikitext", "text", "wikitext-2-raw-v1", "test", "wikitext"),
        ("hf:owner/name::validation", "hf", "owner/name", "text", "", "validation", "name"),  # empty part: default
        ("hf:owner/name:::body", "hf", "owner/name", "body", "", "", "name"),
    ],
)
def test_parse_source(spec, kind, target, field, config, split, label):
    src = parse_source(spec)
    assert (src.spec, src.kind, src.target, src.field, src.config, src.split) == (spec, kind, target, field, config, split)
    assert src.label == dataset_label(spec) == label


@pytest.mark.parametrize(
    "spec, msg",
    [
        ("imagenet", "allowed: wikitext2, ptb, c4, file:PATH, jsonl:PATH:FIELD, hf:ID[:CONFIG[:SPLIT[:FIELD]]]"),
        ("txt:/x/legal.txt", "'txt:' is not a source prefix"),
        ("file:", "names no file"),
        ("jsonl:/x/docs.jsonl", "jsonl:PATH:FIELD"),
        ("jsonl::text", "jsonl:PATH:FIELD"),
        ("hf:", "hf:ID[:CONFIG[:SPLIT[:FIELD]]]"),
        ("hf:a:b:c:d:e", "hf:ID[:CONFIG[:SPLIT[:FIELD]]]"),
    ],
)
def test_bad_names_list_the_allowed_forms(spec, msg):
    with pytest.raises(ConfigError) as e:
        parse_source(spec)
    assert msg in str(e.value)


def test_a_bare_path_gets_a_hint(tmp_path):
    path = tmp_path / "legal.txt"
    path.write_text(PROSE)
    with pytest.raises(ConfigError, match=f"write file:{path}"):
        check_dataset(str(path))


@pytest.mark.parametrize(
    "item, expected",
    [
        ("c4", ("c4", 2**17)),
        ("c4:2048", ("c4", 2048)),  # the built-ins' DATASET:TOKENS, as before
        ("c4@2048", ("c4", 2048)),
        ("ptb@2^12", ("ptb", 4096)),
        ("nope:512", ("nope", 512)),  # refused later by check_dataset as "unknown dataset 'nope'"
        ("file:/x/legal.txt", ("file:/x/legal.txt", 2**17)),
        ("file:/x/legal.txt@4096", ("file:/x/legal.txt", 4096)),
        ("file:/x/a:2048/legal.txt@64", ("file:/x/a:2048/legal.txt", 64)),  # ':' and digits inside a path
        ("file:/x/me@home.txt", ("file:/x/me@home.txt", 2**17)),  # '@' not followed by a count: part of the path
        ("file:/x/v@2.txt@100", ("file:/x/v@2.txt", 100)),  # the last '@' counts
        ("jsonl:/x/d.jsonl:text@512", ("jsonl:/x/d.jsonl:text", 512)),
        ("hf:owner/name:cfg:train:text@1024", ("hf:owner/name:cfg:train:text", 1024)),
    ],
)
def test_parse_calib(item, expected):
    assert parse_calib(item) == expected


@pytest.mark.parametrize("item, msg", [("c4:abc", "write c4@TOKENS"), ("@512", "names no dataset")])
def test_parse_calib_errors(item, msg):
    with pytest.raises(ConfigError, match=msg):
        parse_calib(item)


def test_calib_spec_checks_the_name_not_the_file():
    assert CalibSpec("file:/not/here/legal.txt", 512).dataset == "file:/not/here/legal.txt"  # built elsewhere
    with pytest.raises(ConfigError, match="unknown dataset 'legal'"):
        CalibSpec("legal", 512)


# --- reading ---------------------------------------------------------------------------------------------------


def test_file_is_read_as_is(tmp_path):
    path = tmp_path / "legal.txt"
    path.write_bytes(b"\xef\xbb\xbf" + "Caf\u00e9 law.\n\nSection 2.\r\n".encode())  # BOM dropped, the rest kept
    assert load_text(f"file:{path}") == "Caf\u00e9 law.\n\nSection 2.\r\n"
    assert load_text(f"file:{path}", calibration=True) == load_text(f"file:{path}")
    assert check_dataset(f"file:{path}").label == "legal"


def test_jsonl_rows_joined_by_a_blank_line(tmp_path):
    path = tmp_path / "docs.jsonl"
    rows = [{"body": "first doc", "id": 1}, {"body": "  "}, {"body": "second\u2028doc"}]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n")
    assert load_text(f"jsonl:{path}:body") == "first doc\n\nsecond\u2028doc"  # blank rows skipped


def _write(tmp_path, name: str, data: bytes | str):
    path = tmp_path / name
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


@pytest.mark.parametrize(
    "name, data, error, msgs",
    [
        ("empty.txt", b"", DataError, ["is empty (0 bytes)"]),
        ("blank.txt", " \n\t\r\n  \n", DataError, ["holds only whitespace (8 bytes)"]),
        ("blob.bin", bytes(range(7, 256)) + bytes(range(7)), DataError, ["not text: a NUL byte at byte offset 249",
                                                                           "binary"]),
        ("wide.txt", "law".encode("utf-16"), DataError, ["NUL byte at byte offset 3", "UTF-16"]),
        ("latin1.txt", "Line one\nCaf\u00e9 au lait\n".encode("latin-1"), DataError,
         ["not UTF-8", "byte 0xe9 at byte offset 12 (line 2)", "iconv"]),
    ],
)
def test_bad_files(tmp_path, name, data, error, msgs):
    path = _write(tmp_path, name, data)
    for spec in (f"file:{path}", f"jsonl:{path}:text"):
        with pytest.raises(error) as e:
            load_text(spec)
        assert spec in str(e.value) and all(m in str(e.value) for m in msgs), str(e.value)


def test_missing_file_and_directory(tmp_path):
    for spec in (f"file:{tmp_path}/nope.txt", f"jsonl:{tmp_path}/nope.jsonl:text"):
        with pytest.raises(DataNotFoundError, match="no such file"):
            check_dataset(spec)  # before any model is loaded
        with pytest.raises(DataNotFoundError, match="no such file"):
            load_text(spec)
    with pytest.raises(DataNotFoundError, match="is a directory"):
        load_text(f"file:{tmp_path}")
    _write(tmp_path, "legal.txt", PROSE)
    with pytest.raises(DataNotFoundError, match=f"written SOURCE@TOKENS: file:{tmp_path}/legal.txt@4096"):
        check_dataset(f"file:{tmp_path}/legal.txt:4096")  # DATASET:TOKENS is for the built-ins only


@pytest.mark.parametrize(
    "lines, msg",
    [
        (['{"text": "a"}', '{"text": "b"}', '{"text": "c"'], "line 3 is not valid JSON ("),
        (['{"text": "a"}', "", '["text", "b"]'], "line 3 is a JSON array, not an object with a field 'text'"),
        (['{"text": "a"}', '{"body": "b", "id": 7}'], "line 2 has no field 'text' (its fields: 'body', 'id')"),
        (['{"text": 12}'], "line 1: field 'text' is a JSON number, not a string"),
        (['{"text": ""}', '{"text": " "}'], "no line has text in field 'text'"),
    ],
)
def test_bad_jsonl(tmp_path, lines, msg):
    path = _write(tmp_path, "docs.jsonl", "\n".join(lines) + "\n")
    with pytest.raises(DataError) as e:
        load_text(f"jsonl:{path}:text")
    assert msg in str(e.value) and f"jsonl:{path}:text" in str(e.value)


def test_too_short_for_one_window_says_how_many_tokens():
    ids = torch.arange(37)
    with pytest.raises(DataError, match=r"file:/x/a.txt has 37 tokens, fewer than one window of 512 \(--seqlen\): "
                                        r"it needs at least 512 tokens"):
        eval_windows(ids, 512, name="file:/x/a.txt")


# --- Hugging Face ----------------------------------------------------------------------------------------------


class _FakeSplit:
    def __init__(self, columns: dict):
        self.columns = columns
        self.column_names = list(columns)

    def __getitem__(self, key):
        return self.columns[key]

    def __len__(self):
        return len(next(iter(self.columns.values())))


def _fake_datasets(monkeypatch, load):
    calls = []
    module = types.SimpleNamespace(load_dataset=lambda *a, **k: (calls.append((a, k)), load(*a, **k))[1])
    monkeypatch.setitem(sys.modules, "datasets", module)
    return calls


def test_hf_offline_is_a_clear_error(monkeypatch):
    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'owner/legal' on the Hub (LocalEntryNotFoundError)\nRetrying in 1s")

    _fake_datasets(monkeypatch, offline)
    with pytest.raises(DataNotFoundError) as e:
        load_text("hf:owner/legal")
    msg = str(e.value)
    assert "hf:owner/legal: could not load Hugging Face dataset 'owner/legal' split 'test'" in msg
    assert "ConnectionError: Couldn't reach" in msg and "Retrying" not in msg and "file:PATH" in msg


def test_hf_without_the_datasets_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails
    for call in (load_text, check_dataset):  # check_dataset: before a model loads
        with pytest.raises(MissingDependency, match=r"hf:owner/legal: .*pip install 'ttq\[online\]'"):
            call("hf:owner/legal")


def test_hf_splits_fields_and_join(monkeypatch):
    calls = _fake_datasets(monkeypatch, lambda *a, **k: _FakeSplit({"body": ["one", "", "two"], "id": [1, 2, 3]}))
    assert load_text("hf:owner/legal:::body") == "one\n\ntwo"
    assert load_text("hf:owner/legal:cfg::body", calibration=True) == "one\n\ntwo"
    assert load_text("hf:owner/legal::dev:body", calibration=True) == "one\n\ntwo"
    assert [(a, k["split"]) for a, k in calls] == [(("owner/legal", None), "test"), (("owner/legal", "cfg"), "train"),
                                                   (("owner/legal", None), "dev")]
    with pytest.raises(DataError, match="has no field 'text'; its fields: body, id"):
        load_text("hf:owner/legal")


# --- results follow the file -----------------------------------------------------------------------------------


def test_a_changed_file_gives_a_fresh_result(stories_model, stories_tokenizer, tmp_path, cache_env):
    """The result rows' cache key hashes the evaluated token ids: the same file is served from the cache, an
    edited one is evaluated again (and equals an uncached run)."""
    from ttq.eval.table import Cell, dataset_windows, run_cells

    if not (DATA / "ptb" / "ptb.test.txt").is_file():
        pytest.skip("shared data missing")
    lines = (DATA / "ptb" / "ptb.test.txt").read_text().split("\n")[:120]
    path = tmp_path / "legal.txt"
    spec = f"file:{path}"
    rows = tmp_path / "rows"

    def ppl(cache):
        win = dataset_windows(stories_tokenizer, [spec], 128, 2)
        return run_cells(stories_model, stories_tokenizer, "m", [Cell("FP", None, None)], win, cache, progress=False)[0]

    path.write_text("\n".join(lines))
    first = ppl(rows)
    assert first["dataset"] == spec and first["n_windows"] == 2
    assert ppl(rows)["ppl"] == first["ppl"] and len(list(rows.glob("*.json"))) == 1  # served from the cache
    path.write_text("\n".join(lines[60:] + lines[:60]))  # edited: same characters, another text
    after = ppl(rows)
    assert len(list(rows.glob("*.json"))) == 2 and abs(after["ppl"] - first["ppl"]) > 1e-3
    assert after["ppl"] == ppl(None)["ppl"]  # what an uncached run gives


@needs_data
def test_calibration_on_a_file_is_checked_against_the_evaluated_files(stories_tokenizer, tmp_path, cache_env):
    from ttq.calibrate import calibration_tokens

    ptb_test = (DATA / "ptb" / "ptb.test.txt").read_text()
    legal = _write(tmp_path, "legal.txt", ptb_test[:40_000])
    calib = _write(tmp_path, "calib.txt", (DATA / "ptb" / "ptb.valid.txt").read_text()[:40_000])
    ok = calibration_tokens(stories_tokenizer, CalibSpec(f"file:{calib}", 512, seqlen=128),
                            eval_datasets=(f"file:{legal}", "wikitext2"), data_dir=DATA)
    assert ok.shape == (4, 128)
    for eval_datasets in ((f"file:{legal}",), ("ptb",)):  # the same text as a file, and PTB's own (re-joined) text
        with pytest.raises(DataError, match=f"calibration text 'file:{legal}' overlaps the evaluation text"):
            calibration_tokens(stories_tokenizer, CalibSpec(f"file:{legal}", 512, seqlen=128),
                               eval_datasets=eval_datasets, data_dir=DATA)

