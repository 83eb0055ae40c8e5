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
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the Hugging Face hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

collect_ignore_glob = ["_build/*", ".venv/*"]

_notebook_results: dict[str, set[str]] = defaultdict(set)


def pytest_runtest_logreport(report):
    """Remember, per notebook, whether any of its cells failed (nbval makes one test per cell)."""
    path = report.nodeid.split("::", 1)[0]
    if path.endswith(".ipynb") and (report.when == "call" or report.failed):
        _notebook_results[path].add(report.outcome)


def pytest_terminal_summary(terminalreporter):
    if not _notebook_results:
        return
    failed = sorted(p for p, outcomes in _notebook_results.items() if "failed" in outcomes)
    passed = len(_notebook_results) - len(failed)
    terminalreporter.write_line(f"notebooks: {passed} passed, {len(failed)} failed")
    for path in failed:
        terminalreporter.write_line(f"  failed: {path}")
