"""llmcourse.attention (Day 13): scaled dot-product attention equals F.scaled_dot_product_attention."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from llmcourse.attention import attention_weights, scaled_dot_product_attention
from llmcourse.core import causal_mask
from llmcourse.gradcheck import gradcheck


def _randn(*shape: int, seed: int, dtype=torch.float32, requires_grad: bool = True) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=dtype).requires_grad_(requires_grad)


def _qkv(batch: tuple[int, ...], L: int, S: int, E: int = 8, Ev: int = 8, dtype=torch.float32):
    return (_randn(*batch, L, E, seed=1, dtype=dtype), _randn(*batch, S, E, seed=2, dtype=dtype), _randn(*batch, S, Ev, seed=3, dtype=dtype))


def _assert_matches_torch(q, k, v, **kwargs) -> None:
    """Outputs and the gradients of q, k and v equal PyTorch's."""
    ours = scaled_dot_product_attention(q, k, v, **kwargs)
    theirs = F.scaled_dot_product_attention(q, k, v, **kwargs)
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    torch.testing.assert_close(ours, theirs)
    g = torch.randn(ours.shape, generator=torch.Generator().manual_seed(9), dtype=ours.dtype)
    inputs = [t for t in (q, k, v) if t.requires_grad]
    for a, b in zip(torch.autograd.grad(ours, inputs, g), torch.autograd.grad(theirs, inputs, g)):
        torch.testing.assert_close(a, b)


# ---- equal to PyTorch --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [(), (3,), (2, 4)])
@pytest.mark.parametrize(("L", "S"), [(6, 6), (3, 7), (7, 3), (1, 1)])
@pytest.mark.parametrize("is_causal", [False, True])
def test_matches_torch_plain_and_causal(dtype, batch, L, S, is_causal):
    q, k, v = _qkv(batch, L, S, E=8, Ev=5, dtype=dtype)
    _assert_matches_torch(q, k, v, is_causal=is_causal)


@pytest.mark.parametrize(
    "mask_shape", [(6, 6), (2, 3, 6, 6), (2, 1, 6, 6), (1, 3, 1, 6), (2, 1, 1, 6)], ids=str
)
def test_matches_torch_with_bool_masks(mask_shape):
    q, k, v = _qkv((2, 3), 6, 6)
    mask = torch.rand(mask_shape, generator=torch.Generator().manual_seed(4)) > 0.3
    mask[..., 0] = True  # every query may see key 0, so no row is fully masked
    _assert_matches_torch(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("mask_shape", [(6, 6), (2, 3, 6, 6), (2, 1, 1, 6)], ids=str)
def test_matches_torch_with_float_masks(mask_shape):
    q, k, v = _qkv((2, 3), 6, 6)
    bias = torch.randn(mask_shape, generator=torch.Generator().manual_seed(5))
    bias[..., 2] = float("-inf")  # a float mask may forbid with -inf
    _assert_matches_torch(q, k, v, attn_mask=bias)


def test_a_bool_mask_equals_the_float_mask_with_minus_infinity():
    q, k, v = _qkv((2,), 5, 5)
    allowed = torch.rand(5, 5, generator=torch.Generator().manual_seed(6)) > 0.4
    allowed[:, 0] = True
    additive = torch.zeros(5, 5).masked_fill(~allowed, float("-inf"))
    torch.testing.assert_close(
        scaled_dot_product_attention(q, k, v, attn_mask=allowed), scaled_dot_product_attention(q, k, v, attn_mask=additive)
    )
    torch.testing.assert_close(
        scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(5)), scaled_dot_product_attention(q, k, v, is_causal=True)
    )


@pytest.mark.parametrize("scale", [0.0, 0.3, 1.0, 2.5, -1.0])
def test_matches_torch_with_custom_scale(scale):
    q, k, v = _qkv((2,), 4, 4)
    _assert_matches_torch(q, k, v, scale=scale, is_causal=True)


def test_default_scale_is_one_over_sqrt_E():
    q, k, v = _qkv((), 4, 4, E=16)
    torch.testing.assert_close(scaled_dot_product_attention(q, k, v), scaled_dot_product_attention(q, k, v, scale=0.25))


