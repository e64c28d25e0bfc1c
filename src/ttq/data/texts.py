"""Evaluation and calibration texts: the built-in datasets (GPTQ / SparseLLM protocol) and your own.

=========  ===========================================  ================================  ==========
name       evaluation text (file under the data dir)    calibration text (never the eval)  joined by
=========  ===========================================  ================================  ==========
wikitext2  wikitext2/wiki.test.raw                      wikitext2/wiki.valid.raw           "\\n\\n"
ptb        ptb/ptb.test.txt                             ptb/ptb.valid.txt                  " "
c4         c4/c4-validation.00000-of-00008.head1025     c4/c4-train.00000-of-01024.head1000  " "
=========  ===========================================  ================================  ==========

The data directory is ``--data-dir`` / ``$TTQ_DATA_DIR``, else the first of
``./shared/data``, ``../shared/data`` and the ``shared/data`` beside this
checkout that exists.  ``source="hf"`` loads the same splits with the
``datasets`` library instead (needs internet).

Any other text is named by a prefixed form (:func:`parse_source`; readers in :mod:`ttq.data.sources`):

=================================  ============================================  ==============
form                               text (the same for evaluation and              table label
                                   calibration unless a split is given)
=================================  ============================================  ==============
``file:PATH``                      a UTF-8 text file, as is                       PATH's stem
``jsonl:PATH:FIELD``               one JSON object per line, string FIELD of      PATH's stem
                                   each, joined by a blank line
``hf:ID[:CONFIG[:SPLIT[:FIELD]]]``  a Hugging Face dataset (online, ``datasets``    ID's last part
                                   package); SPLIT default test (evaluation) /
                                   train (calibration), FIELD default text
=================================  ============================================  ==============

PATH is everything after ``file:`` (it may hold ``:``); in ``jsonl:`` the field is after the last
``:``; empty ``hf:`` parts take their default (``hf:owner/name::validation``).  A calibration entry
(:func:`parse_calib`) is ``SOURCE[@TOKENS]``; ``DATASET:TOKENS`` still works for the built-ins.
The name as written is the key of results and caches; caches also hash the text (or its token
ids), so an edited file is never served an old result.  Your own text has no separate calibration
split: :func:`check_disjoint` refuses calibration text that overlaps an evaluated text.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

from ttq.data.sources import (
    check_file,
    decode_utf8,
    load_hf_rows,
    read_hf,
    read_jsonl,
    read_text_file,
    require_datasets,
)
from ttq.errors import ConfigError, DataError, DataNotFoundError
from ttq.registry import SHORT

logger = logging.getLogger(__name__)

DATASETS = ("wikitext2", "ptb", "c4")
SOURCE_FORMS = ("file:PATH", "jsonl:PATH:FIELD", "hf:ID[:CONFIG[:SPLIT[:FIELD]]]")
DEFAULT_CALIB_TOKENS = 2**17
EVAL_FILES = {
    "wikitext2": "wikitext2/wiki.test.raw",
    "ptb": "ptb/ptb.test.txt",
    "c4": "c4/c4-validation.00000-of-00008.head1025.jsonl",
}
CALIB_FILES = {
    "wikitext2": "wikitext2/wiki.valid.raw",
    "ptb": "ptb/ptb.valid.txt",
    "c4": "c4/c4-train.00000-of-01024.head1000.jsonl",
}
HF_SPLITS = {  # (path, config, eval split, calibration split, text field)
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "test", "validation", "text"),
    "ptb": ("ptb_text_only", "penn_treebank", "test", "validation", "sentence"),
    "c4": ("allenai/c4", "en", "validation", "train", "text"),
}


@dataclass(frozen=True)
class TextSource:
    """A parsed dataset name (:func:`parse_source`).

    Args:
        spec: the name as written (the key of results and caches).
        kind: ``"builtin"``, ``"file"``, ``"jsonl"`` or ``"hf"``.
        target: the built-in name, the file path, or the Hugging Face dataset id.
        field: the text field of a jsonl or hf row.
        config: the hf config ("" = the dataset's default).
        split: the hf split ("" = test for evaluation, train for calibration).
    """

    spec: str
    kind: str
    target: str
    field: str = ""
    config: str = ""
    split: str = ""

    @property
    def label(self) -> str:
        """Column label in tables: WT2 / PTB / C4, a file's stem, an hf dataset's name."""
        if self.kind == "builtin":
            return SHORT[self.target]
        if self.kind == "hf":
            return self.target.rstrip("/").rsplit("/", 1)[-1]
        return Path(self.target).stem or self.target


def parse_source(spec: str) -> TextSource:
    """A built-in dataset name or one of :data:`SOURCE_FORMS`; :class:`ConfigError` listing them otherwise.
    Only the syntax is checked (a file's existence is :func:`check_dataset`'s)."""
    if not isinstance(spec, str):
        raise ConfigError(f"a dataset name must be a string, got {spec!r}")
    if spec in DATASETS:
        return TextSource(spec, "builtin", spec)
    prefix, sep, rest = spec.partition(":")
    if sep and prefix == "file":
        if not rest:
            raise ConfigError(f"{spec!r} names no file; write file:PATH")
        return TextSource(spec, "file", rest)
    if sep and prefix == "jsonl":
        path, sep, field = rest.rpartition(":")
        if not sep or not path or not field:
            raise ConfigError(f"{spec!r} needs a path and a text field: jsonl:PATH:FIELD (e.g. jsonl:docs.jsonl:text)")
        return TextSource(spec, "jsonl", path, field=field)
    if sep and prefix == "hf":
        parts = rest.split(":")
        if not parts[0] or len(parts) > 4:
            raise ConfigError(f"{spec!r} is not hf:ID[:CONFIG[:SPLIT[:FIELD]]] (e.g. hf:wikitext:wikitext-2-raw-v1:test:text)")
        dataset_id, config, split, field = (parts + ["", "", ""])[:4]
        return TextSource(spec, "hf", dataset_id, field=field or "text", config=config, split=split)
    if sep and prefix and not re.fullmatch(r"[A-Za-z]", prefix):
        hint = f" ({prefix + ':'!r} is not a source prefix)"
    elif spec and Path(spec).expanduser().is_file():
        hint = f" (to read the file {spec}, write file:{spec})"
    else:
        hint = ""
    raise ConfigError(f"unknown dataset {spec!r}; allowed: {', '.join(DATASETS + SOURCE_FORMS)}{hint}")


def check_dataset(name: str) -> TextSource:
    """Parse ``name`` (:func:`parse_source`) and check what can be checked before a model loads: that a
    ``file:``/``jsonl:`` file exists, that ``hf:`` has the ``datasets`` package."""
    src = parse_source(name)
    if src.kind in ("file", "jsonl"):
        check_file(src.target, src.spec)
    if src.kind == "hf":
        require_datasets(src.spec)
    return src


def dataset_label(name: str) -> str:
    """The table label of a dataset name: ``WT2``, ``legal`` for ``file:/x/legal.txt``, ..."""
    return parse_source(name).label


def parse_calib(item: str) -> tuple[str, int]:
    """A calibration entry -> ``(dataset name, tokens)``.

    ``SOURCE@TOKENS`` (TOKENS an integer or ``2^K``; the last ``@`` counts, so only a path that
    itself ends in ``@DIGITS`` needs an explicit ``@TOKENS``), the built-ins' ``DATASET:TOKENS``, or
    ``SOURCE`` alone (:data:`DEFAULT_CALIB_TOKENS`).  The name is not checked here (:func:`check_dataset`).
    """
    head, sep, tail = item.rpartition("@")
    if sep and _count(tail) is not None:
        if not head:
            raise ConfigError(f"calibration entry {item!r} names no dataset; write SOURCE@TOKENS")
        return head, _count(tail)
    prefix, sep, tail = item.partition(":")
    if sep and prefix not in ("file", "jsonl", "hf") and _count(tail) is not None:
        return prefix, _count(tail)  # DATASET:TOKENS
    if sep and prefix in DATASETS:
        raise ConfigError(f"calibration entry {item!r}: {tail!r} is not a token count; write {prefix}@TOKENS")
    return item, DEFAULT_CALIB_TOKENS


def _count(text: str) -> int | None:
    """``"4096"`` -> 4096, ``"2^12"`` -> 4096 (K up to 40), else None."""
    if re.fullmatch(r"\d+", text):
        return int(text)
    m = re.fullmatch(r"2\^(\d{1,2})", text)
    return 2 ** int(m.group(1)) if m and int(m.group(1)) <= 40 else None


def candidate_data_dirs(data_dir: str | os.PathLike | None = None) -> list[Path]:
    if data_dir is not None:
        return [Path(data_dir)]
    if os.environ.get("TTQ_DATA_DIR"):
        return [Path(os.environ["TTQ_DATA_DIR"])]
    here = Path(__file__).resolve()
    return [Path.cwd() / "shared" / "data", Path.cwd().parent / "shared" / "data", here.parents[3].parent / "shared" / "data"]


def resolve_file(rel: str, data_dir: str | os.PathLike | None = None) -> Path:
    """Find ``rel`` under the data directory, or say where it looked and how to point elsewhere."""
    tried = [d / rel for d in candidate_data_dirs(data_dir)]
    for path in tried:
        if path.is_file():
            return path
    raise DataNotFoundError(
        f"data file {rel!r} not found; looked in: {', '.join(str(p) for p in tried)}. "
        "Point elsewhere with --data-dir DIR or the TTQ_DATA_DIR environment variable "
        "(DIR holds wikitext2/, ptb/ and c4/), or use --data-source hf when online."
    )


def _join(name: str, rows: list[str]) -> str:
    return "\n\n".join(rows) if name == "wikitext2" else " ".join(rows)


def _rows_from_file(name: str, path: Path) -> list[str]:
    text = decode_utf8(path.read_bytes(), str(path))
    if name == "wikitext2":  # HF rows: blank line -> "", else line + "\n"; split on "\n" only
        return [line + "\n" if line.strip() else "" for line in text.split("\n")[:-1]]
    if name == "ptb":
        return [line.strip() for line in text.split("\n") if line.strip()]
    rows = []
    for i, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {i}: not a JSON object ({e.msg}); each line must be {{\"text\": ...}}") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise DataError(f"{path}, line {i}: a row without a string field \"text\"; each line must be {{\"text\": ...}}")
        rows.append(row["text"])
    return rows


def _rows_from_hf(name: str, calibration: bool) -> list[str]:
    path, cfg, test_split, calib_split, field = HF_SPLITS[name]
    split = calib_split if calibration else test_split
    if name == "c4":
        files = {"train": "en/c4-train.00000-of-01024.json.gz", "validation": "en/c4-validation.00000-of-00008.json.gz"}
        return load_hf_rows(path, None, split, field, name, data_files={split: files[split]},
                            limit=5000 if calibration else 1100)
    return load_hf_rows(path, cfg, split, field, name)


def load_text(name: str, calibration: bool = False, data_dir=None, source: str = "local") -> str:
    """The joined evaluation (or calibration) text of dataset ``name`` (a built-in or a :data:`SOURCE_FORMS`
    form; ``data_dir`` and ``source`` apply to the built-ins)."""
    src = parse_source(name)
    if source not in ("local", "hf"):
        raise ConfigError(f"unknown data source {source!r}; allowed: local, hf")
    if src.kind == "file":
        return read_text_file(src.target, src.spec)
    if src.kind == "jsonl":
        return read_jsonl(src.target, src.field, src.spec)
    if src.kind == "hf":
        return read_hf(src.target, src.config, src.split or ("train" if calibration else "test"), src.field, src.spec)
    if source == "hf":
        rows = _rows_from_hf(name, calibration)
    else:
        rows = _rows_from_file(name, resolve_file((CALIB_FILES if calibration else EVAL_FILES)[name], data_dir))
    text = _join(name, rows)
    if not text.strip():
        raise DataError(f"the {'calibration' if calibration else 'evaluation'} text of {name!r} is empty")
    return text


def _probes(text: str, n: int) -> list[str]:
    """``n`` passages of 200 characters at seeded random offsets (the whole text when under 400)."""
    if len(text) < 400:
        return [text.strip()] if text.strip() else []
    rng = random.Random(0)
    return [text[s : s + 200] for s in (rng.randrange(0, len(text) - 200) for _ in range(n))]


def check_disjoint(calib_text: str, eval_text: str, calib_name: str, eval_name: str, probes: int = 64) -> None:
    """Refuse calibration text that overlaps the evaluated text.

    ``probes`` passages of 200 characters of each text are looked up in the other (so a calibration
    text that holds the evaluated one, or is held in it, is found), after collapsing every run of
    whitespace to one space (so the same text joined or wrapped differently, e.g. the PTB test file
    given as ``file:PATH`` against ``ptb``, is found too).
    """
    calib, ev = " ".join(calib_text.split()), " ".join(eval_text.split())
    hits = total = 0
    for a, b in ((calib, ev), (ev, calib)):
        chunks = _probes(a, probes)
        hits += sum(1 for c in chunks if c in b)
        total += len(chunks)
    if hits:
        raise DataError(
            f"calibration text {calib_name!r} overlaps the evaluation text {eval_name!r} "
            f"({hits}/{total} probe passages found in the other); calibrate on disjoint text"
        )
