"""Tests for llmcourse.optim (Day 6): SGD, Adam, AdamW (both paths) against torch.optim, state dicts, errors, configure_optimizer."""

from __future__ import annotations

import copy
import functools
import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llmcourse.optim import SGD, Adam, AdamW, configure_optimizer, param_groups_summary, split_decay_parameters


def make_net(seed: int = 0, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.LayerNorm(16), nn.Linear(16, 4)).to(dtype)


def one_step(net: nn.Module, optimizer: torch.optim.Optimizer, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    dtype = next(net.parameters()).dtype
    x = torch.randn(12, 6, generator=gen).to(dtype)
    y = torch.randint(0, 4, (12,), generator=gen)
    optimizer.zero_grad()
    F.cross_entropy(net(x), y).backward()
    optimizer.step()


def largest_difference(a: nn.Module, b: nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def two_groups(net: nn.Module) -> list[dict]:
    return [
        {"params": [p for p in net.parameters() if p.dim() >= 2], "lr": 3e-3, "weight_decay": 0.1},
        {"params": [p for p in net.parameters() if p.dim() < 2], "lr": 1e-2, "weight_decay": 0.01},
    ]


def run_pair(ours_cls, torch_cls, steps: int, groups=None, dtype=torch.float32, **kwargs) -> tuple[float, float]:
    """Train two copies of one net, ours and torch's; return (largest difference seen, how far weights moved)."""
    ours_net, torch_net = make_net(dtype=dtype), make_net(dtype=dtype)
    ours = ours_cls(groups(ours_net) if groups else ours_net.parameters(), **kwargs)
    reference = torch_cls(groups(torch_net) if groups else torch_net.parameters(), **kwargs)
    worst = 0.0
    for step in range(steps):
        one_step(ours_net, ours, step)
        one_step(torch_net, reference, step)
        worst = max(worst, largest_difference(ours_net, torch_net))
    return worst, largest_difference(ours_net, make_net(dtype=dtype))


# ---------------------------------------------------------------------------------------------
# Equal to torch.optim


FOREACH = pytest.mark.parametrize("foreach", [False, True], ids=["loop", "foreach"])


@FOREACH
def test_adamw_matches_torch_over_100_steps_with_two_groups(foreach):
    worst, moved = run_pair(AdamW, torch.optim.AdamW, steps=100, groups=two_groups, betas=(0.9, 0.95), foreach=foreach)
    assert worst < 1e-6
    assert moved > 0.05  # the weights really moved


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"lr": 1e-2, "weight_decay": 0.5}, {"lr": 1e-2, "betas": (0.5, 0.9), "eps": 1e-6}, {"lr": 1e-2, "amsgrad": True}],
    ids=["defaults", "strong-decay", "betas-eps", "amsgrad"],
)
@FOREACH
def test_adamw_matches_torch(kwargs, foreach):
    worst, _ = run_pair(AdamW, torch.optim.AdamW, steps=40, foreach=foreach, **kwargs)
    assert worst < 1e-6


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"lr": 1e-2, "betas": (0.8, 0.95)}, {"lr": 1e-2, "weight_decay": 0.01}, {"lr": 1e-2, "amsgrad": True}],
    ids=["defaults", "betas", "l2-decay", "amsgrad"],
)
@FOREACH
def test_adam_matches_torch(kwargs, foreach):
    worst, _ = run_pair(Adam, torch.optim.Adam, steps=40, foreach=foreach, **kwargs)
    assert worst < 1e-6


@FOREACH
def test_adam_matches_torch_with_two_groups_in_float64(foreach):
    worst, _ = run_pair(Adam, torch.optim.Adam, steps=30, groups=two_groups, dtype=torch.float64, foreach=foreach)
    assert worst < 1e-12


@pytest.mark.parametrize(
    "kwargs",
    [
        {"lr": 0.1},
        {"lr": 0.1, "momentum": 0.9},
        {"lr": 0.05, "momentum": 0.9, "dampening": 0.2, "weight_decay": 0.01},
        {"lr": 0.05, "momentum": 0.9, "nesterov": True},
        {"lr": 0.05, "weight_decay": 0.1},
    ],
    ids=["plain", "momentum", "dampening-decay", "nesterov", "decay-only"],
)
def test_sgd_matches_torch(kwargs):
    worst, _ = run_pair(SGD, torch.optim.SGD, steps=30, **kwargs)
    assert worst < 1e-6


