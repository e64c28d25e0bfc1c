"""``ttq qtime``: how long each method takes to quantize a model (calibration included)."""

from __future__ import annotations

import argparse
import json

from ttq.commands.common import (
    DTYPES, add_data_args, add_model_args, add_out_args, add_scale_args, int_list, scale_from_args, seqlen_arg,
    str_list,
)
from ttq.commands.ppl import _calib_list, _config_cell

SUFFIXES = (".md", ".json")


def add_parser(sub) -> None:
    from ttq.eval.table import method_choices

    p = sub.add_parser("qtime", help="quantization time per method (calibration included; per-prompt cost of TTQ)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(p)
    p.add_argument("--methods", type=str_list, default="rtn,awq,gptq,awp,awp_online,ttq",
                   help=f"subset of {','.join(method_choices()[1:])} (the registered methods)")
    p.add_argument("--bits", type=int_list, default="3")
    p.add_argument("--group-size", type=int_list, default="32")
    p.add_argument("--rank", type=int_list, default="0,16", help="TTQ low-rank r values")
    p.add_argument("--calib", type=_calib_list, default="wikitext2", help="DATASET[:TOKENS] (2^17 default)")
    p.add_argument("--config", action="append", default=[], metavar="LABEL=JSON", help="extra row (see ttq ppl)")
    add_scale_args(p)
    p.add_argument("--seqlen", type=seqlen_arg, default=2048, help="calibration and prompt window length")
    p.add_argument("--repeats", type=int, default=3, help="forwards per timing (median)")
    add_data_args(p)
    add_out_args(p, "results/qtime", ".md/.json")
    p.set_defaults(func=run)


def run(args) -> int:
    from ttq.eval.qtime import markdown, quantization_times
    from ttq.eval.table import build_cells, dataset_windows
    from ttq.models import load_model, max_context, model_id
    from ttq.outputs import check_outputs, write_outputs

    if "fp" in args.methods:
        raise ValueError("qtime times quantization methods; 'fp' has nothing to time")
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    check_outputs(args.out, SUFFIXES, args.overwrite)  # before the calibrations, not after
    model, tok = load_model(args.model, args.gguf_file, DTYPES[args.dtype], args.device)
    seqlen = min(args.seqlen, max_context(model))
    cells = build_cells(args.methods, args.bits, args.group_size, args.rank, args.calib, scale_from_args(args), seqlen)
    cells += [_config_cell(item) for item in args.config]
    if not cells:
        raise ValueError("nothing to time: --methods and --config selected no rows")
    window = dataset_windows(tok, ["wikitext2"], seqlen, 1, args.data_dir, args.data_source)["wikitext2"].to(args.device)
    rows = quantization_times(model, tok, cells, window, args.repeats, eval_datasets=("wikitext2", "ptb", "c4"),
                              data_dir=args.data_dir, source=args.data_source)
    text = markdown(rows, model_id(args.model, args.gguf_file))
    print(text)
    write_outputs(args.out, {".md": text + "\n", ".json": json.dumps(rows, indent=1)}, args.overwrite)
    return 0
