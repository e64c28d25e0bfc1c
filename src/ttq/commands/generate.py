"""``ttq generate``: stream a greedy completion from a (test-time) quantized model.

TTQ runs in prompt mode (:mod:`ttq.runtime`): the prompt's activations quantize
every layer once, the decode steps use packed low-bit weights.  Ends with the
prefill and decode speeds in tokens/s (the decode speed is "n/a" when there was no decode
step: one new token is the prefill's own).
"""

from __future__ import annotations

import argparse
import logging
import sys

from ttq.commands.common import (
    DTYPES, add_model_args, add_scale_args, check_kv_cache_dtype, group_size_arg, non_negative_int, positive_int,
    scale_from_args,
)

from ttq.errors import ConfigError

logger = logging.getLogger(__name__)



def generation_methods() -> tuple[str, ...]:
    """``fp`` and every registered method that needs no calibration data (its table rows without
    calibration sets are not empty), read from :mod:`ttq.registry`.

    A method whose optional package is missing is still listed: choosing it then says which
    extra to install (``MissingDependency``), instead of ``--help`` failing for every method.
    """
    import ttq.config  # noqa: F401  (registers the built-in methods)
    from ttq.errors import MissingDependency
    from ttq.formats.affine import QuantSpec
    from ttq.methods.scaling import ScaleSpec
    from ttq.registry import RowOptions, row_names, table_rows

    options = RowOptions(QuantSpec(), ScaleSpec(), (0,), ())

    def listed(name: str) -> bool:
        try:
            return bool(table_rows(name, options))
        except MissingDependency:
            return True

    return ("fp", *[n for n in row_names() if listed(n)])


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="stream a greedy completion; report prefill/decode tokens/s",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(p)
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--method", default="ttq", choices=generation_methods(),
                   help="fp = unquantized; any registered method that needs no calibration")
    p.add_argument("--bits", type=positive_int, default=4, help="2..8")
    p.add_argument("--group-size", type=group_size_arg, default=32, help="-1 = per output channel")
    p.add_argument("--rank", type=non_negative_int, default=0, help="TTQ low-rank r")
    p.add_argument("--mode", default="prompt", choices=("prompt", "per_sequence"), help="TTQ runtime mode")
    p.add_argument("--refresh-every", type=non_negative_int, default=0,
                   help="prompt mode: re-quantize every N tokens (0 = never)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--lm-head-bits", type=non_negative_int, default=0,
                   help="also pack the LM head with RTN at this many bits (faster decode, changes logits; 0 = keep it)")
    p.add_argument("--layout", default=None, help="packed layout of prompt-mode TTQ layers (default: best for the device)")
    p.add_argument("--half-params", action="store_true",
                   help="prompt mode and the packed head: float16 scale/zero (CPU layouts; fewer bytes per decode step)")
    p.add_argument("--no-fuse", action="store_true",
                   help="prompt mode: decode q/k/v and gate/up as separate products (by default each group runs as "
                        "one stacked product: the same tokens, fewer kernel calls per token)")
    p.add_argument("--threads", type=non_negative_int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--compile", action="store_true",
                   help="run each decode step as one compiled graph (torch.compile, static KV cache); the first "
                        "start compiles (about a minute for SmolLM2-135M on 2 cores), later ones read the disk cache; "
                        "falls back to eager decoding with one logged line when it cannot compile")
    p.add_argument("--kv-cache-dtype", default=None, choices=["float16", "bfloat16"],
                   help="with --compile: store the static KV cache in this dtype (half the cache bytes read per decode "
                        "step; the prefill stays exact, decode steps see rounded keys and values)")
    add_scale_args(p)
    p.set_defaults(func=run)