def test_sgd_two_groups_match_torch():
    worst, _ = run_pair(SGD, torch.optim.SGD, steps=20, groups=two_groups, momentum=0.9)
    assert worst < 1e-6


@pytest.mark.parametrize(
    "ours, theirs", [(SGD, torch.optim.SGD), (Adam, torch.optim.Adam), (AdamW, torch.optim.AdamW)], ids=["SGD", "Adam", "AdamW"]
)
def test_argument_names_and_defaults_are_torchs(ours, theirs):
    ours_params = inspect.signature(ours.__init__).parameters
    theirs_params = inspect.signature(theirs.__init__).parameters
    for name, parameter in ours_params.items():
        if name == "self":
            continue
        assert name in theirs_params, f"{ours.__name__}({name}=...) is not an argument of {theirs.__name__}"
        if name == "foreach":  # the one chosen difference: True here, None ("choose for me") in torch
            assert parameter.default is True and theirs_params[name].default is None
        elif parameter.default is not inspect.Parameter.empty:
            assert parameter.default == theirs_params[name].default, name


def test_adamw_is_adam_with_decoupled_decay():
    assert issubclass(AdamW, Adam) and issubclass(Adam, torch.optim.Optimizer) and issubclass(SGD, torch.optim.Optimizer)
    assert AdamW.decoupled_weight_decay and not Adam.decoupled_weight_decay


# ---------------------------------------------------------------------------------------------
# The multi-tensor (foreach) path


def run_bitwise(ours_cls, torch_cls, steps: int, groups=None, skip=None, dtype=torch.float32, **kwargs) -> tuple[nn.Module, torch.optim.Optimizer, nn.Module, torch.optim.Optimizer]:
    """Train our foreach path and torch's foreach=True side by side, asserting equal bits after every step.

    `skip(step)` returns the parameters whose gradient is dropped (set to None) before that step.
    """
    ours_net, torch_net = make_net(dtype=dtype), make_net(dtype=dtype)
    ours = ours_cls(groups(ours_net) if groups else ours_net.parameters(), foreach=True, **kwargs)
    reference = torch_cls(groups(torch_net) if groups else torch_net.parameters(), foreach=True, **kwargs)
    for step in range(steps):
        for net, optimizer in ((ours_net, ours), (torch_net, reference)):
            gen = torch.Generator().manual_seed(step)
            x = torch.randn(12, 6, generator=gen).to(dtype)
            y = torch.randint(0, 4, (12,), generator=gen)
            optimizer.zero_grad()
            F.cross_entropy(net(x), y).backward()
            for index in skip(step) if skip else ():
                list(net.parameters())[index].grad = None
            optimizer.step()
        for a, b in zip(ours_net.parameters(), torch_net.parameters()):
            assert torch.equal(a, b), f"step {step}: largest difference {(a - b).abs().max().item()}"
    return ours_net, ours, torch_net, reference


@pytest.mark.parametrize("ours_cls, torch_cls", [(Adam, torch.optim.Adam), (AdamW, torch.optim.AdamW)], ids=["Adam", "AdamW"])
@pytest.mark.parametrize(
    "kwargs",
    [{}, {"lr": 1e-2, "weight_decay": 0.3}, {"lr": 1e-2, "amsgrad": True, "weight_decay": 0.05}, {"lr": 3e-2, "betas": (0.5, 0.9), "eps": 1e-6}],
    ids=["defaults", "decay", "amsgrad-decay", "betas-eps"],
)
def test_foreach_path_equals_torch_foreach_bit_for_bit(ours_cls, torch_cls, kwargs):
    run_bitwise(ours_cls, torch_cls, steps=100, **kwargs)


@pytest.mark.parametrize("ours_cls, torch_cls", [(Adam, torch.optim.Adam), (AdamW, torch.optim.AdamW)], ids=["Adam", "AdamW"])
def test_foreach_path_equals_torch_with_two_groups(ours_cls, torch_cls):
    ours_net, ours, _, reference = run_bitwise(ours_cls, torch_cls, steps=100, groups=two_groups, betas=(0.9, 0.95))
    assert [g["lr"] for g in ours.param_groups] == [3e-3, 1e-2] and all(g["foreach"] for g in ours.param_groups)
    assert largest_difference(ours_net, make_net()) > 0.05


