"""``ttq domain``: calibration-length table (paper Table 1) and the cross-domain table."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from ttq.commands.common import (
    DTYPES, add_data_args, add_model_args, add_out_args, add_scale_args, group_size_arg, int_list, non_negative_int,
    positive_int, scale_from_args, seqlen_arg, str_list,
)
from ttq.errors import ConfigError

logger = logging.getLogger(__name__)

SUFFIXES = (".md", ".json")
MAX_EXPONENT = 1024  # 2^K parses only up to here (a huge K would take the memory of the integer itself)


def _exponent(text: str) -> int:
    k = int(text)
    if not 0 <= k <= MAX_EXPONENT:
        raise argparse.ArgumentTypeError(f"exponent K of 2^K must be in 0..{MAX_EXPONENT}, got {k}")
    return k


def _lengths(s: str) -> list[int]:
    """``"11-17"`` (powers of two), ``"2^11,2^13"`` or plain token counts ``"2048,8192"``."""
    out = []
    for item in str_list(s):
        try:
            if "-" in item:
                lo, hi = (_exponent(v) for v in item.split("-"))
                if lo > hi:
                    raise argparse.ArgumentTypeError(f"calibration lengths {item!r}: K1-K2 needs K1 <= K2")
                out += [2**k for k in range(lo, hi + 1)]
            elif item.startswith("2^"):
                out.append(2 ** _exponent(item[2:]))
            else:
                out.append(int(item))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"calibration length {item!r} is not N, 2^K or K1-K2 (exponents)"
            ) from None
        if out[-1] < 1:
            raise argparse.ArgumentTypeError(f"calibration lengths must be positive token counts, got {item!r}")
    if not out:
        raise argparse.ArgumentTypeError(f"no calibration length in {s!r}")
    return out


def add_parser(sub) -> None:
    p = sub.add_parser(
        "domain",
        help="calibration-length (Table 1) and cross-domain tables: AWQ vs TTQ",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_args(p)
    p.add_argument("--bits", type=positive_int, default=3, help="2..8")
    p.add_argument("--group-size", type=group_size_arg, default=32, help="-1 = per output channel")
    p.add_argument("--rank", type=int_list, default="0,16", help="TTQ low-rank r values")
    p.add_argument("--calib", default="c4", help="AWQ calibration set of the length table")
    p.add_argument(
        "--lengths", type=_lengths, default="11-17",
        help="calibration lengths: K1-K2 (2^K1..2^K2), 2^K or tokens; at most twice the calibration text's tokens",
    )
    p.add_argument("--datasets", type=str_list, default="wikitext2", help="evaluation sets")
    p.add_argument(
        "--cross", type=str_list, default="", help="also calibrate AWQ on each of these sets (e.g. wikitext2,ptb,c4)"
    )
    p.add_argument(
        "--cross-length", type=_lengths, default="2^17", help="calibration tokens of the cross-domain AWQ rows"
    )
    p.add_argument("--symmetric", action="store_true")
    add_scale_args(p)
    p.add_argument("--seqlen", type=seqlen_arg, default=2048, help="window length (capped at the model's context)")
    p.add_argument("--max-windows", type=non_negative_int, default=16, help="evaluation windows per dataset (0 = all)")
    add_data_args(p)
    add_out_args(p, "results/domain", ".md/.json")
    p.add_argument("--cache", default="results/cache", help="folder of per-row cached results ('' disables)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ttq.data import check_dataset, load_text, tokenize
    from ttq.eval.domain import check_calibration_lengths, cross_table, domain_cells, length_table, unique_cells
    from ttq.eval.table import dataset_windows, run_cells
    from ttq.models import load_model, max_context, model_id
    from ttq.outputs import check_outputs, write_outputs

    for ds in args.datasets + [args.calib] + args.cross:
        check_dataset(ds)
    if len(args.cross_length) != 1:
        raise ConfigError(f"--cross-length takes one length, got {args.cross_length}")
    check_outputs(args.out, SUFFIXES, args.overwrite)  # before the calibrations, not after
    model, tok = load_model(args.model, args.gguf_file, DTYPES[args.dtype], args.device)
    seqlen = min(args.seqlen, max_context(model))
    scale = scale_from_args(args)
    ttq_cells, length_cells, cross_cells = domain_cells(
        args.bits,
        args.group_size,
        args.rank,
        args.calib,
        args.lengths,
        args.cross,
        args.cross_length[0],
        scale,
        seqlen,
        args.symmetric,
    )
    requested: dict[str, list[int]] = {args.calib: list(args.lengths)}
    for ds in args.cross:
        requested.setdefault(ds, []).append(args.cross_length[0])
    text_tokens = {  # tokenized (and cached) here as the calibration would, before hours of forwards
        ds: tokenize(tok, load_text(ds, calibration=True, data_dir=args.data_dir, source=args.data_source)).numel()
        for ds in requested
    }
    check_calibration_lengths(requested, text_tokens)
    windows = dataset_windows(tok, args.datasets, seqlen, args.max_windows or None, args.data_dir, args.data_source)
    key = model_id(args.model, args.gguf_file)
    cells = unique_cells(ttq_cells, length_cells, cross_cells)
    results = run_cells(
        model, tok, key, cells, windows, Path(args.cache) if args.cache else None, args.data_dir, args.data_source
    )
    text = f"Model {key}, seqlen {seqlen}, scale {scale}\n\n" + length_table(
        results, ttq_cells, length_cells, args.calib, args.datasets
    )
    if cross_cells:
        text += "\n\n" + cross_table(results, ttq_cells, cross_cells, args.datasets)
    print(text)
    write_outputs(args.out, {".md": text + "\n", ".json": json.dumps(results, indent=1)}, args.overwrite)
    return 0
