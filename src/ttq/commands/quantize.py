"""``ttq quantize``: quantize a model with one method and save it as a checkpoint folder.

The folder loads with ``transformers.AutoModelForCausalLM.from_pretrained(DIR)`` after ``import ttq``
(:mod:`ttq.checkpoint`).  Prints the saved size against the full-precision size.
"""

from __future__ import annotations

import argparse
import json
import logging

from ttq.commands.common import (
    DTYPES,
    add_data_args,
    add_model_args,
    add_scale_args,
    group_size_arg,
    non_negative_int,
    positive_int,
    scale_from_args,
)

logger = logging.getLogger(__name__)


def _methods() -> list[str]:
    import ttq.config  # noqa: F401  (registers the built-in methods)
    from ttq.registry import row_names

    return row_names()


def add_parser(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a model with one method and save it (loads with from_pretrained)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(p)
    p.add_argument("--out", required=True, help="checkpoint folder to create")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint folder")
    p.add_argument("--method", default="rtn", choices=_methods(), help="a registered method (or --config)")
    p.add_argument("--bits", type=positive_int, default=4, help="2..8")
    p.add_argument("--group-size", type=group_size_arg, default=32, help="-1 = per output channel")
    p.add_argument("--symmetric", action="store_true", help="symmetric integer format (eqs. 29-30)")
    p.add_argument("--fmt", default="int", help="number format: int, nf4, fp4, nvfp4, mxfp4 (the last four are 4-bit)")
    p.add_argument("--rank", type=non_negative_int, default=0, help="low-rank r of methods that have one (ttq)")
    p.add_argument("--calib", default="c4", help="calibration set of calibrated methods (awq, gptq, awp)")
    p.add_argument("--calib-tokens", type=positive_int, default=2**17, help="calibration length in tokens")
    p.add_argument("--config", default=None, metavar="JSON",
                   help='the whole method config as JSON instead of --method/--bits/..., e.g. '
                        '\'{"method": "gptq", "quant": {"bits": 3, "group_size": 32}, "act_order": true}\'')
    add_scale_args(p)
    add_data_args(p)
    p.set_defaults(func=run)


def method_config(args):
    """The config of ``--config`` (a JSON dict, :func:`ttq.config_from_dict`) or of ``--method`` and the
    format options (the method's first table row, as ``ttq ppl`` builds it)."""
    from ttq.config import CalibSpec, config_from_dict
    from ttq.errors import ConfigError
    from ttq.formats.affine import QuantSpec
    from ttq.registry import RowOptions, table_rows

    if args.config is not None:
        try:
            return config_from_dict(json.loads(args.config))
        except json.JSONDecodeError as e:
            raise ConfigError(f"--config: invalid JSON ({e})") from None
    quant = QuantSpec(bits=args.bits, group_size=args.group_size, symmetric=args.symmetric, fmt=args.fmt)
    calib = CalibSpec(dataset=args.calib, n_tokens=args.calib_tokens)
    rows = table_rows(args.method, RowOptions(quant, scale_from_args(args), (args.rank,), (calib,)))
    if not rows:
        raise ConfigError(f"method {args.method!r} gives no configuration for these options; use --config")
    return rows[0][1]


def run(args) -> int:
    import ttq
    from ttq.calibrate import calibrate, calibration_tokens, config_p
    from ttq.checkpoint import check_output_dir
    from ttq.models import load_model, model_id

    check_output_dir(args.out, args.overwrite)  # before the model loads
    config = method_config(args)
    model, tok = load_model(args.model, args.gguf_file, DTYPES[args.dtype], args.device)
    calibration = None
    if getattr(config, "sequential", False):
        calibration = calibration_tokens(tok, config.calib, data_dir=args.data_dir, source=args.data_source)
    elif getattr(config, "needs_calibration", False):
        calibration = calibrate(model, tok, config.calib, p=config_p(config), data_dir=args.data_dir,
                                source=args.data_source, model_key=model_id(args.model, args.gguf_file), progress=True)
    plan = ttq.quantize_(model, config, calibration=calibration, progress=True)
    report = ttq.save_pretrained(model, args.out, tokenizer=tok, plan=plan, overwrite=args.overwrite)
    print(report.summary())
    return 0
