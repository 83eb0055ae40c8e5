"""Benchmark: nanoGPT's CPU recipe against the course's recipe, trained side by side on tinyshakespeare.

Not a test (no `test_` prefix, so pytest does not collect it). Run it from the repository root:

    python tests/benchmarks/bench_recipe.py --json notebooks/data/day24_recipe_race.json

Both runs use the course's `Trainer`; only the settings differ. nanoGPT's CPU recipe is the `small`
preset (its README reports a validation loss of about 1.88 for it). The course's recipe keeps the model
(the same parameters), the batch and block sizes and the number of steps (the same tokens), and changes
only what Days 19 to 24 teach to tune: here, the learning rate. `llmcourse.experiments.race` trains the
two in turns, one evaluation interval at a time, so that their wall times compare on a busy machine.
Day 24 plots the JSON this script writes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
from pathlib import Path

# OpenMP threads that spin while they wait steal the cores from the other run and make timings erratic on
# a busy machine; waiting passively keeps the side-by-side comparison fair. Set before torch starts OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from llmcourse.experiments import race
from llmcourse.presets import preset_config
from llmcourse.train import prepare_data

NANOGPT = {"corpus": "tinyshakespeare"}
COURSE = {"corpus": "tinyshakespeare", "lr": 3e-3, "min_lr": 3e-4}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the results to this JSON file")
    parser.add_argument("--seed", type=int, default=1337)
    args = parser.parse_args()

    configs = {
        "nanoGPT's CPU recipe": preset_config("small", seed=args.seed, **NANOGPT),
        "the course's recipe": preset_config("small", seed=args.seed, **COURSE),
    }
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPU(s), torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("load average before (1, 5, 15 min): " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))
    data = prepare_data(next(iter(configs.values())))
    results = race(configs, data)
    for name, result in results.items():
        print(f"{name:22s} {result['parameters']:,} parameters, {result['tokens']:,} tokens, "
              f"{result['seconds']:6.1f} s, final val loss {result['final_val_loss']:.4f}, best {result['best_val_loss']:.4f}")
    base, ours = results["nanoGPT's CPU recipe"], results["the course's recipe"]
    print(f"wall time, course / nanoGPT recipe: {ours['seconds'] / base['seconds']:.3f}")
    if args.json:
        report = {
            "date": datetime.date.today().isoformat(), "machine": platform.platform(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "results": results,
        }
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
