"""Week 6's GPU report: run every day's GPU measurements on a real GPU and record them as data.

Usage (on a machine with a CUDA GPU, from the repository root)::

    python tests/benchmarks/gpu_report.py            # writes notebooks/data/gpu_report.json
    python tests/benchmarks/gpu_report.py --out F    # somewhere else

Each Week 6 module that measures something on a GPU exports ``gpu_report_section(device) -> dict``;
this script calls them in day order and writes one JSON file with the device's name and compute
capability, the torch and CUDA versions and the date, so that no GPU figure in the book is typed by
hand. The notebooks show the file's figures when it exists. Without a GPU the script says so, writes
nothing and exits with status 2.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "notebooks" / "data" / "gpu_report.json"
SECTIONS = {"day31": "llmcourse.perf", "day32": "llmcourse.amp", "day33": "llmcourse.kernels", "day34": "llmcourse.memory", "day36": "llmcourse.capstone"}  # key -> module


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"the JSON file to write (default: {DEFAULT_OUT.relative_to(ROOT)})")
    parser.add_argument("--only", nargs="*", choices=sorted(SECTIONS), help="measure these sections only")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("gpu_report: no CUDA GPU here; nothing measured, nothing written", file=sys.stderr)
        return 2
    from llmcourse.checkpoint import write_atomically

    device = torch.device("cuda")
    report = {
        "device": torch.cuda.get_device_name(device),
        "capability": list(torch.cuda.get_device_capability(device)),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "date": datetime.date.today().isoformat(),
        "python": platform.python_version(),
    }  # then one entry per section: "day31", "day32", ...
    for key, module_name in SECTIONS.items():
        if args.only and key not in args.only:
            continue
        module = importlib.import_module(module_name)
        start = time.perf_counter()
        section = module.gpu_report_section(device)
        section["seconds_to_measure"] = round(time.perf_counter() - start, 1)
        report[key] = section
        print(f"gpu_report: {key} ({module_name}) measured in {section['seconds_to_measure']} s", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(args.out, lambda fh: fh.write((json.dumps(report, indent=1) + "\n").encode("utf-8")))
    print(f"gpu_report: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
