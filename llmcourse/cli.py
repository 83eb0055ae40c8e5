# Hand-written (not exported from a notebook): the `llmcourse` console script.
"""The `llmcourse` command line: `llmcourse train` (Day 23) and `llmcourse export`.

Every `TrainConfig` setting is a flag of `llmcourse train`, made from the dataclass itself, so the
command line and the training code cannot drift apart. Bad input ends with one line on stderr and
exit status 2, never a traceback, and nothing is overwritten.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import MISSING, fields

from . import __version__

ERRORS_EXIT = 2  # bad input: a one-line message, nothing overwritten
INTERRUPTED_EXIT = 130  # Ctrl-C, as shells report it


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr (no usage block) and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(ERRORS_EXIT, f"{self.prog}: error: {message}\n")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `llmcourse train`: the run's folder, a preset, and one flag per TrainConfig field."""
    from .presets import PRESETS
    from .train import TrainConfig

    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", metavar="DIR", help="a new folder for the run: last.pt, best.pt, log.jsonl, config.json")
    where.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last.pt, with its saved settings")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="start from a preset's settings; other flags override it")
    settings = parser.add_argument_group("training settings (TrainConfig; a flag overrides the preset)")
    for f in fields(TrainConfig):
        default = f.default if f.default is not MISSING else None
        help_text = f"{f.metadata.get('help', '')} (default: {default})"
        if f.type in (bool, "bool"):
            settings.add_argument(_flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            kind = {"int": int, "float": float, "str": str}.get(f.type, f.type) if isinstance(f.type, str) else f.type
            settings.add_argument(_flag(f.name), dest=f.name, type=kind, default=None, metavar=kind.__name__.upper(), help=help_text)


def run_train(args: argparse.Namespace) -> int:
    """`llmcourse train`: start or resume a run; returns the exit status."""
    from .checkpoint import CheckpointError
    from .presets import describe_run, preset_config, resume_run, start_run
    from .train import NonFiniteLossError, TrainConfig

    overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name) is not None}
    trainer = None
    try:
        if args.resume is not None:
            if args.preset is not None:
                raise ValueError("--preset chooses the settings of a new run; a resumed run keeps its own")
            trainer = resume_run(args.resume, **overrides)
        else:
            trainer = start_run(preset_config(args.preset, **overrides), args.out)
        print(describe_run(trainer), flush=True)
        trainer.run()
    except KeyboardInterrupt:
        where = f" at step {trainer.step}" if trainer is not None else ""
        folder = args.resume or args.out
        print(f"llmcourse train: interrupted{where}; resume with: llmcourse train --resume {folder}", file=sys.stderr)
        return INTERRUPTED_EXIT
    except (ValueError, TypeError, OSError, CheckpointError, NonFiniteLossError) as err:
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"llmcourse train: error: {message}", file=sys.stderr)
        return ERRORS_EXIT
    took = f"{trainer.elapsed_s:.0f} s" if trainer.elapsed_s < 120 else f"{trainer.elapsed_s / 60:.1f} min"
    print(f"done: {trainer.step} steps in {took}; best validation loss {trainer.best_val_loss:.4f}; files in {args.resume or args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="llmcourse", description="Build, train and run a GPT from scratch.")
    parser.add_argument("--version", action="version", version=f"llmcourse {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    sub.add_parser(
        "export",
        help="regenerate llmcourse/ from the notebooks; takes the options of python -m llmcourse.export (--check, --run, --stamp)",
        add_help=False,
    )
    train = sub.add_parser(
        "train",
        help="train a GPT on a corpus (llmcourse train --help lists every setting)",
        description="Train a GPT. A new run needs --out DIR; --resume DIR continues one exactly where its last.pt stopped.",
    )
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:  # its flags come from TrainConfig: import torch only when they are needed
        add_train_arguments(train)
    args, rest = parser.parse_known_args(argv)
    if args.command == "export":
        from .export import main as export_main

        return export_main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "train":
        return run_train(args)
    parser.print_help(sys.stdout)
    return 0
