"""Tests for llmcourse.schedule (Day 19): the three schedules, their argument checks, and LRScheduler."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

import llmcourse.optim
from llmcourse.schedule import LRScheduler, constant_lr, cosine_lr, linear_warmup_lr

MAX_LR, MIN_LR, WARMUP, DECAY = 1e-3, 1e-4, 100, 5000  # nanoGPT's config/train_shakespeare_char.py
nanogpt = functools.partial(cosine_lr, max_lr=MAX_LR, min_lr=MIN_LR, warmup_steps=WARMUP, decay_steps=DECAY)


# --------------------------------------------------------------------------------------------------
# constant_lr and linear_warmup_lr


def test_constant_is_constant():
    assert [constant_lr(s, lr=3e-4) for s in (0, 1, 10**9)] == [3e-4] * 3
    assert constant_lr(0, lr=0) == 0.0 and isinstance(constant_lr(0, lr=1), float)


@pytest.mark.parametrize("warmup", [1, 2, 10, 100])
def test_warmup_values(warmup):
    values = [linear_warmup_lr(s, max_lr=MAX_LR, warmup_steps=warmup) for s in range(warmup + 5)]
    assert values[0] == MAX_LR / (warmup + 1) > 0
    assert all(v < MAX_LR for v in values[:warmup])
    assert values[warmup:] == [MAX_LR] * 5  # step `warmup` is the first at exactly max_lr
    steps = [b - a for a, b in zip(values, values[1 : warmup + 1])]
    assert all(math.isclose(d, MAX_LR / (warmup + 1), rel_tol=1e-9) for d in steps)  # a straight line, no jump


def test_zero_warmup_is_no_warmup():
    assert [linear_warmup_lr(s, max_lr=2e-3, warmup_steps=0) for s in range(4)] == [2e-3] * 4


# --------------------------------------------------------------------------------------------------
# cosine_lr


def test_cosine_landmarks():
    assert nanogpt(0) == MAX_LR / (WARMUP + 1)
    assert nanogpt(WARMUP - 1) == MAX_LR * WARMUP / (WARMUP + 1)
    assert nanogpt(WARMUP) == MAX_LR  # exactly, at the end of the warmup
    assert nanogpt((WARMUP + DECAY) // 2) == pytest.approx((MAX_LR + MIN_LR) / 2, rel=1e-12)  # halfway
    assert nanogpt(DECAY) == MIN_LR  # exactly, at decay_steps
    assert [nanogpt(s) for s in (DECAY + 1, 2 * DECAY, 10**9)] == [MIN_LR] * 3  # and ever after


def test_cosine_follows_the_formula():
    for step in range(WARMUP, DECAY, 37):
        progress = (step - WARMUP) / (DECAY - WARMUP)
        expected = MIN_LR + 0.5 * (MAX_LR - MIN_LR) * (1 + math.cos(math.pi * progress))
        assert nanogpt(step) == pytest.approx(expected, rel=1e-12)


def test_cosine_warmup_is_linear_warmup():
    for step in range(WARMUP):
        assert nanogpt(step) == linear_warmup_lr(step, max_lr=MAX_LR, warmup_steps=WARMUP)


def test_cosine_is_monotonic_and_continuous():
    values = [nanogpt(s) for s in range(DECAY + 50)]
    assert all(a < b for a, b in zip(values[:WARMUP], values[1 : WARMUP + 1]))  # climbs during the warmup
    assert all(a >= b for a, b in zip(values[WARMUP:], values[WARMUP + 1 :]))  # never climbs again
    largest_step = max(abs(a - b) for a, b in zip(values, values[1:]))
    assert largest_step <= MAX_LR / (WARMUP + 1) * (1 + 1e-9)  # no jump anywhere
    assert abs(values[DECAY - 1] - values[DECAY]) < 1e-9  # lands on min_lr smoothly
    assert abs(values[WARMUP + 1] - values[WARMUP]) < 1e-9  # leaves max_lr smoothly
    assert min(values[WARMUP:]) == MIN_LR and max(values) == MAX_LR


def test_cosine_without_warmup_and_edge_cases():
    no_warmup = functools.partial(cosine_lr, max_lr=1.0, min_lr=0.0, warmup_steps=0, decay_steps=10)
    assert no_warmup(0) == 1.0 and no_warmup(5) == pytest.approx(0.5) and no_warmup(10) == 0.0
    # decay_steps == warmup_steps: no cosine, the warmup is followed by min_lr
    assert [cosine_lr(s, max_lr=1.0, min_lr=0.1, warmup_steps=3, decay_steps=3) for s in range(5)] == [0.25, 0.5, 0.75, 0.1, 0.1]
    assert cosine_lr(0, max_lr=0.0, min_lr=0.0, warmup_steps=0, decay_steps=0) == 0.0
    assert [cosine_lr(s, max_lr=2e-3, min_lr=2e-3, warmup_steps=2, decay_steps=8) for s in range(2, 12)] == [2e-3] * 10


def test_cpu_recipe_of_nanogpt():
    cpu = functools.partial(cosine_lr, max_lr=MAX_LR, min_lr=MIN_LR, warmup_steps=WARMUP, decay_steps=2000)
    assert cpu(2000) == MIN_LR and cpu(1050) == pytest.approx((MAX_LR + MIN_LR) / 2)


def test_accepts_numpy_numbers():
    assert cosine_lr(np.int64(100), max_lr=np.float64(1e-3), min_lr=1e-4, warmup_steps=np.int32(100), decay_steps=5000) == 1e-3


# --------------------------------------------------------------------------------------------------
# argument checks


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(step=-1), ValueError, "step must be >= 0"),
        (dict(step=1.0), TypeError, "step must be an int"),
        (dict(step=True), TypeError, "step must be an int"),
        (dict(step="3"), TypeError, "step must be an int"),
        (dict(min_lr=2e-3), ValueError, "min_lr"),
        (dict(decay_steps=50), ValueError, "decay_steps"),
        (dict(warmup_steps=-5), ValueError, "warmup_steps must be >= 0"),
        (dict(warmup_steps=10.0), TypeError, "warmup_steps must be an int"),
        (dict(decay_steps=None), TypeError, "decay_steps must be an int"),
        (dict(max_lr="1e-3"), TypeError, "max_lr must be a number"),
        (dict(max_lr=torch.tensor(1e-3)), TypeError, "max_lr must be a number"),
        (dict(max_lr=float("nan")), ValueError, "max_lr must be a finite number"),
        (dict(max_lr=float("inf")), ValueError, "max_lr must be a finite number"),
        (dict(min_lr=-1e-4), ValueError, "min_lr must be a finite number >= 0"),
        (dict(min_lr=False), TypeError, "min_lr must be a number"),
    ],
)
def test_cosine_refuses_bad_arguments(kwargs, error, message):
    arguments = dict(step=0, max_lr=1e-3, min_lr=1e-4, warmup_steps=100, decay_steps=5000) | kwargs
    step = arguments.pop("step")
    with pytest.raises(error, match=message) as info:
        cosine_lr(step, **arguments)
    assert "\n" not in str(info.value)  # one line


def test_other_schedules_refuse_bad_arguments():
    with pytest.raises(ValueError, match="step"):
        constant_lr(-1, lr=1e-3)
    with pytest.raises(ValueError, match="lr must be a finite number"):
        constant_lr(0, lr=-1e-3)
    with pytest.raises(TypeError, match="lr must be a number"):
        constant_lr(0, lr=None)
    with pytest.raises(ValueError, match="warmup_steps"):
        linear_warmup_lr(0, max_lr=1e-3, warmup_steps=-1)
    with pytest.raises(ValueError, match="max_lr"):
        linear_warmup_lr(0, max_lr=float("nan"), warmup_steps=10)
    with pytest.raises(TypeError):
        cosine_lr(0, 1e-3, 1e-4, 100, 5000)  # keyword-only, so a swapped order cannot go unnoticed


# --------------------------------------------------------------------------------------------------
# LRScheduler


def make_optimizers() -> dict[str, torch.optim.Optimizer]:
    """Several optimizers, each over a small model's parameters split into two groups."""
    optimizers = {}
    for name, make in [
        ("torch SGD", lambda groups: torch.optim.SGD(groups, lr=0.5, momentum=0.9)),
        ("torch AdamW", lambda groups: torch.optim.AdamW(groups, lr=0.5)),
        ("course SGD", lambda groups: llmcourse.optim.SGD(groups, lr=0.5)),
        ("course AdamW", lambda groups: llmcourse.optim.AdamW(groups, lr=0.5)),
    ]:
        net = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
        matrices = [p for p in net.parameters() if p.dim() == 2]
        vectors = [p for p in net.parameters() if p.dim() < 2]
        optimizers[name] = make([{"params": matrices, "weight_decay": 0.1}, {"params": vectors, "weight_decay": 0.0, "lr": 0.7}])
    return optimizers


