"""``ttq hparams``: grid (alpha, lam, p, form) of TTQ per bit width; top-k table and histograms."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ttq.commands.common import DTYPES, add_data_args, add_model_args, int_list, str_list


def _floats(s: str) -> list[float]:
    try:
        return [float(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None


def add_parser(sub) -> None:
    p = sub.add_parser("hparams", help="TTQ hyper-parameter grid (Appendix F)", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(p)
    p.add_argument("--bits", type=int_list, default="2,3")
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--alphas", type=_floats, default="0.25,0.5,0.75,1.0")
    p.add_argument("--lams", type=_floats, default="0,0.1,0.2,0.4,0.6,0.8")
    p.add_argument("--ps", type=_floats, default="1,2,3")
    p.add_argument("--forms", type=str_list, default="shrinkage,norm")
    p.add_argument("--datasets", type=str_list, default="wikitext2,c4")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=4)
    p.add_argument("--top", type=int, default=5)
    add_data_args(p, sources=False)
    p.add_argument("--out", default="results/hparams")
    p.add_argument("--plot", action="store_true", help="write <out>.png histograms (needs matplotlib)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ttq.eval.hparams import grid_specs, plot_histograms, scan, top_k
    from ttq.eval.table import dataset_windows, fmt_ppl
    from ttq.models import load_model, max_context, model_id

    model, tok = load_model(args.model, args.gguf_file, DTYPES[args.dtype], args.device)
    seqlen = min(args.seqlen, max_context(model))
    windows = dataset_windows(tok, args.datasets, seqlen, args.max_windows or None, args.data_dir)
    specs = grid_specs(args.alphas, args.lams, args.ps, args.forms)
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
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text + "\n")
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    if args.plot:
        plot_histograms(best, str(out.with_suffix(".png")), title=f"top-{args.top} TTQ settings")
    return 0
