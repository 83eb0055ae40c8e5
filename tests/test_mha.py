"""llmcourse.mha (Day 14): CausalSelfAttention, its two implementations, causality and errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from llmcourse.attention import scaled_dot_product_attention
from llmcourse.core import causal_mask
from llmcourse.gradcheck import gradcheck
from llmcourse.mha import IMPLEMENTATIONS, CausalSelfAttention, check_implementation


def _layer(n_embd=32, n_head=4, seed=0, **kwargs) -> CausalSelfAttention:
    torch.manual_seed(seed)
    return CausalSelfAttention(n_embd, n_head, **kwargs).eval()


def _x(B=2, T=7, C=32, seed=1, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(B, T, C, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _outputs_and_grads(layer: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    x = x.clone().requires_grad_()
    y = layer(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(2), dtype=y.dtype)
    return [y, *torch.autograd.grad(y, [x, *layer.parameters()], grad_outputs=g)]


# ---- structure -----------------------------------------------------------------------------------


def test_gpt2_names_shapes_and_parameter_count():
    layer = CausalSelfAttention(768, 12)
    assert list(layer.state_dict()) == ["c_attn.weight", "c_attn.bias", "c_proj.weight", "c_proj.bias"]
    assert isinstance(layer.c_attn, nn.Linear) and layer.c_attn.weight.shape == (3 * 768, 768)
    assert isinstance(layer.c_proj, nn.Linear) and layer.c_proj.weight.shape == (768, 768)
    assert isinstance(layer.attn_dropout, nn.Dropout) and isinstance(layer.resid_dropout, nn.Dropout)
    assert sum(p.numel() for p in layer.parameters()) == 4 * 768 * 768 + 4 * 768 == 2_362_368
    assert (layer.n_embd, layer.n_head, layer.head_size, layer.implementation) == (768, 12, 64, "fused")
    assert "implementation='fused'" in repr(layer)


def test_no_bias_and_dropout_arguments():
    layer = CausalSelfAttention(16, 2, dropout=0.1, bias=False, implementation="manual")
    assert layer.c_attn.bias is None and layer.c_proj.bias is None
    assert list(layer.state_dict()) == ["c_attn.weight", "c_proj.weight"]
    assert layer.attn_dropout.p == 0.1 and layer.resid_dropout.p == 0.1 and layer.dropout == 0.1
    assert layer.implementation == "manual"
    assert IMPLEMENTATIONS == ("fused", "manual")
    assert [check_implementation(name) for name in IMPLEMENTATIONS] == list(IMPLEMENTATIONS)


def test_shapes_of_the_heads():
    layer = _layer(n_embd=24, n_head=3)
    x = _x(B=2, T=5, C=24)
    q, k, v = layer.qkv(x)
    assert q.shape == k.shape == v.shape == (2, 3, 5, 8)
    assert layer(x).shape == (2, 5, 24)
    # head h of q is columns h*hs:(h+1)*hs of the query third of c_attn(x), and merge_heads undoes the split
    q_flat = layer.c_attn(x)[..., :24]
    for h in range(3):
        assert torch.equal(q[:, h], q_flat[..., h * 8 : (h + 1) * 8])
    assert torch.equal(layer.merge_heads(q), q_flat)


# ---- manual == fused == references ------------------------------------------------------------------


@pytest.mark.parametrize(("n_embd", "n_head", "T"), [(32, 4, 7), (32, 1, 5), (48, 6, 1), (16, 16, 9), (64, 2, 33)])
@pytest.mark.parametrize("bias", [True, False])
def test_manual_and_fused_have_equal_outputs_and_gradients(n_embd, n_head, T, bias):
    layer = _layer(n_embd, n_head, bias=bias)
    x = _x(T=T, C=n_embd)
    layer.implementation = "manual"
    manual = _outputs_and_grads(layer, x)
    layer.implementation = "fused"
    fused = _outputs_and_grads(layer, x)
    assert len(manual) == len(fused) == 2 + (4 if bias else 2)
    for a, b in zip(manual, fused):
        torch.testing.assert_close(a, b)


def test_float64_and_gradcheck():
    layer = _layer(4, 2, implementation="manual").double()
    x = _x(B=1, T=3, C=4, dtype=torch.float64).requires_grad_()
    assert gradcheck(layer, [x], params=dict(layer.named_parameters()))
    layer.implementation = "fused"
    assert layer(x).dtype == torch.float64


def _heads_one_by_one(layer: CausalSelfAttention, x: torch.Tensor) -> torch.Tensor:
    C, hs = layer.n_embd, layer.head_size
    W = layer.c_attn.weight.split(C, dim=0)
    b = layer.c_attn.bias.split(C)
    heads = []
    for h in range(layer.n_head):
        r = slice(h * hs, (h + 1) * hs)
        q, k, v = (x @ W[i][r].T + b[i][r] for i in range(3))
        heads.append(scaled_dot_product_attention(q, k, v, is_causal=True))
    return layer.c_proj(torch.cat(heads, dim=-1))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_equals_the_loop_over_heads_and_nn_multiheadattention(implementation):
    layer = _layer(32, 4, implementation=implementation)
    x = _x(T=9)
    mha = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    with torch.no_grad():
        mha.in_proj_weight.copy_(layer.c_attn.weight)
        mha.in_proj_bias.copy_(layer.c_attn.bias)
        mha.out_proj.weight.copy_(layer.c_proj.weight)
        mha.out_proj.bias.copy_(layer.c_proj.bias)
        y = layer(x)
        torch.testing.assert_close(y, _heads_one_by_one(layer, x))
        torch.testing.assert_close(y, mha(x, x, x, attn_mask=~causal_mask(9), need_weights=False)[0])


# ---- causality ---------------------------------------------------------------------------------------


@settings(max_examples=12, deadline=None)
@given(T=st.integers(2, 8), seed=st.integers(0, 2**16), implementation=st.sampled_from(IMPLEMENTATIONS))
def test_changing_token_t_plus_1_never_changes_outputs_up_to_t(T, seed, implementation):
    layer = _layer(16, 4, seed=seed % 7, implementation=implementation)
    x = _x(B=2, T=T, C=16, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        before = layer(x)
        for t in range(T - 1):
            changed = x.clone()
            changed[:, t + 1 :] = torch.randn(changed[:, t + 1 :].shape, generator=gen)  # t+1 and everything after
            after = layer(changed)
            assert torch.equal(before[:, : t + 1], after[:, : t + 1]), f"position <= {t} saw the future"
            assert not torch.allclose(before[:, t + 1], after[:, t + 1])  # position t+1 itself does change


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_gradient_dependency_pattern_is_exactly_causal(implementation):
    layer = _layer(implementation=implementation)
    T = 6
    x = _x(T=T).requires_grad_()
    y = layer(x)
    depends = torch.zeros(T, T, dtype=torch.bool)
    for t in range(T):
        (g,) = torch.autograd.grad(y[:, t].sum(), x, retain_graph=True)
        depends[t] = g.abs().sum(dim=(0, 2)) > 0
    assert torch.equal(depends, causal_mask(T))


def test_batch_elements_do_not_mix():
    layer = _layer()
    x = _x(B=3)
    with torch.no_grad():
        full = layer(x)
        for b in range(3):
            torch.testing.assert_close(layer(x[b : b + 1]), full[b : b + 1])


# ---- dropout and modes -------------------------------------------------------------------------------


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_dropout_is_random_in_training_and_off_in_eval(implementation):
    layer = _layer(dropout=0.3, implementation=implementation)
    x = _x()
    layer.train()
    torch.manual_seed(0)
    a = layer(x)
    b = layer(x)
    assert not torch.equal(a, b)
    layer.eval()
    assert torch.equal(layer(x), layer(x))


def test_manual_path_uses_attn_dropout_and_both_paths_use_resid_dropout():
    layer = _layer(dropout=0.0, implementation="manual").train()
    x = _x()
    clean = layer(x)
    layer.attn_dropout.p = 1.0  # every attention weight dropped: the heads output zeros, only c_proj's bias is left
    torch.testing.assert_close(layer(x), layer.c_proj.bias.expand_as(clean))
    layer.implementation = "fused"  # the fused path reads the same probability
    torch.testing.assert_close(layer(x), layer.c_proj.bias.expand_as(clean))
    layer.attn_dropout.p = 0.0
    layer.resid_dropout.p = 1.0
    assert (layer(x) == 0).all()


def test_dropout_zero_in_training_mode_equals_eval():
    layer = _layer(dropout=0.0)
    x = _x()
    expected = layer(x)
    for implementation in IMPLEMENTATIONS:
        layer.implementation = implementation
        torch.testing.assert_close(layer.train()(x), expected)


# ---- attention maps ----------------------------------------------------------------------------------


def test_attention_maps():
    layer = _layer(32, 4)
    x = _x(T=8)
    maps = layer.attention_maps(x)
    assert maps.shape == (2, 4, 8, 8) and not maps.requires_grad
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, 4, 8))
    assert (maps[..., ~causal_mask(8)] == 0).all()
    with torch.no_grad():
        _, _, v = layer.qkv(x)
        expected = layer.c_proj(layer.merge_heads(maps @ v))  # the maps are the weights the layer really uses
        torch.testing.assert_close(layer(x), expected)


# ---- errors ------------------------------------------------------------------------------------------


def test_n_embd_not_divisible_by_n_head():
    with pytest.raises(ValueError, match=r"n_embd \(30\) must be divisible by n_head \(4\)"):
        CausalSelfAttention(30, 4)


@pytest.mark.parametrize("bad", ["flash", "SDPA", None, "math"])
def test_bad_implementation_name(bad):
    with pytest.raises(ValueError, match="implementation must be one of"):
        CausalSelfAttention(32, 4, implementation=bad)
    layer = CausalSelfAttention(32, 4)
    with pytest.raises(ValueError, match="implementation must be one of"):
        layer.implementation = bad
    assert layer.implementation == "fused"  # unchanged after the refused assignment


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"n_embd": 0, "n_head": 1}, ValueError, "n_embd must be >= 1"),
        ({"n_embd": 32, "n_head": 0}, ValueError, "n_head must be >= 1"),
        ({"n_embd": 32.0, "n_head": 4}, TypeError, "n_embd must be an int"),
        ({"n_embd": 32, "n_head": True}, TypeError, "n_head must be an int"),
        ({"n_embd": 32, "n_head": 4, "dropout": -0.1}, ValueError, "dropout must be a probability"),
        ({"n_embd": 32, "n_head": 4, "dropout": 1.5}, ValueError, "dropout must be a probability"),
    ],
)
def test_bad_constructor_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        CausalSelfAttention(**kwargs)


def test_bad_inputs():
    layer = _layer()
    with pytest.raises(ValueError, match=r"input of shape \(B, T, 32\), got \(2, 7, 16\)"):
        layer(torch.randn(2, 7, 16))
    with pytest.raises(ValueError, match=r"got \(7, 32\)"):
        layer(torch.randn(7, 32))
    with pytest.raises(TypeError, match="expects a torch.Tensor"):
        layer([[0.0] * 32])
