"""llmcourse.train (Day 20): TrainConfig, prepare_data, clip_grad_norm, the Trainer loop and its log."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from llmcourse.bpe import BPETokenizer
from llmcourse.schedule import cosine_lr
from llmcourse.train import Callback, NonFiniteLossError, TrainConfig, Trainer, clip_grad_norm, prepare_data


# ---- TrainConfig -------------------------------------------------------------------------------------


def test_defaults_are_nanogpts_cpu_recipe():
    c = TrainConfig()
    assert (c.n_layer, c.n_head, c.n_embd, c.block_size, c.batch_size, c.max_steps) == (4, 4, 128, 64, 12, 2000)
    assert (c.lr, c.min_lr, c.warmup_steps, c.beta2, c.dropout, c.bias, c.grad_clip) == (1e-3, 1e-4, 100, 0.99, 0.0, False, 1.0)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(n_layer=0), ValueError, "n_layer"),
        (dict(n_layer=2.0), TypeError, "n_layer"),
        (dict(bias=1), TypeError, "bias"),
        (dict(lr="1e-3"), TypeError, "lr"),
        (dict(lr=float("nan")), TypeError, "lr"),
        (dict(min_lr=1e-2), ValueError, "min_lr"),
        (dict(tokenizer="words"), ValueError, "tokenizer"),
        (dict(tokenizer="bpe", bpe_vocab_size=200), ValueError, "bpe_vocab_size"),
        (dict(warmup_steps=3000), ValueError, "warmup_steps"),
        (dict(beta2=1.0), ValueError, "beta2"),
        (dict(grad_clip=-1.0), ValueError, "grad_clip"),
        (dict(n_embd=100, n_head=12), ValueError, "divisible"),
        (dict(dropout=1.0), ValueError, "dropout"),
    ],
)
def test_config_refuses_bad_settings(kwargs, error, message):
    with pytest.raises(error, match=message):
        TrainConfig(**kwargs)


def test_config_round_trip_and_unknown_keys():
    c = TrainConfig(n_layer=2, dropout=0.1)
    assert TrainConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    with pytest.raises(ValueError, match="learning_rate"):
        TrainConfig.from_dict({**c.to_dict(), "learning_rate": 1.0})
    assert all(f.metadata.get("help") for f in dataclasses.fields(TrainConfig))  # every setting says what it is


# ---- data ---------------------------------------------------------------------------------------------


def test_prepare_data_splits_like_nanogpt(corpus_file, tiny_config):
    data = prepare_data(tiny_config())
    text = corpus_file.read_text(encoding="utf-8")
    assert len(data.train) == int(len(text) * 0.9) and len(data.val) == len(text) - int(len(text) * 0.9)
    assert data.tokenizer.decode(data.train.tolist()) + data.tokenizer.decode(data.val.tolist()) == text
    assert data.train.dtype == torch.int64


def test_prepare_data_bpe_is_trained_on_the_training_text_only(corpus_file, tiny_config):
    data = prepare_data(tiny_config(tokenizer="bpe", bpe_vocab_size=300))
    assert isinstance(data.tokenizer, BPETokenizer) and data.tokenizer.vocab_size == 300
    text = corpus_file.read_text(encoding="utf-8")
    assert data.tokenizer.decode(data.val.tolist()) == text[int(len(text) * 0.9):]
    again = BPETokenizer.train(text[: int(len(text) * 0.9)], 300)
    assert again.merges == data.tokenizer.merges


def test_prepare_data_refuses_a_corpus_too_short(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("to be or not to be")
    with pytest.raises(ValueError, match="fewer than one block"):
        prepare_data(TrainConfig(corpus=str(path), block_size=16))
    with pytest.raises((ValueError, FileNotFoundError), match="nope"):
        prepare_data(TrainConfig(corpus="nope"))


# ---- clipping -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale, max_norm", [(100.0, 1.0), (0.01, 1.0), (5.0, math.inf)])
def test_clip_grad_norm_equals_torch(scale, max_norm):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in ((3, 4), (4,), (2, 2, 2))]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p, q in zip(params, twins):
        p.grad = torch.randn(p.shape) * scale
        q.grad = p.grad.clone()
    ours = clip_grad_norm(params, max_norm)
    theirs = torch.nn.utils.clip_grad_norm_(twins, max_norm)
    torch.testing.assert_close(ours, theirs)
    for p, q in zip(params, twins):
        torch.testing.assert_close(p.grad, q.grad)


def test_clip_grad_norm_reads_nothing_back_and_refuses_bad_norms(no_value_reads):
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 10.0)
    with no_value_reads():
        norm = clip_grad_norm([p], 1.0)
    torch.testing.assert_close(norm, torch.tensor(math.sqrt(300.0)))
    torch.testing.assert_close(p.grad.norm(), torch.tensor(1.0), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm([p], 0.0)


# ---- the loop -----------------------------------------------------------------------------------------


def test_a_run_logs_evaluates_and_learns(tiny_config, tmp_path):
    config = tiny_config(max_steps=60, lr=3e-3, eval_interval=20)
    trainer = Trainer(config, log_path=tmp_path / "log.jsonl", progress=False)
    history = trainer.run()
    evals = [r for r in history if r["eval"]]
    logs = [r for r in history if not r["eval"]]
    assert [r["step"] for r in evals] == [0, 20, 40, 60]
    assert [r["step"] for r in logs] == list(range(5, 61, 5))
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5
    assert trainer.best_val_loss == min(r["val_loss"] for r in evals)
    keys = {"step", "train_loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s", "eval"}
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert lines == history and all(set(r) == keys for r in lines)
    assert all(r["tokens_per_s"] > 0 and r["grad_norm"] > 0 for r in logs)
    for r in logs:  # the record of step s carries the learning rate of the step just taken
        assert r["lr"] == cosine_lr(r["step"] - 1, max_lr=config.lr, min_lr=config.min_lr, warmup_steps=config.warmup_steps, decay_steps=config.max_steps)


def test_runs_repeat_exactly_with_a_seed(tiny_config):
    config = tiny_config(dropout=0.1)
    data = prepare_data(config)
    a, b = Trainer(config, data, progress=False), Trainer(config, data, progress=False)
    a.run()
    b.run()
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))
    c = Trainer(dataclasses.replace(config, seed=7), data, progress=False)
    c.run()
    assert not torch.equal(a.model.transformer.wte.weight, c.model.transformer.wte.weight)


def test_callbacks_see_every_record_and_can_stop(tiny_config):
    seen = {"start": 0, "log": [], "eval": [], "end": 0}

    class Spy(Callback):
        def on_train_start(self, trainer):
            seen["start"] += 1

        def on_log(self, trainer, record):
            seen["log"].append(record["step"])

        def on_eval(self, trainer, record):
            seen["eval"].append((record["step"], record["improved"]))
            if trainer.step == 20:
                trainer.should_stop = True

        def on_train_end(self, trainer):
            seen["end"] += 1

    trainer = Trainer(tiny_config(), callbacks=[Spy()], progress=False)
    trainer.run()
    assert trainer.step == 20 and seen["start"] == seen["end"] == 1
    assert seen["log"] == [5, 10, 15, 20] and [s for s, _ in seen["eval"]] == [0, 10, 20] and seen["eval"][0][1]
    trainer.run()  # run again: it continues where it stopped
    assert trainer.step == 30


def test_a_non_finite_loss_stops_the_run_with_a_clear_message(tiny_config, poison_loss):
    evaluations = []

    class Count(Callback):
        def on_eval(self, trainer, record):
            evaluations.append(trainer.step)

    config = tiny_config(max_steps=40)
    trainer = Trainer(config, callbacks=[Count()], progress=False)
    poison_loss(trainer, from_step=12)  # the loss is nan from step 12 on
    with pytest.raises(NonFiniteLossError, match=r"training loss is nan at step 15"):
        trainer.run()
    assert evaluations == [0, 10]  # nothing evaluated (or saved) after the loss went bad


def test_trainer_refuses_a_non_config():
    with pytest.raises(TypeError, match="TrainConfig"):
        Trainer({"n_layer": 2})
