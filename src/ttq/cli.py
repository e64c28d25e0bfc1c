"""``ttq`` command line: parses arguments into configs and calls the library."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMANDS = ("ppl", "generate", "bench", "appendix_h", "hparams", "domain", "qtime")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ttq", description="Activation-aware test-time quantization of LLM weights")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"ttq.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"ttq.commands.{name}":
                raise
            continue
        mod.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"ttq {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
