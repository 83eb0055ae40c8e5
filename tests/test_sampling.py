"""Day 26: temperature, top-k and top-p (`llmcourse.sampling`), checked against `transformers`' warpers."""

from __future__ import annotations

import pytest
import torch

from llmcourse.generate import generate
from llmcourse.gpt import GPT, GPTConfig
from llmcourse.sampling import apply_temperature, check_top_k, check_top_p, filter_logits, top_k_filter, top_p_filter

warpers = pytest.importorskip("transformers.generation.logits_process", reason="transformers is in the dev extra")


def random_cases(n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    for trial in range(n):
        V = int(torch.randint(2, 90, (), generator=gen))
        if trial % 3 == 0:
            yield torch.randint(-3, 3, (5, V), generator=gen).float()  # many ties
        elif trial % 3 == 1:
            yield torch.randn(5, V, generator=gen) * 8  # sharp
        else:
            yield torch.randn(2, 3, V, generator=gen)  # extra leading dimensions


def hf(warper, logits: torch.Tensor) -> torch.Tensor:
    """A transformers warper on (..., V) logits: it takes (B, V), so fold the leading dimensions."""
    flat = logits.reshape(-1, logits.size(-1))
    return warper(torch.zeros(flat.size(0), 1, dtype=torch.long), flat).view_as(logits)


@pytest.mark.parametrize("t", [0.05, 0.5, 0.9, 1.0, 1.7, 3.0])
def test_temperature_equals_transformers(t):
    for logits in random_cases(40):
        assert torch.equal(apply_temperature(logits, t), hf(warpers.TemperatureLogitsWarper(t), logits))


def test_top_k_equals_transformers_with_ties_and_large_k():
    for logits in random_cases(120, seed=1):
        V = logits.size(-1)
        for k in {1, 2, 3, 7, max(V - 1, 1), V, V + 5}:
            assert torch.equal(top_k_filter(logits, k), hf(warpers.TopKLogitsWarper(k), logits)), (k, V)


def test_top_p_equals_transformers_including_p_one():
    for logits in random_cases(120, seed=2):
        for p in (1e-4, 0.1, 0.3, 0.5, 0.75, 0.9, 0.99, 1.0):
            assert torch.equal(top_p_filter(logits, p), hf(warpers.TopPLogitsWarper(p), logits)), p


def test_the_chain_equals_transformers_processor_list():
    chain = warpers.LogitsProcessorList([warpers.TemperatureLogitsWarper(0.6), warpers.TopKLogitsWarper(9), warpers.TopPLogitsWarper(0.8)])
    for logits in random_cases(60, seed=3):
        assert torch.equal(filter_logits(logits, 0.6, 9, 0.8), hf(chain, logits))


def test_ties_are_kept_by_top_k():
    logits = torch.tensor([1.0, 3.0, 3.0, 3.0, 0.0])
    assert top_k_filter(logits, 1).isfinite().tolist() == [False, True, True, True, False]


def test_top_p_always_keeps_the_most_likely_token():
    logits = torch.tensor([[10.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    kept = top_p_filter(logits, 1e-6).isfinite()
    assert kept.sum(-1).tolist() == [1, 1] and kept[0, 0]


def test_p_one_and_large_k_change_nothing():
    logits = torch.randn(3, 20)
    assert torch.equal(top_p_filter(logits, 1.0), logits) and torch.equal(top_k_filter(logits, 20), logits)


def test_temperature_keeps_the_order_and_sharpens():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    cold, hot = apply_temperature(logits, 0.3).softmax(-1), apply_temperature(logits, 3.0).softmax(-1)
    assert torch.equal(cold.argsort(), logits.argsort()) and cold.max() > hot.max()


@pytest.mark.parametrize("bad", [-1, 1.5, "3", True])
def test_bad_top_k(bad):
    with pytest.raises(ValueError, match="top_k"):
        check_top_k(bad)


@pytest.mark.parametrize("bad", [0, -0.2, 1.01, float("nan"), "0.9", True])
def test_bad_top_p(bad):
    with pytest.raises(ValueError, match="top_p"):
        check_top_p(bad)


def test_off_values_and_refusals():
    assert check_top_k(None) is None and check_top_k(0) is None and check_top_k(4) == 4
    assert check_top_p(None) is None and check_top_p(1) == 1.0
    with pytest.raises(ValueError, match="greedy"):
        apply_temperature(torch.zeros(3), 0)
    with pytest.raises(ValueError, match="top_k_filter"):
        top_k_filter(torch.zeros(3), 0)


def test_generate_with_top_k_one_or_tiny_top_p_is_greedy():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=13, block_size=16, n_layer=1, n_head=2, n_embd=16)).eval()
    idx = torch.tensor([[1, 2, 3]])
    greedy = generate(model, idx, 10, temperature=0)
    for knobs in (dict(top_k=1), dict(top_p=1e-6)):
        out = generate(model, idx, 10, temperature=1.7, generator=torch.Generator().manual_seed(4), **knobs)
        assert torch.equal(out, greedy), knobs


def test_sampled_tokens_stay_inside_the_filter():
    torch.manual_seed(1)
    model = GPT(GPTConfig(vocab_size=30, block_size=8, n_layer=1, n_head=1, n_embd=8)).eval()
    idx = torch.tensor([[1, 2]])
    logits = model(idx)[0][0, -1]
    allowed = set(top_k_filter(logits, 3).isfinite().nonzero().flatten().tolist())
    draws = {generate(model, idx, 1, top_k=3, generator=torch.Generator().manual_seed(s))[0, -1].item() for s in range(60)}
    assert draws <= allowed and len(draws) > 1
