"""Tests for llmcourse.mlp (Day 16): dropout, the GELU MLP and SwiGLU."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from llmcourse.linear import count_parameters
from llmcourse.mlp import MLP, Dropout, SwiGLU, dropout, swiglu_hidden_size


# ----------------------------------------------------------------------------------------- dropout
@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_dropout_keeps_the_mean_and_zeroes_a_fraction_p(p):
    torch.manual_seed(0)
    x = torch.rand(200, 1000) + 0.5
    y = dropout(x, p, training=True)
    n = x.numel()
    std_of_mean = math.sqrt((x**2).mean().item() * p / (1 - p) / n)
    assert abs(y.mean().item() - x.mean().item()) < 5 * std_of_mean
    frac = (y == 0).float().mean().item()
    assert abs(frac - p) < 5 * math.sqrt(p * (1 - p) / n)
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] / (1 - p))


@pytest.mark.parametrize("p", [0.2, 0.6])
def test_dropout_matches_nn_dropout_in_distribution(p):
    torch.manual_seed(1)
    x = torch.randn(200, 500)
    ours, theirs = Dropout(p).train()(x), nn.Dropout(p).train()(x)
    n = x.numel()
    f_ours, f_theirs = (ours == 0).float().mean().item(), (theirs == 0).float().mean().item()
    # two independent binomial fractions: their difference has std sqrt(2 p (1-p) / n)
    assert abs(f_ours - f_theirs) < 5 * math.sqrt(2 * p * (1 - p) / n)
    for out in (ours, theirs):
        kept = out != 0
        torch.testing.assert_close(out[kept], x[kept] / (1 - p))


def test_dropout_eval_and_p_zero_are_the_identity():
    x = torch.randn(3, 4)
    assert dropout(x, 0.7, training=False) is x
    assert dropout(x, 0.0, training=True) is x
    d = Dropout(0.5).eval()
    assert torch.equal(d(x), x)
    d.train()
    assert not torch.equal(d(torch.ones(1000)), torch.ones(1000))


def test_dropout_generator_makes_it_reproducible():
    x = torch.ones(100)
    a = dropout(x, 0.5, generator=torch.Generator().manual_seed(3))
    b = dropout(x, 0.5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_dropout_gradient_is_the_mask_scaled():
    x = torch.randn(50, requires_grad=True)
    torch.manual_seed(2)
    y = dropout(x, 0.25)
    y.sum().backward()
    expected = (y != 0).float() / 0.75
    torch.testing.assert_close(x.grad, expected)


@pytest.mark.parametrize("p", [1.0, -0.1, 1.5, float("nan"), float("inf")])
def test_dropout_rejects_p_outside_the_range(p):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        Dropout(p)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        dropout(torch.ones(2), p)


@pytest.mark.parametrize("p", ["0.1", None, True, torch.tensor(0.1)])
def test_dropout_rejects_p_of_the_wrong_type(p):
    with pytest.raises(TypeError, match="float in"):
        Dropout(p)


# --------------------------------------------------------------------------------------------- MLP
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("bias", [True, False])
def test_mlp_equals_torch_sequential(approximate, bias):
    torch.manual_seed(0)
    mlp = MLP(16, bias=bias, approximate=approximate)
    ref = nn.Sequential(nn.Linear(16, 64, bias=bias), nn.GELU(approximate=approximate), nn.Linear(64, 16, bias=bias))
    ref[0].load_state_dict(mlp.c_fc.state_dict())
    ref[2].load_state_dict(mlp.c_proj.state_dict())
    x = torch.randn(3, 7, 16)
    torch.testing.assert_close(mlp(x), ref(x))


def test_mlp_names_shapes_and_count():
    mlp = MLP(12)
    assert tuple(mlp.c_fc.weight.shape) == (48, 12) and tuple(mlp.c_proj.weight.shape) == (12, 48)
    assert count_parameters(mlp) == 8 * 12**2 + 5 * 12
    assert count_parameters(MLP(12, bias=False)) == 8 * 12**2


@settings(max_examples=25, deadline=None)
@given(lead=st.lists(st.integers(1, 4), min_size=0, max_size=3), c=st.integers(1, 12))
def test_mlp_keeps_any_leading_shape_and_is_position_wise(lead, c):
    mlp = MLP(c)
    x = torch.randn(*lead, c)
    y = mlp(x)
    assert y.shape == x.shape
    torch.testing.assert_close(y.reshape(-1, c), mlp(x.reshape(-1, c)))


def test_mlp_dropout_train_vs_eval():
    torch.manual_seed(0)
    mlp = MLP(8, dropout=0.5)
    x = torch.randn(4, 8)
    mlp.train()
    assert not torch.equal(mlp(x), mlp(x))
    mlp.eval()
    assert torch.equal(mlp(x), mlp(x))


@pytest.mark.parametrize("kwargs", [dict(n_embd=0), dict(n_embd=-3), dict(n_embd=8.0), dict(n_embd=8, approximate="fast")])
def test_mlp_errors(kwargs):
    with pytest.raises(ValueError):
        MLP(**kwargs)


def test_mlp_bad_dropout():
    with pytest.raises(ValueError):
        MLP(8, dropout=1.0)


# ------------------------------------------------------------------------------------------ SwiGLU
def test_swiglu_matches_the_formula():
    torch.manual_seed(0)
    m = SwiGLU(16)
    x = torch.randn(2, 5, 16)
    expected = (F.silu(x @ m.c_gate.weight.T) * (x @ m.c_fc.weight.T)) @ m.c_proj.weight.T
    torch.testing.assert_close(m(x), expected)
    assert m.c_gate.bias is None and m.c_fc.bias is None and m.c_proj.bias is None


def test_swiglu_with_bias_and_explicit_hidden():
    m = SwiGLU(10, hidden=6, bias=True)
    assert m.hidden == 6 and tuple(m.c_fc.weight.shape) == (6, 10) and m.c_fc.bias is not None
    assert count_parameters(m) == 3 * 10 * 6 + 2 * 6 + 10


def test_swiglu_gpt2_width_matches_the_mlp_exactly():
    assert swiglu_hidden_size(768) == 2048
    assert count_parameters(SwiGLU(768)) == count_parameters(MLP(768, bias=False)) == 8 * 768**2


@settings(max_examples=40, deadline=None)
@given(c=st.integers(16, 4096))
def test_swiglu_parameter_count_is_close_to_the_mlp(c):
    h = swiglu_hidden_size(c)
    assert h % 8 == 0
    assert abs(3 * c * h / (8 * c * c) - 1) <= 1.5 / c + 1e-12  # rounding by at most 4 units of H
    assert abs(h - 8 * c / 3) <= 4


def test_swiglu_hidden_size_rounding_and_errors():
    assert swiglu_hidden_size(100, multiple_of=64) == 256
    assert swiglu_hidden_size(1) == 8  # never below multiple_of
    for bad in [dict(n_embd=0), dict(n_embd=8, multiple_of=0), dict(n_embd=True)]:
        with pytest.raises(ValueError):
            swiglu_hidden_size(**bad)
    with pytest.raises(ValueError):
        SwiGLU(8, hidden=0)
    with pytest.raises(ValueError):
        SwiGLU(8, dropout=-0.5)


def test_swiglu_gradcheck():
    from llmcourse.gradcheck import gradcheck

    torch.manual_seed(0)
    m = SwiGLU(4, hidden=6).double()
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    assert gradcheck(m, (x,), params=dict(m.named_parameters()))


# ---- the implementation switch ------------------------------------------------------------------


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("bias", [True, False])
def test_mlp_fused_equals_manual_in_values_and_gradients(approximate, bias):
    torch.manual_seed(0)
    fused = MLP(8, bias=bias, approximate=approximate)
    manual = MLP(8, bias=bias, approximate=approximate, implementation="manual")
    manual.load_state_dict(fused.state_dict())
    x = torch.randn(2, 5, 8)
    outs = [m(x) for m in (fused, manual)]
    torch.testing.assert_close(outs[0], outs[1])
    grads = [torch.autograd.grad(o.pow(2).sum(), list(m.parameters())) for o, m in zip(outs, (fused, manual))]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_swiglu_fused_equals_manual():
    torch.manual_seed(0)
    fused, manual = SwiGLU(8), SwiGLU(8, implementation="manual")
    manual.load_state_dict(fused.state_dict())
    x = torch.randn(3, 8)
    torch.testing.assert_close(fused(x), manual(x))


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_fused_dropout_keeps_the_mean_and_the_survivor_scale(p):
    torch.manual_seed(0)
    x = torch.rand(400, 500) + 0.5
    for implementation in ("fused", "manual"):
        y = Dropout(p, implementation=implementation).train()(x)
        zero = y == 0
        n = x.numel()
        assert abs(zero.float().mean().item() - p) < 5 * (p * (1 - p) / n) ** 0.5
        torch.testing.assert_close(y[~zero], x[~zero] / (1 - p))
        assert torch.equal(Dropout(p, implementation=implementation).eval()(x), x)


def test_layers_default_to_fused_and_refuse_unknown_implementations():
    assert Dropout(0.1).implementation == MLP(8).implementation == SwiGLU(8).implementation == "fused"
    assert MLP(8).dropout.implementation == "fused" and MLP(8, implementation="manual").dropout.implementation == "manual"
    for make in (lambda: Dropout(0.1, implementation="cuda"), lambda: MLP(8, implementation="sdpa"), lambda: SwiGLU(8, implementation=None)):
        with pytest.raises(ValueError, match="implementation must be one of"):
            make()
