"""llmcourse.norms (Day 15): LayerNorm and RMSNorm equal torch's, in outputs and gradients, with clear errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from llmcourse.gradcheck import gradcheck
from llmcourse.norms import LayerNorm, RMSNorm


def _randomize(module: nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))


def _assert_same(ours: nn.Module, theirs: nn.Module, x: torch.Tensor, **tol) -> None:
    """Same parameters (copied through state_dict), then equal outputs and gradients for input and parameters."""
    _randomize(theirs)
    ours.load_state_dict(theirs.state_dict())
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = ours(x1), theirs(x2)
    assert y1.dtype == y2.dtype and y1.shape == y2.shape
    torch.testing.assert_close(y1, y2, **tol)
    g = torch.randn(y1.shape, generator=torch.Generator().manual_seed(1)).to(y1.dtype)
    grads1 = torch.autograd.grad(y1, [x1, *ours.parameters()], grad_outputs=g)
    grads2 = torch.autograd.grad(y2, [x2, *theirs.parameters()], grad_outputs=g)
    assert len(grads1) == len(grads2)
    for a, b in zip(grads1, grads2):
        torch.testing.assert_close(a, b, **tol)


def _input(*shape: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * 3 + 1.5).to(dtype)


# ---- LayerNorm ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("shape", "x_shape"), [(16, (2, 5, 16)), ((4, 16), (3, 4, 16)), ([8], (8,)), ((2, 3, 4), (2, 3, 4))])
@pytest.mark.parametrize("bias", [True, False])
def test_layernorm_equals_torch(dtype, shape, x_shape, bias):
    _assert_same(LayerNorm(shape, bias=bias, dtype=dtype), nn.LayerNorm(shape, bias=bias, dtype=dtype), _input(*x_shape, dtype=dtype))


@pytest.mark.parametrize("eps", [1e-5, 1e-2, 1.0])
def test_layernorm_eps_inside_the_square_root(eps):
    x = _input(4, 6) * 1e-2  # small variance, so eps matters
    _assert_same(LayerNorm(6, eps=eps), nn.LayerNorm(6, eps=eps), x)


def test_layernorm_constant_input_gives_bias():
    ln = LayerNorm(5)
    _randomize(ln)
    y = ln(torch.full((2, 5), 3.0))
    torch.testing.assert_close(y, ln.bias.detach().expand(2, 5))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_layernorm_half_precision_close_to_float32(dtype):
    x = _input(4, 64, dtype=dtype)
    ours, theirs = LayerNorm(64, dtype=dtype), nn.LayerNorm(64, dtype=dtype)
    _randomize(theirs)
    ours.load_state_dict(theirs.state_dict())
    y = ours(x)
    assert y.dtype == dtype
    reference = nn.functional.layer_norm(x.float(), (64,), theirs.weight.float(), theirs.bias.float())
    torch.testing.assert_close(y.float(), reference, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(y.float(), theirs(x).float(), atol=3e-2, rtol=3e-2)


def test_layernorm_gradcheck_float64():
    ln = LayerNorm((3, 4), dtype=torch.float64)
    _randomize(ln)
    x = _input(2, 3, 4, dtype=torch.float64).requires_grad_()
    assert gradcheck(ln, [x], params=dict(ln.named_parameters()))


def test_layernorm_parameters_match_torch_names_shapes_and_init():
    ours, theirs = LayerNorm((3, 4)), nn.LayerNorm((3, 4))
    assert {n: p.shape for n, p in ours.named_parameters()} == {n: p.shape for n, p in theirs.named_parameters()}
    assert torch.equal(ours.weight, torch.ones(3, 4)) and torch.equal(ours.bias, torch.zeros(3, 4))
    no_bias = LayerNorm(4, bias=False)
    assert no_bias.bias is None and list(no_bias.state_dict()) == ["weight"]
    theirs.load_state_dict(ours.state_dict())  # and the other way round
    _randomize(ours)
    ours.reset_parameters()
    assert torch.equal(ours.weight, torch.ones(3, 4)) and torch.equal(ours.bias, torch.zeros(3, 4))
    assert ours.normalized_shape == (3, 4) and ours.eps == 1e-5
    assert "eps=1e-05" in repr(ours)


def test_layernorm_invariances():
    x = _input(5, 16)
    ln = LayerNorm(16)
    torch.testing.assert_close(ln(x + 10.0), ln(x), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ln(x * 10.0), ln(x), atol=1e-4, rtol=1e-4)


# ---- RMSNorm -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("shape", "x_shape"), [(16, (2, 5, 16)), ((4, 16), (3, 4, 16)), ([8], (8,))])
@pytest.mark.parametrize("eps", [None, 1e-6, 0.5])
def test_rmsnorm_equals_torch(dtype, shape, x_shape, eps):
    _assert_same(RMSNorm(shape, eps=eps, dtype=dtype), nn.RMSNorm(shape, eps=eps, dtype=dtype), _input(*x_shape, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rmsnorm_eps_none_is_machine_epsilon_of_the_input(dtype):
    x = torch.full((2, 8), 1e-4, dtype=dtype)  # mean square 1e-8: float32's eps (1.2e-7) is not negligible
    y = RMSNorm(8, dtype=dtype)(x)
    torch.testing.assert_close(y, nn.RMSNorm(8, dtype=dtype)(x))
    expected = 1e-4 / (1e-8 + torch.finfo(dtype).eps) ** 0.5
    torch.testing.assert_close(y, torch.full_like(x, expected))
    assert RMSNorm(8).eps is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rmsnorm_half_precision_close_to_float32(dtype):
    x = _input(4, 64, dtype=dtype)
    ours, theirs = RMSNorm(64, dtype=dtype), nn.RMSNorm(64, dtype=dtype)
    _randomize(theirs)
    ours.load_state_dict(theirs.state_dict())
    y = ours(x)
    assert y.dtype == dtype
    reference = nn.functional.rms_norm(x.float(), (64,), theirs.weight.float(), eps=torch.finfo(dtype).eps)
    torch.testing.assert_close(y.float(), reference, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(y.float(), theirs(x).float(), atol=3e-2, rtol=3e-2)


def test_rmsnorm_gradcheck_float64():
    rms = RMSNorm((2, 5), dtype=torch.float64)
    _randomize(rms)
    x = _input(3, 2, 5, dtype=torch.float64).requires_grad_()
    assert gradcheck(rms, [x], params=dict(rms.named_parameters()))


def test_rmsnorm_parameters_and_invariance():
    ours, theirs = RMSNorm(6), nn.RMSNorm(6)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()] == ["weight"]
    assert torch.equal(ours.weight, torch.ones(6))
    x = _input(4, 6)
    torch.testing.assert_close(ours(x * 7.0), ours(x), atol=1e-5, rtol=1e-4)  # re-scaling invariant
    assert (ours(x + 7.0) - ours(x)).abs().max() > 0.1  # but not re-centering invariant
    torch.testing.assert_close(ours(x).pow(2).mean(-1), torch.ones(4), atol=1e-4, rtol=1e-4)  # unit RMS


@settings(max_examples=25, deadline=None)
@given(
    lead=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    norm=st.lists(st.integers(1, 5), min_size=1, max_size=2),
    seed=st.integers(0, 2**16),
)
def test_both_norms_match_torch_on_random_shapes(lead, norm, seed):
    x = _input(*lead, *norm, dtype=torch.float64, seed=seed)
    _assert_same(LayerNorm(norm, dtype=torch.float64), nn.LayerNorm(norm, dtype=torch.float64), x)
    _assert_same(RMSNorm(norm, dtype=torch.float64), nn.RMSNorm(norm, dtype=torch.float64), x)


# ---- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [LayerNorm, RMSNorm])
def test_shape_mismatch_is_a_clear_error(cls):
    with pytest.raises(ValueError, match=r"last 1 dimension\(s\), which must be \(32,\); got input of shape \(2, 5, 16\)"):
        cls(32)(torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match=r"which must be \(4, 8\)"):
        cls((4, 8))(torch.randn(2, 8, 4))
    with pytest.raises(ValueError, match=r"got input of shape \(8,\)"):
        cls((4, 8))(torch.randn(8))


@pytest.mark.parametrize("cls", [LayerNorm, RMSNorm])
def test_bad_inputs_and_arguments(cls):
    with pytest.raises(TypeError, match="floating point"):
        cls(4)(torch.arange(8).view(2, 4))
    with pytest.raises(TypeError, match="torch.Tensor"):
        cls(4)([1.0, 2.0, 3.0, 4.0])
    for bad in [0, -3, (), (4, 0), (4, 2.0), True]:
        with pytest.raises((TypeError, ValueError), match="normalized_shape"):
            cls(bad)
    with pytest.raises(TypeError, match="normalized_shape"):
        cls(8.0)
    for bad_eps in [0.0, -1e-5, float("nan"), "1e-5"]:
        with pytest.raises(ValueError, match="eps must be a positive number"):
            cls(8, eps=bad_eps)


def test_layernorm_eps_none_is_refused():
    with pytest.raises(ValueError, match="eps must be a positive number, got None"):
        LayerNorm(8, eps=None)


# ---- the implementation switch ------------------------------------------------------------------


@pytest.mark.parametrize("dtype, tol", [(torch.float32, {}), (torch.float64, {}), (torch.bfloat16, dict(atol=2e-2, rtol=2e-2))])
@pytest.mark.parametrize("shape, bias", [(16, True), ((3, 16), True), (16, False)])
def test_layernorm_fused_equals_manual_in_values_and_gradients(dtype, tol, shape, bias):
    torch.manual_seed(0)
    layer = LayerNorm(shape, bias=bias, dtype=torch.float64 if dtype == torch.float64 else None)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    x = (torch.randn(2, 5, 3, 16) * 3 + 1).to(dtype)
    results = {}
    for implementation in ("manual", "fused"):
        layer.implementation = implementation
        xi = x.clone().requires_grad_()
        y = layer(xi)
        results[implementation] = [y, *torch.autograd.grad((y.float() ** 2).sum(), [xi, *layer.parameters()])]
    for a, b in zip(results["manual"], results["fused"]):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, **tol)


def test_layernorm_default_is_fused_and_refuses_unknown_implementations():
    assert LayerNorm(8).implementation == "fused"
    assert "implementation='manual'" in repr(LayerNorm(8, implementation="manual"))
    with pytest.raises(ValueError, match="implementation must be one of"):
        LayerNorm(8, implementation="apex")
    with pytest.raises(ValueError, match=r"last 1 dimension"):  # the same clear shape error on both paths
        LayerNorm(8)(torch.randn(2, 4))