def test_batch_dimensions_broadcast_like_torch():
    q = _randn(2, 1, 4, 8, seed=1)
    k = _randn(1, 3, 5, 8, seed=2)
    v = _randn(1, 3, 5, 6, seed=3)
    out = scaled_dot_product_attention(q, k, v)
    assert out.shape == (2, 3, 4, 6)
    _assert_matches_torch(q, k, v)


def test_fully_masked_rows_give_zeros_not_nan_like_torch():
    q, k, v = _qkv((2, 2), 4, 5)
    mask = torch.ones(2, 1, 4, 5, dtype=torch.bool)
    mask[1, :, 2] = False  # batch 1, query 2 may see nothing
    out = scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert not out.isnan().any()
    assert (out[1, :, 2] == 0).all()
    _assert_matches_torch(q, k, v, attn_mask=mask)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert not any(g.isnan().any() for g in grads)
    w = attention_weights(q, k, attn_mask=mask)
    assert (w[1, :, 2] == 0).all()
    float_mask = torch.zeros(4, 5)
    float_mask[0] = float("-inf")
    _assert_matches_torch(q, k, v, attn_mask=float_mask)


# ---- the weights -------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(T=st.integers(1, 12), d=st.integers(1, 16), seed=st.integers(0, 2**16))
def test_causal_weights_rows_sum_to_one_and_upper_triangle_is_exactly_zero(T, d, seed):
    q, k = _randn(2, T, d, seed=seed), _randn(2, T, d, seed=seed + 1)
    w = attention_weights(q, k, is_causal=True)
    assert w.shape == (2, T, T)
    torch.testing.assert_close(w.sum(dim=-1), torch.ones(2, T))
    assert (w[:, ~causal_mask(T)] == 0).all()
    assert (w >= 0).all()


def test_causal_with_more_queries_than_keys_is_top_left_aligned():
    w = attention_weights(_randn(6, 4, seed=1), _randn(3, 4, seed=2), is_causal=True)  # (L=6, S=3)
    expected_allowed = torch.ones(6, 3, dtype=torch.bool).tril()
    assert (w[~expected_allowed] == 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(6))


def test_weights_are_the_softmax_of_the_scaled_scores():
    q, k = _randn(3, 5, 4, seed=1), _randn(3, 7, 4, seed=2)
    expected = torch.softmax(q @ k.transpose(-2, -1) / 2.0, dim=-1)
    torch.testing.assert_close(attention_weights(q, k), expected)


def test_return_weights():
    q, k, v = _qkv((2,), 5, 5)
    out, w = scaled_dot_product_attention(q, k, v, is_causal=True, return_weights=True)
    torch.testing.assert_close(out, w @ v)
    torch.testing.assert_close(w, attention_weights(q, k, is_causal=True))


def test_gradcheck_float64():
    q, k, v = _qkv((2,), 4, 5, E=3, Ev=2, dtype=torch.float64)
    bias = torch.randn(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert gradcheck(lambda a, b, c: scaled_dot_product_attention(a, b, c, attn_mask=bias), [q, k, v])
    q, k, v = _qkv((2,), 4, 4, E=3, Ev=2, dtype=torch.float64)
    assert gradcheck(lambda a, b, c: scaled_dot_product_attention(a, b, c, is_causal=True), [q, k, v])


# ---- dropout -----------------------------------------------------------------------------------


def test_dropout_zeroes_weights_and_rescales_the_survivors():
    q, k = _randn(4, 8, 6, seed=1, requires_grad=False), _randn(4, 8, 6, seed=2, requires_grad=False)
    eye = torch.eye(8)  # values = identity, so the output IS the dropped weight matrix
    torch.manual_seed(0)
    dropped = scaled_dot_product_attention(q, k, eye, dropout_p=0.25)
    clean = attention_weights(q, k)
    kept = dropped != 0
    torch.testing.assert_close(dropped[kept], clean[kept] / 0.75)
    assert 0.6 < kept.float().mean().item() < 0.9
    assert torch.equal(scaled_dot_product_attention(q, k, eye, dropout_p=0.0), scaled_dot_product_attention(q, k, eye))
    assert (scaled_dot_product_attention(q, k, eye, dropout_p=1.0) == 0).all()


def test_return_weights_are_before_dropout():
    q, k, v = _qkv((2,), 5, 5)
    _, w = scaled_dot_product_attention(q, k, v, dropout_p=0.5, return_weights=True)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 5))


