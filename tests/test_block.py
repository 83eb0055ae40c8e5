"""Tests for llmcourse.block (Day 17): the transformer block."""

import pytest
import torch

from llmcourse.block import Block
from llmcourse.linear import count_parameters
from llmcourse.mha import CausalSelfAttention
from llmcourse.mlp import MLP
from llmcourse.norms import LayerNorm


@pytest.mark.parametrize("prenorm", [True, False])
def test_block_keeps_the_shape(prenorm):
    torch.manual_seed(0)
    block = Block(16, 4, prenorm=prenorm)
    x = torch.randn(3, 7, 16)
    assert block(x).shape == (3, 7, 16)


def test_block_submodules_have_gpt2_names():
    block = Block(16, 2)
    assert isinstance(block.ln_1, LayerNorm) and isinstance(block.ln_2, LayerNorm)
    assert isinstance(block.attn, CausalSelfAttention) and isinstance(block.mlp, MLP)
    assert [name for name, _ in block.named_children()] == ["ln_1", "attn", "ln_2", "mlp"]


def test_prenorm_formula():
    torch.manual_seed(0)
    b = Block(16, 4)
    x = torch.randn(2, 5, 16)
    h = x + b.attn(b.ln_1(x))
    torch.testing.assert_close(b(x), h + b.mlp(b.ln_2(h)))


def test_postnorm_formula():
    torch.manual_seed(0)
    b = Block(16, 4, prenorm=False)
    x = torch.randn(2, 5, 16)
    h = b.ln_1(x + b.attn(x))
    torch.testing.assert_close(b(x), b.ln_2(h + b.mlp(h)))


@pytest.mark.parametrize("prenorm", [True, False])
@pytest.mark.parametrize("implementation", ["fused", "manual"])
def test_block_is_causal(prenorm, implementation):
    torch.manual_seed(0)
    block = Block(16, 4, prenorm=prenorm, implementation=implementation).eval()
    x = torch.randn(2, 9, 16)
    for t in (0, 4, 8):
        changed = x.clone()
        changed[:, t:] = torch.randn(2, 9 - t, 16)
        before, after = block(x), block(changed)
        torch.testing.assert_close(before[:, :t], after[:, :t])
        assert not torch.allclose(before[:, t:], after[:, t:])


def test_block_dropout_train_and_eval():
    torch.manual_seed(0)
    block = Block(16, 4, dropout=0.2)
    x = torch.randn(2, 6, 16)
    block.train()
    assert not torch.equal(block(x), block(x))
    block.eval()
    assert torch.equal(block(x), block(x))


def test_block_parameter_count_and_bias_option():
    c = 24
    assert count_parameters(Block(c, 4)) == 12 * c * c + 13 * c
    no_bias = Block(c, 4, bias=False)
    assert count_parameters(no_bias) == 12 * c * c + 2 * c  # only the two norm weights besides matrices
    assert no_bias.ln_1.bias is None and no_bias.mlp.c_fc.bias is None


def test_block_passes_options_down():
    b = Block(16, 4, approximate="tanh", eps=1e-6)
    assert b.mlp.approximate == "tanh"
    assert b.ln_1.eps == 1e-6 and b.ln_2.eps == 1e-6


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    for prenorm in (True, False):
        block = Block(16, 4, prenorm=prenorm)
        block(torch.randn(2, 5, 16)).pow(2).sum().backward()
        for name, p in block.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_block_errors():
    with pytest.raises(TypeError, match="prenorm"):
        Block(16, 4, prenorm="yes")
    with pytest.raises(ValueError):
        Block(16, 5)  # 5 heads do not divide 16
    with pytest.raises(ValueError):
        Block(16, 4, dropout=1.0)
