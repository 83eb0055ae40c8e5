# Hand-written (not exported from a notebook): the `llmcourse` console script.
"""The `llmcourse` command line: `llmcourse train` (Day 23; under torchrun, Day 35), `llmcourse generate` (Day 30), `llmcourse export-hf` (Day 38) and `llmcourse export`.

This file stays thin: it builds the parser and hands each command to its pieces in
`llmcourse.commands`, which Day 30's notebook exports. Bad input ends with one line on stderr and exit
status 2, never a traceback. Nothing here imports torch: `llmcourse --help` and `llmcourse export`
start at once, and the `train` flags (made from `TrainConfig`) are added only when the command is `train`.
"""

from __future__ import annotations

import argparse
import contextlib
import sys

from . import __version__
from .commands import (  # noqa: F401  (ERRORS_EXIT and INTERRUPTED_EXIT stay importable from here)
    ERRORS_EXIT,
    INTERRUPTED_EXIT,
    OneLineParser,
    add_generate_arguments,
    add_train_arguments,
    report_error,
    run_generate,
    run_train,
)

GENERATE_DESCRIPTION = """\
Write text with a trained model: the shipped shakespeare-char, a checkpoint file, or a run folder of
llmcourse train. The text is printed token by token as it is made; the same --seed writes the same
text, with the KV cache or without it. Bad input ends with one line on stderr and exit status 2.
"""
GENERATE_EXAMPLES = """\
examples:
  llmcourse generate --prompt $'ROMEO:\\n' --max-new-tokens 200
  llmcourse generate --temperature 0 --no-cache                # greedy, without the KV cache
  llmcourse generate --checkpoint runs/tiny --num-samples 3 --output-file samples.txt
"""

EXPORT_HF_DESCRIPTION = """\
Write a trained model as a Hugging Face folder: config.json, model.safetensors, tokenizer_config.json and
the model's and tokenizer's code, which transformers loads with trust_remote_code=True and no llmcourse
installed. DIR must be new, empty, or an earlier export-hf folder (whose files are overwritten); a folder
holding anything else is refused. Bad input ends with one line on stderr and exit status 2.
"""
EXPORT_HF_EXAMPLES = """\
examples:
  llmcourse export-hf --out shakespeare-char-hf
  llmcourse export-hf --checkpoint runs/tiny --out tiny-hf        # a run folder of llmcourse train: its best.pt
"""


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
    generate = sub.add_parser(
        "generate",
        help="write text with a trained model, printed as it is made (llmcourse generate --help)",
        description=GENERATE_DESCRIPTION,
        epilog=GENERATE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_generate_arguments(generate)
    export_hf = sub.add_parser(
        "export-hf",
        help="write a model as a Hugging Face folder that transformers loads (llmcourse export-hf --help)",
        description=EXPORT_HF_DESCRIPTION,
        epilog=EXPORT_HF_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    export_hf.add_argument("--checkpoint", default="shakespeare-char", metavar="NAME|PATH",
                           help="shakespeare-char (the default, a model the package ships), a checkpoint file, "
                                "or a run folder of llmcourse train, whose best.pt is used")
    export_hf.add_argument("--out", required=True, metavar="DIR", help="the folder to write")
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
        from .distributed import distributed_session  # Day 35: join torchrun's processes, when it started several

        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(distributed_session())
            except (ValueError, RuntimeError) as err:
                return report_error("train", err)
            return run_train(args)
    if args.command == "generate":
        return run_generate(args)
    if args.command == "export-hf":
        from .hf import run_export_hf  # Day 38; imports torch, so only for this command

        return run_export_hf(args)
    parser.print_help(sys.stdout)
    return 0
