"""``ttq bench-gpu``: the paper's Appendix H table (Qwen3 q_proj decode speed, FP16 vs TTQ 4-bit) on CUDA."""

from __future__ import annotations

import argparse
import json

from ttq.commands.common import add_out_args, int_list, positive_int, str_list

SUFFIXES = (".md", ".json")


def add_parser(sub) -> None:
    from ttq.eval.appendix_h import MODES, QWEN3_QPROJ, AppendixHConfig

    d = AppendixHConfig()
    p = sub.add_parser("bench-gpu", help="Appendix H: q_proj decode k tokens/s, FP16 vs TTQ 4-bit, on a CUDA GPU",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", type=str_list, default=",".join(d.models), help=f"subset of {','.join(QWEN3_QPROJ)}")
    p.add_argument("--bits", type=int, default=d.bits)
    p.add_argument("--group-size", type=int, default=d.group_size)
    p.add_argument("--ranks", type=int_list, default=",".join(map(str, d.ranks)))
    p.add_argument("--layouts", type=str_list, default=",".join(d.layouts), help="CUDA layouts to time")
    p.add_argument("--modes", type=str_list, default=",".join(d.modes), help=f"subset of {','.join(MODES)}")
    p.add_argument("--repeats", type=int, default=d.repeats, help="graph replays per timing (median)")
    p.add_argument("--rotate-mb", type=positive_int, default=d.rotate_bytes >> 20,
                   help="working set of the rotate mode (MiB)")
    p.add_argument("--no-tune", action="store_true", help="skip the decode-kernel configuration search")
    add_out_args(p, "results/appendix_h", ".md/.json")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from ttq.eval.appendix_h import AppendixHConfig, format_tables, rows_to_dicts, run_appendix_h
    from ttq.outputs import check_outputs, write_outputs

    cfg = AppendixHConfig(models=tuple(args.models), bits=args.bits, group_size=args.group_size,
                          ranks=tuple(args.ranks), layouts=tuple(args.layouts), repeats=args.repeats,
                          rotate_bytes=args.rotate_mb << 20, modes=tuple(args.modes), tune=not args.no_tune)
    check_outputs(args.out, SUFFIXES, args.overwrite)  # before the benchmark, not after
    rows = run_appendix_h(cfg)
    device = f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    table = format_tables(rows, cfg, device)
    print(table)
    result = {"device": device, "rows": rows_to_dicts(rows)}
    write_outputs(args.out, {".md": table + "\n", ".json": json.dumps(result, indent=1)}, args.overwrite)
    return 0