@pytest.mark.parametrize("ours_cls, torch_cls", [(Adam, torch.optim.Adam), (AdamW, torch.optim.AdamW)], ids=["Adam", "AdamW"])
@pytest.mark.parametrize("amsgrad", [False, True], ids=["plain", "amsgrad"])
def test_a_parameter_without_gradient_on_some_steps_keeps_its_own_step_count(ours_cls, torch_cls, amsgrad):
    # parameter 1 (the first bias) has no gradient on every third step, parameter 3 (a LayerNorm bias) only from step 10 on
    def skip(step):
        return [1] * (step % 3 == 0) + [3] * (step < 10)

    ours_net, ours, torch_net, reference = run_bitwise(
        ours_cls, torch_cls, steps=30, groups=two_groups, skip=skip, lr=1e-2, amsgrad=amsgrad
    )
    steps = [ours.state[p]["step"] for p in ours_net.parameters()]
    assert steps == [30, 20, 30, 20, 30, 30]
    assert steps == [int(reference.state[p]["step"]) for p in torch_net.parameters()]
    # the loop path counts the same way and lands within rounding of the foreach path
    loop_net = make_net()
    loop = ours_cls(two_groups(loop_net), foreach=False, lr=1e-2, amsgrad=amsgrad)
    for step in range(30):
        gen = torch.Generator().manual_seed(step)
        x, y = torch.randn(12, 6, generator=gen), torch.randint(0, 4, (12,), generator=gen)
        loop.zero_grad()
        F.cross_entropy(loop_net(x), y).backward()
        for index in skip(step):
            list(loop_net.parameters())[index].grad = None
        loop.step()
    assert [loop.state[p]["step"] for p in loop_net.parameters()] == steps
    assert largest_difference(loop_net, ours_net) < 1e-6


class MixedPrecision(nn.Module):
    """A float32 layer and a float64 layer whose parameters share one parameter group."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(6, 4)
        self.side = nn.Linear(3, 2).double()

    def loss(self, step: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(step)
        x, y = torch.randn(12, 6, generator=gen), torch.randint(0, 4, (12,), generator=gen)
        z = torch.randn(4, 3, generator=gen, dtype=torch.float64)
        return F.cross_entropy(self.body(x), y) + self.side(z).square().mean()


def test_foreach_buckets_mixed_dtypes_like_torch():
    nets = [MixedPrecision(), MixedPrecision()]
    ours = AdamW(nets[0].parameters(), lr=1e-2, foreach=True)
    reference = torch.optim.AdamW(nets[1].parameters(), lr=1e-2, foreach=True)
    for step in range(20):
        for net, optimizer in zip(nets, (ours, reference)):
            optimizer.zero_grad()
            net.loss(step).backward()
            optimizer.step()
    assert {p.dtype for p in nets[0].parameters()} == {torch.float32, torch.float64}
    for a, b in zip(*(net.parameters() for net in nets)):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert largest_difference(nets[0], MixedPrecision()) > 0.05


@pytest.mark.parametrize("cls", [Adam, AdamW])
@pytest.mark.parametrize("amsgrad", [False, True], ids=["plain", "amsgrad"])
def test_both_paths_keep_the_same_state_layout(cls, amsgrad):
    states = {}
    for foreach in (False, True):
        net = make_net()
        optimizer = cls(two_groups(net), lr=1e-2, amsgrad=amsgrad, foreach=foreach)
        for step in range(3):
            one_step(net, optimizer, step)
        saved = optimizer.state_dict()
        assert [g["foreach"] for g in saved["param_groups"]] == [foreach, foreach]
        states[foreach] = saved["state"]
    keys = {"step", "exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if amsgrad else set())
    assert states[False].keys() == states[True].keys() == set(range(6))
    for index in states[False]:
        loop_state, foreach_state = states[False][index], states[True][index]
        assert set(loop_state) == set(foreach_state) == keys
        assert type(foreach_state["step"]) is int and loop_state["step"] == foreach_state["step"] == 3
        for key in keys - {"step"}:
            assert foreach_state[key].shape == loop_state[key].shape
            torch.testing.assert_close(foreach_state[key], loop_state[key], rtol=1e-5, atol=1e-8)


def test_paths_can_take_turns_on_one_optimizer():
    """Switching a group's foreach mid-run continues from the same state; the result stays within rounding."""
    net_turns, net_loop = make_net(), make_net()
    turns = AdamW(two_groups(net_turns), lr=1e-2)
    loop = AdamW(two_groups(net_loop), lr=1e-2, foreach=False)
    for step in range(20):
        for group in turns.param_groups:
            group["foreach"] = step % 2 == 0
        one_step(net_turns, turns, step)
        one_step(net_loop, loop, step)
    assert largest_difference(net_turns, net_loop) < 1e-6
    assert all(turns.state[p]["step"] == 20 for p in net_turns.parameters())


