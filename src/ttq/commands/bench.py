"""``ttq bench``: speed of test-time quantization (TTQ paper, Section 2 eq. 3 and Appendix H).

Parts (``--parts``): (a) per-layer quantization vs one fp32 / bf16 matrix-vector
product; (b) decode matmul on packed weights vs fp32 / bf16 ``F.linear`` for the
Qwen3 q_proj shapes of Appendix H, 4096 x 4096, 4096 x 11008 and SmolLM2's
layers; (c) end-to-end generation on SmolLM2-135M (prompt-mode TTQ vs fp32 and
bf16); (load) one forward of the base model and of per-sequence 3-bit TTQ, alone and
next to a busy process the command starts itself (how each slows down on a shared
CPU).  Medians of ``--repeats`` runs; ratios against baselines of the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform

from ttq.commands.common import (
    DTYPES,
    add_out_args,
    check_kv_cache_dtype,
    int_list,
    non_negative_int,
    positive_int,
    str_list,
)
from ttq.errors import ConfigError

PARTS = ("a", "b", "c", "load")
SHAPE_SETS = ("all", "quick", "qwen3", "smollm2", "square4096")
OUT_SUFFIXES = (".md", ".json")
LOAD_BITS = 3  # part load: per-sequence TTQ at 3 bits, as in the report it reproduces


def _listed(check, what: str):
    """argparse type: a non-empty comma-separated list of integers, each accepted by ``check``."""

    def parse(s: str) -> list[int]:
        values = int_list(s)
        if not values:
            raise argparse.ArgumentTypeError(f"expected at least one value ({what}), got {s!r}")
        bad = [v for v in values if not check(v)]
        if bad:
            raise argparse.ArgumentTypeError(f"each value must be {what}, got {', '.join(map(str, bad))}")
        return values

    return parse


bits_list = _listed(lambda v: 2 <= v <= 8, "a bit width in 2..8")
group_size_list = _listed(lambda v: v >= 1 or v == -1, "a positive group size or -1 (per output channel)")
rank_list = _listed(lambda v: v >= 0, "a rank of 0 or more")


def new_tokens_arg(s: str) -> int:
    """argparse type: at least 2 new tokens (the first ends the prefill; decode is timed from the second)."""
    v = positive_int(s)
    if v < 2:
        raise argparse.ArgumentTypeError(f"must be at least 2 to time decode (the first new token ends the prefill), "
                                         f"got {v}")
    return v


def head_bits_arg(s: str) -> int:
    """argparse type: 0 (keep the LM head) or a bit width in 2..8."""
    v = non_negative_int(s)
    if v and not 2 <= v <= 8:
        raise argparse.ArgumentTypeError(f"must be 0 (keep the head) or a bit width in 2..8, got {v}")
    return v


def synthetic_arg(s: str) -> list[int]:
    """argparse type: HIDDEN,INTERMEDIATE,LAYERS[,HEAD_DIM], positive integers."""
    v = int_list(s)
    if len(v) not in (3, 4) or min(v) < 1:
        raise argparse.ArgumentTypeError(f"takes HIDDEN,INTERMEDIATE,LAYERS[,HEAD_DIM] (positive integers), got {s!r}")
    return v


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="quantization / decode matmul / generation speed",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--parts", type=str_list, default="a,b,c", help=f"subset of {','.join(PARTS)}")
    p.add_argument("--quick", action="store_true",
                   help="small run: 3 shapes, fewer repeats, 128-token prompt, 32 new tokens, 4/2-bit r=0 only")
    p.add_argument("--shapes", default=None, choices=SHAPE_SETS, help="layer shapes of parts a and b")
    p.add_argument("--bits", type=bits_list, default="4,3,2", help="parts b and c (2..8)")
    p.add_argument("--group-size", type=group_size_list, default="32",
                   help="parts a and b (parts c and load use the first; -1 = per output channel)")
    p.add_argument("--ranks", type=rank_list, default="0,16", help="TTQ low-rank r (parts b and c)")
    p.add_argument("--batch", type=positive_int, default=1, help="tokens per product in part b")
    p.add_argument("--hot", action="store_true",
                   help="part b: re-read one cache-resident copy of each layer (default: cycle through copies "
                        "totalling 96 MB so weights stream from memory, as in a decode step)")
    p.add_argument("--repeats", type=positive_int, default=None,
                   help="timed runs per measurement (default: a 5, b 20, c 3, load 3; quick a 3, b 10, c 1, load 1)")
    p.add_argument("--stat", default="median", choices=("median", "min"),
                   help="statistic over the repeats (min resists other processes' load on a shared machine)")
    p.add_argument("--model", default="smollm2-135m", help="parts c and load model (see ttq ppl --model)")
    p.add_argument("--gguf-file", default=None)
    p.add_argument("--synthetic", type=synthetic_arg, default=None, metavar="HIDDEN,INTERMEDIATE,LAYERS[,HEAD_DIM]",
                   help="parts c and load: time a randomly initialized Llama of these shapes (e.g. 4096,11008,4: "
                        "Llama-2-7B's layers; head_dim 128 unless given) with --model's tokenizer instead of "
                        "--model itself (speed only)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="parts c and load base dtype")
    p.add_argument("--prompt-tokens", type=positive_int, default=None,
                   help="part c prompt, part load forward length (default 512, quick 128)")
    p.add_argument("--new-tokens", type=new_tokens_arg, default=None, help="part c, at least 2 (default 128, quick 32)")
    p.add_argument("--busy", type=positive_int, default=1, help="part load: busy processes to run beside the forward")
    p.add_argument("--lm-head-bits", type=head_bits_arg, default=0,
                   help="part c: also time the widest TTQ rows with the LM head packed to this many bits (RTN; 0 = no)")
    p.add_argument("--gen-layouts", type=str_list, default="",
                   help="part c: extra rows for the widest TTQ config decoding through these layouts (e.g. cpu_q4_i8)")
    p.add_argument("--half-params", action="store_true",
                   help="part c: float16 scale/zero in prompt mode and in the packed head (default: TTQ_HALF_PARAMS, off)")
    p.add_argument("--gguf", default=None, metavar="PATH",
                   help="part c: also time this GGUF file through llama.cpp (llama-cpp-python) on the same prompt ids, "
                        "token count and threads (default: --model's own GGUF file, e.g. SmolLM2's Q4_1)")
    p.add_argument("--no-llamacpp", action="store_true", help="part c: no llama.cpp row")
    p.add_argument("--fused", action="store_true",
                   help="part c: also time each TTQ row with q/k/v and gate/up as one packed product each")
    p.add_argument("--refines", type=str_list, default="",
                   help="part c: extra rows for the widest TTQ config quantized with these refinement rows (e.g. "
                        "ttq_clip,ttq_plus; see ttq ppl --methods): their per-prompt cost is 'quant / prefill'")
    p.add_argument("--compile", action="store_true",
                   help="part c: also time each row (but bf16) with its decode step compiled (torch.compile over a "
                        "static KV cache; compile time reported, paid once and cached on disk)")
    p.add_argument("--kv-cache-dtype", default=None, choices=["float16", "bfloat16"],
                   help="part c, with --compile: also time each compiled row with its static KV cache in this dtype "
                        "(half the cache bytes per decode step; llama.cpp's default cache is float16)")
    p.add_argument("--row", action="append", default=[], metavar="LABEL", dest="rows",
                   help="part c: time only the row with this label (as the table prints it, e.g. 'ttq 4-bit r=0 "
                        "+ head 8-bit [cpu_q4_i8] fused compiled'), with fp32 and bf16 for the ratios; repeatable")
    p.add_argument("--threads", type=non_negative_int, default=0, help="torch threads (0 = torch's default)")
    add_out_args(p, None, ".md and .json")
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
    omp = ", ".join(f"{k}={os.environ[k]}" for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if k in os.environ)
    return (f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU capability "
            f"{torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} CPU(s), {platform.machine()}, "
            f"load average {load[0]:.2f}{f', {omp}' if omp else ''}")


def _load_model(args):
    """(model, tokenizer, name) of parts c and load: ``--model``, or a synthetic Llama with its tokenizer."""
    from ttq.models import load_model, max_context, synthetic_llama

    model, tok = load_model(args.model, args.gguf_file, DTYPES[args.dtype])
    name = args.model
    if args.synthetic is not None:
        model = synthetic_llama(tok, *args.synthetic, dtype=DTYPES[args.dtype])
        name = (f"synthetic Llama {'/'.join(map(str, args.synthetic))} (hidden/intermediate/layers"
                f"{'/head_dim' if len(args.synthetic) == 4 else ''}, random weights, {args.model} tokenizer)")
    ctx = max_context(model)
    for part, n, what in (("c", args.prompt_tokens + args.new_tokens, "--prompt-tokens + --new-tokens"),
                          ("load", args.prompt_tokens, "--prompt-tokens")):
        if part in args.parts and n > ctx:
            raise ConfigError(f"part {part}: {what} = {n} exceeds the model's context of {ctx} tokens "
                              f"(max_position_embeddings of {name}); ask for at most {ctx}")
    return model, tok, name


def _llamacpp_gguf(args, model) -> tuple[str | None, str | None]:
    """(GGUF file for part c's llama.cpp row, None) or (None, the one line saying why there is no such row).

    A synthetic model without ``--gguf`` gets a GGUF of its own random weights (written once, cached), with the
    tokenizer of ``--model``'s GGUF file or SentencePiece ``tokenizer.model``."""
    from ttq.eval import llamacpp

    if args.no_llamacpp:
        return None, None
    if args.synthetic is not None and args.gguf is None:
        if why := llamacpp.missing():
            return None, why
        vocab = llamacpp.default_gguf(args.model, args.gguf_file)
        if vocab is None and os.path.isfile(os.path.join(os.path.expanduser(args.model), "tokenizer.model")):
            vocab = os.path.expanduser(args.model)  # a SentencePiece folder, as ttq export reads it
        if vocab is None or not os.path.exists(vocab):
            return None, (f"llama.cpp rows skipped: the synthetic model's GGUF takes its tokenizer from --model's GGUF "
                          f"file or SentencePiece tokenizer.model, and {args.model} has neither (pass --gguf PATH)")
        return str(llamacpp.synthetic_gguf(model, vocab)), None
    gguf = args.gguf or llamacpp.default_gguf(args.model, args.gguf_file)
    if gguf is None:
        return None, f"llama.cpp rows skipped: {args.model} is not a GGUF model (pass --gguf PATH of the same model)"
    if not os.path.isfile(gguf):  # the model's own file (an explicit --gguf was checked before loading)
        raise ConfigError(f"the GGUF file {gguf} of {args.model} is missing; pass --gguf PATH or --no-llamacpp")
    why = llamacpp.missing()
    return (None, why) if why else (str(gguf), None)


def _default(value, quick: bool, full, small):
    """``value`` when given (an explicit number is never replaced), else the full or --quick default."""
    return value if value is not None else (small if quick else full)


def run(args) -> int:
    import torch

    from ttq.eval import bench
    from ttq.outputs import check_outputs, write_outputs

    bad = [p for p in args.parts if p not in PARTS]
    if bad or not args.parts:
        raise ConfigError(f"unknown bench part(s) {bad or args.parts}; allowed: {', '.join(PARTS)}")
    if args.out:
        check_outputs(args.out, OUT_SUFFIXES, args.overwrite)  # a taken or unwritable --out fails now, not after the run
    if args.gguf is not None and not os.path.isfile(args.gguf):  # now, not after the model and parts a / b
        raise ConfigError(f"--gguf {args.gguf}: no such file (give the path of a .gguf file of the same model)")
    if args.refines:  # an unknown name fails now, not after the model and parts a / b
        from ttq.quantizers.ttq import check_refine_rows

        check_refine_rows(args.refines)
    check_kv_cache_dtype(args)  # now, not after the model and parts a / b
    if args.threads:
        torch.set_num_threads(args.threads)
    quick = args.quick
    args.prompt_tokens = _default(args.prompt_tokens, quick, 512, 128)
    args.new_tokens = _default(args.new_tokens, quick, 128, 32)
    shapes = _shapes(args.shapes or ("quick" if quick else "all"))
    bits = args.bits if not quick or args.bits != [4, 3, 2] else [4, 2]
    ranks = args.ranks if not quick or args.ranks != [0, 16] else [0]
    if args.rows:  # a label that names no row fails now, not after the model and parts a / b
        if "c" not in args.parts:
            raise ConfigError("--row picks rows of part c; add c to --parts")
        bench.part_c_rows(bits, ranks, args.lm_head_bits, tuple(args.gen_layouts), tuple(args.refines), args.fused,
                          args.compile, args.kv_cache_dtype, tuple(args.rows))
    rep = args.repeats
    out: list[str] = []
    data: dict = {"environment": _environment(args.threads)}

    def emit(text: str) -> None:
        print(text + "\n", flush=True)
        out.append(text + "\n")

    model = tok = model_name = None
    if "c" in args.parts or "load" in args.parts:
        model, tok, model_name = _load_model(args)  # refuses lengths beyond the model's context before any timing
    emit(f"# ttq bench\n\n{_environment(args.threads)}; statistic: {args.stat} of the repeats")
    if "a" in args.parts:
        rows = bench.bench_quantization(shapes, bits=[4], group_sizes=args.group_size,
                                        repeats=_default(rep, quick, 5, 3), stat=args.stat)
        data["quantization"] = rows
        emit("## (a) quantization of one layer (fused scale+quantize+pack, buffers reused) vs one GEMV\n\n" + _table(rows, [
            ("shape", "layer", ""), ("d_out", "d_out", "d"), ("d_in", "d_in", "d"), ("bits", "bits", "d"),
            ("group_size", "g", "d"), ("layout", "layout", ""), ("quant_ms", "quant ms", ".3f"),
            ("fp32_gemv_ms", "fp32 GEMV ms", ".3f"), ("bf16_gemv_ms", "bf16 GEMV ms", ".3f"),
            ("quant_over_fp32", "quant / fp32 GEMV", ".2f"), ("quant_over_bf16", "quant / bf16 GEMV", ".2f")]))
    if "b" in args.parts:
        rows = bench.bench_matmul(shapes, bits=bits, group_sizes=args.group_size, ranks=ranks, batch=args.batch,
                                  repeats=_default(rep, quick, 20, 10), stat=args.stat, cold=not args.hot)
        data["matmul"] = rows
        where = "cache-resident weights (--hot)" if args.hot else "weights streamed from memory (copies cycled)"
        emit(f"## (b) decode matmul, {args.batch} token(s), x/s prescale and rank-r term included, {where}\n\n"
             + _table(rows, [
            ("shape", "layer", ""), ("d_out", "d_out", "d"), ("d_in", "d_in", "d"), ("bits", "bits", "d"),
            ("group_size", "g", "d"), ("rank", "r", "d"), ("layout", "layout", ""), ("ms", "packed ms", ".4f"),
            ("fp32_ms", "fp32 ms", ".4f"), ("bf16_ms", "bf16 ms", ".4f"), ("speedup_fp32", "x fp32", ".2f"),
            ("speedup_bf16", "x bf16", ".2f"), ("mbytes", "packed MB", ".2f")]))
    if "c" in args.parts:
        gguf, why = _llamacpp_gguf(args, model)
        if why:
            emit(why)
        rows = bench.bench_generation(
            model, tok, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, bits=bits, ranks=ranks,
            group_size=args.group_size[0], repeats=_default(rep, quick, 3, 1), stat=args.stat,
            head_bits=args.lm_head_bits, layouts=tuple(args.gen_layouts),
            half_params=True if args.half_params else None, gguf=gguf, fused=args.fused,
            compiled=args.compile, refines=tuple(args.refines), kv_dtype=args.kv_cache_dtype, only=tuple(args.rows))
        roof = bench.read_bandwidth_gbps()  # after the rows: their timings ran without this 512 MB tensor
        same = {r["config"]: bool(torch.equal(r["output_ids"], rows[0]["output_ids"])) for r in rows}
        for r in rows:
            r["same_as_fp32"] = same[r["config"]]
            r["of_bandwidth"] = r["weights_gbps"] / roof
        data["generation"] = [{k: v for k, v in r.items() if k != "output_ids"} for r in rows]
        data["read_bandwidth_gbps"] = roof
        emit(f"## (c) generation, {model_name}, greedy, KV cache, TTQ in prompt mode\n\n"
             f"weights GB/s = the weights one decode step reads (MB / token; KV cache not counted) x decode tok/s; "
             f"memory read bandwidth here: {roof:.1f} GB/s (a sum over 512 MB at {torch.get_num_threads()} "
             f"thread(s)), the roof of a memory-bound decode step\n\n" + _table(rows, [
            ("config", "config", ""), ("prompt_tokens", "prompt", "d"), ("new_tokens", "new", "d"),
            ("prefill_tps", "prefill tok/s", ".1f"), ("decode_tps", "decode tok/s", ".2f"),
            ("decode_vs_fp32", "decode x fp32", ".2f"), ("decode_vs_bf16", "decode x bf16", ".2f"),
            ("decode_vs_llamacpp", "decode x llama.cpp", ".2f"), ("prefill_vs_fp32", "prefill x fp32", ".2f"),
            ("prefill_vs_llamacpp", "prefill x llama.cpp", ".2f"), ("decode_mb", "weights MB / token", ".1f"),
            ("weights_gbps", "weights GB/s", ".1f"), ("of_bandwidth", "x read bandwidth", ".2f"), ("quant_s", "quant s (whole model)", ".3f"), ("quant_over_prefill", "quant / prefill", ".3f"),
            ("peak_rss_mb", "peak RSS MB", ".0f"), ("same_as_fp32", "same tokens as fp32", ""),
            ("same_as_reference", "same tokens as reference path", "")]
            + ([("compile_s", "compile s (warm-up)", ".1f"), ("compile_note", "eager because", "")] if args.compile else [])))
    if "load" in args.parts:
        rows = bench.bench_load(model, tok, tokens=args.prompt_tokens, bits=LOAD_BITS, group_size=args.group_size[0],
                                repeats=_default(rep, quick, 3, 1), stat=args.stat, busy=args.busy)
        data["load"] = rows
        emit(f"## (load) one forward of {args.prompt_tokens} tokens, {model_name}, alone and next to {args.busy} busy "
             f"process(es) (a Python loop started here)\n\n" + _table(rows, [
                 ("config", "config", ""), ("threads", "threads", "d"), ("quiet_s", "alone s", ".3f"),
                 ("busy_s", "beside busy s", ".3f"), ("slowdown", "slowdown", ".2f"),
                 ("quiet_vs_base", "alone / base", ".2f"), ("busy_vs_base", "beside busy / base", ".2f")])
             + "\n\nslowdown = beside busy / alone; a quantized forward that slows down much more than the base "
               "one spends its time in short parallel regions (see the README's troubleshooting table)")
    emit(f"(finished; {_environment(args.threads)})")
    if args.out:
        write_outputs(args.out, {".md": "\n".join(out), ".json": json.dumps(data, indent=1, default=str)}, args.overwrite)
    return 0
