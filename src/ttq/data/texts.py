"""Evaluation and calibration texts (GPTQ / SparseLLM protocol).

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
"""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path

from ttq.errors import ConfigError, DataError, DataNotFoundError, MissingDependency

logger = logging.getLogger(__name__)

DATASETS = ("wikitext2", "ptb", "c4")
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


def check_dataset(name: str) -> None:
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; allowed: {', '.join(DATASETS)}")


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
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason})") from None
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
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - optional dependency
        raise MissingDependency("--data-source hf needs the `datasets` package: pip install 'ttq[online]'") from e
    path, cfg, test_split, calib_split, field = HF_SPLITS[name]
    split = calib_split if calibration else test_split
    if name == "c4":
        files = {"train": "en/c4-train.00000-of-01024.json.gz", "validation": "en/c4-validation.00000-of-00008.json.gz"}
        ds = datasets.load_dataset(path, data_files={split: files[split]}, split=split)
        ds = ds.select(range(min(len(ds), 1100 if not calibration else 5000)))
    else:
        ds = datasets.load_dataset(path, cfg, split=split)
    return list(ds[field])


def load_text(name: str, calibration: bool = False, data_dir=None, source: str = "local") -> str:
    """The joined evaluation (or calibration) text of dataset ``name``."""
    check_dataset(name)
    if source not in ("local", "hf"):
        raise ConfigError(f"unknown data source {source!r}; allowed: local, hf")
    if source == "hf":
        rows = _rows_from_hf(name, calibration)
    else:
        rows = _rows_from_file(name, resolve_file((CALIB_FILES if calibration else EVAL_FILES)[name], data_dir))
    text = _join(name, rows)
    if not text.strip():
        raise DataError(f"the {'calibration' if calibration else 'evaluation'} text of {name!r} is empty")
    return text


def check_disjoint(calib_text: str, eval_text: str, calib_name: str, eval_name: str, probes: int = 64) -> None:
    """Refuse calibration text that overlaps the evaluated text (probe chunks of 200 characters)."""
    if len(calib_text) < 400:
        chunks = [calib_text.strip()] if calib_text.strip() else []
    else:
        rng = random.Random(0)
        starts = [rng.randrange(0, len(calib_text) - 200) for _ in range(probes)]
        chunks = [calib_text[s : s + 200] for s in starts]
    hits = sum(1 for c in chunks if c and c in eval_text)
    if hits:
        raise DataError(
            f"calibration text {calib_name!r} overlaps the evaluation text {eval_name!r} "
            f"({hits}/{len(chunks)} probe passages found in it); calibrate on disjoint text"
        )
