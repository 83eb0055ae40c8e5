"""Week 6's settings in the Day 20 Trainer: dtype, compile, grad_accum_steps, activation_checkpointing.

Each must train what the plain loop trains (to float tolerance, or within a loss tolerance for the
16-bit dtypes), keep checkpoints plain and resumable, and refuse bad values at the edges.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from llmcourse.checkpoint import load_checkpoint, restore_trainer, save_checkpoint, trainer_state
from llmcourse.memory import CheckpointedBlock
from llmcourse.presets import RESUMABLE, describe_run
from llmcourse.train import TrainConfig, Trainer, prepare_data


@pytest.fixture(scope="module")
def data(tiny_config):
    return prepare_data(tiny_config())


def trained(config: TrainConfig, data, **kwargs) -> Trainer:
    trainer = Trainer(config, data, progress=False, **kwargs)
    trainer.run()
    return trainer


def largest_difference(a: Trainer, b: Trainer) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.model.parameters(), b.model.parameters()))


def test_the_new_settings_default_to_the_plain_loop(tiny_config, data):
    c = TrainConfig()
    assert (c.dtype, c.compile, c.grad_accum_steps, c.activation_checkpointing) == ("float32", False, 1, False)
    trainer = Trainer(tiny_config(), data, progress=False)
    assert not trainer.scaled_up and trainer.training_model is trainer.model
    assert (trainer.rank, trainer.world_size, trainer.dtype, trainer.scaler) == (0, 1, torch.float32, None)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dtype="float64"), "dtype"),
        (dict(dtype="bf16"), "dtype"),
        (dict(grad_accum_steps=0), "grad_accum_steps"),
        (dict(batch_size=6, grad_accum_steps=4), "divisible by grad_accum_steps"),
    ],
)
def test_bad_week6_settings_are_refused_by_name(tiny_config, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**kwargs)


@pytest.mark.parametrize("name, value", [("compile", 1), ("activation_checkpointing", "yes"), ("grad_accum_steps", 2.0), ("dtype", None)])
def test_week6_settings_check_their_types(tiny_config, name, value):
    with pytest.raises(TypeError, match=name):
        tiny_config(**{name: value})


def test_a_config_saved_before_week6_loads_with_the_defaults(tiny_config):
    old = tiny_config().to_dict()
    for name in ("dtype", "compile", "grad_accum_steps", "activation_checkpointing"):
        del old[name]
    assert TrainConfig.from_dict(old) == tiny_config()


def test_the_shipped_models_config_loads():
    from llmcourse.checkpoint import load_pretrained

    _, _, config = load_pretrained()
    assert config.dtype == "float32" and config.grad_accum_steps == 1


@pytest.mark.parametrize("steps", [2, 4])
def test_gradient_accumulation_trains_what_the_big_batch_trains(tiny_config, data, steps):
    plain = trained(tiny_config(batch_size=8), data)
    accumulated = trained(tiny_config(batch_size=8, grad_accum_steps=steps), data)
    assert accumulated.scaled_up
    assert largest_difference(plain, accumulated) < 1e-5
    assert [r["step"] for r in plain.history] == [r["step"] for r in accumulated.history]
    for a, b in zip(plain.history, accumulated.history):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)


def test_activation_checkpointing_trains_the_same_weights_bit_for_bit(tiny_config, data):
    plain = trained(tiny_config(), data)
    checkpointed = trained(tiny_config(activation_checkpointing=True), data)
    assert all(type(b) is CheckpointedBlock for b in checkpointed.model.transformer.h)
    assert all(torch.equal(p, q) for p, q in zip(plain.model.parameters(), checkpointed.model.parameters()))
    assert list(trainer_state(checkpointed)["model"]) == list(trainer_state(plain)["model"])


def test_bfloat16_autocast_trains_close_to_float32(tiny_config, data):
    plain = trained(tiny_config(max_steps=60), data)
    bf16 = trained(tiny_config(max_steps=60, dtype="bfloat16"), data)
    assert bf16.dtype == torch.bfloat16 and bf16.scaler is None
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())  # the weights stay float32
    assert bf16.history[-1]["val_loss"] == pytest.approx(plain.history[-1]["val_loss"], rel=0.01)
    assert bf16.history[-1]["val_loss"] < bf16.history[0]["val_loss"] - 0.2  # it learned


def test_float16_uses_a_grad_scaler_saved_in_checkpoints(tiny_config, data):
    trainer = trained(tiny_config(dtype="float16"), data)
    assert trainer.dtype == torch.float16 and trainer.scaler is not None and trainer.scaler.is_enabled()
    bundle = trainer_state(trainer)
    assert bundle["scaler"]["scale"] == trainer.scaler.get_scale()
    assert "scaler" not in trainer_state(trained(tiny_config(), data))


@pytest.mark.parametrize("settings", [dict(dtype="float16", dropout=0.1), dict(grad_accum_steps=2, activation_checkpointing=True, dropout=0.1)])
def test_a_week6_run_resumes_bit_for_bit(tiny_config, data, tmp_path, settings, stop_at):
    config = tiny_config(**settings)
    whole = trained(config, data)
    half = trained(config, data, callbacks=[stop_at(10)])
    assert half.step == 10
    save_checkpoint(trainer_state(half), tmp_path / "last.pt")
    resumed = restore_trainer(load_checkpoint(tmp_path / "last.pt"), data=data, progress=False)
    if resumed.scaler is not None:
        assert resumed.scaler.state_dict() == half.scaler.state_dict()
    resumed.run()
    assert all(torch.equal(p, q) for p, q in zip(whole.model.parameters(), resumed.model.parameters()))
    assert [r["val_loss"] for r in whole.history if r["eval"]] == [r["val_loss"] for r in resumed.history if r["eval"]]


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="torch.compile on the CPU needs a C++ compiler")
def test_a_compiled_run_trains_the_same_model_and_saves_plain_names(tiny_config, data, tmp_path):
    plain = trained(tiny_config(max_steps=10, eval_interval=10), data)
    compiled = trained(tiny_config(max_steps=10, eval_interval=10, compile=True), data)
    assert compiled.training_model is not compiled.model and hasattr(compiled.training_model, "_orig_mod")
    assert largest_difference(plain, compiled) < 1e-4
    names = list(trainer_state(compiled)["model"])
    assert names == list(plain.model.state_dict()) and not any("_orig_mod" in n for n in names)


def test_resumed_runs_may_change_how_but_not_what_they_compute():
    assert {"compile", "grad_accum_steps", "activation_checkpointing"} <= set(RESUMABLE)
    assert "dtype" not in RESUMABLE


def test_describe_run_says_how_the_run_scales(tiny_config, data):
    text = describe_run(Trainer(tiny_config(batch_size=8, dtype="float16", grad_accum_steps=2, activation_checkpointing=True), data, progress=False))
    assert "float16 autocast with a loss scaler" in text and "2 micro-batches per step" in text and "activation checkpointing" in text
    assert "processes" not in text
    assert "autocast" not in describe_run(Trainer(tiny_config(), data, progress=False))
