"""Paper-style perplexity tables (TTQ paper, Tables 2-3), resumable.

A table is a list of :class:`Cell` (row label, bits, group size, method config);
every (cell, dataset) result is cached as JSON, so a long table can be
completed across several runs with the same arguments.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ttq import runtime
from ttq.cache import code_fingerprint, digest, model_fingerprint, tensor_digest, writable, write_bytes
from ttq.calibrate import calibrate, calibration_tokens, config_p
from ttq.config import CalibSpec, config_to_dict
from ttq.data import C4_EVAL_WINDOWS, dataset_label, eval_windows, load_text, tokenize
from ttq.eval.ppl import perplexity
from ttq.formats.affine import QuantSpec
from ttq.methods.scaling import ScaleSpec
from ttq.options import current as current_options
from ttq.errors import ConfigError
from ttq.patch.walker import quantize_, restore_
from ttq.registry import RowOptions, row_names, table_rows

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class Cell:
    label: str  # row label, e.g. "TTQ (r=16)"
    bits: int | float | None  # None for the unquantized model; a plan's average bits for mixed precision
    group_size: int | None
    config: Any = None  # method config; None = full precision
    plan: Any = None  # a ttq.methods.allocation.BitPlan: per-layer bits replace the config's (mixed precision)


def with_bits(config: Any, bits: int) -> Any:
    """``config`` with its format's bits replaced (every method config holds its format in ``quant``)."""
    if getattr(config, "quant", None) is None:
        raise ConfigError(f"method {config.name!r} has no format (quant) to give per-layer bits to")
    return dataclasses.replace(config, quant=dataclasses.replace(config.quant, bits=bits))


def plan_cells(cells: list[Cell], plans: dict[str, Any]) -> list[Cell]:
    """One mixed-precision cell per (quantized cell, plan): the cell's method with each layer at the plan's
    bits, labelled ``"<label> [<plan name>]"``, in the column of the plan's parameter-weighted average bits."""
    out, seen = [], set()
    for name, plan in plans.items():
        avg = round(plan.avg_bits_params, 3)
        for c in cells:
            key = (c.label, c.group_size, name)  # the plan sets every layer's bits: one cell per row and group size
            if c.config is not None and key not in seen:
                seen.add(key)
                out.append(Cell(f"{c.label} [{name}]", avg, c.group_size, c.config, plan))
    return out


def method_choices() -> tuple[str, ...]:
    """``fp`` and every registered method's table rows (:func:`ttq.registry.row_names`)."""
    return ("fp", *row_names())


def build_cells(
    methods: list[str],
    bits: list[int],
    group_sizes: list[int],
    ranks: list[int],
    calib: list[tuple[str, int]],
    scale: ScaleSpec,
    seqlen: int,
    symmetric: bool = False,
    fmt: str = "int",
) -> list[Cell]:
    """Cells in the registry's row order (the paper's for the built-ins: FP, RTN, calibrated baselines
    per calibration set, on-the-fly AWP, TTQ per rank, then the other methods); each method's rows come
    from :func:`ttq.registry.table_rows`."""
    allowed = method_choices()
    for m in methods:
        if m not in allowed:
            raise ConfigError(f"unknown method {m!r}; allowed: {', '.join(allowed)}")
    cells = [Cell("FP", None, None)] if "fp" in methods else []
    calibs = tuple(CalibSpec(dataset=ds, n_tokens=n, seqlen=seqlen) for ds, n in calib)
    for g in group_sizes:
        for q in bits:
            options = RowOptions(QuantSpec(bits=q, group_size=g, symmetric=symmetric, fmt=fmt), scale,
                                 tuple(ranks), calibs)
            for name in allowed[1:]:
                if name in methods:
                    cells += [Cell(label, q, g, cfg) for label, cfg in table_rows(name, options)]
    return cells


def _key(model_key: str, cell: Cell, dataset: str, windows: torch.Tensor, source: str,
         prompt_tokens: int | None = None) -> str:
    """Cache key of one (cell, dataset) row: the model (its name and weights fingerprint), the method
    config (and a bit plan's per-layer bits), the evaluated token ids themselves (so a changed text,
    tokenizer or window count is a new row) and the held-out prompt length, if any, with the process options
    (:mod:`ttq.options`: float16 scale / zero or the reference layout change prompt mode's packed weights)."""
    cfg = config_to_dict(cell.config) if cell.config is not None else {"method": "fp"}
    if cell.plan is not None:
        cfg = {**cfg, "bit_plan": dict(sorted(cell.plan.bits.items()))}
    parts = [model_key, cfg, dataset, list(windows.shape), tensor_digest(windows), source]
    if prompt_tokens is not None:  # appended only then: the paper-protocol rows keep their keys
        parts.append({"held_out_prompt_tokens": prompt_tokens, "options": dataclasses.asdict(current_options())})
    blob = json.dumps(parts, sort_keys=True)
    return digest(blob)


