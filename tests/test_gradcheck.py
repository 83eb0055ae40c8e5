"""Tests for llmcourse.gradcheck (Day 2): numerical_gradient, gradcheck, GradcheckError."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from llmcourse.gradcheck import GradcheckError, gradcheck, numerical_gradient

f64 = torch.float64


def leaf(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tuple(shape), generator=g, dtype=f64).requires_grad_()


class Multiply(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y):
        ctx.save_for_backward(x, y)
        return x * y

    @staticmethod
    def backward(ctx, grad_out):
        x, y = ctx.saved_tensors
        return grad_out * y, grad_out * x


class SwappedMultiply(Multiply):
    @staticmethod
    def backward(ctx, grad_out):
        x, y = ctx.saved_tensors
        return grad_out * x, grad_out * y


class OneWrongElement(torch.autograd.Function):
    """sin(x) whose backward is wrong at element (1, 2) only."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.sin()

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        grad = grad_out * x.cos()
        grad[1, 2] += 0.5
        return grad


class ScaleFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, buggy):
        ctx.save_for_backward(x, scale)
        ctx.buggy = buggy
        return x * scale

    @staticmethod
    def backward(ctx, grad_out):
        x, scale = ctx.saved_tensors
        grad_scale = grad_out.sum(dim=0) if ctx.buggy else (grad_out * x).sum(dim=0)
        return grad_out * scale, grad_scale, None


class Scale(nn.Module):
    def __init__(self, channels, buggy=False):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, channels, dtype=f64))
        self.bias = nn.Parameter(torch.zeros(channels, dtype=f64))
        self.buggy = buggy

    def forward(self, x):
        return ScaleFunction.apply(x, self.weight, self.buggy) + self.bias


# passes right gradients ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "fn, shapes",
    [
        (torch.sin, [(5,)]),
        (lambda a, b: a @ b, [(3, 4), (4, 2)]),
        (lambda a: torch.softmax(a, dim=-1), [(2, 3, 5)]),
        (lambda a: (a**2).sum(), [(4,)]),  # scalar output
        (lambda a: a, [(3, 2)]),  # output is the input itself
        (lambda a: a.t(), [(3, 2)]),  # output is a view of the input
        (lambda a, b: (a * b).mean(dim=0, keepdim=True), [(2, 3), (3,)]),  # broadcasting
    ],
)
def test_passes_right_gradients(fn, shapes):
    inputs = [leaf(*s, seed=i) for i, s in enumerate(shapes)]
    assert gradcheck(fn, inputs) is True


def test_passes_custom_function_with_right_backward():
    assert gradcheck(Multiply.apply, [leaf(2, 3), leaf(2, 3, seed=1)])


def test_single_tensor_and_tuple_inputs():
    x = leaf(4)
    assert gradcheck(torch.tanh, x)
    assert gradcheck(torch.tanh, (x,))


def test_non_tensor_and_constant_inputs_pass_through():
    x = leaf(3, 4)
    const = torch.randn(4, dtype=torch.float32)  # does not require grad: never perturbed, may be float32
    index = torch.tensor([0, 2])  # integer tensor, e.g. targets
    assert gradcheck(lambda a, c, dim, idx: (a * c).sum(dim=dim)[idx], [x, const, 1, index])


def test_non_contiguous_leaf():
    x = torch.randn(4, 3, dtype=f64).t().requires_grad_()  # a leaf with strides (1, 3)
    assert not x.is_contiguous()
    assert gradcheck(lambda a: a.exp() * torch.arange(4.0, dtype=f64), [x])


# catches wrong gradients ---------------------------------------------------------------------


def test_catches_swapped_gradients_and_names_input():
    x, y = leaf(2, 3), leaf(2, 3, seed=1)
    with pytest.raises(GradcheckError) as info:
        gradcheck(SwappedMultiply.apply, [x, y])
    err = info.value
    assert isinstance(err, AssertionError)
    assert err.name == "input 0" and "input 0" in str(err)
    assert f"{err.analytic:.6g}" in str(err) and f"{err.numerical:.6g}" in str(err)
    # the reported values are the real ones at the reported element
    grad_x = torch.autograd.grad(SwappedMultiply.apply(x, y), x, torch.ones(2, 3))[0]
    assert grad_x.shape == (2, 3)


