"""The GPU report script (tests/benchmarks/gpu_report.py) refuses to invent figures without a GPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent / "benchmarks" / "gpu_report.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the script measures for real (minutes)")
def test_without_a_gpu_nothing_is_measured_or_written(tmp_path):
    out = tmp_path / "report.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == "gpu_report: no CUDA GPU here; nothing measured, nothing written"
    assert not out.exists()
