"""Tests for llmcourse.embeddings (Day 10): lookup = one-hot matmul, sinusoidal table, the first GPT layer."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from llmcourse.embeddings import TokenAndPositionEmbedding, check_token_ids, embed_token_ids, sinusoidal_positions


@settings(max_examples=25, deadline=None)
@given(V=st.integers(1, 20), C=st.integers(1, 8), n=st.integers(1, 12), seed=st.integers(0, 10_000))
def test_lookup_equals_one_hot_matmul_values_and_gradients(V, C, n, seed):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(V, C, generator=gen, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(0, V, (n,), generator=gen)
    g = torch.randn(n, C, generator=gen, dtype=torch.float64)
    by_matmul = F.one_hot(idx, V).double() @ W
    (grad_matmul,) = torch.autograd.grad((by_matmul * g).sum(), W)
    by_lookup = torch.nn.functional.embedding(idx, W)
    (grad_lookup,) = torch.autograd.grad((by_lookup * g).sum(), W)
    torch.testing.assert_close(by_matmul, by_lookup)
    torch.testing.assert_close(grad_matmul, grad_lookup)


def _reference_table(T: int, C: int, base: float = 10000.0) -> torch.Tensor:
    table = torch.zeros(T, C, dtype=torch.float64)
    for p in range(T):
        for j in range(C):
            angle = p / base ** (2 * (j // 2) / C)
            table[p, j] = math.sin(angle) if j % 2 == 0 else math.cos(angle)
    return table


@pytest.mark.parametrize("T,C", [(1, 1), (7, 2), (16, 5), (33, 12)])
def test_sinusoidal_matches_the_formula(T, C):
    pe = sinusoidal_positions(T, C)
    assert pe.shape == (T, C) and pe.dtype == torch.get_default_dtype()
    torch.testing.assert_close(pe.double(), _reference_table(T, C), atol=1e-6, rtol=0)


def test_sinusoidal_base_and_relative_property():
    torch.testing.assert_close(sinusoidal_positions(10, 6, base=50.0).double(), _reference_table(10, 6, 50.0), atol=1e-6, rtol=0)
    pe = sinusoidal_positions(64, 16).double()
    gram = pe @ pe.T
    for k in range(10):  # dot products depend only on the offset
        d = gram.diagonal(k)
        torch.testing.assert_close(d, d[:1].expand_as(d), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "args,kwargs,exc",
    [((0, 4), {}, ValueError), ((4, 0), {}, ValueError), ((4.0, 4), {}, TypeError), ((4, 4), {"base": 1.0}, ValueError)],
)
def test_sinusoidal_errors(args, kwargs, exc):
    with pytest.raises(exc):
        sinusoidal_positions(*args, **kwargs)


@pytest.mark.parametrize("positions", ["learned", "sinusoidal"])
def test_forward_is_token_row_plus_position_row(positions):
    torch.manual_seed(0)
    m = TokenAndPositionEmbedding(11, 8, 6, positions=positions)
    idx = torch.randint(0, 11, (3, 5))
    out = m(idx)
    assert out.shape == (3, 5, 6)
    pos = m.wpe.weight[:5] if positions == "learned" else sinusoidal_positions(8, 6)[:5]
    torch.testing.assert_close(out, m.wte.weight[idx] + pos)
    assert m(torch.randint(0, 11, (2, 8))).shape == (2, 8, 6)  # exactly block_size works
    assert m(idx.int()).shape == (3, 5, 6)  # int32 ids are accepted too


def test_parameters_and_state_dict():
    learned = TokenAndPositionEmbedding(10, 4, 3)
    fixed = TokenAndPositionEmbedding(10, 4, 3, positions="sinusoidal")
    assert sum(p.numel() for p in learned.parameters()) == 10 * 3 + 4 * 3
    assert sum(p.numel() for p in fixed.parameters()) == 10 * 3
    assert set(learned.state_dict()) == {"wte.weight", "wpe.weight"}
    assert set(fixed.state_dict()) == {"wte.weight"}  # the table is a non-persistent buffer
    assert not fixed.pe.requires_grad


def test_learned_positions_receive_gradients_only_where_used():
    m = TokenAndPositionEmbedding(10, 8, 4)
    m(torch.randint(0, 10, (2, 3))).sum().backward()
    used = (m.wpe.weight.grad != 0).any(dim=1)
    assert used[:3].all() and not used[3:].any()


def test_dropout_train_and_eval():
    torch.manual_seed(0)
    m = TokenAndPositionEmbedding(10, 8, 64, dropout=0.5)
    idx = torch.randint(0, 10, (4, 8))
    assert (m(idx) == 0).float().mean() > 0.3
    m.eval()
    assert not (m(idx) == 0).any()


def test_too_long_sequence_names_T_and_block_size():
    for positions in ("learned", "sinusoidal"):
        m = TokenAndPositionEmbedding(10, 8, 4, positions=positions)
        with pytest.raises(ValueError, match=r"T=9.*block_size=8"):
            m(torch.zeros(1, 9, dtype=torch.long))


@pytest.mark.parametrize("bad", [10, -1, 1000])
def test_out_of_range_ids(bad):
    m = TokenAndPositionEmbedding(10, 8, 4)
    with pytest.raises(ValueError, match=rf"token id {bad}.*\[0, 9\]"):
        m(torch.tensor([[1, bad, 2]]))


def test_bad_input_type_and_shape():
    m = TokenAndPositionEmbedding(10, 8, 4)
    with pytest.raises(TypeError, match="integer"):
        m(torch.zeros(1, 3))
    with pytest.raises(TypeError):
        m([[1, 2]])
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        m(torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"positions": "rotary"}, ValueError, "positions"),
        ({"positions": None}, ValueError, "positions"),
        ({"dropout": 1.0}, ValueError, "dropout"),
        ({"dropout": -0.1}, ValueError, "dropout"),
        ({"vocab_size": 0}, ValueError, "vocab_size"),
        ({"block_size": 2.5}, TypeError, "block_size"),
        ({"n_embd": -3}, ValueError, "n_embd"),
    ],
)
def test_constructor_errors(kwargs, exc, match):
    args = {"vocab_size": 10, "block_size": 8, "n_embd": 4} | kwargs
    with pytest.raises(exc, match=match):
        TokenAndPositionEmbedding(**args)


def test_metadata_checks_and_the_lookup_read_nothing_back(no_value_reads):
    """values=False and a good lookup bring no value back to Python: that would make the CPU wait for a GPU."""
    good, empty, bad = torch.tensor([[0, 4]]), torch.zeros(2, 0, dtype=torch.long), torch.tensor([[0, 5]])
    table = torch.nn.Embedding(5, 3)
    with no_value_reads():
        check_token_ids(good, 5, values=False)
        check_token_ids(empty, 5, values=False)
        check_token_ids(bad, 5, values=False)  # the values are not looked at
        assert embed_token_ids(table, good).shape == (1, 2, 3)
        with pytest.raises(TypeError, match="integer"):  # type and shape come from the metadata
            check_token_ids(good.float(), 5, values=False)
        with pytest.raises(ValueError, match=r"\(B, T\)"):
            embed_token_ids(table, good[0])


@pytest.mark.parametrize("bad", [5, -1, 99])
def test_embed_token_ids_names_a_bad_id_without_a_chained_traceback(bad):
    table = torch.nn.Embedding(5, 3)
    with pytest.raises(ValueError, match=rf"token id {bad} in targets is out of range") as info:
        embed_token_ids(table, torch.tensor([[0, bad, 1]]), "targets")
    assert info.value.__suppress_context__  # the lookup's terse IndexError is not shown above it


def test_embed_token_ids_equals_the_lookup_for_any_integer_dtype():
    table = torch.nn.Embedding(7, 3)
    idx = torch.tensor([[0, 6, 3]])
    for dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
        torch.testing.assert_close(embed_token_ids(table, idx.to(dtype)), table(idx))


def test_check_token_ids():
    check_token_ids(torch.tensor([[0, 4]]), 5)
    check_token_ids(torch.tensor([[0, 4]], dtype=torch.uint8), 5)
    check_token_ids(torch.zeros(2, 0, dtype=torch.long), 5)  # empty is fine
    with pytest.raises(ValueError, match=r"token id 5 in targets.*\[0, 4\]"):
        check_token_ids(torch.tensor([[0, 5]]), 5, "targets")
    with pytest.raises(TypeError, match="targets"):
        check_token_ids(torch.tensor([[0.5]]), 5, "targets")
    with pytest.raises(TypeError, match="torch.Tensor"):
        check_token_ids([[1]], 5)
    with pytest.raises(ValueError, match=r"idx\[None\]"):
        check_token_ids(torch.tensor([1, 2]), 5)
