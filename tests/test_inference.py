"""Tests for llmcourse.inference (Day 39): speculative decoding, distillation loss, int8 quantization."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import llmcourse.inference as inference
from llmcourse.generate import generate
from llmcourse.gpt import GPT, GPTConfig
from llmcourse.inference import (
    Int8Linear,
    SpeculativeStats,
    accept_draft_tokens,
    distillation_loss,
    quantize_int8,
    speculative_generate,
    state_dict_bytes,
)

TINY = GPTConfig(vocab_size=4, block_size=8, n_layer=2, n_head=2, n_embd=16)


def tiny_model(seed: int, scale: float = 1.0, **changes) -> GPT:
    """A small random GPT in float64 and eval mode; ``scale`` > 0.02 makes its distributions peaked."""
    torch.manual_seed(seed)
    model = GPT(dataclasses.replace(TINY, **changes))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, scale) if p.dim() > 1 else p.add_(0.1 * torch.randn_like(p))
    return model.double().eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one thread is much faster than two on a busy CPU (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pair() -> tuple[GPT, GPT]:
    """A target and a draft that disagree a lot (different random weights, peaked distributions)."""
    return tiny_model(0, scale=0.2), tiny_model(1, scale=0.2, n_layer=1)


# --------------------------------------------------------------------------------------------------
# Greedy: the target's own tokens


@pytest.mark.parametrize("prompt_len, new, k", [(1, 6, 1), (3, 12, 3), (2, 20, 5), (8, 9, 2), (5, 1, 4)])
def test_greedy_equals_generate(pair, prompt_len, new, k):
    # (3, 12), (2, 20), (8, 9) run past block_size 8: the target's windows slide
    target, draft = pair
    prompt = torch.randint(4, (1, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
    expected = generate(target, prompt, new, temperature=0)
    out, stats = speculative_generate(target, draft, prompt, new, k=k, temperature=0, return_stats=True)
    assert torch.equal(out, expected)
    assert torch.equal(speculative_generate(target, target, prompt, new, k=k, temperature=0), expected)
    assert stats.new_tokens == new and 0 <= stats.accepted <= stats.drafted
    assert stats.drafted <= stats.rounds * k and stats.rejected <= stats.rounds


def test_draft_equal_to_target_keeps_everything(pair):
    target, _ = pair
    prompt = torch.tensor([[1, 2]])
    out, stats = speculative_generate(target, target, prompt, 20, k=4, temperature=1.0,
                                      generator=torch.Generator().manual_seed(0), return_stats=True)
    assert out.shape == (1, 22)
    assert stats == SpeculativeStats(rounds=4, drafted=16, accepted=16, rejected=0, new_tokens=20)
    assert stats.acceptance_rate == stats.agreement == 1.0 and stats.tokens_per_round == 5.0


def test_one_target_pass_per_round(pair):
    target, draft = pair
    calls = []
    hook = target.transformer.wte.register_forward_hook(lambda m, inputs, output: calls.append(tuple(inputs[0].shape)))
    try:
        _, stats = speculative_generate(target, draft, torch.tensor([[0]]), 6, k=3, temperature=1.0,
                                        generator=torch.Generator().manual_seed(3), return_stats=True)
    finally:
        hook.remove()
    assert len(calls) == stats.rounds  # the text never outgrows block_size 8 here: one call a round
    assert all(shape[0] == 1 for shape in calls)


def test_stats_add_up_and_seeds_repeat(pair):
    target, draft = pair
    prompt = torch.tensor([[3, 1, 2]])
    runs = [speculative_generate(target, draft, prompt, 15, k=3, generator=torch.Generator().manual_seed(s), return_stats=True)
            for s in (7, 7, 8)]
    assert torch.equal(runs[0][0], runs[1][0]) and runs[0][1] == runs[1][1]
    for out, stats in runs:
        assert out.shape == (1, 18) and torch.equal(out[:, :3], prompt)
        assert stats.accepted + stats.rounds >= 15  # each round adds its accepted tokens and one more
        assert stats.rejected <= stats.rounds and stats.drafted <= 3 * stats.rounds
        assert 0 <= stats.acceptance_rate <= stats.agreement <= 1


def test_zero_new_tokens_and_mode_restored(pair):
    target, draft = pair
    target.train(), draft.train()
    try:
        out, stats = speculative_generate(target, draft, torch.tensor([[1]]), 0, k=2, return_stats=True)
        assert torch.equal(out, torch.tensor([[1]])) and stats.rounds == 0 and stats.acceptance_rate == 0.0
        speculative_generate(target, draft, torch.tensor([[1]]), 3, k=2)
        assert target.training and draft.training
    finally:
        target.eval(), draft.eval()


# --------------------------------------------------------------------------------------------------
# Sampling: the target's distribution, checked against the exact one


def exact_two_token_distribution(model: GPT, prompt: torch.Tensor, temperature: float) -> torch.Tensor:
    """P(x1, x2) of the model's next two tokens after ``prompt``: (V * V,) float64, by enumeration."""
    V = model.config.vocab_size
    with torch.no_grad():
        p1 = F.softmax(model(prompt)[0][0, -1] / temperature, dim=-1)  # (V,)
        texts = torch.cat([prompt.expand(V, -1), torch.arange(V)[:, None]], dim=1)  # (V, T + 1)
        p2 = F.softmax(model(texts)[0][:, -1] / temperature, dim=-1)  # (V, V): row x1
    return (p1[:, None] * p2).reshape(-1)


