"""pytest set-up shared by the unit tests and the notebooks (run under nbval)."""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

from llmcourse.export import notebook_environment

ROOT = Path(__file__).resolve().parent

# The notebooks' environment (offline data in ../shared/data, no Hugging Face hub, passive OpenMP
# threads) is defined once, in llmcourse/export.py, which `--run` uses too. Kernels started by nbval
# inherit this process's environment, so notebooks see it; variables already set are kept.
os.environ.update(notebook_environment(ROOT))

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