@pytest.mark.parametrize("name", ["torch SGD", "torch AdamW", "course SGD", "course AdamW"])
def test_scheduler_sets_every_group(name):
    optimizer = make_optimizers()[name]
    scheduler = LRScheduler(optimizer, nanogpt)
    for step in [0, 1, 99, 100, 2550, 5000, 7000]:
        lr = scheduler.apply(step)
        assert lr == nanogpt(step)
        assert [g["lr"] for g in optimizer.param_groups] == [lr, lr]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]  # other settings untouched


def test_scheduler_drives_training_like_setting_lr_by_hand():
    """The scheduler changes nothing but the learning rate: equal to writing it into the groups by hand."""
    torch.manual_seed(0)
    nets = [nn.Linear(5, 3) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    opts = [llmcourse.optim.AdamW(net.parameters(), lr=1.0) for net in nets]
    scheduler = LRScheduler(opts[0], functools.partial(cosine_lr, max_lr=1e-2, min_lr=1e-3, warmup_steps=3, decay_steps=20))
    x, y = torch.randn(8, 5), torch.randn(8, 3)
    for step in range(25):
        scheduler.apply(step)
        for group in opts[1].param_groups:
            group["lr"] = cosine_lr(step, max_lr=1e-2, min_lr=1e-3, warmup_steps=3, decay_steps=20)
        for net, opt in zip(nets, opts):
            opt.zero_grad()
            ((net(x) - y) ** 2).mean().backward()
            opt.step()
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        assert torch.equal(a, b)


def test_scheduler_is_stateless():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=1.0)
    scheduler = LRScheduler(optimizer, nanogpt)
    forward = [scheduler.apply(s) for s in range(300)]
    backward = [scheduler.apply(s) for s in reversed(range(300))][::-1]
    assert forward == backward  # any order, any number of times: the step alone decides
    resumed = LRScheduler(torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=123.0), nanogpt)
    assert resumed.apply(3000) == scheduler.apply(3000) == nanogpt(3000)


