"""Calibration for static methods (AWQ, GPTQ, ...): run calibration windows
through the unquantized model and keep per-layer statistics, cached on disk."""

from __future__ import annotations

import hashlib
import logging

import torch

from ttq.config import CalibSpec
from ttq.data import calibration_windows, check_dataset, check_disjoint, load_text, tokenize
from ttq.data.windows import cache_dir
from ttq.patch.capture import LayerCalib, collect_layer_stats
from ttq.patch.walker import block_linears

logger = logging.getLogger(__name__)


def config_p(config) -> float:
    """The l_p norm of a config's diagonal statistic (its ``scale.p``; 2 for configs without one, e.g. GPTQ)."""
    scale = getattr(config, "scale", None)
    return scale.p if scale is not None else 2.0


def _calib_text(calib: CalibSpec, eval_datasets: tuple[str, ...], data_dir, source: str) -> str:
    """The calibration text, refused if it overlaps any of ``eval_datasets``' evaluation texts."""
    check_dataset(calib.dataset)
    text = load_text(calib.dataset, calibration=True, data_dir=data_dir, source=source)
    for name in eval_datasets:
        check_disjoint(text, load_text(name, data_dir=data_dir, source=source), calib.dataset, name)
    return text


def calibration_tokens(
    tokenizer, calib: CalibSpec, eval_datasets: tuple[str, ...] = (), data_dir=None, source: str = "local"
) -> torch.Tensor:
    """The calibration windows of ``calib``: token ids (n_windows, seqlen), as :func:`calibrate` draws them.

    This is the ``calibration=`` of configs with ``sequential=True`` (block-by-block calibration).
    """
    ids = tokenize(tokenizer, _calib_text(calib, eval_datasets, data_dir, source))
    return calibration_windows(ids, calib.n_tokens, calib.seqlen, calib.seed)


def calibrate(
    model,
    tokenizer,
    calib: CalibSpec,
    p: float = 2.0,
    eval_datasets: tuple[str, ...] = (),
    data_dir=None,
    source: str = "local",
    model_key: str | None = None,
    progress: bool = False,
) -> dict[str, LayerCalib]:
    """Per-layer calibration statistics of ``calib`` for every decoder-block linear.

    Refuses calibration text that overlaps any of ``eval_datasets``' evaluation
    texts.  With ``model_key`` the result is cached under the ttq cache dir.
    """
    text = _calib_text(calib, eval_datasets, data_dir, source)
    path = None
    if model_key:
        key = hashlib.sha256(f"{model_key}|{calib}|{p}|{source}|{len(text)}".encode()).hexdigest()[:20]
        path = cache_dir() / "calib" / f"{model_key}-{calib.dataset}-{calib.n_tokens}-{key}.pt"
        if path.is_file():
            logger.info("calibration statistics from cache %s", path)
            return torch.load(path, weights_only=False)
    ids = tokenize(tokenizer, text)
    windows = calibration_windows(ids, calib.n_tokens, calib.seqlen, calib.seed)
    logger.info("calibrating on %s: %d windows of %d tokens", calib.dataset, *windows.shape)
    stats = collect_layer_stats(model, block_linears(model), windows, p, progress=progress)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(stats, path)
    return stats
