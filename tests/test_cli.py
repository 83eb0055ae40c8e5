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


# ---- llmcourse train -----------------------------------------------------------------------------------

TINY_FLAGS = ["--preset", "tiny", "--max-steps", "20", "--warmup-steps", "5", "--eval-interval", "10", "--eval-iters", "2", "--log-interval", "5",
              "--n-embd", "16", "--block-size", "16", "--batch-size", "4"]


def train(*args) -> int:
    return cli.main(["train", *map(str, args)])


def test_train_writes_a_run_folder_that_plain_torch_can_load(tmp_path, corpus_file, capsys):
    import json

    import torch

    out = tmp_path / "run"
    assert train(*TINY_FLAGS, "--corpus", corpus_file, "--out", out) == 0
    printed = capsys.readouterr().out
    assert "parameters" in printed and "done: 20 steps" in printed
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "config.json", "last.pt", "log.jsonl"]
    checkpoint = torch.load(out / "last.pt", weights_only=True)
    assert {"model", "optimizer", "step", "config"} <= set(checkpoint) and checkpoint["step"] == 20
    assert "transformer.wte.weight" in checkpoint["model"]
    config = json.loads((out / "config.json").read_text())
    assert config["n_layer"] == 2 and config["n_embd"] == 16 and config["corpus"] == str(corpus_file)  # preset, then flags

    assert train("--resume", out, "--max-steps", "30") == 0  # --max-steps may raise the goal
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 30
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps[-1] == 30 and steps == sorted(steps)


def one_line_error(capsys, code: int) -> str:
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err and "error:" in err
    return err


def test_train_refuses_bad_input_with_one_line_and_status_2(tmp_path, corpus_file, capsys):
    out = tmp_path / "run"
    assert train(*TINY_FLAGS, "--corpus", corpus_file, "--out", out) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    assert "already holds a run" in one_line_error(capsys, train(*TINY_FLAGS, "--corpus", corpus_file, "--out", out))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing overwritten

    assert "unknown corpus" in one_line_error(capsys, train(*TINY_FLAGS, "--corpus", "no-such-corpus", "--out", tmp_path / "a"))
    assert not (tmp_path / "a").exists()  # and no empty folder left behind
    assert "divisible" in one_line_error(capsys, train("--n-embd", "100", "--n-head", "12", "--out", tmp_path / "b"))
    assert "no last.pt" in one_line_error(capsys, train("--resume", tmp_path))
    assert "keeps its settings" in one_line_error(capsys, train("--resume", out, "--n-embd", "32"))
    assert "--preset" in one_line_error(capsys, train("--resume", out, "--preset", "tiny"))
    # Week 6's flags are checked the same way
    assert "dtype must be one of" in one_line_error(capsys, train(*TINY_FLAGS, "--dtype", "float64", "--out", tmp_path / "c"))
    assert "divisible by grad_accum_steps" in one_line_error(capsys, train(*TINY_FLAGS, "--batch-size", "10", "--grad-accum-steps", "4", "--out", tmp_path / "d"))
    assert "keeps its settings" in one_line_error(capsys, train("--resume", out, "--dtype", "bfloat16"))
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()

    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "last.pt").write_bytes((out / "last.pt").read_bytes()[:1000])
    assert "damaged or truncated" in one_line_error(capsys, train("--resume", tmp_path / "broken"))


def test_train_argument_errors_are_one_line_too():
    for argv in (["train"], ["train", "--out", "x", "--n-layer", "two"], ["train", "--out", "x", "--bogus", "1"],
                 ["train", "--out", "x", "--resume", "y"], ["train", "--out", "x", "--preset", "huge"]):
        result = subprocess.run([sys.executable, "-m", "llmcourse", *argv], capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, (argv, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and "error:" in result.stderr, (argv, result.stderr)


def test_every_train_config_setting_is_a_flag():
    from dataclasses import fields

    from llmcourse.train import TrainConfig

    parser = cli.OneLineParser(prog="t")
    cli.add_train_arguments(parser)
    flags = {option for action in parser._actions for option in action.option_strings}
    for f in fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in flags, f.name
    assert {"--preset", "--out", "--resume", "--bias", "--no-bias"} <= flags
