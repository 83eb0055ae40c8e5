"""llmcourse.checkpoint (Day 21): the bundle, atomic saves, safe loading, exact resume (also after kill -9)."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from llmcourse.bpe import BPETokenizer
from llmcourse.chartok import CharTokenizer
from llmcourse.checkpoint import (
    CheckpointError,
    Checkpointer,
    load_checkpoint,
    load_pretrained,
    model_from_checkpoint,
    pretrained_path,
    restore_trainer,
    save_checkpoint,
    tokenizer_from_dict,
    tokenizer_to_dict,
    trainer_state,
    weights_only_bundle,
)
from llmcourse.data import load_corpus
from llmcourse.train import TrainConfig, Trainer, prepare_data

ROOT = Path(__file__).resolve().parents[1]


def small_config(corpus: Path, **overrides) -> TrainConfig:
    settings = dict(corpus=str(corpus), n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=4, max_steps=40,
                    warmup_steps=5, eval_interval=10, eval_iters=2, log_interval=5, dropout=0.1)
    return TrainConfig(**{**settings, **overrides})


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- tokenizers as plain values ----------------------------------------------------------------------


def test_tokenizers_round_trip_through_plain_values():
    char = CharTokenizer.from_text("to be or not to be", unknown="replace")
    again = tokenizer_from_dict(tokenizer_to_dict(char))
    assert again == char and again.unknown == "replace"
    bpe = BPETokenizer.train("to be or not to be, that is the question " * 20, 272)
    again = tokenizer_from_dict(tokenizer_to_dict(bpe))
    assert again.encode_ordinary("to be, or not") == bpe.encode_ordinary("to be, or not")
    with pytest.raises(CheckpointError, match="unknown tokenizer kind"):
        tokenizer_from_dict({"kind": "words"})
    with pytest.raises(TypeError):
        tokenizer_to_dict(object())


# ---- saving ------------------------------------------------------------------------------------------


def test_save_is_atomic_when_writing_fails(tmp_path, monkeypatch):
    path = save_checkpoint({"format": "x", "n": torch.arange(3)}, tmp_path / "last.pt")
    before = path.read_bytes()

    def crash(obj, fh):
        fh.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"format": "y"}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind


def test_save_creates_the_folder_and_replaces(tmp_path):
    path = tmp_path / "run" / "last.pt"
    save_checkpoint({"a": torch.ones(1)}, path)
    save_checkpoint({"a": torch.zeros(1)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.zeros(1))
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # the usual permissions, not mkstemp's private 0600


# ---- loading -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished(corpus_file, tmp_path_factory):
    """A finished small run with a Checkpointer: (trainer, its folder)."""
    folder = tmp_path_factory.mktemp("run")
    trainer = Trainer(small_config(corpus_file), log_path=folder / "log.jsonl", callbacks=[Checkpointer(folder)], progress=False)
    trainer.run()
    return trainer, folder


def test_refuses_missing_truncated_foreign_and_code_carrying_files(tmp_path, finished):
    _, folder = finished
    good = (folder / "last.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(good[: len(good) // 2])
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    torch.save({"weights": torch.ones(2)}, tmp_path / "foreign.pt")
    torch.save({"format": "llmcourse-checkpoint", "version": 99}, tmp_path / "future.pt")

    class RunsCode:
        def __reduce__(self):
            return (os.system, ("echo this must never run",))

    (tmp_path / "code.pt").write_bytes(pickle.dumps({"format": "llmcourse-checkpoint", "model": RunsCode()}, protocol=2))
    expectations = {
        "missing.pt": "no such checkpoint",
        "truncated.pt": "damaged or truncated",
        "empty.pt": "damaged or truncated",
        "text.pt": "damaged or truncated|refused",
        "foreign.pt": "not an llmcourse checkpoint",
        "future.pt": "version 99",
        "code.pt": "refused",
    }
    for name, message in expectations.items():
        with pytest.raises(CheckpointError, match=message) as info:
            load_checkpoint(tmp_path / name)
        assert "\n" not in str(info.value)  # one line
        assert name in str(info.value)


def test_checkpointer_writes_the_run_folder(finished):
    trainer, folder = finished
    assert sorted(p.name for p in folder.iterdir()) == ["best.pt", "config.json", "last.pt", "log.jsonl"]
    assert json.loads((folder / "config.json").read_text()) == trainer.config.to_dict()
    last = torch.load(folder / "last.pt", weights_only=True)  # plain torch can read it, safely
    assert {"model", "optimizer", "step", "config"} <= set(last)
    assert last["step"] == 40 and not any(k.startswith("_orig_mod") for k in last["model"])
    best = load_checkpoint(folder / "best.pt")
    evals = [r for r in trainer.history if r["eval"]]
    assert best["best_val_loss"] == min(r["val_loss"] for r in evals)
    # a checkpoint carries the training time at its evaluation, also one written in the middle of the run
    assert last["elapsed_s"] == evals[-1]["elapsed_s"] > 0
    assert best["elapsed_s"] == next(r["elapsed_s"] for r in evals if r["step"] == best["step"]) > 0
    lines = (folder / "log.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == trainer.history


def test_model_from_checkpoint_gives_the_same_logits(finished):
    trainer, folder = finished
    model = model_from_checkpoint(load_checkpoint(folder / "last.pt"))
    x = torch.randint(trainer.model.config.vocab_size, (2, 16))
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], trainer.model(x)[0], rtol=0, atol=0)
    assert not model.training


def test_weights_only_bundle_loads_but_cannot_resume(finished, tmp_path):
    _, folder = finished
    slim = save_checkpoint(weights_only_bundle(load_checkpoint(folder / "last.pt")), tmp_path / "slim.pt")
    assert slim.stat().st_size < (folder / "last.pt").stat().st_size / 2
    bundle = load_checkpoint(slim)
    model_from_checkpoint(bundle)
    with pytest.raises(CheckpointError, match="only weights"):
        restore_trainer(bundle)


# ---- resuming ----------------------------------------------------------------------------------------


def test_resume_in_process_is_bitwise_exact(corpus_file, tmp_path, stop_at):
    config = small_config(corpus_file)
    data = prepare_data(config)
    straight = Trainer(config, data, progress=False)
    straight.run()
    half = Trainer(config, data, progress=False, callbacks=[stop_at(20)])
    half.run()
    save_checkpoint(trainer_state(half), tmp_path / "half.pt")
    resumed = restore_trainer(load_checkpoint(tmp_path / "half.pt"), progress=False)  # data prepared again from the file
    assert resumed.step == 20
    resumed.run()
    assert same_tensors(straight.model.state_dict(), resumed.model.state_dict())
    a, b = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert all(same_tensors({k: a[i][k] for k in ("exp_avg", "exp_avg_sq")}, {k: b[i][k] for k in ("exp_avg", "exp_avg_sq")}) for i in a)
    assert [r["val_loss"] for r in straight.history if r["eval"]] == [r["val_loss"] for r in resumed.history if r["eval"]]


def test_resume_refuses_model_changes_and_allows_more_steps(finished):
    _, folder = finished
    bundle = load_checkpoint(folder / "last.pt")
    with pytest.raises(CheckpointError, match="cannot change n_embd"):
        restore_trainer(bundle, overrides={"n_embd": 32})
    longer = restore_trainer(bundle, overrides={"max_steps": 50}, progress=False)
    longer.run()
    assert longer.step == 50


RUN_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import torch
    from llmcourse.checkpoint import Checkpointer, load_checkpoint, restore_trainer
    from llmcourse.train import Callback, TrainConfig, Trainer

    mode, folder, config_json = sys.argv[1], sys.argv[2], sys.argv[3]
    config = TrainConfig.from_dict(__import__("json").loads(config_json))

    class Slow(Callback):  # gives the test time to kill the process in the middle of training
        def on_log(self, trainer, record):
            if trainer.step >= 20:
                open(folder + "/ready", "w").close()
                time.sleep(0.05)

    if mode == "straight":
        trainer = Trainer(config, progress=False)
    elif mode == "killed":
        trainer = Trainer(config, log_path=folder + "/log.jsonl", callbacks=[Checkpointer(folder), Slow()], progress=False)
    else:
        trainer = restore_trainer(load_checkpoint(folder + "/last.pt"), log_path=folder + "/log.jsonl", callbacks=[Checkpointer(folder)], progress=False)
    trainer.run()
    torch.save(trainer.model.state_dict(), folder + "/final.pt")
    """
)


