"""CLI subcommands; each module exposes ``add_parser(subparsers)`` that sets ``func``."""
