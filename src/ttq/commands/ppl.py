"""``ttq ppl``: the paper-style perplexity table (Tables 2-3)."""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
from pathlib import Path

from ttq.commands.common import (
    DTYPES, add_data_args, add_model_args, add_out_args, add_row_args, add_scale_args, load_kwargs,
    non_negative_int,
    positive_int, scale_from_args, str_list,
)

logger = logging.getLogger(__name__)

SUFFIXES = (".md", ".json", ".csv")
QUICK_WINDOWS = 4
QUICK_CALIB_TOKENS = 2**15


def _calib_list(s: str) -> list[tuple[str, int]]:
    """``"wikitext2,ptb,c4:2048,file:/x/legal.txt@4096"`` -> [(dataset, tokens)] (:func:`ttq.data.parse_calib`;
    default 2^17 tokens)."""
    from ttq.data import parse_calib
    from ttq.errors import ConfigError

    try:
        return [parse_calib(item) for item in str_list(s)]
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_parser(sub) -> None:

    p = sub.add_parser("ppl", help="perplexity table: FP / RTN / AWQ / TTQ over bits and group sizes",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(p, offload=True)
    add_row_args(p)
    p.add_argument("--datasets", type=str_list, default="wikitext2,ptb,c4",
                   help="evaluation texts: wikitext2, ptb, c4, file:PATH, jsonl:PATH:FIELD, hf:ID[:CONFIG[:SPLIT[:FIELD]]]")
    p.add_argument("--calib", type=_calib_list, default="c4",
                   help="AWQ calibration sets, SOURCE[@TOKENS] (any --datasets form; 2^17 tokens default; "
                        "the built-ins also DATASET:TOKENS)")
    p.add_argument("--config", action="append", default=[], metavar="LABEL=JSON",
                   help="extra row from any registered method's config dict, e.g. "
                        "'Prune 2:4={\"method\": \"prune\", \"n_m\": [2, 4]}' (repeatable; see ttq.METHODS)")
    p.add_argument("--symmetric", action="store_true", help="symmetric integer format (eqs. 29-30)")
    p.add_argument("--fmt", default="int", help="number format: int, nf4, fp4, nvfp4, mxfp4 (the last four are 4-bit)")
    p.add_argument("--bit-plan", action="append", default=[], metavar="[NAME=]PLAN.json",
                   help="mixed precision: also run every quantized row with the per-layer bits of this plan "
                        "(from `ttq allocate`; repeatable), labelled '<row> [NAME]' (NAME: the file's stem)")
    add_scale_args(p)
    p.add_argument("--lm-head-bits", type=non_negative_int, default=0,
                   help="pack the LM head with RTN at this many bits in every row, FP included (0 = keep it; not the paper's setting)")
    p.add_argument("--seqlen", type=positive_int, default=2048, help="window length (capped at the model's context)")
    p.add_argument("--held-out", type=positive_int, default=None, metavar="K",
                   help="score only the tokens after the first K of each window: TTQ rows quantize once from those K "
                        "tokens in prompt mode (packed weights, KV cache, as in generation) and never see a scored "
                        "token; every row scores the same tokens (default: the paper's protocol, all tokens, the "
                        "statistic includes them)")
    p.add_argument("--max-windows", type=non_negative_int, default=16, help="windows per dataset (0 = all)")
    p.add_argument("--quick", action="store_true",
                   help="a first look in minutes: 4 windows per dataset and calibration sets cut to 2^15 tokens "
                        "(the default is the paper's protocol: 16 windows, 2^17 calibration tokens)")
    add_data_args(p)
    add_out_args(p, "results/ppl", ".md/.csv/.json")
    p.add_argument("--cache", default="results/cache", help="folder of per-row cached results ('' disables)")
    p.add_argument("--overhead", action="store_true", help="also time one TTQ forward vs the unquantized forward")
    p.set_defaults(func=run)


def run(args) -> int:
    from ttq.data import check_dataset
    from ttq.errors import ConfigError
    from ttq.eval.table import build_cells, dataset_windows, forward_overhead, markdown_tables, row_line, run_cells
    from ttq.models import load_model, max_context, model_id
    from ttq.outputs import check_outputs, write_outputs

    if args.quick:
        args.max_windows = min(args.max_windows or QUICK_WINDOWS, QUICK_WINDOWS)
        args.calib = [(ds, min(n, QUICK_CALIB_TOKENS)) for ds, n in args.calib]
    for flag, names in (("--datasets", args.datasets), ("--calib", [c[0] for c in args.calib])):
        labels: dict[str, str] = {}
        for ds in names:
            label = check_dataset(ds).label  # before the model loads: the syntax, that a file: / jsonl: file exists
            if labels.setdefault(label, ds) != ds:
                raise ConfigError(f"{flag} {labels[label]} and {ds} would share the table label {label!r}; "
                                  "rename one of the files")
    extra = [_config_cell(item) for item in args.config]
    plans = _load_plans(args.bit_plan)
    check_outputs(args.out, SUFFIXES, args.overwrite)  # before an hour of work, not after
    model, tok = load_model(args.model, args.gguf_file, DTYPES[args.dtype], args.device, **load_kwargs(args))
    seqlen = min(args.seqlen, max_context(model))
    if args.held_out is not None and args.held_out >= seqlen:
        raise ConfigError(f"--held-out {args.held_out} leaves nothing to score in {seqlen}-token windows; "
                          f"give a prompt length in [1, {seqlen - 1}]")
    scale = scale_from_args(args)
    cells = build_cells(args.methods, args.bits, args.group_size, args.rank, args.calib, scale, seqlen, args.symmetric, args.fmt)
    cells += extra
    if plans:
        from ttq.eval.table import plan_cells
        from ttq.patch.blocks import block_linears
        from ttq.patch.experts import unfused

        with unfused(model):  # MoE: plans name each expert's linear
            linears = block_linears(model)
        _check_plans(plans, linears)
        cells += plan_cells(cells, plans)
    if not cells:
        raise ValueError("nothing to evaluate: --methods selected no rows")
    windows = dataset_windows(tok, args.datasets, seqlen, args.max_windows or None, args.data_dir, args.data_source)
    key = model_id(args.model, args.gguf_file)
    if args.lm_head_bits:
        from ttq.runtime import quantize_lm_head

        head = quantize_lm_head(model, bits=args.lm_head_bits, layout="u8")  # reference path: exact RTN head
        key += f"|lm_head-rtn{head.spec.bits}-g{head.spec.group_size}"  # its own cache rows
    print(_estimate(model, cells, windows, args), flush=True)
    results = run_cells(model, tok, key, cells, windows, Path(args.cache) if args.cache else None,
                        args.data_dir, args.data_source, on_row=lambda rows: print(row_line(rows), flush=True),
                        prompt_tokens=args.held_out)
    print()
    held = ("" if args.held_out is None else
            f", held-out: the first {args.held_out} tokens of each window are the prompt (TTQ rows quantize from "
            f"them in prompt mode), the other {seqlen - args.held_out} are scored")
    table = f"Model {key}, seqlen {seqlen}, scale {scale}{held}\n\n" + markdown_tables(results, args.datasets)
    if args.overhead:
        from ttq.config import TTQConfig
        from ttq.formats.affine import QuantSpec

        first = next(iter(windows.values()))[:1].to(args.device)
        for r in sorted(set(args.rank)):
            cfg = TTQConfig(quant=QuantSpec(bits=args.bits[0], group_size=args.group_size[0]), scale=scale, rank=r)
            o = forward_overhead(model, first, cfg)
            table += (f"\n\nCost: one TTQ (q={args.bits[0]}, g={args.group_size[0]}, r={r}) forward of a {o['seqlen']}-token "
                      f"window takes {o['quantized_seconds']:.2f} s vs {o['fp_seconds']:.2f} s unquantized "
                      f"(ratio {o['ratio']:.2f}, reference PyTorch path, median of 3)")
    print(table)
    rows = io.StringIO()
    w = csv.DictWriter(rows, fieldnames=["method", "bits", "group_size", "dataset", "ppl", "nll", "n_windows", "n_tokens",
                                         "seconds"], extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(results)
    write_outputs(args.out, {".md": table + "\n", ".json": json.dumps(results, indent=1), ".csv": rows.getvalue()},
                  args.overwrite)
    return 0


def _config_cell(item: str):
    """``LABEL=JSON`` -> a table cell for any registered method."""
    from ttq.config import config_from_dict
    from ttq.eval.table import Cell

    label, sep, blob = item.partition("={")  # labels may contain "=" (e.g. "r=16"); the JSON starts at "{"
    blob = "{" + blob
    if not sep or not label.strip():
        raise ValueError(f"--config expects LABEL=JSON, got {item!r}")
    try:
        cfg = config_from_dict(json.loads(blob))
    except json.JSONDecodeError as e:
        raise ValueError(f"--config {label!r}: invalid JSON ({e})") from None
    quant = getattr(cfg, "quant", None)
    return Cell(label.strip(), quant.bits if quant else None, quant.group_size if quant else None, cfg)


def _load_plans(items: list[str]) -> dict:
    """``[NAME=]PATH`` entries -> ``{name: BitPlan}`` (JSON files from ``ttq allocate``)."""
    from ttq.errors import ConfigError, DataNotFoundError
    from ttq.methods.allocation import BitPlan

    plans = {}
    for item in items:
        name, sep, path = item.rpartition("=") if "=" in item else ("", "", item)
        name = name if sep else Path(path).stem
        if name in plans:
            raise ConfigError(f"two --bit-plan entries are named {name!r}; name them NAME=PATH")
        if not Path(path).is_file():
            raise DataNotFoundError(f"--bit-plan {path!r}: no such file (make one with `ttq allocate ... --out PLAN`)")
        try:
            plans[name] = BitPlan.load(path)
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"--bit-plan {path!r} is not a bit plan written by `ttq allocate` ({e})") from None
    return plans


def _check_plans(plans: dict, linears: dict) -> None:
    """Every layer a plan names must be a linear layer of this model's blocks; layers it leaves out keep the
    row's own bits (with a warning)."""
    from ttq.errors import ConfigError

    for name, plan in plans.items():
        stray = [n for n in plan.bits if n.removesuffix(".weight") not in linears]
        if stray:
            raise ConfigError(f"bit plan {name!r} names {len(stray)} layer(s) this model does not have (e.g. "
                              f"{stray[0]!r}); was it made for another model?")
        missing = [n for n in linears if n not in plan.bits and f"{n}.weight" not in plan.bits]
        if missing:
            logger.warning("bit plan %r leaves %d layer(s) out (e.g. %s): they keep the row's own bits", name,
                           len(missing), missing[0])



def _estimate(model, cells, windows: dict, args) -> str:
    """One line before the work starts: rows x windows, the calibration, and the time that takes on this
    machine (from one timed forward of one window; cached rows are skipped, so it is an upper bound)."""
    import time

    import torch

    from ttq.offload import execution_device

    first = next(iter(windows.values()))[:1]
    device = execution_device(model)
    with torch.no_grad():
        t0 = time.perf_counter()
        model(first.to(device), use_cache=False, logits_to_keep=1)
        t = time.perf_counter() - t0
    n_win = sum(int(w.shape[0]) for w in windows.values())
    seqlen = int(first.shape[1])
    calib = {c.config.calib for c in cells if c.config is not None and getattr(c.config, "needs_calibration", False)}
    calib_fw = sum(max(1, spec.n_tokens // spec.seqlen) for spec in calib)
    seconds = t * (len(cells) * n_win + calib_fw)
    line = (f"Work: {len(cells)} rows x {n_win} windows of {seqlen} tokens"
            + (f" + {len(calib)} calibration set(s) ({calib_fw} windows)" if calib else "")
            + f": about {seconds / 60:.0f} min at {t:.1f} s per window forward here, without cached rows "
            "(searches and test-time quantization add to it); each row prints as it finishes, Ctrl-C keeps finished rows.")
    if not args.quick and seconds > 600:
        line += f" A first look in minutes: --quick ({QUICK_WINDOWS} windows, 2^15 calibration tokens)."
    return line