def test_resume_after_kill_9_in_another_process_is_bitwise_exact(corpus_file, tmp_path):
    config = small_config(corpus_file, max_steps=60, log_interval=1, eval_interval=5)
    script = tmp_path / "run.py"
    script.write_text(RUN_SCRIPT)
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    straight_dir, run_dir = tmp_path / "straight", tmp_path / "killed"
    straight_dir.mkdir()
    run_dir.mkdir()
    argv = [sys.executable, str(script)]
    subprocess.run(argv + ["straight", str(straight_dir), json.dumps(config.to_dict())], check=True, env=env, timeout=120)

    victim = subprocess.Popen(argv + ["killed", str(run_dir), json.dumps(config.to_dict())], env=env)
    deadline = time.monotonic() + 60
    while not (run_dir / "ready").exists():
        assert victim.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "the run never reached step 20"
        time.sleep(0.01)
    time.sleep(0.3)  # well inside the slowed second half: between two checkpoints, or while writing one
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL
    killed_at = load_checkpoint(run_dir / "last.pt")["step"]
    assert 20 <= killed_at < 60 and not (run_dir / "final.pt").exists()

    subprocess.run(argv + ["resume", str(run_dir), json.dumps(config.to_dict())], check=True, env=env, timeout=120)
    straight = torch.load(straight_dir / "final.pt", weights_only=True)
    resumed = torch.load(run_dir / "final.pt", weights_only=True)
    assert same_tensors(straight, resumed)


# ---- the pretrained model -----------------------------------------------------------------------------


def test_pretrained_model_file_is_the_recorded_one():
    path = pretrained_path("shakespeare-char")
    record = json.loads(path.with_suffix(".json").read_text())
    assert hashlib.sha256(path.read_bytes()).hexdigest() == record["sha256"]
    assert path.stat().st_size <= 8 * 1024 * 1024


def test_pretrained_model_reproduces_its_recorded_loss():
    model, tokenizer, config = load_pretrained("shakespeare-char")
    record = json.loads(pretrained_path("shakespeare-char").with_suffix(".json").read_text())
    check = record["check"]  # a fixed slice of the validation text and the loss measured on it
    text = load_corpus(config.corpus)
    val_text = text[int(len(text) * 0.9):]
    ids = torch.tensor(tokenizer.encode(val_text[check["start"] : check["start"] + check["length"]]))
    blocks = ids[: (len(ids) - 1) // config.block_size * config.block_size + 1]
    x = blocks[:-1].view(-1, config.block_size)
    y = blocks[1:].view(-1, config.block_size)
    with torch.no_grad():
        loss = model(x, y)[1].item()
    assert abs(loss - check["loss"]) < 1e-3, (loss, check["loss"])
    assert not model.training


def test_unknown_pretrained_name():
    with pytest.raises(CheckpointError, match="shakespeare-char"):
        load_pretrained("gpt-5")
