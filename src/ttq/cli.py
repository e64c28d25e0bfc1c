"""``ttq`` command line: parses arguments into configs and calls the library."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from ttq.errors import TTQError

COMMANDS = ("ppl", "generate", "bench", "appendix_h", "hparams", "domain", "qtime", "allocate", "eval", "quantize", "export")


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
    """Run one subcommand; returns the exit status.

    Exit status: 0 done; 2 bad input or a failure ttq explains (a :class:`ttq.errors.TTQError`, a bad value,
    a missing file, an operating-system error such as a full disk); 130 interrupted (Ctrl-C); 1 an unexpected
    error (a bug: ``-v`` shows its traceback).
    """
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    where = f"ttq {args.command}"
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"\n{where}: interrupted; finished rows are cached, the same command resumes", file=sys.stderr)
        return 130
    except (TTQError, ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"{where}: error: {e}", file=sys.stderr)
        return 2
    except MemoryError:
        print(f"{where}: error: out of memory; try a smaller --seqlen, fewer --max-windows or --dtype bfloat16",
              file=sys.stderr)
        return 2
    except OSError as e:  # permissions, a full disk, a vanished file
        print(f"{where}: error: {e.strerror or e}{f': {e.filename}' if e.filename else ''}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - the last line of defence: one clear line, the traceback on request
        if args.verbose:
            raise
        if type(e).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError
            print(f"{where}: error: out of GPU memory ({e}); try a smaller --seqlen or --dtype bfloat16", file=sys.stderr)
            return 2
        print(f"{where}: unexpected error: {type(e).__name__}: {e}\n(this is a bug in ttq; rerun with -v for the "
              "traceback and report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