def _cached_row(path: Path | None) -> dict | None:
    """A cached row, or None when absent or unreadable (recomputed)."""
    if path is None or not path.is_file():
        return None
    try:
        row = json.loads(path.read_text())
        if isinstance(row, dict) and isinstance(row.get("ppl"), (int, float)):
            return row
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        pass
    logger.warning("ignoring unreadable cached row %s; recomputing", path)
    return None


def dataset_windows(tokenizer, datasets, seqlen, max_windows, data_dir=None, source="local") -> dict[str, torch.Tensor]:
    out = {}
    for ds in datasets:
        ids = tokenize(tokenizer, load_text(ds, data_dir=data_dir, source=source))
        cut = C4_EVAL_WINDOWS * seqlen if ds == "c4" else None
        out[ds] = eval_windows(ids, seqlen, max_windows=max_windows, max_tokens=cut, name=ds)
    return out


def run_cells(
    model,
    tokenizer,
    model_key: str,
    cells: list[Cell],
    windows: dict[str, torch.Tensor],
    cache: Path | None = None,
    data_dir=None,
    source: str = "local",
    progress: bool = True,
    on_row=None,
    prompt_tokens: int | None = None,
) -> list[dict]:
    """Evaluate every cell on every dataset; one result dict per (cell, dataset).

    ``prompt_tokens``: held-out scoring (:mod:`ttq.eval.ppl`): the first ``prompt_tokens`` of each window are a
    prompt that TTQ rows quantize from in prompt mode, the rest are scored.

    ``on_row(rows)``, when given, is called with a cell's rows (one per dataset) as soon as the cell is done
    (cached or computed), so a long table can show each row at once.
    """
    results = []
    calib_cache: dict[CalibSpec, dict] = {}
    cache = writable(cache, "result") if cache else None
    cache_key = f"{model_key}|{model_fingerprint(model)}|{code_fingerprint()}" if cache else model_key
    for cell in cells:
        todo, done = [], {}
        for ds, win in windows.items():
            path = cache / f"{_key(cache_key, cell, ds, win, source, prompt_tokens)}.json" if cache else None
            row = _cached_row(path)
            if row is not None:
                done[ds] = {**row, "method": cell.label}  # same config, maybe another label
            else:
                todo.append((ds, win, path))
        if todo:
            _evaluate_cell(model, tokenizer, model_key, cell, todo, done, calib_cache, windows, data_dir, source, progress,
                           prompt_tokens)
        for ds in windows:
            results.append(done[ds])
        if on_row is not None:
            on_row([done[ds] for ds in windows])
        logger.info("%s q=%s g=%s: %s", cell.label, cell.bits, cell.group_size, {d: round(done[d]["ppl"], 2) for d in windows})
    return results


def _evaluate_cell(model, tokenizer, model_key, cell, todo, done, calib_cache, windows, data_dir, source, progress,
                   prompt_tokens=None):
    calibration = None
    cfg = cell.config
    if cfg is not None and getattr(cfg, "sequential", False):  # block-by-block: quantize_ takes the token windows
        calibration = calibration_tokens(tokenizer, cfg.calib, eval_datasets=tuple(windows), data_dir=data_dir, source=source)
    elif cfg is not None and getattr(cfg, "needs_calibration", False):
        if cfg.calib not in calib_cache:
            calib_cache.clear()  # keep one set in memory
            calib_cache[cfg.calib] = calibrate(
                model, tokenizer, cfg.calib, p=config_p(cfg), eval_datasets=tuple(windows), data_dir=data_dir,
                source=source, model_key=model_key, progress=progress,
            )
        calibration = calib_cache[cfg.calib]
    t0 = time.perf_counter()
    if cfg is not None:
        overrides = None
        if cell.plan is not None:
            from ttq.methods.allocation import plan_overrides

            overrides = plan_overrides(cell.plan, lambda b: with_bits(cfg, b))
        quantize_(model, cfg, calibration=calibration, overrides=overrides, progress=progress)
    t_quant = time.perf_counter() - t0
    try:
        if prompt_tokens is not None and runtime.ttq_layers(model):
            runtime.set_mode(model, "prompt")  # quantized once from each window's prompt (restore_ drops it)
        for ds, win, path in todo:
            for m in model.modules():  # stateful layers (online low-rank, prompt mode) start fresh per dataset
                if m is not model and callable(getattr(m, "reset", None)) and hasattr(m, "original"):
                    m.reset()
            res = perplexity(model, win, progress=progress, desc=f"{cell.label} q={cell.bits} {ds}",
                             prompt_tokens=prompt_tokens)
            row = {
                "method": cell.label, "bits": cell.bits, "group_size": cell.group_size, "dataset": ds,
                **res.to_dict(), "quantize_seconds": t_quant,
                "config": config_to_dict(cfg) if cfg is not None else {"method": "fp"},
            }
            done[ds] = row
            if path is not None:
                write_bytes(path, json.dumps(row, indent=1).encode())
    finally:
        restore_(model, blocks_only=True)


