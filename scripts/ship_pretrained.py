"""Ship a trained run as one of the package's pretrained models (hand-written; not exported from a notebook).

Run it from the repository root after `llmcourse train` has finished a run:

    python scripts/ship_pretrained.py runs/shakespeare-char --name shakespeare-char --command "llmcourse train ..."

It writes `llmcourse/pretrained/NAME.pt` (the run's best.pt without the optimizer and random states, which
only continuing a run needs) and `NAME.json` beside it: the exact command, the date, the machine, the
losses and the time of the run, the file's size and SHA-256, and a check: the model's loss on a fixed
slice of the validation text, which the tests recompute from the shipped file.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
from pathlib import Path

import torch

from llmcourse.checkpoint import PRETRAINED, load_checkpoint, model_from_checkpoint, save_checkpoint, tokenizer_from_dict, weights_only_bundle
from llmcourse.data import load_corpus
from llmcourse.train import TrainConfig

CHECK_LENGTH = 20_000  # characters of validation text for the recorded check


def check_loss(bundle: dict) -> dict:
    """The mean loss of the model on the first CHECK_LENGTH characters of the validation text, in full blocks."""
    config = TrainConfig.from_dict(bundle["config"])
    model, tokenizer = model_from_checkpoint(bundle), tokenizer_from_dict(bundle["tokenizer"])
    text = load_corpus(config.corpus)
    val_text = text[int(len(text) * 0.9):]
    ids = torch.tensor(tokenizer.encode(val_text[:CHECK_LENGTH]))
    blocks = ids[: (len(ids) - 1) // config.block_size * config.block_size + 1]
    x, y = blocks[:-1].view(-1, config.block_size), blocks[1:].view(-1, config.block_size)
    with torch.no_grad():
        loss = model(x, y)[1].item()
    return {"start": 0, "length": CHECK_LENGTH, "loss": loss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="the run's folder (with best.pt and log.jsonl)")
    parser.add_argument("--name", required=True, choices=sorted(PRETRAINED))
    parser.add_argument("--command", required=True, help="the exact command that trained the run")
    args = parser.parse_args()

    best = load_checkpoint(args.run / "best.pt")
    last = load_checkpoint(args.run / "last.pt")
    out = Path(__file__).resolve().parents[1] / "llmcourse" / "pretrained" / PRETRAINED[args.name]
    bundle = weights_only_bundle(best)
    # the training time at the best evaluation, from its log record (checkpoints written before the
    # trainer kept elapsed_s current during a run carry the time at the run's start instead)
    bundle["elapsed_s"] = next(r["elapsed_s"] for r in best["history"] if r["eval"] and r["step"] == best["step"])
    save_checkpoint(bundle, out)
    data = out.read_bytes()
    evaluations = [r for r in last["history"] if r["eval"]]
    record = {
        "name": args.name,
        "command": args.command,
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "torch": torch.__version__,
        "parameters": sum(t.numel() for k, t in best["model"].items() if k != "lm_head.weight"),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "steps": last["step"],
        "best_step": best["step"],
        "train_minutes": round(last["history"][-1]["elapsed_s"] / 60, 1),  # the last record: the time of the whole run
        "best_val_loss": round(best["best_val_loss"], 4),
        "evaluations": [[r["step"], round(r["train_loss"], 4), round(r["val_loss"], 4)] for r in evaluations],
        "check": check_loss(best),
    }
    out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k != "evaluations"}, indent=1))


if __name__ == "__main__":
    main()