def test_torch_state_dict_with_foreach_none_runs_the_foreach_path():
    net_a = make_net()
    opt_a = torch.optim.AdamW(net_a.parameters(), lr=1e-2)  # foreach=None in its groups
    for step in range(5):
        one_step(net_a, opt_a, step)
    net_b = copy.deepcopy(net_a)
    opt_b = AdamW(net_b.parameters(), lr=1e-2, foreach=False)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    assert opt_b.param_groups[0]["foreach"] is None  # the saved groups replace ours, as in torch
    net_c = copy.deepcopy(net_a)
    opt_c = torch.optim.AdamW(net_c.parameters(), lr=1e-2, foreach=True)
    opt_c.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    opt_c.param_groups[0]["foreach"] = True
    for step in range(5, 15):
        one_step(net_b, opt_b, step)
        one_step(net_c, opt_c, step)
    assert all(torch.equal(p, q) for p, q in zip(net_b.parameters(), net_c.parameters()))
    assert all(type(opt_b.state[p]["step"]) is int and opt_b.state[p]["step"] == 15 for p in net_b.parameters())


def test_foreach_is_the_default():
    params = [nn.Parameter(torch.zeros(3))]
    assert Adam(params).param_groups[0]["foreach"] is True
    assert AdamW(params).param_groups[0]["foreach"] is True
    assert AdamW(params, foreach=False).param_groups[0]["foreach"] is False
    mixed = AdamW([{"params": params, "foreach": False}, {"params": [nn.Parameter(torch.ones(2))]}])
    assert [g["foreach"] for g in mixed.param_groups] == [False, True]
    assert all(g["foreach"] is True for g in configure_optimizer(TiedLM(), lr=1e-3).param_groups)
    assert all(g["foreach"] is False for g in configure_optimizer(TiedLM(), lr=1e-3, foreach=False).param_groups)


@pytest.mark.parametrize("value", ["no", 1, 0, None, 1.0])
def test_foreach_must_be_a_bool(value):
    with pytest.raises(TypeError, match="foreach must be True or False"):
        AdamW(_params(), foreach=value)
    with pytest.raises(TypeError, match="foreach"):
        Adam([{"params": _params(), "foreach": value}])
    with pytest.raises(TypeError, match="foreach"):
        configure_optimizer(TiedLM(), lr=1e-3, foreach=value)


