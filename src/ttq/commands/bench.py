"""``ttq bench``: speed of test-time quantization (TTQ paper, Section 2 eq. 3 and Appendix H).

Parts (``--parts``): (a) per-layer quantization vs one fp32 / bf16 matrix-vector
product; (b) decode matmul on packed weights vs fp32 / bf16 ``F.linear`` for the
Qwen3 q_proj shapes of Appendix H, 4096 x 4096, 4096 x 11008 and SmolLM2's
layers; (c) end-to-end generation on SmolLM2-135M (prompt-mode TTQ vs fp32 and
bf16).  Medians of ``--repeats`` runs; ratios against baselines of the same run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
from pathlib import Path

from ttq.commands.common import DTYPES, int_list, str_list

logger = logging.getLogger(__name__)

PARTS = ("a", "b", "c")
SHAPE_SETS = ("all", "quick", "qwen3", "smollm2", "square4096")


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="quantization / decode matmul / generation speed",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--parts", type=str_list, default="a,b,c", help="subset of a,b,c")
    p.add_argument("--quick", action="store_true",
                   help="small run: 3 shapes, fewer repeats, 128-token prompt, 32 new tokens, 4/2-bit r=0 only")
    p.add_argument("--shapes", default=None, choices=SHAPE_SETS, help="layer shapes of parts a and b")
    p.add_argument("--bits", type=int_list, default="4,3,2", help="parts b and c")
    p.add_argument("--group-size", type=int_list, default="32", help="parts a and b (part c uses the first)")
    p.add_argument("--ranks", type=int_list, default="0,16", help="TTQ low-rank r (parts b and c)")
    p.add_argument("--batch", type=int, default=1, help="tokens per product in part b")
    p.add_argument("--hot", action="store_true",
                   help="part b: re-read one cache-resident copy of each layer (default: cycle through copies "
                        "totalling 96 MB so weights stream from memory, as in a decode step)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per measurement")
    p.add_argument("--stat", default="median", choices=("median", "min"),
                   help="statistic over the repeats (min resists other processes' load on a shared machine)")
    p.add_argument("--model", default="smollm2-135m", help="part c model (see ttq ppl --model)")
    p.add_argument("--gguf-file", default=None)
    p.add_argument("--synthetic", type=int_list, default=None, metavar="HIDDEN,INTERMEDIATE,LAYERS",
                   help="part c: time a randomly initialized Llama of these shapes (e.g. 4096,11008,4: "
                        "Llama-2-7B's layers) with --model's tokenizer instead of --model itself (speed only)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="part c base dtype")
    p.add_argument("--prompt-tokens", type=int, default=None, help="part c (default 512, quick 128)")
    p.add_argument("--new-tokens", type=int, default=None, help="part c (default 128, quick 32)")
    p.add_argument("--lm-head-bits", type=int, default=0,
                   help="part c: also time the widest TTQ rows with the LM head packed to this many bits (RTN; 0 = no)")
    p.add_argument("--gen-layouts", type=str_list, default="",
                   help="part c: extra rows for the widest TTQ config decoding through these layouts (e.g. cpu_q4_i8)")
    p.add_argument("--half-params", action="store_true",
                   help="part c: float16 scale/zero for bits <= 4 in prompt mode (default: TTQ_HALF_PARAMS, off)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--out", default=None, help="prefix of .md / .json outputs (default: print only)")
    p.set_defaults(func=run)


def _shapes(name: str):
    from ttq.eval import bench

    return {"all": bench.all_shapes(), "quick": bench.QUICK_SHAPES, "qwen3": bench.QWEN3_QPROJ,
            "smollm2": bench.SMOLLM2, "square4096": [("4096x4096", 4096, 4096)]}[name]


def _table(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    """Markdown table of ``rows`` with ``cols`` = [(key, header, format)]."""
    head = "| " + " | ".join(h for _, h, _ in cols) + " |"
    sep = "|" + "|".join("---" for _ in cols) + "|"
    body = ["| " + " | ".join("-" if r[k] is None else format(r[k], f) if f else str(r[k]) for k, _, f in cols) + " |"
            for r in rows]
    return "\n".join([head, sep] + body)


def _environment(threads: int) -> str:
    import torch

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return (f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU capability "
            f"{torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} CPU(s), {platform.machine()}, "
            f"load average {load[0]:.2f}")


def run(args) -> int:
    import torch

    from ttq.eval import bench

    bad = [p for p in args.parts if p not in PARTS]
    if bad:
        raise ValueError(f"unknown bench part(s) {bad}; allowed: {', '.join(PARTS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    quick = args.quick
    shapes = _shapes(args.shapes or ("quick" if quick else "all"))
    bits = args.bits if not quick or args.bits != [4, 3, 2] else [4, 2]
    ranks = args.ranks if not quick or args.ranks != [0, 16] else [0]
    rep = args.repeats
    out: list[str] = []
    data: dict = {"environment": _environment(args.threads)}

    def emit(text: str) -> None:
        print(text + "\n", flush=True)
        out.append(text + "\n")

    emit(f"# ttq bench\n\n{_environment(args.threads)}; statistic: {args.stat} of the repeats")
    if "a" in args.parts:
        rows = bench.bench_quantization(shapes, bits=[4], group_sizes=args.group_size, repeats=rep or (3 if quick else 5),
                                        stat=args.stat)
        data["quantization"] = rows
        emit("## (a) quantization of one layer (fused scale+quantize+pack, buffers reused) vs one GEMV\n\n" + _table(rows, [
            ("shape", "layer", ""), ("d_out", "d_out", "d"), ("d_in", "d_in", "d"), ("bits", "bits", "d"),
            ("group_size", "g", "d"), ("layout", "layout", ""), ("quant_ms", "quant ms", ".3f"),
            ("fp32_gemv_ms", "fp32 GEMV ms", ".3f"), ("bf16_gemv_ms", "bf16 GEMV ms", ".3f"),
            ("quant_over_fp32", "quant / fp32 GEMV", ".2f"), ("quant_over_bf16", "quant / bf16 GEMV", ".2f")]))
    if "b" in args.parts:
        rows = bench.bench_matmul(shapes, bits=bits, group_sizes=args.group_size, ranks=ranks, batch=args.batch,
                                  repeats=rep or (10 if quick else 20), stat=args.stat, cold=not args.hot)
        data["matmul"] = rows
        where = "cache-resident weights (--hot)" if args.hot else "weights streamed from memory (copies cycled)"
        emit(f"## (b) decode matmul, {args.batch} token(s), x/s prescale and rank-r term included, {where}\n\n"
             + _table(rows, [
            ("shape", "layer", ""), ("d_out", "d_out", "d"), ("d_in", "d_in", "d"), ("bits", "bits", "d"),
            ("group_size", "g", "d"), ("rank", "r", "d"), ("layout", "layout", ""), ("ms", "packed ms", ".4f"),
            ("fp32_ms", "fp32 ms", ".4f"), ("bf16_ms", "bf16 ms", ".4f"), ("speedup_fp32", "x fp32", ".2f"),
            ("speedup_bf16", "x bf16", ".2f"), ("mbytes", "packed MB", ".2f")]))
    if "c" in args.parts:
        from ttq.models import load_model

        model, tok = load_model(args.model, args.gguf_file, DTYPES[args.dtype])
        model_name = args.model
        if args.synthetic is not None:
            from ttq.models import synthetic_llama

            if len(args.synthetic) != 3:
                raise ValueError(f"--synthetic takes HIDDEN,INTERMEDIATE,LAYERS, got {args.synthetic}")
            model = synthetic_llama(tok, *args.synthetic, dtype=DTYPES[args.dtype])
            model_name = (f"synthetic Llama {'/'.join(map(str, args.synthetic))} (hidden/intermediate/layers, "
                          f"random weights, {args.model} tokenizer)")
        rows = bench.bench_generation(
            model, tok, prompt_tokens=args.prompt_tokens or (128 if quick else 512),
            new_tokens=args.new_tokens or (32 if quick else 128), bits=bits, ranks=ranks,
            group_size=args.group_size[0], repeats=rep or (1 if quick else 3), stat=args.stat,
            head_bits=args.lm_head_bits, layouts=tuple(args.gen_layouts),
            half_params=True if args.half_params else None)
        same = {r["config"]: bool(torch.equal(r["output_ids"], rows[0]["output_ids"])) for r in rows}
        for r in rows:
            r["same_as_fp32"] = same[r["config"]]
        data["generation"] = [{k: v for k, v in r.items() if k != "output_ids"} for r in rows]
        emit(f"## (c) generation, {model_name}, greedy, KV cache, TTQ in prompt mode\n\n" + _table(rows, [
            ("config", "config", ""), ("prompt_tokens", "prompt", "d"), ("new_tokens", "new", "d"),
            ("prefill_tps", "prefill tok/s", ".1f"), ("decode_tps", "decode tok/s", ".2f"),
            ("decode_vs_fp32", "decode x fp32", ".2f"), ("decode_vs_bf16", "decode x bf16", ".2f"),
            ("quant_s", "quant s (whole model)", ".3f"), ("quant_over_prefill", "quant / prefill", ".3f"),
            ("peak_rss_mb", "peak RSS MB", ".0f"), ("same_as_fp32", "same tokens as fp32", ""),
            ("same_as_reference", "same tokens as reference path", "")]))
    emit(f"(finished; {_environment(args.threads)})")
    if args.out:
        prefix = Path(args.out)
        prefix.parent.mkdir(parents=True, exist_ok=True)
        prefix.with_suffix(".md").write_text("\n".join(out))
        prefix.with_suffix(".json").write_text(json.dumps(data, indent=1, default=str))
        logger.info("wrote %s.md and %s.json", prefix, prefix)
    return 0
