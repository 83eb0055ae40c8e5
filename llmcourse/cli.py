# Hand-written (not exported from a notebook): the `llmcourse` console script.
"""The `llmcourse` command line. Training and generation commands arrive with Week 5 (Day 30)."""

from __future__ import annotations

import argparse
import sys

from . import __version__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmcourse", description="Build, train and run a GPT from scratch.")
    parser.add_argument("--version", action="version", version=f"llmcourse {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser(
        "export",
        help="regenerate llmcourse/ from the notebooks; takes the options of python -m llmcourse.export (--check, --run, --stamp)",
        add_help=False,
    )
    args, rest = parser.parse_known_args(argv)
    if args.command == "export":
        from .export import main as export_main

        return export_main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    parser.print_help(sys.stdout)
    return 0
