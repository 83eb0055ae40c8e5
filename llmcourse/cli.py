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
    export = sub.add_parser("export", help="regenerate llmcourse/ from the notebooks (same as python -m llmcourse.export)")
    export.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the exporter, e.g. --check")
    args = parser.parse_args(argv)
    if args.command == "export":
        from .export import main as export_main

        return export_main(args.args)
    parser.print_help(sys.stdout)
    return 0