# ---- errors ------------------------------------------------------------------------------------


def test_mismatched_shapes_are_clear_errors():
    with pytest.raises(ValueError, match=r"same last dimension E, got query \(2, 4, 8\) and key \(2, 4, 6\)"):
        scaled_dot_product_attention(torch.randn(2, 4, 8), torch.randn(2, 4, 6), torch.randn(2, 4, 6))
    with pytest.raises(ValueError, match=r"same sequence length S .* key \(5, 8\) and value \(6, 8\)"):
        scaled_dot_product_attention(torch.randn(4, 8), torch.randn(5, 8), torch.randn(6, 8))
    with pytest.raises(ValueError, match="batch dimensions"):
        scaled_dot_product_attention(torch.randn(2, 4, 8), torch.randn(3, 4, 8), torch.randn(3, 4, 8))
    with pytest.raises(ValueError, match=r"at least 2 dimensions .* got shape \(8,\)"):
        scaled_dot_product_attention(torch.randn(8), torch.randn(4, 8), torch.randn(4, 8))
    with pytest.raises(ValueError, match=r"attn_mask of shape \(4, 5\) does not broadcast to the scores' shape \(2, 4, 4\)"):
        scaled_dot_product_attention(torch.randn(2, 4, 8), torch.randn(2, 4, 8), torch.randn(2, 4, 8), attn_mask=torch.ones(4, 5, dtype=torch.bool))


def test_mask_and_is_causal_together_is_an_error():
    q = torch.randn(4, 8)
    with pytest.raises(ValueError, match="either attn_mask or is_causal"):
        scaled_dot_product_attention(q, q, q, attn_mask=causal_mask(4), is_causal=True)
    with pytest.raises(ValueError, match="either attn_mask or is_causal"):
        attention_weights(q, q, attn_mask=causal_mask(4), is_causal=True)


def test_bad_types_are_clear_errors():
    q = torch.randn(4, 8)
    with pytest.raises(TypeError, match="attn_mask must be bool .* got dtype torch.int64"):
        scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(4, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="attn_mask must be a torch.Tensor"):
        scaled_dot_product_attention(q, q, q, attn_mask=[[True] * 4] * 4)
    with pytest.raises(TypeError, match="query must be a torch.Tensor"):
        scaled_dot_product_attention(q.tolist(), q, q)
    with pytest.raises(TypeError, match="floating point"):
        scaled_dot_product_attention(torch.ones(4, 8, dtype=torch.long), q, q)
    with pytest.raises(TypeError, match="share one dtype"):
        scaled_dot_product_attention(q, q.double(), q)
    with pytest.raises(TypeError, match="is_causal must be True or False"):
        scaled_dot_product_attention(q, q, q, is_causal=1)


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan"), True])
def test_bad_dropout_p(p):
    q = torch.randn(4, 8)
    with pytest.raises(ValueError, match="dropout_p must be a probability in"):
        scaled_dot_product_attention(q, q, q, dropout_p=p)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), True, "0.5"])
def test_bad_scale(scale):
    q = torch.randn(4, 8)
    with pytest.raises(ValueError, match="scale must be a finite number"):
        scaled_dot_product_attention(q, q, q, scale=scale)


def test_scale_demo_variance_grows_with_d():
    """The Day 13 claim, as a test: var(q.k) is about d for unit-variance entries."""
    gen = torch.Generator().manual_seed(0)
    for d in (4, 64, 256):
        q, k = torch.randn(20_000, d, generator=gen), torch.randn(20_000, d, generator=gen)
        var = (q * k).sum(-1).var().item()
        assert math.isclose(var, d, rel_tol=0.1)
