"""Tests for llmcourse.linear (Day 3): Linear matches nn.Linear; count_parameters counts shared tensors once."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from llmcourse.gradcheck import GradcheckError, gradcheck
from llmcourse.linear import Linear, count_parameters


# --- structure -----------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_same_names_and_shapes_as_nn_linear(bias):
    ours, theirs = Linear(7, 3, bias=bias), nn.Linear(7, 3, bias=bias)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    assert ours.weight.shape == (3, 7)
    assert (ours.bias is None) == (not bias)
    assert ours.in_features == 7 and ours.out_features == 3
    assert all(isinstance(p, nn.Parameter) and p.requires_grad for p in ours.parameters())


def test_repr_like_nn_linear():
    assert repr(Linear(4, 2)) == "Linear(in_features=4, out_features=2, bias=True)"
    assert repr(Linear(4, 2, bias=False)) == "Linear(in_features=4, out_features=2, bias=False)"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_dtype_and_device(dtype):
    layer = Linear(5, 4, device="cpu", dtype=dtype)
    assert layer.weight.dtype == dtype and layer.bias.dtype == dtype
    assert layer.weight.device.type == "cpu"


def test_integer_sizes_from_numpy_accepted():
    np = pytest.importorskip("numpy")
    layer = Linear(np.int64(3), np.int32(2))
    assert layer.weight.shape == (2, 3) and type(layer.in_features) is int


# --- equal to nn.Linear ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(6,), (4, 6), (2, 5, 6), (2, 3, 4, 6), (0, 6)])
@pytest.mark.parametrize("bias", [True, False])
def test_outputs_equal_nn_linear_both_directions(shape, dtype, bias):
    torch.manual_seed(0)
    ours = Linear(6, 4, bias=bias, dtype=dtype)
    theirs = nn.Linear(6, 4, bias=bias, dtype=dtype)
    x = torch.randn(shape, dtype=dtype)
    ours.load_state_dict(theirs.state_dict())
    out = ours(x)
    assert out.shape == shape[:-1] + (4,) and out.dtype == dtype
    torch.testing.assert_close(out, theirs(x))
    torch.manual_seed(1)
    ours = Linear(6, 4, bias=bias, dtype=dtype)
    theirs.load_state_dict(ours.state_dict())
    torch.testing.assert_close(theirs(x), ours(x))


def test_low_precision_close_to_nn_linear():
    torch.manual_seed(0)
    ours = Linear(16, 8, dtype=torch.bfloat16)
    theirs = nn.Linear(16, 8, dtype=torch.bfloat16)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    torch.testing.assert_close(ours(x), theirs(x), atol=2e-2, rtol=2e-2)


def test_gradients_equal_nn_linear():
    torch.manual_seed(0)
    ours, theirs = Linear(5, 3), nn.Linear(5, 3)
    theirs.load_state_dict(ours.state_dict())
    x1 = torch.randn(2, 4, 5, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    g = torch.randn(2, 4, 3)
    ours(x1).backward(g)
    theirs(x2).backward(g)
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad)
    torch.testing.assert_close(ours.bias.grad, theirs.bias.grad)
    torch.testing.assert_close(x1.grad, x2.grad)


@pytest.mark.parametrize("shape", [(4,), (3, 4), (2, 3, 4)])
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_float64(shape, bias):
    torch.manual_seed(0)
    layer = Linear(4, 3, bias=bias, dtype=torch.float64)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    assert gradcheck(layer, [x], params=list(layer.parameters()))


def test_gradcheck_catches_a_broken_layer():
    class Broken(Linear):
        def forward(self, input):
            return input @ self.weight.T + self.bias.detach()

    torch.manual_seed(0)
    layer = Broken(4, 3, dtype=torch.float64)
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    with pytest.raises(GradcheckError):
        gradcheck(layer, [x], params=list(layer.parameters()))


@settings(max_examples=30, deadline=None)
@given(
    in_features=st.integers(1, 12),
    out_features=st.integers(1, 12),
    lead=st.lists(st.integers(1, 4), min_size=0, max_size=3),
    bias=st.booleans(),
)
def test_property_matches_functional_linear(in_features, out_features, lead, bias):
    torch.manual_seed(0)
    layer = Linear(in_features, out_features, bias=bias, dtype=torch.float64)
    x = torch.randn(*lead, in_features, dtype=torch.float64)
    expected = torch.nn.functional.linear(x, layer.weight, layer.bias)
    torch.testing.assert_close(layer(x), expected)


# --- initialisation -------------------------------------------------------------------------------


def test_same_seed_same_initial_values_as_nn_linear():
    for n_in, n_out in [(1, 1), (3, 5), (64, 32), (768, 10)]:
        torch.manual_seed(7)
        ours = Linear(n_in, n_out)
        torch.manual_seed(7)
        theirs = nn.Linear(n_in, n_out)
        torch.testing.assert_close(ours.weight, theirs.weight)
        torch.testing.assert_close(ours.bias, theirs.bias)


@pytest.mark.parametrize("n_in", [1, 16, 300])
def test_init_distribution_is_uniform_with_bound(n_in):
    torch.manual_seed(0)
    layer = Linear(n_in, 4000)
    bound = 1 / math.sqrt(n_in)
    for t in (layer.weight.detach().flatten(), layer.bias.detach()):
        assert t.abs().max() <= bound
        assert t.abs().max() > 0.95 * bound  # really uses the whole range
        assert abs(t.mean().item()) < 0.05 * bound
        assert abs(t.var().item() / (bound**2 / 3) - 1) < 0.1  # variance of U(-k, k) is k^2 / 3


def test_reset_parameters_redraws():
    torch.manual_seed(0)
    layer = Linear(8, 8)
    before = layer.weight.detach().clone()
    layer.reset_parameters()
    assert not torch.equal(before, layer.weight)
    assert layer.weight.grad is None and layer.weight.requires_grad


def test_state_dict_round_trip_is_exact(tmp_path):
    torch.manual_seed(0)
    layer = Linear(5, 3)
    path = tmp_path / "linear.pt"
    torch.save(layer.state_dict(), path)
    torch.manual_seed(1)
    fresh = Linear(5, 3)
    fresh.load_state_dict(torch.load(path, weights_only=True))
    x = torch.randn(4, 5)
    assert torch.equal(fresh(x), layer(x))


# --- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [(0, 3), (3, 0), (-2, 3), (3, -1)])
def test_non_positive_sizes_raise_value_error(args):
    with pytest.raises(ValueError, match="positive integer"):
        Linear(*args)


@pytest.mark.parametrize("args", [(2.5, 3), (3, "4"), (True, 3), (3, None)])
def test_non_integer_sizes_raise_type_error(args):
    with pytest.raises(TypeError, match="positive integer"):
        Linear(*args)


def test_integer_dtype_raises_type_error():
    with pytest.raises(TypeError, match="floating-point"):
        Linear(3, 2, dtype=torch.int64)


@pytest.mark.parametrize("shape", [(5,), (2, 5), (2, 3, 5), (4, 1)])
def test_wrong_last_dimension_raises_value_error(shape):
    with pytest.raises(ValueError, match=r"last dimension is 4, got shape"):
        Linear(4, 3)(torch.randn(shape))


def test_scalar_and_non_tensor_inputs_raise():
    with pytest.raises(ValueError, match="last dimension"):
        Linear(1, 3)(torch.tensor(1.0))
    with pytest.raises(TypeError, match="torch.Tensor"):
        Linear(2, 3)([1.0, 2.0])


# --- count_parameters -----------------------------------------------------------------------------


def test_count_simple_models():
    assert count_parameters(Linear(3, 4)) == 3 * 4 + 4
    assert count_parameters(Linear(3, 4, bias=False)) == 12
    seq = nn.Sequential(Linear(10, 20), nn.ReLU(), nn.Linear(20, 5), nn.LayerNorm(5))
    assert count_parameters(seq) == (10 * 20 + 20) + (20 * 5 + 5) + 10
    assert count_parameters(seq) == sum(p.numel() for p in seq.parameters())
    assert count_parameters(nn.ReLU()) == 0


class _Tied(nn.Module):
    def __init__(self, vocab=11, n_embd=6):
        super().__init__()
        self.wte = nn.Embedding(vocab, n_embd)
        self.lm_head = Linear(n_embd, vocab, bias=False)
        self.lm_head.weight = self.wte.weight


def test_tied_weights_counted_once():
    model = _Tied()
    assert count_parameters(model) == 11 * 6
    assert sum(t.numel() for t in model.state_dict().values()) == 2 * 11 * 6  # the trap it avoids


def test_same_memory_different_parameter_objects_counted_once():
    model = _Tied()
    model.lm_head.weight = nn.Parameter(model.wte.weight.data)  # a new object on the same memory
    assert model.lm_head.weight is not model.wte.weight
    assert sum(p.numel() for p in model.parameters()) == 2 * 66
    assert count_parameters(model) == 66
    # A different view of the same storage (the first 5 rows) is a different tensor: counted.
    model.lm_head.weight = nn.Parameter(model.wte.weight.data[:5])
    assert count_parameters(model) == 66 + 30


def test_trainable_only():
    model = nn.Sequential(Linear(4, 3), Linear(3, 2))
    for p in model[0].parameters():
        p.requires_grad_(False)
    assert count_parameters(model) == 3 * 2 + 2
    assert count_parameters(model, trainable_only=False) == (4 * 3 + 3) + (3 * 2 + 2)
    tied = _Tied()
    tied.wte.weight.requires_grad_(False)
    assert count_parameters(tied) == 0
    assert count_parameters(tied, trainable_only=False) == 66


def test_meta_device_counts_by_object():
    model = nn.Sequential(Linear(4, 3, device="meta"), Linear(3, 2, device="meta"))
    assert count_parameters(model) == 15 + 8


def test_count_parameters_rejects_non_modules():
    with pytest.raises(TypeError, match="nn.Module"):
        count_parameters([torch.zeros(3, requires_grad=True)])
