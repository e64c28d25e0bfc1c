"""``ttq eval``: zero-shot accuracy on downstream tasks (lm-evaluation-harness), FP / RTN / AWQ / TTQ rows."""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
from pathlib import Path

from ttq.commands.common import (
    DTYPES,
    add_data_args,
    add_model_args,
    add_row_args,
    add_out_args,
    add_scale_args,
    positive_int,
    scale_from_args,
    str_list,
)
from ttq.commands.ppl import _calib_list, _config_cell

logger = logging.getLogger(__name__)

SUFFIXES = (".md", ".json", ".csv")


def add_parser(sub) -> None:
    from ttq.eval.tasks import METRICS, TASKS

    p = sub.add_parser("eval", help="zero-shot task accuracy (lm-eval): FP / RTN / AWQ / TTQ over bits and group sizes",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(p)
    p.add_argument("--tasks", type=str_list, default=",".join(TASKS), help=f"subset of {','.join(TASKS)}")
    p.add_argument("--limit", type=positive_int, default=None,
                   help="evaluate the first N documents of each task (None: all of them, slow on a CPU)")
    p.add_argument("--metric", default="acc", choices=METRICS,
                   help="the table's metric (acc_norm: length-normalized; tasks without it show acc)")
    add_row_args(p)
    p.add_argument("--calib", type=_calib_list, default="c4",
                   help="AWQ calibration sets, DATASET[:TOKENS] (2^17 default)")
    p.add_argument("--seqlen", type=positive_int, default=2048,
                   help="calibration window length (capped at the model's context)")
    p.add_argument("--config", action="append", default=[], metavar="LABEL=JSON",
                   help="extra row from any registered method's config dict (repeatable; see `ttq ppl --help`)")
    p.add_argument("--symmetric", action="store_true", help="symmetric integer format (eqs. 29-30)")
    p.add_argument("--fmt", default="int", help="number format: int, nf4, fp4, nvfp4, mxfp4 (the last four are 4-bit)")
    add_scale_args(p)
    add_data_args(p, sources=False)
    add_out_args(p, "results/eval", ".md/.csv/.json")
    p.add_argument("--cache", default="results/cache", help="folder of per-(row, task) cached results ('' disables)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ttq.data import check_dataset
    from ttq.eval.table import build_cells
    from ttq.eval.tasks import (
        check_tasks,
        csv_fields,
        markdown_table,
        require_lm_eval,
        run_task_cells,
        table_header,
        task_file,
    )
    from ttq.models import load_model, max_context, model_id
    from ttq.outputs import check_outputs, write_outputs

    tasks = check_tasks(args.tasks)
    for t in tasks:
        task_file(t, args.data_dir)  # a missing task file is refused before any work
    for ds, _ in args.calib:
        check_dataset(ds)

    def cells(seqlen: int) -> list:
        return build_cells(args.methods, args.bits, args.group_size, args.rank, args.calib, scale_from_args(args),
                           seqlen, args.symmetric, args.fmt) + [_config_cell(item) for item in args.config]

    if not cells(args.seqlen):  # methods, bits, group sizes, ranks checked before the model loads
        raise ValueError("nothing to evaluate: --methods selected no rows")
    require_lm_eval()
    check_outputs(args.out, SUFFIXES, args.overwrite)
    if not getattr(args, "verbose", False):
        logging.getLogger("lm_eval").setLevel(logging.WARNING)  # its per-task INFO lines drown the progress
    model, tok = load_model(args.model, args.gguf_file, DTYPES[args.dtype], args.device)
    seqlen = min(args.seqlen, max_context(model))  # the calibration windows' length
    key = model_id(args.model, args.gguf_file)
    results = run_task_cells(model, tok, key, cells(seqlen), tasks, args.limit, Path(args.cache) if args.cache else None,
                             args.data_dir)
    table = (table_header(key, tasks, results, args.limit, args.metric) + "\n\n"
             + markdown_table(results, tasks, args.metric))
    print(table)
    rows = io.StringIO()
    w = csv.DictWriter(rows, fieldnames=csv_fields(), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(results)
    write_outputs(args.out, {".md": table + "\n", ".json": json.dumps(results, indent=1), ".csv": rows.getvalue()},
                  args.overwrite)
    return 0
