"""``ttq domain``: calibration-length table (paper Table 1) and the cross-domain table."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from ttq.commands.common import DTYPES, add_data_args, add_model_args, add_scale_args, int_list, scale_from_args, str_list

logger = logging.getLogger(__name__)


def _lengths(s: str) -> list[int]:
    """``"11-17"`` (powers of two), ``"2^11,2^13"`` or plain token counts ``"2048,8192"``."""
    out = []
    for item in str_list(s):
        try:
            if "-" in item:
                lo, hi = (int(v) for v in item.split("-"))
                out += [2**k for k in range(lo, hi + 1)]
            elif item.startswith("2^"):
                out.append(2 ** int(item[2:]))
            else:
                out.append(int(item))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"calibration length {item!r} is not N, 2^K or K1-K2 (exponents)"
            ) from None
    return out


def add_parser(sub) -> None:
    p = sub.add_parser(
        "domain",
        help="calibration-length (Table 1) and cross-domain tables: AWQ vs TTQ",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_args(p)
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--rank", type=int_list, default="0,16", help="TTQ low-rank r values")
    p.add_argument("--calib", default="c4", help="AWQ calibration set of the length table")
    p.add_argument(
        "--lengths", type=_lengths, default="11-17", help="calibration lengths: K1-K2 (2^K1..2^K2), 2^K or tokens"
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
    p.add_argument("--seqlen", type=int, default=2048, help="window length (capped at the model's context)")
    p.add_argument("--max-windows", type=int, default=16, help="evaluation windows per dataset (0 = all)")
    add_data_args(p)
    p.add_argument("--out", default="results/domain", help="prefix of the .md/.json outputs")
    p.add_argument("--cache", default="results/cache", help="folder of per-row cached results ('' disables)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ttq.data import check_dataset
    from ttq.eval.domain import cross_table, domain_cells, length_table, unique_cells
    from ttq.eval.table import dataset_windows, run_cells
    from ttq.models import load_model, max_context, model_id

    for ds in args.datasets + [args.calib] + args.cross:
        check_dataset(ds)
    if len(args.cross_length) != 1:
        raise ValueError(f"--cross-length takes one length, got {args.cross_length}")
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
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text + "\n")
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    logger.info("wrote %s.{md,json}", out)
    return 0