def row_line(rows: list[dict]) -> str:
    """One finished row as a line: ``RTN q=3 g=32: WT2 83.71 | PTB 220.63 | C4 102.76 | avg 135.70``."""
    r0 = rows[0]
    fmt = "" if r0["bits"] is None else f" q={r0['bits']} g={r0['group_size']}"
    vals = [f"{dataset_label(r['dataset'])} {fmt_ppl(r['ppl'])}" for r in rows]
    avg = sum(r["ppl"] for r in rows) / len(rows)
    return f"{r0['method']}{fmt}: " + " | ".join(vals) + (f" | avg {fmt_ppl(avg)}" if len(rows) > 1 else "")


def fmt_ppl(x: float) -> str:
    if not math.isfinite(x):
        return "inf"
    return f"{x:.3g}" if x >= 1e4 else f"{x:.2f}"


def markdown_tables(results: list[dict], datasets: list[str]) -> str:
    """Summary (average over datasets per bits/group) and per-dataset detail, in markdown."""
    cols = sorted({(r["group_size"], r["bits"]) for r in results if r["bits"] is not None},
                  key=lambda c: (c[0] if c[0] != -1 else float("inf"), c[1]))  # per-channel (-1) last
    labels = list(dict.fromkeys(r["method"] for r in results))
    by = {(r["method"], r["bits"], r["group_size"], r["dataset"]): r for r in results}

    def avg(label, q, g):
        vals = [by[(label, q, g, d)]["ppl"] for d in datasets if (label, q, g, d) in by]
        return sum(vals) / len(vals) if len(vals) == len(datasets) else None

    nwin = ", ".join(f"{dataset_label(d)} {next(r['n_windows'] for r in results if r['dataset'] == d)}"
                     for d in datasets)
    lines = [f"Average perplexity over {'/'.join(dataset_label(d) for d in datasets)} (windows: {nwin})", ""]
    head = ["Method"] + [f"q={q} g={g}" for g, q in cols]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label in labels:
        if label == "FP":
            fp = avg("FP", None, None)
            detail = ", ".join(f"{dataset_label(d)}: {fmt_ppl(by[('FP', None, None, d)]['ppl'])}" for d in datasets)
            lines.insert(0, f"FP ({detail}, Avg: {fmt_ppl(fp)})")
            continue
        cells = [avg(label, q, g) for g, q in cols]
        lines.append("| " + " | ".join([label] + ["" if c is None else fmt_ppl(c) for c in cells]) + " |")
    lines += ["", "Per dataset", ""]
    head = ["Method", "q", "g"] + [dataset_label(d) for d in datasets] + ["Avg"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g, q in [(None, None)] + cols:
        for label in labels:
            rowv = [by.get((label, q, g, d)) for d in datasets]
            if any(v is None for v in rowv):
                continue
            a = avg(label, q, g)
            lines.append("| " + " | ".join([label, str(q or "-"), str(g or "-")] + [fmt_ppl(v["ppl"]) for v in rowv] + [fmt_ppl(a)]) + " |")
    return "\n".join(lines)


@torch.no_grad()
def forward_seconds(model, window: torch.Tensor, repeats: int = 3) -> float:
    """Median wall time of ``repeats`` forwards of ``window`` (1, seqlen), after one warm-up forward
    (which also does any lazy setup of test-time methods)."""
    model(window, use_cache=False)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(window, use_cache=False)
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]


def forward_overhead(model, window: torch.Tensor, config, repeats: int = 3) -> dict:
    """Median wall time of one forward of ``window`` (1, seqlen): unquantized vs quantized with ``config``."""
    fp = forward_seconds(model, window, repeats)
    quantize_(model, config)
    try:
        q = forward_seconds(model, window, repeats)
    finally:
        restore_(model, blocks_only=True)
    return {"fp_seconds": fp, "quantized_seconds": q, "ratio": q / fp, "seqlen": window.shape[1]}
