"""pytest set-up shared by the unit tests and the notebooks (run under nbval)."""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent

# Offline data: a local copy of tinyshakespeare sits in ../shared/data on the course's own machines.
# Kernels started by nbval inherit this environment, so notebooks see it too.
_shared_data = ROOT.parent / "shared" / "data"
if "LLMCOURSE_DATA_DIR" not in os.environ and _shared_data.is_dir():
    os.environ["LLMCOURSE_DATA_DIR"] = str(_shared_data)
# OpenMP threads that spin while waiting make torch crawl when another process shares the cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the Hugging Face hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

collect_ignore_glob = ["_build/*", ".venv/*"]

NOTEBOOK_BUDGET_SECONDS = 60  # each notebook, on the course's 2-core CPU machine
_notebook_results: dict[str, set[str]] = defaultdict(set)
_notebook_seconds: dict[str, float] = defaultdict(float)


def pytest_runtest_logreport(report):
    """Remember, per notebook, whether any of its cells failed (nbval makes one test per cell)."""
    path = report.nodeid.split("::", 1)[0]
    if path.endswith(".ipynb"):
        _notebook_seconds[path] += report.duration
        if report.when == "call" or report.failed:
            _notebook_results[path].add(report.outcome)


def pytest_terminal_summary(terminalreporter):
    if not _notebook_results:
        return
    failed = sorted(p for p, outcomes in _notebook_results.items() if "failed" in outcomes)
    passed = len(_notebook_results) - len(failed)
    terminalreporter.write_line(f"notebooks: {passed} passed, {len(failed)} failed")
    for path in failed:
        terminalreporter.write_line(f"  failed: {path}")
    slow = sorted(_notebook_seconds.items(), key=lambda item: -item[1])
    total = sum(_notebook_seconds.values())
    terminalreporter.write_line(
        f"notebook time: {total / 60:.1f} min in all; "
        + ", ".join(f"{Path(p).stem.split('_')[0]} {s:.0f}s" for p, s in sorted(_notebook_seconds.items()))
    )
    for path, seconds in slow:
        if seconds > NOTEBOOK_BUDGET_SECONDS:
            terminalreporter.write_line(f"  over the {NOTEBOOK_BUDGET_SECONDS} s budget: {path} ({seconds:.0f} s)")
