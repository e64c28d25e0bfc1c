"""``ttq export``: quantize a model with a static method (or a TTQ snapshot) and write it for vLLM or llama.cpp.

``--format compressed-tensors`` writes a ``pack-quantized`` folder (vLLM, transformers with the
``compressed-tensors`` package), ``--format gguf`` one GGUF file (llama.cpp).  Input scales of AWQ and the TTQ
snapshot are folded into the preceding norm / linear (:mod:`ttq.export.fold`).  Prints what went where, how
exact, and the size (:class:`ttq.export.report.ExportReport`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
from pathlib import Path

from ttq.commands.common import (
    DTYPES,
    add_data_args,
    add_model_args,
    add_scale_args,
    group_size_arg,
    positive_int,
    scale_from_args,
    seqlen_arg,
)

logger = logging.getLogger(__name__)

METHODS = ("rtn", "awq", "ttq")


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="quantize, write a compressed-tensors folder (vLLM) or a GGUF file (llama.cpp)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(p)
    p.add_argument("--method", default="rtn", choices=METHODS,
                   help="rtn; awq (calibrated, input scales folded); ttq (a snapshot: s from --from-text, folded)")
    p.add_argument("--bits", type=positive_int, default=4, help="2..8")
    p.add_argument("--group-size", type=group_size_arg, default=32, help="-1 = per output channel")
    p.add_argument("--symmetric", action="store_true", help="symmetric integer grid")
    p.add_argument("--format", required=True, metavar="FORMAT", help="compressed-tensors or gguf")
    p.add_argument("--out", required=True, help="the folder (compressed-tensors) or .gguf file to create")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export")
    p.add_argument("--from-text", default=None, metavar="FILE",
                   help="--method ttq: the UTF-8 text whose activation statistic gives the snapshot's s")
    p.add_argument("--seqlen", type=seqlen_arg, default=2048, help="window length of the --from-text forwards")
    p.add_argument("--calib", default="c4", help="--method awq: calibration set")
    p.add_argument("--calib-tokens", type=positive_int, default=2**17, help="--method awq: calibration tokens")
    p.add_argument("--widths", default="vllm", choices=("vllm", "native"),
                   help="compressed-tensors: store 2/3-bit codes as 4-bit and 5..7-bit as 8-bit (vllm) or as they are")
    p.add_argument("--vocab-from", default=None, metavar="PATH",
                   help="gguf: the tokenizer's source, a .gguf file or a SentencePiece folder (unset: the model's)")
    add_scale_args(p)
    add_data_args(p)
    p.set_defaults(func=run)


def gguf_vocab_source(model: str, gguf_file: str | None) -> Path:
    """Where the GGUF tokenizer of ``--model`` comes from: its GGUF file, or its folder (SentencePiece)."""
    from ttq.models import NAMED_MODELS, fetch_named

    if model in NAMED_MODELS:
        return fetch_named(model) / (gguf_file or NAMED_MODELS[model].gguf)
    path = Path(os.path.expanduser(model))
    if path.is_file():
        return path
    if gguf_file:
        return path / gguf_file
    found = sorted(path.glob("*.gguf")) if path.is_dir() and not (path / "config.json").is_file() else []
    return found[0] if len(found) == 1 else path


def _config(args, quant, scale):
    from ttq.config import AWQConfig, CalibSpec, RTNConfig
    from ttq.export import TTQSnapshotConfig

    if args.method == "rtn":
        return RTNConfig(quant=quant)
    if args.method == "awq":
        return AWQConfig(quant=quant, scale=scale, calib=CalibSpec(dataset=args.calib, n_tokens=args.calib_tokens))
    return TTQSnapshotConfig(quant=quant, scale=scale)


def run(args) -> int:
    import ttq.export
    from ttq.calibrate import calibrate, config_p
    from ttq.data import load_text
    from ttq.errors import ConfigError
    from ttq.export.compressed import _check_dir
    from ttq.export.gguf import check_output_file, check_vocab
    from ttq.export.pipeline import check_target
    from ttq.formats.affine import QuantSpec
    from ttq.models import load_model, max_context, model_id

    target = check_target(args.format)
    ttq.export.register()
    if args.method == "ttq" and args.from_text is None:
        raise ConfigError("--method ttq exports a snapshot: give the text its scale comes from with --from-text FILE")
    if args.method != "ttq" and args.from_text is not None:
        raise ConfigError(f"--from-text is the TTQ snapshot's text (--method ttq); --method {args.method} does not "
                          "use it")
    (check_output_file if target == "gguf" else _check_dir)(args.out, args.overwrite)  # before the model loads
    quant = ttq.export.export_spec(QuantSpec(bits=args.bits, group_size=args.group_size, symmetric=args.symmetric),
                                   target)
    config = _config(args, quant, scale_from_args(args))
    text = load_text(f"file:{args.from_text}") if args.from_text is not None else None  # refused early if unreadable
    vocab = None
    if target == "gguf":
        vocab = check_vocab(args.vocab_from if args.vocab_from else gguf_vocab_source(args.model, args.gguf_file))
    model, tok = load_model(args.model, args.gguf_file, DTYPES[args.dtype], args.device)
    calibration = None
    if args.method == "awq":
        calibration = calibrate(model, tok, config.calib, p=config_p(config), data_dir=args.data_dir,
                                source=args.data_source, model_key=model_id(args.model, args.gguf_file), progress=True)
    elif args.method == "ttq":
        calibration = ttq.export.text_statistics(model, tok, text, seqlen=min(args.seqlen, max_context(model)),
                                                 p=config.scale.p, progress=True)
    print(f"quantizing with {config.name} in format {quant.fmt} ({quant.bits}-bit, group {quant.group_size}"
          f"{', symmetric' if quant.symmetric else ''}) for {target}", flush=True)
    _plan, folds = ttq.export.quantize_for_export(model, config, calibration=calibration, progress=True)
    options = {}
    if target == "gguf":
        options["metadata"] = {"ttq.method": config.name, "ttq.quant": json.dumps(dataclasses.asdict(quant))}
        if args.from_text:
            options["metadata"]["ttq.snapshot_text"] = Path(args.from_text).name
    else:
        options["widths"] = args.widths
    report = ttq.export.export(model, args.out, target, tokenizer=tok, vocab=vocab, folds=folds,
                               overwrite=args.overwrite, **options)
    print(report.summary())
    if target == "gguf":
        print(f"run it: llama-cli -m {args.out}   (or llama_cpp.Llama(model_path={str(args.out)!r}))")
    else:
        print(f"run it: vllm serve {args.out}   (or transformers.AutoModelForCausalLM.from_pretrained("
              f"{str(args.out)!r}) with compressed-tensors installed)")
    return 0