def test_foreach_path_with_a_closure_and_no_gradients_at_all():
    net = make_net()
    optimizer = AdamW(net.parameters(), lr=1e-2)
    before = copy.deepcopy(net.state_dict())
    optimizer.step()  # nothing has a gradient yet: nothing moves, no state
    assert not optimizer.state and all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    loss = optimizer.step(loss_closure(net, optimizer))
    assert isinstance(loss, torch.Tensor) and len(optimizer.state) == len(list(net.parameters()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("cls, torch_cls", [(Adam, torch.optim.Adam), (AdamW, torch.optim.AdamW)], ids=["Adam", "AdamW"])
def test_foreach_path_on_cuda_matches_torch(cls, torch_cls):
    nets = [make_net().cuda(), make_net().cuda()]
    ours = cls(two_groups(nets[0]), foreach=True, amsgrad=True)
    reference = torch_cls(two_groups(nets[1]), foreach=True, amsgrad=True)
    for step in range(50):
        for net, optimizer in zip(nets, (ours, reference)):
            gen = torch.Generator().manual_seed(step)
            x, y = torch.randn(12, 6, generator=gen).cuda(), torch.randint(0, 4, (12,), generator=gen).cuda()
            optimizer.zero_grad()
            F.cross_entropy(net(x), y).backward()
            optimizer.step()
    assert largest_difference(*nets) < 1e-6


# ---------------------------------------------------------------------------------------------
# The Optimizer contract


@FOREACH
def test_state_per_parameter_and_skipped_parameters(foreach):
    net = make_net()
    frozen_out = nn.Parameter(torch.ones(3))  # in the optimizer but never in the loss: no grad
    optimizer = AdamW(list(net.parameters()) + [frozen_out], lr=1e-2, foreach=foreach)
    one_step(net, optimizer, 0)
    assert frozen_out not in optimizer.state
    assert torch.equal(frozen_out.detach(), torch.ones(3))
    for p in net.parameters():
        state = optimizer.state[p]
        assert set(state) == {"step", "exp_avg", "exp_avg_sq"}
        assert state["step"] == 1 and state["exp_avg"].shape == p.shape


def loss_closure(net: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor | None = None, y: torch.Tensor | None = None):
    """The closure `optimizer.step(closure)` expects: zero the gradients, recompute the loss, backward."""
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(0)) if x is None else x
    y = torch.tensor([0, 1, 2, 3, 0]) if y is None else y

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        return loss

    return closure


def test_step_with_closure_returns_the_loss():
    net = make_net()
    x, y = torch.randn(5, 6), torch.tensor([0, 1, 2, 3, 0])
    for optimizer in (SGD(net.parameters(), lr=0.1), Adam(net.parameters()), AdamW(net.parameters())):
        before = F.cross_entropy(net(x), y).item()
        loss = optimizer.step(loss_closure(net, optimizer, x, y))
        assert isinstance(loss, torch.Tensor) and abs(loss.item() - before) < 1e-6


@pytest.mark.parametrize(
    "cls, foreach", [(SGD, None), (Adam, False), (Adam, True), (AdamW, False), (AdamW, True)], ids=["SGD", "Adam-loop", "Adam-foreach", "AdamW-loop", "AdamW-foreach"]
)
def test_state_dict_round_trip_resumes_exactly(cls, foreach):
    kwargs = {"lr": 0.05, "momentum": 0.9} if cls is SGD else {"lr": 1e-2, "amsgrad": True, "foreach": foreach}
    net = make_net()
    optimizer = cls(two_groups(net), **kwargs)
    for step in range(5):
        one_step(net, optimizer, step)
    saved_net = copy.deepcopy(net.state_dict())
    saved_opt = copy.deepcopy(optimizer.state_dict())
    for step in range(5, 10):
        one_step(net, optimizer, step)

    resumed = make_net(seed=99)
    resumed.load_state_dict(saved_net)
    resumed_opt = cls(two_groups(resumed), **kwargs)
    resumed_opt.load_state_dict(saved_opt)
    assert resumed_opt.param_groups[0]["lr"] == 3e-3 and resumed_opt.param_groups[1]["weight_decay"] == 0.01
    for step in range(5, 10):
        one_step(resumed, resumed_opt, step)
    assert largest_difference(net, resumed) == 0.0


@FOREACH
def test_state_dicts_load_across_ours_and_torchs(foreach):
    """Same state names as torch: a torch AdamW checkpoint continues in ours, and the other way round."""
    ours = functools.partial(AdamW, foreach=foreach)
    for source_cls, target_cls in ((torch.optim.AdamW, ours), (ours, torch.optim.AdamW)):
        net_a = make_net()
        opt_a = source_cls(net_a.parameters(), lr=1e-2)
        for step in range(5):
            one_step(net_a, opt_a, step)
        net_b = copy.deepcopy(net_a)
        opt_b = target_cls(net_b.parameters(), lr=1e-2)
        opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
        for step in range(5, 15):
            one_step(net_a, opt_a, step)
            one_step(net_b, opt_b, step)
        assert largest_difference(net_a, net_b) < 1e-6


def test_zero_grad_is_inherited():
    net = make_net()
    optimizer = AdamW(net.parameters())
    one_step(net, optimizer, 0)
    optimizer.zero_grad()
    assert all(p.grad is None for p in net.parameters())


@pytest.mark.parametrize("cls", [Adam, AdamW])
@FOREACH
def test_sparse_gradients_are_refused(cls, foreach):
    emb = nn.Embedding(10, 4, sparse=True)
    optimizer = cls(emb.parameters(), foreach=foreach)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        optimizer.step()


# ---------------------------------------------------------------------------------------------
# Errors


def _params():
    return [nn.Parameter(torch.zeros(3))]


@pytest.mark.parametrize(
    "build, error, match",
    [
        (lambda: AdamW(_params(), lr=-1e-3), ValueError, r"lr=-0.001"),
        (lambda: Adam(_params(), lr=float("nan")), ValueError, r"lr=nan"),
        (lambda: AdamW(_params(), betas=(0.9, 1.0)), ValueError, r"betas\[1\]=1.0.*\[0.0, 1.0\)"),
        (lambda: AdamW(_params(), betas=(-0.1, 0.9)), ValueError, r"betas\[0\]=-0.1"),
        (lambda: AdamW(_params(), betas=0.9), TypeError, "pair"),
        (lambda: AdamW(_params(), betas=(0.9, 0.95, 0.99)), TypeError, "pair"),
        (lambda: AdamW(_params(), eps=-1e-8), ValueError, "eps"),
        (lambda: AdamW(_params(), weight_decay=-0.1), ValueError, "weight_decay"),
        (lambda: Adam(_params(), lr="0.1"), TypeError, "lr must be a number"),
        (lambda: Adam(_params(), lr=True), TypeError, "lr must be a number"),
        (lambda: SGD(_params(), lr=-0.1), ValueError, "lr"),
        (lambda: SGD(_params(), momentum=-0.9), ValueError, "momentum"),
        (lambda: SGD(_params(), weight_decay=-1.0), ValueError, "weight_decay"),
        (lambda: SGD(_params(), dampening=-0.5), ValueError, "dampening"),
        (lambda: SGD(_params(), lr=0.1, nesterov=True), ValueError, "nesterov"),
        (lambda: SGD(_params(), lr=0.1, momentum=0.9, dampening=0.1, nesterov=True), ValueError, "nesterov"),
        (lambda: AdamW([{"params": _params(), "lr": -1.0}]), ValueError, "lr=-1.0"),
        (lambda: AdamW([]), ValueError, "empty"),
    ],
)
def test_bad_hyperparameters_raise(build, error, match):
    with pytest.raises(error, match=match):
        build()


def test_add_param_group_later_is_checked_too():
    optimizer = AdamW(_params())
    with pytest.raises(ValueError, match="betas"):
        optimizer.add_param_group({"params": _params(), "betas": (0.9, 1.5)})
    assert len(optimizer.param_groups) == 1
    optimizer.add_param_group({"params": _params(), "lr": 0.5})
    assert optimizer.param_groups[1]["lr"] == 0.5 and optimizer.param_groups[1]["weight_decay"] == 1e-2


# ---------------------------------------------------------------------------------------------
# configure_optimizer


class TiedLM(nn.Module):
    def __init__(self, vocab=13, n_embd=8, block_size=5):
        super().__init__()
        self.wte = nn.Embedding(vocab, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.h = nn.ModuleList([nn.Sequential(nn.LayerNorm(n_embd), nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd)) for _ in range(2)])
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied


def names_of(group_params, model):
    by_id = {id(p): n for n, p in model.named_parameters()}
    return {by_id[id(p)] for p in group_params}


def test_groups_by_default():
    model = TiedLM()
    optimizer = configure_optimizer(model, lr=6e-4)
    assert isinstance(optimizer, AdamW)
    decay, no_decay = optimizer.param_groups
    assert decay["name"] == "decay" and no_decay["name"] == "no_decay"
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert decay["betas"] == (0.9, 0.95) and decay["eps"] == 1e-8 and decay["lr"] == no_decay["lr"] == 6e-4
    assert names_of(decay["params"], model) == {f"h.{i}.{j}.weight" for i in range(2) for j in (1, 3)}
    assert names_of(no_decay["params"], model) == {"wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"} | {
        f"h.{i}.{j}.{k}" for i in range(2) for j, k in ((0, "weight"), (0, "bias"), (1, "bias"), (3, "bias"))
    }
    assert all(p.dim() >= 2 for p in decay["params"])


def test_tied_weight_appears_once_and_every_parameter_is_covered():
    model = TiedLM()
    optimizer = configure_optimizer(model, lr=1e-3)
    in_groups = [p for g in optimizer.param_groups for p in g["params"]]
    assert len(in_groups) == len({id(p) for p in in_groups}) == len(list(model.parameters()))
    assert sum(1 for p in in_groups if p is model.lm_head.weight) == 1
    assert sum(p.numel() for p in in_groups) == sum(p.numel() for p in model.parameters())


def test_decay_embeddings_moves_embeddings_and_the_tied_head():
    model = TiedLM()
    decay, no_decay = split_decay_parameters(model, decay_embeddings=True)
    assert {"wte.weight", "wpe.weight"} <= set(decay)
    assert all(p.dim() >= 2 for p in decay.values()) and all(p.dim() < 2 for p in no_decay.values())
    optimizer = configure_optimizer(model, lr=1e-3, decay_embeddings=True)
    assert any(p is model.lm_head.weight for p in optimizer.param_groups[0]["params"])


def test_untied_head_decays_but_embedding_does_not():
    model = TiedLM()
    model.lm_head.weight = nn.Parameter(torch.randn(13, 8))  # untie
    decay, no_decay = split_decay_parameters(model)
    assert "lm_head.weight" in decay and "wte.weight" in no_decay


def test_frozen_parameters_and_raw_parameters():
    model = TiedLM()
    model.pos = nn.Parameter(torch.zeros(5, 8))  # a raw 2-D parameter decays
    model.scale = nn.Parameter(torch.ones(()))  # a 0-D parameter does not
    for p in model.h[0].parameters():
        p.requires_grad_(False)
    decay, no_decay = split_decay_parameters(model)
    assert "pos" in decay and "scale" in no_decay
    assert not any(name.startswith("h.0.") for name in (*decay, *no_decay))


def test_configure_optimizer_trains_and_passes_settings():
    model = TiedLM()
    optimizer = configure_optimizer(model, lr=1e-2, weight_decay=0.3, betas=(0.8, 0.9), eps=1e-6)
    assert optimizer.param_groups[0]["weight_decay"] == 0.3
    assert all(g["betas"] == (0.8, 0.9) and g["eps"] == 1e-6 for g in optimizer.param_groups)
    idx = torch.randint(0, 13, (2, 5))
    before = model.h[0][1].weight.detach().clone()
    x = model.wte(idx) + model.wpe(torch.arange(5))
    for block in model.h:
        x = x + block(x)
    loss = F.cross_entropy(model.lm_head(model.ln_f(x)).view(-1, 13), idx.view(-1))
    loss.backward()
    optimizer.step()
    assert not torch.equal(before, model.h[0][1].weight)


def test_configure_optimizer_errors():
    with pytest.raises(TypeError, match="nn.Module"):
        configure_optimizer([nn.Parameter(torch.zeros(2))], lr=1e-3)
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        configure_optimizer(frozen, lr=1e-3)
    with pytest.raises(ValueError, match="weight_decay"):
        configure_optimizer(TiedLM(), lr=1e-3, weight_decay=-0.1)
    with pytest.raises(ValueError, match="lr"):
        configure_optimizer(TiedLM(), lr=-1e-3)
    with pytest.raises(ValueError, match="betas"):
        configure_optimizer(TiedLM(), lr=1e-3, betas=(0.9, 1.0))


def test_only_one_dim_parameters_still_gives_two_groups():
    optimizer = configure_optimizer(nn.LayerNorm(4), lr=1e-3)
    assert [len(g["params"]) for g in optimizer.param_groups] == [0, 2]


def test_summary_names_tied_tensors_and_verbose_prints_it(capsys):
    model = TiedLM()
    optimizer = configure_optimizer(model, lr=1e-3, verbose=True)
    printed = capsys.readouterr().out
    summary = param_groups_summary(optimizer, model)
    assert printed.strip() == summary.strip()
    assert "wte.weight = lm_head.weight (13, 8)" in summary
    assert summary.splitlines()[0].startswith("decay: lr=0.001, weight_decay=0.1, 4 tensors")
    short = param_groups_summary(optimizer, model, max_names=2)
    assert "... and 2 more" in short
    assert "<tensor (13, 8)>" in param_groups_summary(optimizer)  # without a model: shapes only
