"""Tokenized windows: non-overlapping evaluation windows and random calibration windows."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ttq.data.texts import parse_source
from ttq.errors import DataError
from ttq.typecheck import check_types

logger = logging.getLogger(__name__)

C4_EVAL_WINDOWS = 256  # GPTQ cuts the joined C4 validation text to 256 x seqlen tokens


def tokenize(tokenizer, text: str, cache: bool = True) -> torch.Tensor:
    """Token ids (1-D int64) of ``text``, cached on disk (safetensors) by tokenizer definition and text hash."""
    from ttq.cache import (
        cache_root, code_fingerprint, digest, load_tensors, save_tensors, tokenizer_fingerprint, writable,
    )

    folder = writable(cache_root() / "tokens", "token") if cache else None
    key = digest(code_fingerprint(), tokenizer_fingerprint(tokenizer), text)
    path = folder / f"{key}.safetensors" if folder else None
    if path is not None and path.is_file():
        loaded = load_tensors(path)
        if loaded is not None and "ids" in loaded[0]:
            return loaded[0]["ids"]
    ids = torch.tensor(tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long)
    if path is not None:
        save_tensors(path, {"ids": ids})
    return ids


def eval_windows(
    ids: torch.Tensor, seqlen: int, max_windows: int | None = None, max_tokens: int | None = None, name: str = "text"
) -> torch.Tensor:
    """Non-overlapping windows (n, seqlen) from the start of ``ids``.

    Args:
        ids: 1-D token ids.
        seqlen: window length.
        max_windows: keep only the first windows (quick runs).
        max_tokens: cut ``ids`` first (C4: 256 x seqlen).
        name: the text's name in the error raised when it is shorter than one window.
    """
    if seqlen <= 1:
        raise ValueError(f"seqlen must be at least 2, got {seqlen}")
    if max_windows is not None and max_windows <= 0:
        raise ValueError(f"max_windows must be positive, got {max_windows}")
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n = ids.numel() // seqlen
    if n == 0:
        raise DataError(f"{name} has {ids.numel()} tokens, fewer than one window of {seqlen} (--seqlen): it needs at "
                        f"least {seqlen} tokens; give a longer text or a smaller --seqlen")
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[: n * seqlen].reshape(n, seqlen)  # (n*seqlen,) -> (n, seqlen)


def calibration_windows(ids: torch.Tensor, n_tokens: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``ceil(n_tokens / seqlen)`` distinct windows drawn at random from the non-overlapping
    window grid of ``ids`` (C4 train documents are mostly shorter than 2048 tokens, so
    GPTQ's one-document-per-window rule is replaced by windows of the joined text).
    When ``n_tokens < seqlen`` one window of ``n_tokens`` tokens is returned."""
    if n_tokens <= 0:
        raise ValueError(f"calibration length must be positive, got {n_tokens} tokens")
    width = min(seqlen, n_tokens)
    grid = ids.numel() // width
    need = -(-n_tokens // width)
    if grid == 0:
        raise DataError(f"calibration text has {ids.numel()} tokens, fewer than one window of {width}: it needs at "
                        f"least {width} tokens; give a longer text or a smaller --seqlen")
    g = torch.Generator().manual_seed(seed)
    if need <= grid:
        pick = torch.randperm(grid, generator=g)[:need]
        return ids[: grid * width].reshape(grid, width)[pick]  # (need, width)
    # text shorter than the request: GPTQ-style random (overlapping) start offsets
    logger.warning("calibration text has %d tokens < %d requested: drawing %d overlapping windows", ids.numel(), n_tokens, need)
    starts = torch.randperm(ids.numel() - width + 1, generator=g)[:need]
    return torch.stack([ids[s : s + width] for s in starts.tolist()])  # (need, width)


@dataclass(frozen=True)
class CalibSpec:
    """Calibration data for static methods.

    Args:
        dataset: one of ``ttq.data.DATASETS`` (wikitext2 / ptb / c4) or your own text: ``file:PATH``,
            ``jsonl:PATH:FIELD``, ``hf:ID[:CONFIG[:SPLIT[:FIELD]]]`` (:func:`ttq.data.texts.parse_source`).
        n_tokens: calibration length in tokens (the paper uses up to 2**17).
        seqlen: window length of the calibration forwards.
        seed: seed of the random window draw.
    """

    dataset: str = "c4"
    n_tokens: int = 2**17
    seqlen: int = 2048
    seed: int = 0

    def __post_init__(self) -> None:
        check_types(self)
        parse_source(self.dataset)  # the syntax only: a config may be built where the file is not
        if self.n_tokens <= 0:
            raise ValueError(f"calibration n_tokens must be a positive integer, got {self.n_tokens!r}")
        if self.seqlen <= 0:
            raise ValueError(f"calibration seqlen must be a positive integer, got {self.seqlen!r}")