def test_reports_the_wrong_element():
    x = leaf(3, 4)
    with pytest.raises(GradcheckError) as info:
        gradcheck(OneWrongElement.apply, [x])
    err = info.value
    assert err.index == (1, 2)
    assert "index (1, 2)" in str(err) and "1 of 12" in str(err)
    assert abs(err.analytic - err.numerical) > 0.01


def test_second_input_named():
    class WrongSecond(Multiply):
        @staticmethod
        def backward(ctx, grad_out):
            x, y = ctx.saved_tensors
            return grad_out * y, 2 * grad_out * x

    with pytest.raises(GradcheckError, match="input 1"):
        gradcheck(WrongSecond.apply, [leaf(3), leaf(3, seed=1)])


def test_catches_stray_detach():
    x, y = leaf(2, 3), leaf(2, 3, seed=1)
    with pytest.raises(GradcheckError) as info:
        gradcheck(lambda a, b: a.detach().sum(dim=1) * b.sum(dim=1), [x, y])
    assert info.value.name == "input 0" and info.value.analytic == 0.0


def test_output_independent_of_inputs_passes():
    assert gradcheck(lambda a: torch.zeros(3, dtype=f64), [leaf(3)])


def _scaled_by(factor):
    """y = 2x whose backward multiplies by `factor` instead of 2."""

    class Scaled(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return 2 * x

        @staticmethod
        def backward(ctx, grad_out):
            return grad_out * factor

    return Scaled.apply


def test_tolerance_boundary():
    x = torch.ones(1, dtype=f64, requires_grad=True)
    assert gradcheck(_scaled_by(2 + 1e-7), [x])  # within atol + rtol * |2|
    with pytest.raises(GradcheckError):
        gradcheck(_scaled_by(2 + 1e-3), [x])
    assert gradcheck(_scaled_by(2 + 1e-3), [x], rtol=1e-2)  # a looser tolerance accepts it


# params= -------------------------------------------------------------------------------------


def test_params_list_module():
    layer = nn.Linear(3, 2).double()
    x = leaf(4, 3)
    assert gradcheck(layer, [x], params=list(layer.parameters()))
    norm = nn.LayerNorm(5).double()
    assert gradcheck(norm, [leaf(2, 3, 5)], params=list(norm.parameters()))


def test_params_wrong_gradient_named_by_position_and_name():
    model = Scale(3, buggy=True)
    x = leaf(4, 3)
    with pytest.raises(GradcheckError) as info:
        gradcheck(model, [x], params=list(model.parameters()))
    assert info.value.name == "parameter 0"
    with pytest.raises(GradcheckError, match=r"parameter 0 \(weight\)"):
        gradcheck(model, [x], params=dict(model.named_parameters()))
    right = Scale(3)
    assert gradcheck(right, [x], params=dict(right.named_parameters()))


def test_params_only_without_input_grad():
    model = Scale(3)
    x = torch.randn(4, 3, dtype=f64)  # no grad: only the parameters are checked
    assert gradcheck(model, [x], params=list(model.parameters()))
    buggy = Scale(3, buggy=True)
    with pytest.raises(GradcheckError, match="parameter 0"):
        gradcheck(buggy, [x], params=list(buggy.parameters()))


def test_frozen_params_are_skipped():
    model = Scale(3, buggy=True)
    model.weight.requires_grad_(False)  # the buggy gradient is not checked any more
    assert gradcheck(model, [leaf(4, 3)], params=list(model.parameters()))


def test_params_must_be_tensors():
    with pytest.raises(TypeError, match="parameter 1 is a float"):
        gradcheck(torch.sin, [leaf(2)], params=[leaf(2), 1.0])


# float64 and other input errors --------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_input_is_refused(dtype):
    x = torch.randn(3, dtype=dtype, requires_grad=True)
    with pytest.raises(TypeError, match=r"input 0 has dtype .* need torch.float64.*7 significant digits"):
        gradcheck(torch.sin, [x])
    with pytest.raises(TypeError, match="float64"):
        numerical_gradient(torch.sin, [x])


def test_float32_module_parameters_refused():
    layer = nn.Linear(3, 2)  # float32
    with pytest.raises(TypeError, match=r"parameter 0 has dtype torch.float32.*\.double\(\)"):
        gradcheck(layer, [torch.randn(4, 3, dtype=f64)], params=list(layer.parameters()))


def test_float32_output_refused():
    with pytest.raises(TypeError, match="fn returned a torch.float32 tensor"):
        gradcheck(lambda a: a.float() * 2, [leaf(3)])


def test_nothing_requires_grad():
    with pytest.raises(ValueError, match="nothing to check"):
        gradcheck(torch.sin, [torch.randn(3, dtype=f64)])
    with pytest.raises(ValueError, match="nothing to check"):
        gradcheck(lambda i: i.double(), [torch.arange(3)])  # integer input: cannot require grad
    with pytest.raises(ValueError, match="nothing to differentiate"):
        numerical_gradient(torch.sin, [torch.randn(3, dtype=f64)])


@pytest.mark.parametrize("kwargs", [{"eps": 0.0}, {"eps": -1e-6}, {"atol": -1.0}, {"rtol": -1e-3}])
def test_bad_tolerances(kwargs):
    with pytest.raises(ValueError):
        gradcheck(torch.sin, [leaf(2)], **kwargs)


def test_bad_fn_and_outputs():
    with pytest.raises(TypeError, match="fn must be callable"):
        gradcheck("sin", [leaf(2)])
    with pytest.raises(TypeError, match="inputs must be a list or tuple"):
        gradcheck(torch.sin, {"x": leaf(2)})
    with pytest.raises(TypeError, match="must return a tensor"):
        gradcheck(lambda a: a.sum().item(), [leaf(2)])
    with pytest.raises(TypeError, match="no floating-point tensor"):
        gradcheck(lambda a: a.argmax(), [leaf(2)])


def test_overlapping_memory_refused():
    x = torch.randn(3, 1, dtype=f64).expand(3, 4).requires_grad_()
    with pytest.raises(ValueError, match="overlapping memory"):
        gradcheck(torch.sin, [x])


# restoring tensors and leaving state alone ---------------------------------------------------


def test_tensors_restored_after_pass_and_failure():
    layer = nn.Linear(3, 2).double()
    x = leaf(4, 3)
    saved = [t.detach().clone() for t in (x, layer.weight, layer.bias)]
    assert gradcheck(layer, [x], params=list(layer.parameters()))
    assert all(torch.equal(s, t.detach()) for s, t in zip(saved, (x, layer.weight, layer.bias)))
    model = Scale(3, buggy=True)
    saved = [t.detach().clone() for t in (x, model.weight, model.bias)]
    with pytest.raises(GradcheckError):
        gradcheck(model, [x], params=list(model.parameters()))
    assert all(torch.equal(s, t.detach()) for s, t in zip(saved, (x, model.weight, model.bias)))


def test_tensor_restored_when_fn_raises_midway():
    x = leaf(5)
    saved = x.detach().clone()
    calls = {"n": 0}

    def flaky(a):
        calls["n"] += 1
        if calls["n"] == 4:  # the call after the analytic one and the first perturbation
            raise RuntimeError("boom")
        return a.sin()

    with pytest.raises(RuntimeError, match="boom"):
        gradcheck(flaky, [x])
    assert torch.equal(x.detach(), saved)


def test_grad_fields_and_global_rng_untouched():
    layer = nn.Linear(3, 2).double()
    x = leaf(4, 3)
    layer.weight.grad = torch.full_like(layer.weight, 7.0)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    gradcheck(layer, [x], params=list(layer.parameters()))
    assert torch.equal(torch.rand(3), expected)  # the random projection has its own generator
    assert torch.equal(layer.weight.grad, torch.full_like(layer.weight, 7.0))
    assert layer.bias.grad is None and x.grad is None


# outputs of any shape, several outputs -------------------------------------------------------


def test_multi_output_tuple():
    x = leaf(3, 4)
    assert gradcheck(lambda a: (a.sin(), a.cumsum(dim=0), a.sum()), [x])
    assert gradcheck(lambda a: tuple(a.max(dim=1)), [x])  # (values, integer indices)


def test_multi_output_bug_in_one_output_caught():
    x = leaf(3, 4)
    with pytest.raises(GradcheckError, match="input 0"):
        gradcheck(lambda a: (a.sin(), OneWrongElement.apply(a)), [x])


def test_output_of_any_shape_every_element_checked():
    """A bug that affects only one output element of a (B, T, C) output is still caught."""

    class WrongAtOneOutput(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 3

        @staticmethod
        def backward(ctx, grad_out):
            grad = grad_out * 3
            grad[1, 2, 0] = 0.0  # drops output (1, 2, 0)'s contribution
            return grad

    x = leaf(2, 3, 4)
    with pytest.raises(GradcheckError) as info:
        gradcheck(WrongAtOneOutput.apply, [x])
    assert info.value.index == (1, 2, 0)


# numerical_gradient --------------------------------------------------------------------------


def test_numerical_gradient_matches_autograd_with_grad_output():
    x, w = leaf(3, 4), leaf(4, 2, seed=1)
    v = torch.randn(3, 2, dtype=f64)
    gx, gw = numerical_gradient(lambda a, b: torch.tanh(a @ b), [x, w], grad_output=v)
    ax, aw = torch.autograd.grad(torch.tanh(x @ w), [x, w], v)
    torch.testing.assert_close(gx, ax, atol=1e-8, rtol=1e-6)
    torch.testing.assert_close(gw, aw, atol=1e-8, rtol=1e-6)
    assert gx.grad_fn is None and not gx.requires_grad


def test_numerical_gradient_default_is_gradient_of_sum_and_params():
    layer = nn.Linear(3, 2).double()
    x = torch.randn(4, 3, dtype=f64)  # no grad: its entry is None
    gx, gw, gb = numerical_gradient(layer, [x], params=list(layer.parameters()))
    assert gx is None
    layer(x).sum().backward()
    torch.testing.assert_close(gw, layer.weight.grad, atol=1e-8, rtol=1e-6)
    torch.testing.assert_close(gb, layer.bias.grad, atol=1e-8, rtol=1e-6)


def test_numerical_gradient_bad_grad_output():
    with pytest.raises(ValueError, match="grad_output shapes"):
        numerical_gradient(torch.sin, [leaf(3)], grad_output=torch.ones(4, dtype=f64))


def test_numerical_gradient_scalar_input():
    x = torch.tensor(0.5, dtype=f64, requires_grad=True)
    (g,) = numerical_gradient(lambda a: a**3, [x])
    assert g.shape == () and abs(g.item() - 3 * 0.25) < 1e-8


# agreement with torch ------------------------------------------------------------------------


def _ours(fn, inputs):
    try:
        return gradcheck(fn, inputs)
    except GradcheckError:
        return False


@pytest.mark.parametrize(
    "fn",
    [Multiply.apply, SwappedMultiply.apply, lambda a, b: torch.tanh(a) * b, lambda a, b: a.detach() * b],
)
def test_agrees_with_torch_gradcheck(fn):
    x, y = leaf(2, 3), leaf(2, 3, seed=1)
    assert _ours(fn, [x, y]) == torch.autograd.gradcheck(fn, (x, y), raise_exception=False)


@settings(max_examples=20, deadline=None)
@given(
    shape=st.lists(st.integers(1, 3), min_size=0, max_size=3),
    op=st.sampled_from(["sin", "exp", "square", "softmax", "cumsum", "sigmoid"]),
    seed=st.integers(0, 1000),
)
def test_property_passes_torch_ops(shape, op, seed):
    x = leaf(*shape, seed=seed)
    fns = {
        "sin": torch.sin,
        "exp": torch.exp,
        "square": lambda a: a * a,
        "softmax": lambda a: torch.softmax(a, dim=-1) if a.ndim else a.exp(),
        "cumsum": lambda a: a.cumsum(dim=0) if a.ndim else a * 2,
        "sigmoid": torch.sigmoid,
    }
    saved = x.detach().clone()
    assert gradcheck(fns[op], [x])
    assert torch.equal(saved, x.detach())