def quantize_for_generation(model, method: str, bits: int, group_size: int, rank: int, scale, mode: str,
                            refresh_every: int, head_bits: int = 0, layout: str | None = None,
                            half_params: bool | None = None, fuse: bool = True) -> None:
    """Apply ``method`` to ``model`` in place (``fp`` leaves the blocks as is); ``head_bits`` packs the LM head;
    ``fuse``: in prompt mode, q/k/v and gate/up decode as one product each (:mod:`ttq.nn.fused`)."""
    import ttq
    from ttq import runtime

    if head_bits:  # an int8-activation layout for the blocks gives the head its int8-activation layout too
        runtime.quantize_lm_head(model, bits=head_bits, group_size=group_size,
                                 layout=runtime.head_layout(layout, head_bits, group_size, model), half_params=half_params)
    from ttq.registry import RowOptions, table_rows

    if method == "fp":
        return
    rows = table_rows(method, RowOptions(ttq.QuantSpec(bits=bits, group_size=group_size), scale, (rank,), ()))
    if not rows:
        raise ConfigError(f"method {method!r} needs calibration data; ttq generate runs methods without it")
    ttq.quantize_(model, rows[0][1])
    if runtime.ttq_layers(model):  # TTQ layers: quantize once per prompt, decode on packed weights
        runtime.set_mode(model, mode, refresh_every=refresh_every, layout=layout, half_params=half_params)
        if fuse and mode == "prompt":
            from ttq.nn.fused import fuse_shared_inputs

            fuse_shared_inputs(model)


def run(args) -> int:
    import torch
    from transformers import TextStreamer

    from ttq import runtime
    from ttq.eval.bench import timed_generate
    from ttq.models import load_model, max_context

    if not args.prompt.strip():
        raise ConfigError("the prompt is empty; give the text to continue with --prompt TEXT")
    check_kv_cache_dtype(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model, args.gguf_file, DTYPES[args.dtype], args.device)
    quantize_for_generation(model, args.method, args.bits, args.group_size, args.rank, scale_from_args(args),
                            args.mode, args.refresh_every, args.lm_head_bits, args.layout,
                            half_params=True if args.half_params else None, fuse=not args.no_fuse)
    if args.chat and getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tok(args.prompt, return_tensors="pt")["input_ids"]
    limit = max_context(model)
    if ids.shape[-1] + args.max_new_tokens > limit:
        raise ConfigError(f"the prompt ({ids.shape[-1]} tokens) + --max-new-tokens {args.max_new_tokens} exceeds the "
                          f"model's context of {limit} tokens; shorten the prompt or lower --max-new-tokens")
    ids = ids.to(args.device)
    kw, compiled_note = {}, ""
    if args.compile:
        from ttq import compiled

        prep = compiled.prepare(model, ids, args.max_new_tokens, args.kv_cache_dtype)
        if prep.compiled:
            kw = compiled.generate_kwargs(model, ids.shape[-1] + args.max_new_tokens, prep.kv_dtype)
            kv = f", {str(prep.kv_dtype).removeprefix('torch.')} KV cache" if prep.kv_dtype is not None else ""
            compiled_note = f" compiled decode{kv} (warm-up {prep.seconds:.1f} s)"
        else:
            compiled_note = " eager decode (could not compile)"
    streamer = TextStreamer(tok, skip_prompt=False, skip_special_tokens=True)
    t = timed_generate(model, ids, args.max_new_tokens, streamer=streamer, exact=False, **kw)
    sys.stdout.flush()
    layouts = ", ".join(f"{lay} x{n}" for lay, n in runtime.packed_layouts(model).items())
    print(f"\n[{args.method}{'' if args.method == 'fp' else f' {args.bits}-bit g={args.group_size}'}"
          f"{f' r={args.rank} mode={args.mode}' if args.method == 'ttq' else ''}"
          f"{f' layouts {layouts}' if layouts else ''}"
          f"{f' head {args.lm_head_bits}-bit' if args.lm_head_bits else ''}{compiled_note}] "
          f"{speeds(t)}")
    return 0


def _tps(n: int, seconds: float) -> str:
    return f"{n / seconds:.1f} tokens/s" if n > 0 and seconds > 0 else "n/a"


def speeds(t) -> str:
    """``prefill: ... tokens/s; decode: ... tokens/s`` of a :class:`ttq.eval.bench.GenTiming`.

    The first new token ends the prefill, so ``n`` new tokens take ``n - 1`` decode steps.  With
    one new token (``--max-new-tokens 1``, or an end-of-sequence token first) there is no decode
    step to time, and a zero interval has no speed either: those print "n/a", never nan or inf.
    """
    prefill = f"prefill: {t.prompt_tokens} tokens in {t.prefill_s:.3f} s ({_tps(t.prompt_tokens, t.prefill_s)})"
    if t.new_tokens <= 1:
        return f"{prefill}; decode: n/a ({'one token' if t.new_tokens == 1 else 'no new token'}: no decode step)"
    return f"{prefill}; decode: {t.new_tokens} tokens in {t.decode_s:.3f} s ({_tps(t.new_tokens - 1, t.decode_s)})"
