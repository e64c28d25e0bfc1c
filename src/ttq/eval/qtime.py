"""Quantization time of each method on one model (issue 4): calibration + ``quantize_`` for
static methods, the extra forward time of quantizing at every prompt for test-time methods."""

from __future__ import annotations

import time

import torch

from ttq.calibrate import calibrate, calibration_tokens, config_p
from ttq.eval.table import Cell, forward_seconds
from ttq.patch.walker import quantize_, restore_


def is_test_time(model) -> bool:
    """Whether the quantized ``model`` has test-time layers (:func:`ttq.runtime.test_time_layers`)."""
    from ttq.runtime import test_time_layers

    return bool(test_time_layers(model))


def quantization_times(model, tokenizer, cells: list[Cell], window: torch.Tensor, repeats: int = 3,
                       eval_datasets: tuple[str, ...] = (), data_dir=None, source: str = "local") -> list[dict]:
    """One row per cell: ``calib_seconds`` (fresh, not from the disk cache; shared by cells with the
    same calibration spec and counted in each; for block-sequential configs the token windows only, their
    block-by-block calibration is part of ``quantize_``), ``quantize_seconds`` (``quantize_`` itself), and for
    test-time methods ``per_prompt_seconds`` = forward of ``window`` quantized minus an unquantized
    forward timed right after it (medians of ``repeats``; it can come out slightly negative when the
    cost is below the timing noise).  ``rss_start_mb`` / ``peak_rss_mb``: the process's resident memory when the
    row starts and its peak during the row's calibration and ``quantize_`` (Linux; the peak is reset per row
    where the kernel allows it, see :func:`ttq.eval.bench.reset_peak_rss`, else it is the process's peak so far)."""
    from ttq.eval.bench import current_rss_mb, peak_rss_mb, reset_peak_rss

    fp = forward_seconds(model, window, repeats)
    calib: dict = {}
    rows = []
    for cell in cells:
        cfg = cell.config
        row = {"method": cell.label, "bits": cell.bits, "group_size": cell.group_size, "calib_seconds": 0.0,
               "quantize_seconds": 0.0, "per_prompt_seconds": None, "fp_forward_seconds": fp, "seqlen": window.shape[1]}
        stats = None
        row["peak_reset"] = reset_peak_rss()
        row["rss_start_mb"] = current_rss_mb()
        if getattr(cfg, "sequential", False):  # block by block: the calibration runs inside quantize_
            t0 = time.perf_counter()
            stats = calibration_tokens(tokenizer, cfg.calib, eval_datasets=eval_datasets, data_dir=data_dir,
                                       source=source)
            row["calib_seconds"] = time.perf_counter() - t0
        elif cfg.needs_calibration:
            if cfg.calib not in calib:
                calib.clear()
                t0 = time.perf_counter()
                stats = calibrate(model, tokenizer, cfg.calib, p=config_p(cfg),
                                  eval_datasets=eval_datasets, data_dir=data_dir, source=source, model_key=None)
                calib[cfg.calib] = (stats, time.perf_counter() - t0)
            stats, row["calib_seconds"] = calib[cfg.calib]
        t0 = time.perf_counter()
        quantize_(model, cfg, calibration=stats)
        row["quantize_seconds"] = time.perf_counter() - t0
        row["peak_rss_mb"] = peak_rss_mb()
        try:
            q = forward_seconds(model, window, repeats) if is_test_time(model) else None
        finally:
            restore_(model, blocks_only=True)
        if q is not None:  # paired with an unquantized forward timed right after, so machine drift cancels
            row["fp_forward_seconds"] = forward_seconds(model, window, repeats)
            row["quantized_forward_seconds"] = q
            row["per_prompt_seconds"] = q - row["fp_forward_seconds"]
        row["total_seconds"] = row["calib_seconds"] + row["quantize_seconds"]
        rows.append(row)
    return rows


def _mb(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def markdown(rows: list[dict], model_key: str) -> str:
    seqlen = rows[0]["seqlen"] if rows else 0
    fp = rows[0]["fp_forward_seconds"] if rows else 0.0
    lines = [f"Model {model_key}; one unquantized forward of a {seqlen}-token window: {fp:.2f} s", "",
             "| Method | q | g | calibration s | quantize_ s | once, total s | per prompt of "
             f"{seqlen} tokens, s (forward quantized vs unquantized) | RSS at start MB | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pp = "-" if r["per_prompt_seconds"] is None else (
            f"{r['per_prompt_seconds']:.2f} ({r['quantized_forward_seconds']:.2f} vs {r['fp_forward_seconds']:.2f})")
        lines.append(f"| {r['method']} | {r['bits']} | {r['group_size']} | {r['calib_seconds']:.1f} | "
                     f"{r['quantize_seconds']:.2f} | {r['total_seconds']:.1f} | {pp} | {_mb(r.get('rss_start_mb'))} | "
                     f"{_mb(r.get('peak_rss_mb'))}{'' if r.get('peak_reset', True) else ' (process peak)'} |")
    return "\n".join(lines)
