"""``ttq allocate``: AlphaQ's calibration-free bit allocation from weight spectra (writes a BitPlan).

Per 2-D linear weight of the decoder blocks: heavy-tail alpha and weight variance
(:func:`ttq.eval.allocate.matrix_stats`), then the exact budget-constrained allocation
(:func:`ttq.methods.allocation.allocate`) or a baseline.  Outputs ``PREFIX.json`` (the plan, as
``BitPlan.save`` writes it), ``PREFIX.md`` (the summary, also printed) and ``PREFIX.png`` (alpha vs
bits, unless ``--no-plot``).

Scale/zero overhead (``--count-overhead``): an asymmetric integer format stores a float16 scale and a
float16 zero point per group, ``2 x 16 = 32`` bits per ``--group-size`` weights, so every width ``b``
costs ``b + 32 / g`` bits per weight in the budget (the same for every width).

``--method calibrated`` is the calibration-based baseline (the data-driven approach AlphaQ argues
against): the cost of ``b`` bits for matrix ``l`` is the output error ``tr[(W - Q_b(W)) C (W - Q_b(W))^T]``
of RTN at ``b`` bits (``--group-size``) on the ``--calib`` activations (``C``: the layer's calibration gram
over its token count; :func:`ttq.eval.allocate.calibrated_costs`), and the same exact DP
(:func:`ttq.methods.allocation.allocate_costs`) picks the widths under the same budget.  ``--gamma`` is
not used; the alphas are still computed for the summary and the plot.
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib.util
import io
import logging
import math
import time

from ttq.commands.common import (
    DTYPES,
    add_data_args,
    add_model_args,
    add_out_args,
    group_size_arg,
    int_list,
    non_negative_int,
)
from ttq.commands.ppl import _calib_list
from ttq.errors import ConfigError
from ttq.formats.spec import MAX_BITS, MIN_BITS

logger = logging.getLogger(__name__)

METHODS = ("alphaq", "uniform", "half_split", "random", "calibrated")
SCALE_ZERO_BITS = 2 * 16  # float16 scale + float16 zero point per group


def _float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be finite, got {s!r}")
    return v


def add_parser(sub) -> None:
    from ttq.methods.allocation import GRANULARITIES, MODES
    from ttq.methods.heavytail import ESTIMATORS

    p = sub.add_parser(
        "allocate",
        help="AlphaQ: calibration-free per-matrix bit allocation from weight spectra (writes a BitPlan)",
        description="Give every 2-D linear weight of the decoder blocks a width from --candidates so that the "
                    "average meets --budget, favouring heavy-tailed (small-alpha) matrices: minimise "
                    "sum_l (alpha_0/alpha_l)^gamma var(W_l) 2^(-2 b_l), solved exactly. "
                    "Granularity (--granularity): one width per linear matrix (each expert of a fused MoE "
                    "tensor is its own matrix), per expert (its matrices share a width, alpha averaged) or per "
                    "decoder block.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_args(p)
    p.add_argument("--budget", type=_float, default=3.0,
                   help="average bits per weight (--mode params) or per matrix (--mode matrices); > 0")
    p.add_argument("--candidates", type=int_list, default="2,3,4",
                   help=f"comma-separated widths, each {MIN_BITS}..{MAX_BITS}")
    p.add_argument("--gamma", type=_float, default=10.0,
                   help="exponent of the heavy-tail importance (alpha_0/alpha)^gamma; >= 0 (0: variance only)")
    p.add_argument("--estimator", default="hill", choices=ESTIMATORS,
                   help="alpha estimator: hill (AlphaQ, top 10%%) or mle (WeightWatcher power-law fit); "
                        "gamma does not transfer between them")
    p.add_argument("--no-farms", action="store_true",
                   help="whole-matrix spectrum instead of FARMS 128x128 sub-block sampling")
    p.add_argument("--per-type", action="store_true",
                   help="alpha_0 = median alpha per module type (q/k/v/o/gate/up/down) instead of over all")
    p.add_argument("--granularity", default="matrix", choices=GRANULARITIES,
                   help="the unit given one width: matrix, expert (an MoE expert's matrices together; other "
                        "matrices stay their own unit) or block (a decoder block)")
    p.add_argument("--only", default=None, metavar="PATTERN",
                   help="allocate only matrices whose name matches this shell pattern (e.g. '*.experts.*', AlphaQ's "
                        "setting for MoE models); the others are left out of the plan (quantize them at a fixed width)")
    p.add_argument("--mode", default="params", choices=MODES,
                   help="budget per weight (params, honest for mixed shapes) or per matrix (matrices, AlphaQ's count)")
    p.add_argument("--group-size", type=group_size_arg, default=32,
                   help="quantization group size, for --count-overhead (-1 = per output channel is not supported there) "
                        "and for the RTN errors of --method calibrated")
    p.add_argument("--count-overhead", action="store_true",
                   help=f"count the scale and zero point ({SCALE_ZERO_BITS} bits per group: float16 each) "
                        "in the budget: each width b costs b + 32/group-size bits per weight")
    p.add_argument("--method", default="alphaq", choices=METHODS,
                   help="alphaq (the exact DP optimum; see exact in the plan), or a baseline: uniform (one width), half_split (prefix at the "
                        "next wider width), random (seeded), calibrated (the same DP on the output error of RTN on --calib activations)")
    p.add_argument("--calib", type=_calib_list, default="c4:32768",
                   help="--method calibrated: calibration set, DATASET[:TOKENS] (2^17 tokens when TOKENS is left out)")
    p.add_argument("--synthetic-moe", default=None, metavar="FAMILY[:E,H,I,L]",
                   help="instead of --model: a random MoE model of this transformers family (ttq.tiny_moe: "
                        "qwen3_moe, qwen2_moe, mixtral, olmoe, deepseek_v3, gpt_oss) with E experts, width H, expert "
                        "width I and L blocks (default 8,256,128,2), to time the per-expert pipeline offline")
    p.add_argument("--seed", type=non_negative_int, default=0, help="FARMS sampler and --method random seed")
    p.add_argument("--no-plot", action="store_true", help="do not write PREFIX.png (the plot needs matplotlib)")
    p.add_argument("--progress", action="store_true", help="progress bar over the matrices")
    add_data_args(p, sources=False)
    add_out_args(p, "results/plan", ".json/.md/.png")
    p.set_defaults(func=run)


def _validate(args) -> tuple[tuple[int, ...], float]:
    """Check the arguments before loading anything; returns ``(candidates, overhead bits per weight)``."""
    if not args.budget > 0:
        raise ConfigError(f"--budget must be > 0 bits, got {args.budget:g}")
    if not args.candidates:
        raise ConfigError("--candidates is empty: give comma-separated widths such as 2,3,4")
    bad = [c for c in args.candidates if not MIN_BITS <= c <= MAX_BITS]
    if bad:
        raise ConfigError(f"--candidates must each be {MIN_BITS}..{MAX_BITS} bits, got {','.join(map(str, bad))}")
    if len(set(args.candidates)) != len(args.candidates):
        raise ConfigError(f"--candidates has repeated widths: {','.join(map(str, args.candidates))}")
    if not args.gamma >= 0:
        raise ConfigError(f"--gamma must be >= 0, got {args.gamma:g}")
    overhead = 0.0
    if args.count_overhead:
        if args.group_size == -1:
            raise ConfigError("--count-overhead needs a positive --group-size: per-channel (-1) overhead depends on "
                              "each matrix's input width, which a per-width overhead cannot express")
        overhead = SCALE_ZERO_BITS / args.group_size
    cands = tuple(sorted(args.candidates))
    least = cands[0] + overhead  # the narrowest width everywhere: the same average in either mode
    if args.budget < least:
        unit = "bits per weight" if args.mode == "params" else "bits per matrix"
        raise ConfigError(
            f"--budget {args.budget:g} is infeasible: the minimum is {least:g} {unit} ({cands[0]} bits everywhere"
            + (f" + {overhead:g} scale/zero overhead at group size {args.group_size})" if overhead else ")")
        )
    if args.method == "calibrated":
        from ttq.data import check_dataset

        if len(args.calib) != 1:
            raise ConfigError(f"--calib takes one DATASET[:TOKENS], got {len(args.calib)} entries")
        dataset, tokens = args.calib[0]
        check_dataset(dataset)
        if tokens <= 0:
            raise ConfigError(f"--calib tokens must be > 0, got {tokens}")
    if not args.no_plot and importlib.util.find_spec("matplotlib") is None:
        raise ConfigError("the PREFIX.png plot needs matplotlib: pip install 'ttq[plots]', or pass --no-plot")
    return cands, overhead


def run(args) -> int:
    from ttq.eval.allocate import calibrated_costs, matrix_stats, plot_alpha_bits, size_table, summary_tables
    from ttq.methods.allocation import (
        allocate, allocate_costs, by_units, costs_by_units, expand, half_split_plan, random_plan, uniform_plan,
    )
    from ttq.models import load_model, max_context, model_id
    from ttq.outputs import check_outputs, write_outputs

    cands, overhead = _validate(args)
    suffixes = (".json", ".md") + (() if args.no_plot else (".png",))
    check_outputs(args.out, suffixes, args.overwrite)  # before the model is loaded, not after
    if args.synthetic_moe:
        if args.method == "calibrated":
            raise ConfigError("--method calibrated needs text and a tokenizer: use --model, not --synthetic-moe")
        model, tok, name = *_synthetic_moe(args.synthetic_moe), f"random {args.synthetic_moe}"
    else:
        model, tok = load_model(args.model, args.gguf_file, DTYPES[args.dtype], args.device)
        name = model_id(args.model, args.gguf_file)
    t0 = time.perf_counter()
    stats = matrix_stats(model, estimator=args.estimator, farms=not args.no_farms, seed=args.seed,
                         progress=args.progress)
    t_metrics = time.perf_counter() - t0
    if args.only:
        stats = [s for s in stats if fnmatch.fnmatchcase(s.name, args.only)]
        if not stats:
            raise ConfigError(f"--only {args.only!r} matches no linear matrix of the decoder blocks")
    kw = {"candidates": cands, "gamma": args.gamma, "budget": args.budget, "mode": args.mode,
          "overhead": overhead, "per_type": args.per_type}
    solvers = {"alphaq": allocate, "uniform": uniform_plan, "half_split": half_split_plan,
               "random": lambda st, **k: random_plan(st, seed=args.seed, **k)}
    if args.method == "calibrated":
        from ttq.calibrate import calibrate
        from ttq.data.windows import CalibSpec

        dataset, tokens = args.calib[0]
        spec = CalibSpec(dataset, tokens, seqlen=min(2048, max_context(model)))
        calibration = calibrate(model, tok, spec, data_dir=args.data_dir,
                                model_key=model_id(args.model, args.gguf_file), progress=args.progress)
        names, n_params, costs = calibrated_costs(model, calibration, cands, args.group_size, progress=args.progress)
        keep = [i for i, n in enumerate(names) if not args.only or fnmatch.fnmatchcase(n, args.only)]
        units, n_units, unit_costs, members = costs_by_units(
            [names[i] for i in keep], [n_params[i] for i in keep], [costs[i] for i in keep], args.granularity)
        plan = expand(allocate_costs(units, n_units, unit_costs, candidates=cands, budget=args.budget, mode=args.mode,
                                     overhead=overhead), members, args.granularity)
    else:
        t0 = time.perf_counter()
        plan = by_units(stats, args.granularity, lambda st: solvers[args.method](st, **kw))
        t_solve = time.perf_counter() - t0
    header = (f"Model {name}: {args.method} allocation over {len(stats)} linear "
              f"matrices{'' if args.granularity == 'matrix' else f' (one width per {args.granularity})'}"
              f"{f' matching {args.only!r}' if args.only else ''}, {args.estimator} alpha{'' if args.no_farms else ' (FARMS)'}"
              + (f", scale/zero overhead at group size {args.group_size}" if args.count_overhead else "")
              + (f", costs: RTN output error at group size {args.group_size} on {args.calib[0][0]} "
                 f"({args.calib[0][1]} tokens)" if args.method == "calibrated" else ""))
    timing = (f"Time: heavy-tail metrics {t_metrics:.2f} s for {len(stats)} matrices "
              f"({1000 * t_metrics / len(stats):.1f} ms per matrix)"
              + (f", solve {t_solve:.3f} s" if args.method != "calibrated" else ""))
    sizes = size_table(plan, model, args.group_size)
    text = header + "\n\n" + summary_tables(plan, stats) + "\n\n" + sizes + "\n\n" + timing
    print(text)
    contents: dict[str, str | bytes] = {".json": plan.to_json() + "\n", ".md": text + "\n"}  # .json = BitPlan.save
    if not args.no_plot:
        png = io.BytesIO()
        plot_alpha_bits(plan, stats, png)
        contents[".png"] = png.getvalue()
    write_outputs(args.out, contents, args.overwrite)
    return 0


def _synthetic_moe(spec: str):
    """``(model, None)``: a random MoE of ``FAMILY[:E,H,I,L]`` (ttq.tiny_moe)."""
    from ttq.tiny_moe import tiny_moe

    family, _, shape = spec.partition(":")
    try:
        e, h, i, layers = (int(v) for v in (shape or "8,256,128,2").split(","))
    except ValueError:
        raise ConfigError(f"--synthetic-moe {spec!r}: the shape must be four integers E,H,I,L") from None
    if min(e, h, i, layers) < 1:
        raise ConfigError(f"--synthetic-moe {spec!r}: E, H, I and L must be >= 1")
    return tiny_moe(family, hidden=h, experts=e, top_k=min(2, e), expert_width=i, layers=layers), None