def sampled_two_token_distribution(target, draft, prompt, k, temperature, n) -> torch.Tensor:
    """The empirical distribution of the first two tokens of ``n`` speculative runs: (V * V,)."""
    V = target.config.vocab_size
    gen = torch.Generator().manual_seed(39)
    counts = torch.zeros(V * V, dtype=torch.float64)
    T = prompt.size(1)
    for _ in range(n):
        out = speculative_generate(target, draft, prompt, 2, k=k, temperature=temperature, generator=gen)
        counts[out[0, T] * V + out[0, T + 1]] += 1
    return counts / n


N_RUNS = 2000
CELLS = TINY.vocab_size**2  # 16 outcomes (x1, x2)
# Bretagnolle-Huber-Carol: for n draws from m cells, P(L1(empirical, true) >= eps) <= 2^m exp(-n eps^2 / 2).
# eps below makes that chance at most 1e-9 (a false failure is astronomically unlikely).
L1_BOUND = math.sqrt(2 * (CELLS * math.log(2) + 9 * math.log(10)) / N_RUNS)  # about 0.18


@pytest.mark.parametrize("k, temperature", [(1, 1.0), (2, 1.0), (3, 0.7)])
def test_sampled_tokens_follow_the_target(pair, k, temperature):
    # k = 1: the second token comes from the target's extra draw after an accepted token or from the
    # replacement; k >= 2: both tokens go through the acceptance rule.
    target, draft = pair
    prompt = torch.tensor([[2, 0]])
    p = exact_two_token_distribution(target, prompt, temperature)
    q = exact_two_token_distribution(draft, prompt, temperature)
    assert (p - q).abs().sum() > 3 * L1_BOUND  # the draft alone would be told apart
    empirical = sampled_two_token_distribution(target, draft, prompt, k, temperature, N_RUNS)
    assert (empirical - p).abs().sum() < L1_BOUND


def test_the_statistical_check_catches_a_rule_that_keeps_every_draft_token(pair, monkeypatch):
    def keep_everything(p, q, tokens, generator=None):
        n = tokens.numel()
        return n, int(torch.multinomial(p[n], 1, generator=generator))

    monkeypatch.setattr(inference, "accept_draft_tokens", keep_everything)
    target, draft = pair
    prompt = torch.tensor([[2, 0]])
    p = exact_two_token_distribution(target, prompt, 1.0)
    q = exact_two_token_distribution(draft, prompt, 1.0)  # what keeping every draft token gives with k = 2
    assert (p - q).abs().sum() > 3 * L1_BOUND  # so the empirical one lands more than L1_BOUND from p
    empirical = sampled_two_token_distribution(target, draft, prompt, 2, 1.0, N_RUNS)
    assert (empirical - p).abs().sum() > L1_BOUND  # the draft's distribution, not the target's


P_ONE = torch.tensor([0.05, 0.6, 0.3, 0.05], dtype=torch.float64)
Q_ONE = torch.tensor([0.4, 0.1, 0.1, 0.4], dtype=torch.float64)


