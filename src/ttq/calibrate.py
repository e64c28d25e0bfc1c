"""Calibration for static methods (AWQ, GPTQ, ...): run calibration windows
through the unquantized model and keep per-layer statistics, cached on disk."""

from __future__ import annotations

import dataclasses
import json
import logging

import torch

from ttq.cache import (
    cache_root, code_fingerprint, digest, load_tensors, locked, model_fingerprint, save_tensors, tokenizer_fingerprint,
    writable,
)
from ttq.data.windows import CalibSpec
from ttq.data import calibration_windows, check_dataset, check_disjoint, load_text, tokenize
from ttq.methods.scaling import ChannelStats
from ttq.patch.capture import LayerCalib, collect_layer_stats
from ttq.patch.blocks import block_linears
from ttq.patch.experts import unfused

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
    texts.  With ``model_key`` (a readable name) the result is cached under the ttq cache dir as
    safetensors, keyed by the model's weights, the calibration spec, ``p``, the calibration text and
    the tokenizer (:mod:`ttq.cache`); a concurrent run computing the same entry is waited for.
    """
    text = _calib_text(calib, eval_datasets, data_dir, source)
    folder = writable(cache_root() / "calib", "calibration") if model_key else None
    if folder is None:
        return _collect(model, tokenizer, text, calib, p, progress)
    key = digest(code_fingerprint(), model_fingerprint(model), json.dumps(dataclasses.asdict(calib), sort_keys=True),
                 repr(float(p)), source, digest(text), tokenizer_fingerprint(tokenizer))
    path = folder / f"{_safe_name(model_key)}-{_safe_name(calib.dataset)}-{calib.n_tokens}-{key}.safetensors"
    with locked(path):
        if path.is_file():
            stats = _load_stats(path)
            if stats is not None:
                logger.info("calibration statistics from cache %s", path)
                return stats
        stats = _collect(model, tokenizer, text, calib, p, progress)
        _save_stats(path, stats)
    return stats


def _collect(model, tokenizer, text: str, calib: CalibSpec, p: float, progress: bool) -> dict[str, LayerCalib]:
    ids = tokenize(tokenizer, text)
    windows = calibration_windows(ids, calib.n_tokens, calib.seqlen, calib.seed)
    logger.info("calibrating on %s: %d windows of %d tokens", calib.dataset, *windows.shape)
    with unfused(model):  # MoE experts: one linear per expert, each sees the tokens routed to it
        return collect_layer_stats(model, block_linears(model), windows, p, progress=progress)


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:80]


def _save_stats(path, stats: dict[str, LayerCalib]) -> None:
    """``{layer: LayerCalib}`` as safetensors (identical statistics of layers that share an input stored once)."""
    tensors, meta = {}, {}
    for name, lc in stats.items():
        tensors[f"{name}/sum_abs_p"] = lc.stats.sum_abs_p
        tensors[f"{name}/gram"] = lc.gram
        meta[name] = {"n_tokens": lc.stats.n_tokens, "p": lc.stats.p}
    save_tensors(path, tensors, {"ttq.layers": json.dumps(meta)})


def _load_stats(path) -> dict[str, LayerCalib] | None:
    loaded = load_tensors(path)
    if loaded is None:
        return None
    tensors, meta = loaded
    try:
        layers = json.loads(meta["ttq.layers"])
        return {
            name: LayerCalib(ChannelStats(tensors[f"{name}/sum_abs_p"], int(m["n_tokens"]), float(m["p"])),
                             tensors[f"{name}/gram"])
            for name, m in layers.items()
        }
    except (KeyError, ValueError, TypeError) as e:
        logger.warning("ignoring malformed calibration cache %s (%s); recomputing", path, e)
        return None
