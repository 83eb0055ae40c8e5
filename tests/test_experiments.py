"""llmcourse.experiments (Day 24): budgets, parameter counts, Chinchilla, sweeps, power laws and races."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from llmcourse.experiments import (
    PauseAtEvaluations,
    chinchilla_tokens,
    fit_power_law,
    model_parameters,
    race,
    run_experiment,
    summarize,
    sweep,
    tokens_seen,
    with_token_budget,
)
from llmcourse.gpt import GPT
from llmcourse.presets import PRESETS, preset_config
from llmcourse.train import TrainConfig, Trainer, prepare_data


@pytest.fixture(scope="module")
def data(tiny_config):
    return prepare_data(tiny_config())


# --- sizes and budgets --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("vocab_size", [65, 512])
def test_model_parameters_equals_the_built_model(name, vocab_size):
    config = preset_config(name)
    model = GPT(config.model_config(vocab_size))
    assert model_parameters(config, vocab_size) == sum(p.numel() for p in model.parameters())


def test_model_parameters_of_nanogpts_cpu_recipe():
    assert model_parameters(preset_config("small"), 65) == 804_096   # "about 0.8M" in nanoGPT's README


def test_tokens_seen_is_steps_times_batch_times_block():
    assert tokens_seen(TrainConfig()) == 2000 * 12 * 64 == 1_536_000
    assert tokens_seen(TrainConfig(max_steps=7, batch_size=3, block_size=5, warmup_steps=0)) == 105


def test_chinchilla_tokens():
    assert chinchilla_tokens(804_096) == 16_081_920
    assert chinchilla_tokens(70_000_000_000) == 1_400_000_000_000   # Chinchilla: 70B parameters, 1.4T tokens
    assert chinchilla_tokens(1000, tokens_per_param=2.5) == 2500
    assert isinstance(chinchilla_tokens(3, 0.5), int)


@pytest.mark.parametrize("n_params, ratio", [(0, 20.0), (-5, 20.0), (100, 0.0), (100, -1.0), (100, math.nan)])
def test_chinchilla_tokens_refuses_bad_input(n_params, ratio):
    with pytest.raises(ValueError):
        chinchilla_tokens(n_params, ratio)


@pytest.mark.parametrize(
    "changes",
    [{}, {"batch_size": 48}, {"batch_size": 5}, {"block_size": 256, "batch_size": 3}, {"block_size": 100}, {"block_size": 8, "batch_size": 7}],
)
@pytest.mark.parametrize("tokens", [100_000, 1_536_000, 3_000_001])
def test_with_token_budget_keeps_the_tokens(changes, tokens):
    config = with_token_budget(TrainConfig(), tokens, **changes)
    per_step = config.batch_size * config.block_size
    assert abs(tokens_seen(config) - tokens) <= per_step / 2       # rounded to whole steps
    for key, value in changes.items():
        assert getattr(config, key) == value


def test_with_token_budget_scales_warmup_and_evaluations():
    base = TrainConfig()                                            # 2000 steps, warmup 100, eval every 250
    quarter = with_token_budget(base, tokens_seen(base), batch_size=48)
    assert (quarter.max_steps, quarter.warmup_steps, quarter.eval_interval) == (500, 25, 62)
    double = with_token_budget(base, 2 * tokens_seen(base))
    assert (double.max_steps, double.warmup_steps, double.eval_interval) == (4000, 200, 500)
    same = with_token_budget(base, tokens_seen(base))
    assert same == base
    few = with_token_budget(base, 3 * 768)                          # three steps: warmup and intervals stay valid
    assert few.max_steps == 3 and 0 <= few.warmup_steps <= 3 and few.eval_interval >= 1 and few.log_interval <= 3


def test_with_token_budget_refuses_less_than_a_step():
    with pytest.raises(ValueError, match="less than one step"):
        with_token_budget(TrainConfig(), 100)


# --- power laws ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("a, b", [(3.0, -0.5), (406.4, -0.34), (0.01, 1.7), (2.0, 0.0)])
def test_fit_power_law_recovers_an_exact_power_law(a, b):
    x = [1e3, 4e3, 2.5e4, 1e5, 7e6]
    fitted_a, fitted_b = fit_power_law(x, [a * v**b for v in x])
    assert fitted_a == pytest.approx(a, rel=1e-9)
    assert fitted_b == pytest.approx(b, rel=1e-9, abs=1e-12)


def test_fit_power_law_is_least_squares_in_log_space():
    x, y = [1.0, 2.0, 4.0, 8.0], [5.0, 3.0, 2.5, 1.0]
    a, b = fit_power_law(x, y)
    slope, intercept = torch.linalg.lstsq(
        torch.tensor([[math.log(v), 1.0] for v in x], dtype=torch.float64), torch.tensor([[math.log(v)] for v in y], dtype=torch.float64)
    ).solution.flatten().tolist()
    assert b == pytest.approx(slope) and math.log(a) == pytest.approx(intercept)


@pytest.mark.parametrize(
    "x, y",
    [([1.0], [1.0]), ([], []), ([1.0, 2.0], [1.0]), ([0.0, 2.0], [1.0, 2.0]), ([1.0, 2.0], [-1.0, 2.0]), ([3.0, 3.0, 3.0], [1.0, 2.0, 3.0])],
)
def test_fit_power_law_refuses_bad_input(x, y):
    with pytest.raises(ValueError):
        fit_power_law(x, y)


# --- runs, sweeps and races ---------------------------------------------------------------------------


def test_run_experiment_summarizes_the_run(tiny_config, data):
    config = tiny_config()
    result = run_experiment(config, data)
    assert set(result) == {"config", "parameters", "tokens", "best_val_loss", "final_val_loss", "seconds", "evaluations"}
    assert result["config"] == config.to_dict()
    assert result["parameters"] == model_parameters(config, data.tokenizer.vocab_size)
    assert result["tokens"] == tokens_seen(config)
    assert [e[0] for e in result["evaluations"]] == [0, 10, 20, 30]
    assert result["final_val_loss"] == result["evaluations"][-1][2]
    assert result["best_val_loss"] == min(e[2] for e in result["evaluations"])
    assert result["seconds"] > 0


def test_sweep_refuses_an_unknown_setting(tiny_config, data):
    with pytest.raises(ValueError, match="width"):
        sweep(tiny_config(), "width", [16, 32], data)


def test_sweep_runs_every_value_at_one_budget(tiny_config, data):
    base = tiny_config()
    results = sweep(base, "block_size", [8, 16, 32], data, tokens=1920)
    assert [r["config"]["block_size"] for r in results] == [8, 16, 32]
    assert [r["config"]["max_steps"] for r in results] == [60, 30, 15]
    assert all(r["tokens"] == 1920 for r in results)
    same_steps = sweep(base, "lr", [1e-3, 2e-3], data)               # no budget: the steps stay
    assert [r["config"]["max_steps"] for r in same_steps] == [30, 30]
    assert [r["config"]["lr"] for r in same_steps] == [1e-3, 2e-3]
    alone = run_experiment(dataclasses.replace(base, lr=2e-3), data)
    assert same_steps[1]["evaluations"] == alone["evaluations"]       # a sweep's run is the run itself


def test_pause_at_evaluations_stops_after_each_evaluation(tiny_config, data):
    trainer = Trainer(tiny_config(), data, callbacks=[PauseAtEvaluations()], progress=False)
    steps = []
    while trainer.step < trainer.config.max_steps:
        trainer.run()
        steps.append(trainer.step)
    assert steps == [10, 20, 30]


def test_race_equals_each_run_alone(tiny_config, data):
    configs = {
        "slow": tiny_config(lr=1e-3, min_lr=1e-4, dropout=0.1),        # dropout: the turns must not mix random streams
        "fast": tiny_config(lr=3e-3, min_lr=3e-4, dropout=0.1, max_steps=20, eval_interval=5),
    }
    results = race(configs, data)
    assert list(results) == ["slow", "fast"]
    for name, config in configs.items():
        alone = Trainer(config, data, progress=False)
        alone.run()
        expected = summarize(alone, 1.0)
        got = results[name]
        assert got["seconds"] > 0
        assert got["config"] == config.to_dict() and got["tokens"] == tokens_seen(config)
        assert got["parameters"] == expected["parameters"]
        assert got["evaluations"] == expected["evaluations"]              # the same losses, bit for bit
        assert got["final_val_loss"] == expected["final_val_loss"] and got["best_val_loss"] == expected["best_val_loss"]


def test_race_final_weights_equal_a_run_alone(tiny_config, data, monkeypatch):
    """The turns do not change the runs: the raced models end with the weights of the runs alone."""
    made = []
    real_init = Trainer.__init__

    def keep(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(Trainer, "__init__", keep)
    configs = {"a": tiny_config(dropout=0.1), "b": tiny_config(dropout=0.1, seed=7)}
    race(configs, data)
    raced = dict(zip(configs, made))
    monkeypatch.undo()
    for name, config in configs.items():
        alone = Trainer(config, data, progress=False)
        alone.run()
        for p, q in zip(raced[name].model.state_dict().values(), alone.model.state_dict().values()):
            assert torch.equal(p, q)