def one_token_rounds(rule, n: int = 20_000) -> tuple[float, float, float]:
    """Run ``rule`` on one drafted token n times: (L1 distance of the output to P_ONE, its bound, fraction kept)."""
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(4, dtype=torch.float64)
    kept = 0
    for _ in range(n):
        x = torch.multinomial(Q_ONE, 1, generator=gen)
        accepted, token = rule(torch.stack([P_ONE, P_ONE]), Q_ONE[None], x, gen)
        kept += accepted
        counts[x.item() if accepted else token] += 1
    bound = math.sqrt(2 * (4 * math.log(2) + 9 * math.log(10)) / n)  # chance of a false failure <= 1e-9
    return (counts / n - P_ONE).abs().sum().item(), bound, kept / n


def test_accept_rule_exact_distribution():
    # one drafted token: P(out = y) = min(p, q)(y) + P(reject) * normalize(max(0, p - q))(y) = p(y)
    l1, bound, kept = one_token_rounds(accept_draft_tokens)
    assert l1 < bound
    assert abs(kept - torch.minimum(P_ONE, Q_ONE).sum().item()) < 0.03  # P(accept) = sum min(p, q) = 0.3


def test_the_exact_check_catches_resampling_from_the_target():
    # a subtler mistake: after a rejection, draw from p instead of the leftover max(0, p - q)
    def resample_from_p(p, q, tokens, generator=None):
        accepted, token = accept_draft_tokens(p, q, tokens, generator)
        if accepted < tokens.numel():
            token = int(torch.multinomial(p[accepted], 1, generator=generator))
        return accepted, token

    wrong = torch.minimum(P_ONE, Q_ONE) + (1 - torch.minimum(P_ONE, Q_ONE).sum()) * P_ONE  # what it gives
    l1, bound, _ = one_token_rounds(resample_from_p)
    assert (wrong - P_ONE).abs().sum() > 3 * bound and l1 > bound


def test_accept_rule_stops_at_first_rejection():
    V = 3
    p = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.2, 0.3, 0.5]], dtype=torch.float64)
    q = torch.eye(V, dtype=torch.float64)[[1, 0, 0]]  # draws tokens 1, 0, 0 with certainty
    tokens = torch.tensor([1, 0, 0])
    accepted, token = accept_draft_tokens(p, q, tokens, torch.Generator().manual_seed(0))
    assert accepted == 1 and token == 2  # token 1 kept (p = 1), token 0 rejected (p = 0), replaced by p's only choice
    p_agree = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    all_kept, extra = accept_draft_tokens(p_agree, q, tokens, torch.Generator().manual_seed(0))
    assert all_kept == 3 and extra == 2  # everything kept: the extra token comes from the last row


# --------------------------------------------------------------------------------------------------
# Arguments


def test_refusals(pair):
    target, draft = pair
    prompt = torch.tensor([[1, 2]])
    with pytest.raises(ValueError, match="vocabulary"):
        speculative_generate(target, tiny_model(2, vocab_size=5), prompt, 3)
    with pytest.raises(ValueError, match="k"):
        speculative_generate(target, draft, prompt, 3, k=0)
    with pytest.raises(TypeError, match="k must be an int"):
        speculative_generate(target, draft, prompt, 3, k=2.0)
    with pytest.raises(TypeError):
        speculative_generate(target, nn.Linear(2, 2), prompt, 3)
    with pytest.raises(ValueError, match="one prompt"):
        speculative_generate(target, draft, torch.tensor([[1, 2], [3, 0]]), 3)
    with pytest.raises(ValueError, match="one prompt"):
        speculative_generate(target, draft, [[1, 2]], 3)
    with pytest.raises(ValueError, match="temperature"):
        speculative_generate(target, draft, prompt, 3, temperature=-0.5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        speculative_generate(target, draft, prompt, -1)
    with pytest.raises(ValueError):
        speculative_generate(target, draft, torch.tensor([[1, 9]]), 3)  # an id outside the vocabulary


# --------------------------------------------------------------------------------------------------
# Distillation loss


def test_distillation_loss_by_hand():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    y = torch.randint(5, (2, 3), generator=g)
    T, alpha = 3.0, 0.25
    kl = ce = 0.0
    for b, i in itertools.product(range(2), range(3)):
        ps = [math.exp(v / T) for v in s[b, i].tolist()]
        pt = [math.exp(v / T) for v in t[b, i].tolist()]
        ps, pt = [v / sum(ps) for v in ps], [v / sum(pt) for v in pt]
        kl += sum(a * math.log(a / c) for a, c in zip(pt, ps))
        logits = s[b, i].tolist()
        ce += math.log(sum(math.exp(v) for v in logits)) - logits[y[b, i]]
    expected = alpha * T * T * kl / 6 + (1 - alpha) * ce / 6
    assert distillation_loss(s, t, y, T, alpha).item() == pytest.approx(expected, rel=1e-5)


def test_distillation_loss_limits_and_gradients():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(4, 7, generator=g, requires_grad=True)
    t = torch.randn(4, 7, generator=g, requires_grad=True)
    y = torch.randint(7, (4,), generator=g)
    assert torch.allclose(distillation_loss(s, t, y, 2.0, 0.0), F.cross_entropy(s, y))
    assert distillation_loss(t, t, y, 5.0, 1.0).abs().item() < 1e-6
    assert distillation_loss(s, t, y, 2.0, 1.0).item() > 0
    distillation_loss(s, t, y, 2.0, 0.5).backward()
    assert s.grad is not None and t.grad is None  # the teacher is not trained


@pytest.mark.parametrize("bad", [dict(temperature=0.0), dict(temperature=-1.0), dict(alpha=1.5), dict(alpha=-0.1)])
def test_distillation_loss_refuses(bad):
    s, y = torch.zeros(2, 3), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError):
        distillation_loss(s, s, y, **({"temperature": 2.0, "alpha": 0.5} | bad))
    with pytest.raises(ValueError, match="shape"):
        distillation_loss(s, torch.zeros(2, 4), y)