@pytest.mark.parametrize(
    "optimizer_class", [torch.optim.SGD, torch.optim.AdamW, llmcourse.optim.AdamW], ids=["torch SGD", "torch AdamW", "course AdamW"]
)
def test_equal_to_lambda_lr(optimizer_class):
    """LambdaLR with the factor schedule(step) / max_lr, on an optimizer built with lr=max_lr, gives the same rates."""
    schedule = functools.partial(cosine_lr, max_lr=MAX_LR, min_lr=MIN_LR, warmup_steps=20, decay_steps=1000)
    params = [nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(3))]
    ours_opt = optimizer_class([{"params": [params[0]]}], lr=MAX_LR)
    theirs_opt = optimizer_class([{"params": [params[1]]}], lr=MAX_LR)
    ours = LRScheduler(ours_opt, schedule)
    theirs = LambdaLR(theirs_opt, lr_lambda=lambda n: schedule(n) / MAX_LR)
    for step in range(1100):
        lr = ours.apply(step)
        assert theirs_opt.param_groups[0]["lr"] == pytest.approx(lr, rel=1e-12, abs=0)
        for opt, p in zip((ours_opt, theirs_opt), params):
            p.grad = torch.ones(3)
            opt.step()
        theirs.step()
    torch.testing.assert_close(params[0], params[1], rtol=1e-6, atol=0)


def test_tensor_learning_rate_is_updated_in_place():
    optimizer = torch.optim.AdamW([nn.Parameter(torch.zeros(2))], lr=torch.tensor(0.5))
    tensor_lr = optimizer.param_groups[0]["lr"]
    LRScheduler(optimizer, nanogpt).apply(2550)
    assert optimizer.param_groups[0]["lr"] is tensor_lr
    assert tensor_lr.item() == pytest.approx(nanogpt(2550), rel=1e-6)


def test_scheduler_refuses_bad_input():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=1.0)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        LRScheduler(nn.Linear(2, 2), nanogpt)
    with pytest.raises(TypeError, match="schedule must be a function"):
        LRScheduler(optimizer, 1e-3)
    scheduler = LRScheduler(optimizer, nanogpt)
    with pytest.raises(ValueError, match="step must be >= 0"):
        scheduler.apply(-1)
    with pytest.raises(TypeError, match="step must be an int"):
        scheduler.apply(1.5)
    with pytest.raises(ValueError, match=r"schedule\(3\)"):
        LRScheduler(optimizer, lambda step: float("nan")).apply(3)
    with pytest.raises(TypeError, match=r"schedule\(0\)"):
        LRScheduler(optimizer, lambda step: "fast").apply(0)
    assert optimizer.param_groups[0]["lr"] == 1.0  # a refused value never reaches the optimizer


def test_scheduler_repr_names_the_schedule():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=1.0)
    text = repr(LRScheduler(optimizer, nanogpt))
    assert text.startswith("LRScheduler(SGD, groups=1, schedule=partial(cosine_lr, max_lr=0.001") and "0x" not in text
    assert "constant_lr" in repr(LRScheduler(optimizer, constant_lr))
