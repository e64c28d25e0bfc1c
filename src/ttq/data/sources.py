"""Readers of your own texts: a UTF-8 text file, a JSON-lines file, a Hugging Face dataset.

Each reader returns one joined text and refuses, with a :mod:`ttq.errors` error that names
the source (``spec``, as the user wrote it) and the place, what cannot be evaluated: a file
that is not there, empty, whitespace only, binary, not UTF-8 (the byte offset and line), a
JSON line that does not parse or lacks the field (the line number).  Which name maps to which
reader is :func:`ttq.data.texts.parse_source`.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from ttq.errors import DataError, DataNotFoundError, MissingDependency

logger = logging.getLogger(__name__)

JOIN = "\n\n"  # jsonl rows and hf rows are joined by a blank line (documents stay apart)
_UTF8_BOM = b"\xef\xbb\xbf"
_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean",
               type(None): "null"}


def check_file(path: str, spec: str) -> Path:
    """``path`` (``~`` expanded) if it is a file, else :class:`DataNotFoundError` naming ``spec``."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        raise DataNotFoundError(f"{spec}: {p} is a directory; give a text file")
    hint = ""
    m = re.fullmatch(r"(.*):(\d+)", path)
    if m and Path(m.group(1)).expanduser().is_file():  # "file:x.txt:4096": the --calib token count is @TOKENS
        hint = f" (a calibration length is written SOURCE@TOKENS: {spec[: -len(m.group(2)) - 1]}@{m.group(2)})"
    raise DataNotFoundError(f"{spec}: no such file {p}{hint}")


def decode_utf8(data: bytes, where: str) -> str:
    """``data`` as UTF-8 text (a leading byte-order mark dropped), or a :class:`DataError` that says why not:
    a NUL byte (binary data, or UTF-16) or an undecodable byte, with its byte offset and line."""
    nul = data.find(b"\x00")
    if nul >= 0:
        utf16 = data[:2] in (b"\xff\xfe", b"\xfe\xff")
        kind = "UTF-16 text; convert it to UTF-8" if utf16 else "a binary file?"
        raise DataError(f"{where}: not text: a NUL byte at byte offset {nul} ({kind}); ttq reads UTF-8 text")
    skip = len(_UTF8_BOM) if data.startswith(_UTF8_BOM) else 0
    try:
        return data[skip:].decode("utf-8")
    except UnicodeDecodeError as e:
        off = skip + e.start
        line = data.count(b"\n", 0, off) + 1
        raise DataError(
            f"{where}: not UTF-8 text: byte 0x{data[off]:02x} at byte offset {off} (line {line}) {e.reason}; "
            "convert it, e.g. `iconv -f latin1 -t utf-8 IN > OUT`"
        ) from None


def _read(path: str, spec: str) -> str:
    """The text of a local file, refused when empty, binary, not UTF-8 or whitespace only."""
    p = check_file(path, spec)
    data = p.read_bytes()
    if not data:
        raise DataError(f"{spec}: {p} is empty (0 bytes)")
    text = decode_utf8(data, spec)
    if not text.strip():
        raise DataError(f"{spec}: {p} holds only whitespace ({len(data)} bytes), no text")
    return text


def read_text_file(path: str, spec: str) -> str:
    """``file:PATH``: the whole file, as is (line breaks kept), for evaluation and calibration alike."""
    return _read(path, spec)


def read_jsonl(path: str, field: str, spec: str) -> str:
    """``jsonl:PATH:FIELD``: the string ``FIELD`` of each line's JSON object, joined by a blank line.

    Blank lines and rows whose text is blank are skipped; any other line must be an object holding a
    string ``FIELD``."""
    rows = []
    for i, line in enumerate(_read(path, spec).split("\n"), 1):  # "\n" only: JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{spec}: line {i} is not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise DataError(f"{spec}: line {i} is a JSON {_JSON_TYPES.get(type(row), type(row).__name__)}, "
                            f"not an object with a field {field!r}")
        if field not in row:
            have = ", ".join(repr(k) for k in list(row)[:8]) or "none"
            raise DataError(f"{spec}: line {i} has no field {field!r} (its fields: {have}); "
                            "name the text field with jsonl:PATH:FIELD")
        value = row[field]
        if not isinstance(value, str):
            raise DataError(f"{spec}: line {i}: field {field!r} is a JSON "
                            f"{_JSON_TYPES.get(type(value), type(value).__name__)}, not a string")
        if value.strip():
            rows.append(value)
    if not rows:
        raise DataError(f"{spec}: no line has text in field {field!r}")
    return JOIN.join(rows)


def require_datasets(where: str) -> None:
    """:class:`MissingDependency` unless the ``datasets`` package is installed (checked before a model loads)."""
    try:
        import datasets  # noqa: F401
    except ImportError as e:
        raise MissingDependency(f"{where}: Hugging Face datasets need the `datasets` package: pip install "
                                "'ttq[online]' (offline, save the text and use file:PATH or jsonl:PATH:FIELD)") from e


def load_hf_rows(
    dataset_id: str, config: str | None, split: str, field: str, where: str, data_files: dict | None = None,
    limit: int | None = None,
) -> list[str]:
    """The ``field`` column of a Hugging Face dataset split (needs the ``datasets`` package and internet).

    Args:
        dataset_id, config, split: what ``datasets.load_dataset`` loads (``config`` None: the default).
        field: the text column.
        where: the name to put in error messages (e.g. ``hf:owner/name``).
        data_files: passed on (the built-in C4 names one shard).
        limit: keep the first rows only.
    """
    require_datasets(where)
    import datasets

    what = f"{dataset_id!r}" + (f" config {config!r}" if config else "") + f" split {split!r}"
    try:
        if data_files is not None:
            ds = datasets.load_dataset(dataset_id, data_files=data_files, split=split)
        else:
            ds = datasets.load_dataset(dataset_id, config, split=split)
    except Exception as e:  # noqa: BLE001 - offline, unknown id/config/split: `datasets` raises many types
        reason = str(e).strip().split("\n")[0][:300]
        raise DataNotFoundError(
            f"{where}: could not load Hugging Face dataset {what} ({type(e).__name__}: {reason}); "
            "hf: sources need internet (or a copy in the datasets cache with HF_DATASETS_OFFLINE=1); "
            "offline, save the text and use file:PATH or jsonl:PATH:FIELD"
        ) from None
    if field not in ds.column_names:
        raise DataError(f"{where}: dataset {what} has no field {field!r}; its fields: {', '.join(ds.column_names)}")
    if limit is not None:
        ds = ds.select(range(min(len(ds), limit)))
    rows = ds[field]
    if rows and not isinstance(rows[0], str):
        raise DataError(f"{where}: field {field!r} of {what} holds {type(rows[0]).__name__}, not text")
    return list(rows)


def read_hf(dataset_id: str, config: str, split: str, field: str, spec: str) -> str:
    """``hf:ID[:CONFIG[:SPLIT[:FIELD]]]``: the non-blank ``field`` rows of one split, joined by a blank line."""
    rows = [r for r in load_hf_rows(dataset_id, config or None, split, field, spec) if r.strip()]
    if not rows:
        raise DataError(f"{spec}: split {split!r} has no text in field {field!r}")
    return JOIN.join(rows)
