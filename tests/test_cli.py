"""The `llmcourse` console script."""

import subprocess
import sys
from pathlib import Path

import pytest

from llmcourse import __version__, cli

ROOT = Path(__file__).resolve().parents[1]


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"llmcourse {__version__}"


def test_export_subcommand_runs_the_exporter(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    assert cli.main(["export", "--check"]) == 0
    assert "llmcourse/ matches the notebooks" in capsys.readouterr().out


def test_console_script_is_installed():
    script = Path(sys.executable).with_name("llmcourse")  # beside the environment's python
    assert script.exists(), "pip install -e . should install the `llmcourse` script"
    result = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "export" in result.stdout