# --------------------------------------------------------------------------------------------------
# int8 quantization


def test_int8_linear_rounds_within_half_a_step():
    torch.manual_seed(0)
    linear = nn.Linear(10, 6)
    with torch.no_grad():
        linear.weight[2] = 0.0  # an all-zero row must not divide by zero
    q = Int8Linear.from_linear(linear)
    assert q.weight_int8.dtype == torch.int8 and q.scale.shape == (6,)
    err = (q.dequantized_weight() - linear.weight).abs()
    assert (err <= q.scale[:, None] / 2 + 1e-7).all()
    nonzero = [r for r in range(6) if r != 2]
    assert (q.weight_int8[nonzero].abs().amax(1) == 127).all() and not q.weight_int8[2].any()
    x = torch.randn(3, 10)
    assert torch.allclose(q(x), linear(x), atol=0.02)
    assert torch.equal(q(x), F.linear(x, q.dequantized_weight(), linear.bias))


def test_quantize_int8_copies_and_keeps_the_tie():
    model = tiny_model(0, scale=0.1).float()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    quantized = quantize_int8(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the input is untouched
    assert not any(isinstance(m, Int8Linear) for m in model.modules())
    assert sum(isinstance(m, Int8Linear) for m in quantized.modules()) == 4 * TINY.n_layer
    assert quantized.lm_head.weight is quantized.transformer.wte.weight and isinstance(quantized.lm_head, nn.Linear)
    idx = torch.randint(4, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(quantized(idx)[0], model(idx)[0], atol=0.05)
    with pytest.raises(TypeError):
        quantize_int8("model")


def test_pretrained_model_shrinks_to_under_35_percent():
    from llmcourse.checkpoint import load_pretrained

    model, _, _ = load_pretrained("shakespeare-char")
    quantized = quantize_int8(model)
    assert state_dict_bytes(quantized) <= 0.35 * state_dict_bytes(model)
    idx = torch.randint(75, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(idx, idx)[1].item(), quantized(idx, idx)[1].item()
    assert abs(a - b) < 0.05


def test_state_dict_bytes_counts_a_shared_tensor_once():
    tied = GPT(dataclasses.replace(TINY, n_embd=64, vocab_size=500))
    untied = GPT(dataclasses.replace(TINY, n_embd=64, vocab_size=500, tie_weights=False))
    table = 500 * 64 * 4
    assert state_dict_bytes(untied) - state_dict_bytes(tied) == pytest.approx(table, rel=0.01)


def test_torch_dynamic_quantization_is_comparable():
    import warnings

    import torch.ao.quantization as ao  # deprecated in torch 2.13 (moving to torchao), still there
    model = tiny_model(0, scale=0.1).float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dynamic = ao.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
        idx = torch.randint(4, (2, 8), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            assert torch.allclose(dynamic(idx)[0], model(idx)[0], atol=0.1)
