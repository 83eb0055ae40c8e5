"""Tests for llmcourse.functional (Day 4): activations and a stable softmax, equal to torch.nn.functional."""

import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from llmcourse.functional import gelu, log_softmax, relu, silu, softmax
from llmcourse.gradcheck import gradcheck

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
SHAPES = [(), (7,), (4, 9), (2, 3, 16), (2, 1, 3, 5)]
SCALES = [1.0, 30.0, 1e4]
LOW_PRECISION = (torch.bfloat16, torch.float16)

ELEMENTWISE = {
    "relu": (relu, F.relu),
    "gelu": (gelu, F.gelu),
    "gelu_tanh": (lambda t: gelu(t, approximate="tanh"), lambda t: F.gelu(t, approximate="tanh")),
    "silu": (silu, F.silu),
}


def _random(shape, scale, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def _log_softmax_tolerance(dtype):
    """torch's CPU kernel rounds the sum of exponentials to 16 bits; we do not (one 16-bit step apart)."""
    if dtype in LOW_PRECISION:
        return {"atol": torch.finfo(dtype).eps, "rtol": 1.6e-2 if dtype == torch.bfloat16 else 1e-3}
    return {}


# --- signatures -----------------------------------------------------------------------------------


def test_argument_names_match_torch():
    assert list(inspect.signature(softmax).parameters) == ["input", "dim", "dtype"]
    assert list(inspect.signature(log_softmax).parameters) == ["input", "dim", "dtype"]
    assert list(inspect.signature(relu).parameters) == ["input", "inplace"]
    assert list(inspect.signature(silu).parameters) == ["input", "inplace"]
    assert list(inspect.signature(gelu).parameters) == ["input", "approximate"]
    assert inspect.signature(softmax).parameters["dim"].default == -1
    assert inspect.signature(gelu).parameters["approximate"].default == "none"
    for name in ("input", "dim", "dtype"):  # torch's softmax has these names too
        assert name in inspect.signature(F.softmax).parameters
    x = torch.randn(3, 4)
    torch.testing.assert_close(softmax(input=x, dim=0, dtype=torch.float64), F.softmax(input=x, dim=0, dtype=torch.float64))
    torch.testing.assert_close(relu(input=x, inplace=False), F.relu(input=x, inplace=False))
    torch.testing.assert_close(gelu(input=x, approximate="tanh"), F.gelu(input=x, approximate="tanh"))


# --- equal to torch -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(ELEMENTWISE))
@pytest.mark.parametrize("dtype", DTYPES)
def test_activations_equal_torch(name, dtype):
    ours, theirs = ELEMENTWISE[name]
    for shape in SHAPES:
        for scale in SCALES:
            x = _random(shape, scale, dtype)
            out = ours(x)
            assert out.dtype == dtype and out.shape == x.shape
            torch.testing.assert_close(out, theirs(x), msg=lambda m: f"shape {shape}, scale {scale}: {m}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_softmax_and_log_softmax_equal_torch_on_every_dim(dtype, shape):
    for scale in SCALES:
        x = _random(shape, scale, dtype)
        for dim in range(-max(x.dim(), 1), max(x.dim(), 1)):
            where = f"scale {scale}, dim {dim}"
            out = softmax(x, dim=dim)
            assert out.dtype == dtype and out.shape == x.shape
            torch.testing.assert_close(out, F.softmax(x, dim=dim), msg=lambda m: f"{where}: {m}")
            torch.testing.assert_close(log_softmax(x, dim=dim), F.log_softmax(x, dim=dim),
                                       **_log_softmax_tolerance(dtype), msg=lambda m: f"{where}: {m}")


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_low_precision_log_softmax_is_float32_rounded_once(dtype):
    x = _random((6, 33), 5.0, dtype)
    expected = F.log_softmax(x.float(), dim=-1).to(dtype)
    torch.testing.assert_close(log_softmax(x), expected)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("in_dtype", [torch.int64, torch.float16, torch.float32])
def test_dtype_argument_casts_first(in_dtype, out_dtype):
    x = _random((3, 5), 4.0, torch.float64).to(in_dtype)
    for ours, theirs in ((softmax, F.softmax), (log_softmax, F.log_softmax)):
        out = ours(x, dim=-1, dtype=out_dtype)
        assert out.dtype == out_dtype
        torch.testing.assert_close(out, theirs(x, dim=-1, dtype=out_dtype))


def test_gelu_tanh_differs_from_exact():
    x = torch.linspace(-6, 6, 1001, dtype=torch.float64)
    gap = (gelu(x) - gelu(x, approximate="tanh")).abs().max().item()
    assert 1e-4 < gap < 1e-3
    assert gelu(x, approximate="none").equal(gelu(x))


def test_gelu_exact_formula():
    x = torch.tensor([-3.0, -1.0, 0.0, 0.5, 2.0], dtype=torch.float64)
    phi = torch.tensor([0.5 * (1 + math.erf(v / math.sqrt(2))) for v in x.tolist()], dtype=torch.float64)
    torch.testing.assert_close(gelu(x), x * phi)


# --- special values and stability -----------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_no_nan_or_inf_at_magnitude_1e4(dtype):
    logits = torch.tensor([[1e4, -1e4, 0.0, 9999.0], [-1e4, -1e4, -9990.0, -1e4]], dtype=dtype)
    p = softmax(logits)
    lp = log_softmax(logits)
    assert torch.isfinite(p).all() and torch.isfinite(lp).all()
    torch.testing.assert_close(p.float().sum(-1), torch.ones(2), atol=2e-3 if dtype in LOW_PRECISION else 1e-6, rtol=0)
    torch.testing.assert_close(p, F.softmax(logits, dim=-1))
    torch.testing.assert_close(lp, F.log_softmax(logits, dim=-1), **_log_softmax_tolerance(dtype))
    for fn in (relu, gelu, lambda t: gelu(t, approximate="tanh"), silu):
        assert torch.isfinite(fn(logits)).all()


def test_naive_softmax_overflows_where_ours_does_not():
    x = torch.tensor([1000.0, 999.0, 998.0])
    naive = x.exp() / x.exp().sum()
    assert naive.isnan().all()
    assert torch.isfinite(softmax(x)).all()
    torch.testing.assert_close(softmax(x), softmax(x - 1000))


def test_gradients_finite_and_equal_torch_at_1e4():
    base = torch.tensor([[1e4, -1e4, 0.0, 9999.0]], dtype=torch.float64)
    upstream = torch.tensor([[0.3, -1.0, 2.0, 0.5]], dtype=torch.float64)
    pairs = [
        (softmax, lambda t: F.softmax(t, dim=-1)),
        (log_softmax, lambda t: F.log_softmax(t, dim=-1)),
        (gelu, F.gelu),
        (lambda t: gelu(t, approximate="tanh"), lambda t: F.gelu(t, approximate="tanh")),
        (silu, F.silu),
        (relu, F.relu),
    ]
    for ours, theirs in pairs:
        a = base.clone().requires_grad_(True)
        b = base.clone().requires_grad_(True)
        ours(a).backward(upstream)
        theirs(b).backward(upstream)
        assert torch.isfinite(a.grad).all()
        torch.testing.assert_close(a.grad, b.grad)


def test_minus_infinity_masks_like_torch():
    x = torch.tensor([[0.0, float("-inf"), 1.0], [float("-inf")] * 3])
    torch.testing.assert_close(softmax(x), F.softmax(x, dim=-1), equal_nan=True)
    torch.testing.assert_close(log_softmax(x), F.log_softmax(x, dim=-1), equal_nan=True)
    assert softmax(x)[0, 1].item() == 0.0 and log_softmax(x)[0, 1].item() == float("-inf")
    assert softmax(x)[1].isnan().all()  # no finite entry: no distribution, as in torch


def test_relu_special_values_and_gradient_at_zero():
    x = torch.tensor([float("nan"), float("-inf"), float("inf"), -1.0, 0.0, 2.0])
    torch.testing.assert_close(relu(x), F.relu(x), equal_nan=True)
    a = torch.tensor([-1.0, 0.0, 1.0], requires_grad=True)
    b = a.detach().clone().requires_grad_(True)
    relu(a).sum().backward()
    F.relu(b).sum().backward()
    assert a.grad.tolist() == b.grad.tolist() == [0.0, 0.0, 1.0]
    ints = torch.arange(-3, 4)
    assert relu(ints).dtype == torch.int64 and relu(ints).equal(F.relu(ints))


def test_empty_and_zero_dim_inputs():
    for shape in [(0,), (5, 0), (0, 5)]:
        x = torch.randn(shape)
        for dim in (0, -1):
            assert softmax(x, dim=dim).shape == shape and log_softmax(x, dim=dim).shape == shape
            assert softmax(x, dim=dim).equal(F.softmax(x, dim=dim))
    s = torch.tensor(3.0)
    assert softmax(s).item() == 1.0 and log_softmax(s, dim=0).item() == 0.0
    for fn in (relu, gelu, silu):
        assert fn(torch.empty(0)).shape == (0,)


# --- in place -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ours, theirs", [(relu, F.relu), (silu, F.silu)], ids=["relu", "silu"])
def test_inplace_returns_and_overwrites_input(ours, theirs, dtype):
    x = _random((4, 5), 3.0, dtype)
    expected = theirs(x)
    y = x.clone()
    out = ours(y, inplace=True)
    assert out is y
    torch.testing.assert_close(y, expected)
    z = x.clone()
    ours(z, inplace=False)
    assert z.equal(x)  # out of place leaves the input alone


@pytest.mark.parametrize("ours, theirs", [(relu, F.relu), (silu, F.silu)], ids=["relu", "silu"])
def test_inplace_gradients_equal_torch(ours, theirs):
    base = _random((3, 4), 2.0, torch.float64)
    a = base.clone().requires_grad_(True)
    b = base.clone().requires_grad_(True)
    ours(a * 1.0, inplace=True).pow(2).sum().backward()  # in place on a non-leaf, as inside a model
    theirs(b * 1.0, inplace=True).pow(2).sum().backward()
    torch.testing.assert_close(a.grad, b.grad)


# --- gradients ------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(5,), (3, 4), (2, 3, 4)])
def test_gradcheck_every_function(shape):
    x = _random(shape, 1.5, torch.float64).requires_grad_(True)
    fns = [
        relu,  # random inputs never sit on the kink at 0
        gelu,
        lambda t: gelu(t, approximate="tanh"),
        silu,
        lambda t: silu(t * 1.0, inplace=True),
    ]
    for d in range(len(shape)):
        fns += [lambda t, d=d: softmax(t, dim=d), lambda t, d=d: log_softmax(t, dim=d)]
    for fn in fns:
        assert gradcheck(fn, [x])


def test_gradcheck_softmax_with_large_logits():
    x = torch.tensor([[50.0, 49.0, 47.5, -3.0]], dtype=torch.float64, requires_grad=True)
    assert gradcheck(softmax, [x])
    assert gradcheck(log_softmax, [x])


@settings(max_examples=40, deadline=None)
@given(
    values=st.lists(st.floats(-1e4, 1e4, allow_nan=False), min_size=1, max_size=12),
    shift=st.floats(-1e3, 1e3, allow_nan=False),
)
def test_property_softmax_is_a_distribution_and_shift_invariant(values, shift):
    x = torch.tensor(values, dtype=torch.float64)
    p = softmax(x)
    assert torch.isfinite(p).all() and (p >= 0).all()
    assert abs(p.sum().item() - 1) < 1e-9
    torch.testing.assert_close(softmax(x + shift), p, atol=1e-9, rtol=1e-6)
    torch.testing.assert_close(log_softmax(x).exp(), p, atol=1e-12, rtol=1e-9)
    torch.testing.assert_close(log_softmax(x), F.log_softmax(x, dim=-1))


# --- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [relu, gelu, silu, softmax, log_softmax])
@pytest.mark.parametrize("bad", [[1.0, 2.0], 3.0, None])
def test_non_tensor_input_raises_type_error(fn, bad):
    with pytest.raises(TypeError, match="torch.Tensor"):
        fn(bad)


@pytest.mark.parametrize("approximate", ["", "Tanh", "exact", "erf", None, True])
def test_gelu_bad_approximate_raises_value_error(approximate):
    with pytest.raises(ValueError, match="approximate"):
        gelu(torch.randn(3), approximate=approximate)


@pytest.mark.parametrize("fn", [gelu, silu, softmax, log_softmax])
def test_integer_input_raises_type_error(fn):
    with pytest.raises(TypeError, match="floating-point"):
        fn(torch.arange(4))


@pytest.mark.parametrize("fn", [softmax, log_softmax])
@pytest.mark.parametrize("dim", [2, -3, 10])
def test_dim_out_of_range_raises_index_error(fn, dim):
    with pytest.raises(IndexError, match="out of range"):
        fn(torch.randn(2, 3), dim=dim)


@pytest.mark.parametrize("fn", [softmax, log_softmax])
@pytest.mark.parametrize("dim", [1.0, None, True, "0"])
def test_dim_not_int_raises_type_error(fn, dim):
    with pytest.raises(TypeError, match="dim must be an int"):
        fn(torch.randn(2, 3), dim=dim)
