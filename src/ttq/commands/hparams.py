"""``ttq hparams``: grid (alpha, lam, p, form) of TTQ per bit width; top-k table and histograms."""

from __future__ import annotations

import argparse
import importlib.util
import io
import json

from ttq.commands.common import (
    DTYPES, add_data_args, add_model_args, add_out_args, group_size_arg, int_list, non_negative_int, positive_int,
    seqlen_arg, str_list,
)
from ttq.errors import ConfigError

SUFFIXES = (".md", ".json")  # and ".png" with --plot


def _floats(s: str) -> list[float]:
    try:
        return [float(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None


def add_parser(sub) -> None:
    p = sub.add_parser("hparams", help="TTQ hyper-parameter grid (Appendix F)", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(p)
    p.add_argument("--bits", type=int_list, default="2,3", help="comma-separated, 2..8")
    p.add_argument("--group-size", type=group_size_arg, default=32, help="-1 = per output channel")
    p.add_argument("--rank", type=non_negative_int, default=0, help="TTQ low-rank r")
    p.add_argument("--alphas", type=_floats, default="0.25,0.5,0.75,1.0")
    p.add_argument("--lams", type=_floats, default="0,0.1,0.2,0.4,0.6,0.8")
    p.add_argument("--ps", type=_floats, default="1,2,3")
    p.add_argument("--forms", type=str_list, default="shrinkage,norm")
    p.add_argument("--datasets", type=str_list, default="wikitext2,c4")
    p.add_argument("--seqlen", type=seqlen_arg, default=2048, help="window length (capped at the model's context)")
    p.add_argument("--max-windows", type=non_negative_int, default=4, help="windows per dataset (0 = all)")
    p.add_argument("--top", type=positive_int, default=5, help="settings per bit width in the table")
    add_data_args(p, sources=False)
    add_out_args(p, "results/hparams", ".md/.json (and .png with --plot)")
    p.add_argument("--plot", action="store_true", help="write <out>.png histograms (needs matplotlib)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ttq.data import check_dataset
    from ttq.eval.hparams import grid_specs, plot_histograms, scan, top_k
    from ttq.eval.table import dataset_windows, fmt_ppl
    from ttq.formats.affine import QuantSpec
    from ttq.models import load_model, max_context, model_id
    from ttq.outputs import check_outputs, write_outputs

    for ds in args.datasets:
        check_dataset(ds)
    if not args.datasets or not args.bits:
        raise ConfigError("--datasets and --bits need at least one entry each")
    for q in args.bits:
        QuantSpec(bits=q, group_size=args.group_size)  # 2..8, before the model is loaded
    specs = grid_specs(args.alphas, args.lams, args.ps, args.forms)
    if not specs:
        raise ConfigError("the grid --alphas x --lams x --ps x --forms has no valid setting (shrinkage needs lam <= 1)")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise ConfigError("--plot needs matplotlib: pip install 'ttq[plots]'")
    suffixes = SUFFIXES + ((".png",) if args.plot else ())
    check_outputs(args.out, suffixes, args.overwrite)  # before the grid, not after
    model, tok = load_model(args.model, args.gguf_file, DTYPES[args.dtype], args.device)
    seqlen = min(args.seqlen, max_context(model))
    windows = dataset_windows(tok, args.datasets, seqlen, args.max_windows or None, args.data_dir)
    rows = scan(model, windows, specs, args.bits, args.group_size, args.rank, progress=True)
    best = top_k(rows, args.top)
    nwin = ", ".join(f"{d} {w.shape[0]}x{w.shape[1]}" for d, w in windows.items())
    lines = [f"Model {model_id(args.model, args.gguf_file)}, TTQ r={args.rank}, g={args.group_size}, windows: {nwin}", ""]
    lines += ["| bits | rank | form | alpha | lam | p | avg ppl |", "|---|---|---|---|---|---|---|"]
    for q, rs in sorted(best.items()):
        for i, r in enumerate(rs, 1):
            lines.append(f"| {q} | {i} | {r['form']} | {r['alpha']} | {r['lam']} | {r['p']} | {fmt_ppl(r['avg_ppl'])} |")
    text = "\n".join(lines)
    print(text)
    contents: dict[str, str | bytes] = {".md": text + "\n", ".json": json.dumps(rows, indent=1)}
    if args.plot:
        png = io.BytesIO()
        plot_histograms(best, png, title=f"top-{args.top} TTQ settings")
        contents[".png"] = png.getvalue()
    write_outputs(args.out, contents, args.overwrite)
    return 0
