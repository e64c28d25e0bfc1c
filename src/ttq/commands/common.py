"""Argument helpers shared by the subcommands."""

from __future__ import annotations

import argparse

from ttq.models import DTYPES  # the commands take it from here


def int_list(s: str) -> list[int]:
    try:
        return [int(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def str_list(s: str) -> list[str]:
    return [v.strip() for v in s.split(",") if v.strip()]


def add_model_args(p: argparse.ArgumentParser, offload: bool = False) -> None:
    """``--model --gguf-file --dtype --device``; with ``offload``, ``--max-memory`` too (:func:`load_kwargs`)."""
    from ttq.models import DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL, help=f"local HF dir, .gguf file, hub id, or {DEFAULT_MODEL!r} (default)")
    p.add_argument("--gguf-file", default=None, help="GGUF file name inside --model")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--device", default="cpu")
    if offload:
        p.add_argument("--max-memory", type=memory_size, default=None, metavar="SIZE",
                       help="models bigger than memory: keep at most SIZE of weights (e.g. 200MB, 2GiB) on --device, "
                            "the rest offloaded by accelerate (on the CPU to disk, under the ttq cache; on a GPU to "
                            "CPU memory, then disk) and loaded block by block at forward time (default: all in memory)")


def memory_size(s: str) -> str:
    """argparse type: a memory size such as ``200MB`` or ``2GiB`` (:func:`ttq.offload.memory_bytes`)."""
    from ttq.errors import ConfigError
    from ttq.offload import memory_bytes

    try:
        memory_bytes(s)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return s


def load_kwargs(args) -> dict:
    """Extra keywords for :func:`ttq.models.load_model` from ``--max-memory`` (none without it)."""
    if getattr(args, "max_memory", None) is None:
        return {}
    from ttq.models import check_device
    from ttq.offload import dispatch_kwargs

    return dispatch_kwargs(args.max_memory, check_device(args.device))


def add_scale_args(p: argparse.ArgumentParser) -> None:
    from ttq.methods.scaling import FORMS, ScaleSpec

    d = ScaleSpec()
    p.add_argument("--alpha", type=float, default=d.alpha, help=f"exponent of the diagonal statistic (default {d.alpha})")
    p.add_argument("--lam", type=float, default=d.lam, help=f"damping lambda (default {d.lam})")
    p.add_argument("--p", type=float, default=d.p, help=f"l_p norm over tokens (default {d.p})")
    p.add_argument("--form", default=d.form, choices=FORMS, help=f"form of the diagonal (default {d.form})")


def add_data_args(p: argparse.ArgumentParser, sources: bool = True) -> None:
    """``--data-dir`` (and ``--data-source``): where the evaluation/calibration texts come from."""
    p.add_argument("--data-dir", default=None, help="folder with wikitext2/, ptb/, c4/ (default: ../shared/data or $TTQ_DATA_DIR)")
    if sources:
        p.add_argument("--data-source", default="local", choices=("local", "hf"), help="local files or the HF hub")


def scale_from_args(args):
    from ttq.methods.scaling import ScaleSpec

    return ScaleSpec(alpha=args.alpha, lam=args.lam, p=args.p, form=args.form)


def add_out_args(p: argparse.ArgumentParser, default: str | None, suffixes: str) -> None:
    """``--out PREFIX`` (files ``PREFIX<suffix>``, suffix appended) and ``--overwrite``."""
    p.add_argument("--out", default=default,
                   help=f"prefix of the {suffixes} outputs (appended: exp.1 -> exp.1.md)"
                        + ("" if default else "; default: print only"))
    p.add_argument("--overwrite", action="store_true", help="replace output files that exist (default: refuse)")


def _int(s: str, expected: str) -> int:
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {s!r}") from None


def positive_int(s: str) -> int:
    """argparse type: an integer >= 1."""
    v = _int(s, "a positive integer")
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def non_negative_int(s: str) -> int:
    """argparse type: an integer >= 0."""
    v = _int(s, "a non-negative integer")
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {v}")
    return v


def group_size_arg(s: str) -> int:
    """argparse type: a positive group size or -1 (per output channel)."""
    v = _int(s, "a positive integer or -1")
    if v < 1 and v != -1:
        raise argparse.ArgumentTypeError(f"must be a positive integer or -1 (per output channel), got {v}")
    return v


def seqlen_arg(s: str) -> int:
    """argparse type: a window length of at least 2 tokens (one to predict from, one to predict)."""
    v = positive_int(s)
    if v < 2:
        raise argparse.ArgumentTypeError(f"must be at least 2 (a window predicts its tokens 2..T), got {v}")
    return v


def add_row_args(p: argparse.ArgumentParser) -> None:
    """The options a table's method rows are made from (``ttq ppl``, ``ttq eval``)."""
    from ttq.eval.table import method_choices

    p.add_argument("--methods", type=str_list, default="fp,rtn,awq,ttq",
                   help=f"subset of {','.join(method_choices())} (the registered methods)")
    p.add_argument("--bits", type=int_list, default="3", help="comma-separated, 2..8")
    p.add_argument("--group-size", type=int_list, default="32", help="comma-separated; -1 = per output channel")
    p.add_argument("--rank", type=int_list, default="0,16", help="TTQ low-rank r values")


def check_kv_cache_dtype(args: argparse.Namespace) -> None:
    """``--kv-cache-dtype`` sets the static cache of compiled decode steps: refused without ``--compile``."""
    if args.kv_cache_dtype and not args.compile:
        from ttq.errors import ConfigError

        raise ConfigError(f"--kv-cache-dtype {args.kv_cache_dtype} sets the static cache of compiled decode steps; "
                          f"add --compile")
