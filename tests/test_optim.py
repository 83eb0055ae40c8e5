"""Tests for llmcourse.optim (Day 6): SGD, Adam, AdamW against torch.optim, state dicts, errors, configure_optimizer."""

from __future__ import annotations

import copy
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


def test_adamw_matches_torch_over_100_steps_with_two_groups():
    worst, moved = run_pair(AdamW, torch.optim.AdamW, steps=100, groups=two_groups, betas=(0.9, 0.95))
    assert worst < 1e-6
    assert moved > 0.05  # the weights really moved


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"lr": 1e-2, "weight_decay": 0.5}, {"lr": 1e-2, "betas": (0.5, 0.9), "eps": 1e-6}, {"lr": 1e-2, "amsgrad": True}],
    ids=["defaults", "strong-decay", "betas-eps", "amsgrad"],
)
def test_adamw_matches_torch(kwargs):
    worst, _ = run_pair(AdamW, torch.optim.AdamW, steps=40, **kwargs)
    assert worst < 1e-6


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"lr": 1e-2, "betas": (0.8, 0.95)}, {"lr": 1e-2, "weight_decay": 0.01}, {"lr": 1e-2, "amsgrad": True}],
    ids=["defaults", "betas", "l2-decay", "amsgrad"],
)
def test_adam_matches_torch(kwargs):
    worst, _ = run_pair(Adam, torch.optim.Adam, steps=40, **kwargs)
    assert worst < 1e-6


def test_adam_matches_torch_with_two_groups_in_float64():
    worst, _ = run_pair(Adam, torch.optim.Adam, steps=30, groups=two_groups, dtype=torch.float64)
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
        if parameter.default is not inspect.Parameter.empty:
            assert parameter.default == theirs_params[name].default, name


def test_adamw_is_adam_with_decoupled_decay():
    assert issubclass(AdamW, Adam) and issubclass(Adam, torch.optim.Optimizer) and issubclass(SGD, torch.optim.Optimizer)
    assert AdamW.decoupled_weight_decay and not Adam.decoupled_weight_decay


# ---------------------------------------------------------------------------------------------
# The Optimizer contract


def test_state_per_parameter_and_skipped_parameters():
    net = make_net()
    frozen_out = nn.Parameter(torch.ones(3))  # in the optimizer but never in the loss: no grad
    optimizer = AdamW(list(net.parameters()) + [frozen_out], lr=1e-2)
    one_step(net, optimizer, 0)
    assert frozen_out not in optimizer.state
    assert torch.equal(frozen_out.detach(), torch.ones(3))
    for p in net.parameters():
        state = optimizer.state[p]
        assert set(state) == {"step", "exp_avg", "exp_avg_sq"}
        assert state["step"] == 1 and state["exp_avg"].shape == p.shape


def test_step_with_closure_returns_the_loss():
    net = make_net()
    x, y = torch.randn(5, 6), torch.tensor([0, 1, 2, 3, 0])

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        return loss

    for optimizer in (SGD(net.parameters(), lr=0.1), Adam(net.parameters()), AdamW(net.parameters())):
        before = F.cross_entropy(net(x), y).item()
        loss = optimizer.step(closure)
        assert isinstance(loss, torch.Tensor) and abs(loss.item() - before) < 1e-6


@pytest.mark.parametrize("cls", [SGD, Adam, AdamW])
def test_state_dict_round_trip_resumes_exactly(cls):
    kwargs = {"lr": 0.05, "momentum": 0.9} if cls is SGD else {"lr": 1e-2, "amsgrad": True}
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


def test_state_dicts_load_across_ours_and_torchs():
    """Same state names as torch: a torch AdamW checkpoint continues in ours, and the other way round."""
    for source_cls, target_cls in ((torch.optim.AdamW, AdamW), (AdamW, torch.optim.AdamW)):
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


def test_sparse_gradients_are_refused():
    emb = nn.Embedding(10, 4, sparse=True)
    optimizer = AdamW(emb.parameters())
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
