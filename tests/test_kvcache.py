"""Tests for llmcourse.kvcache (Day 28): the KV cache, the offset attention mask, and the cached GPT forward."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from llmcourse.generate import generate
from llmcourse.gpt import GPT, GPTConfig
from llmcourse.kvcache import KVCache, attention_mask, gpt_forward, kv_cache_bytes

TINY = GPTConfig(vocab_size=11, block_size=12, n_layer=2, n_head=2, n_embd=16)


def tiny_model(seed: int = 0, **changes) -> GPT:
    """A small random GPT in eval mode, with non-zero biases and norms so that every parameter matters."""
    torch.manual_seed(seed)
    model = GPT(dataclasses.replace(TINY, **changes)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name or "ln_f" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def stepped_logits(model: GPT, idx: torch.Tensor, chunks: list[int]) -> torch.Tensor:
    """Logits of idx (B, T) fed through a cache in pieces of the given sizes (summing to T): (B, T, V)."""
    assert sum(chunks) == idx.size(1)
    cache = KVCache.for_model(model, batch_size=idx.size(0), max_len=idx.size(1))
    out, start = [], 0
    for n in chunks:
        out.append(gpt_forward(model, idx[:, start : start + n], cache=cache))
        start += n
    assert cache.length == idx.size(1)
    return torch.cat(out, dim=1)


@pytest.fixture
def model() -> GPT:
    return tiny_model()


# --------------------------------------------------------------------------------------------------
# Tokens: cached == uncached


@pytest.mark.parametrize("prompt_len, new", [(3, 5), (3, 20), (12, 4), (1, 11)])
def test_greedy_tokens_equal_with_and_without_cache(model, prompt_len, new):
    # (3, 20) and (12, 4) run past block_size 12: the window slides and the cached path recomputes
    prompt = torch.randint(TINY.vocab_size, (2, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
    cached = generate(model, prompt, new, temperature=0, use_cache=True)
    uncached = generate(model, prompt, new, temperature=0, use_cache=False)
    assert cached.shape == (2, prompt_len + new)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("knobs", [dict(temperature=1.0), dict(temperature=0.7, top_k=4), dict(temperature=1.3, top_p=0.9)])
def test_seeded_samples_equal_with_and_without_cache(model, knobs):
    prompt = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    runs = [generate(model, prompt, 18, generator=torch.Generator().manual_seed(5), use_cache=c, **knobs) for c in (True, False)]
    assert torch.equal(runs[0], runs[1])
    other = generate(model, prompt, 18, generator=torch.Generator().manual_seed(6), use_cache=True, **knobs)
    assert not torch.equal(runs[0], other)  # the seed matters: the check above compares real samples


def test_ragged_prompts_equal_with_and_without_cache(model):
    prompts = [[1, 2, 3, 4, 5], [6], [7, 8]]  # left-padded: the cache runs with a pad_mask
    cached = generate(model, prompts, 9, temperature=0, use_cache=True)
    uncached = generate(model, prompts, 9, temperature=0, use_cache=False)
    assert cached == uncached
    alone = [generate(model, [p], 9, temperature=0, use_cache=False)[0] for p in prompts]
    assert cached == alone


def test_generate_allocates_only_what_it_needs(model, monkeypatch):
    sizes = []
    original = KVCache.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        sizes.append(self.max_len)

    monkeypatch.setattr(KVCache, "__init__", spy)
    generate(model, torch.tensor([[1, 2]]), 3, temperature=0)
    generate(model, torch.tensor([[1, 2]]), 30, temperature=0)
    assert sizes == [5, TINY.block_size]


# --------------------------------------------------------------------------------------------------
# gpt_forward


@pytest.mark.parametrize("chunks", [[9], [1] * 9, [4, 1, 1, 1, 1, 1], [2, 3, 1, 3]])
def test_cached_logits_match_the_model(model, chunks):
    idx = torch.randint(TINY.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference, _ = model(idx)
        stepped = stepped_logits(model, idx, chunks)
    assert stepped.shape == reference.shape == (2, 9, TINY.vocab_size)
    torch.testing.assert_close(stepped, reference, atol=1e-5, rtol=1e-5)


def test_gpt_forward_without_cache_is_the_model(model):
    idx = torch.randint(TINY.vocab_size, (3, TINY.block_size), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(gpt_forward(model, idx), model(idx)[0], atol=1e-5, rtol=1e-5)


def test_manual_equals_fused_through_the_cache():
    fused = tiny_model(3)
    manual = GPT(dataclasses.replace(fused.config, implementation="manual")).eval()
    manual.load_state_dict(fused.state_dict())
    idx = torch.randint(TINY.vocab_size, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a = stepped_logits(fused, idx, [3, 1, 2, 1, 1, 1, 1])
        b = stepped_logits(manual, idx, [3, 1, 2, 1, 1, 1, 1])
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    prompt = idx[:, :3]
    assert torch.equal(generate(fused, prompt, 12, temperature=0), generate(manual, prompt, 12, temperature=0))


def test_post_norm_blocks_go_through_the_cache():
    model = tiny_model(4)
    for block in model.transformer.h:
        block.prenorm = False  # the other branch of gpt_forward: Block's post-norm layout
    idx = torch.randint(TINY.vocab_size, (1, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(stepped_logits(model, idx, [2, 1, 1, 3]), model(idx)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunks", [[6], [3, 1, 1, 1]])
def test_left_padded_row_matches_the_row_alone(model, chunks):
    row = torch.tensor([[3, 1, 4, 1]])  # (1, 4)
    other = torch.tensor([[2, 7, 1, 8, 2, 8]])  # (1, 6)
    padded = torch.cat([torch.tensor([[0, 0]]), row], dim=1)  # (1, 6): two padding slots on the left
    idx = torch.cat([padded, other])  # (2, 6)
    pad_mask = torch.tensor([[False, False, True, True, True, True], [True] * 6])
    with torch.no_grad():
        cache = KVCache.for_model(model, batch_size=2, max_len=6)
        pieces, start = [], 0
        for n in chunks:
            pieces.append(gpt_forward(model, idx[:, start : start + n], cache=cache, pad_mask=pad_mask[:, : start + n]))
            start += n
        logits = torch.cat(pieces, dim=1)  # (2, 6, V)
        alone, _ = model(row)
        full, _ = model(other)
    torch.testing.assert_close(logits[0, 2:], alone[0], atol=1e-5, rtol=1e-5)  # real positions of the padded row
    torch.testing.assert_close(logits[1], full[0], atol=1e-5, rtol=1e-5)  # an unpadded row is untouched
    assert torch.isfinite(logits).all()  # padding queries read themselves: no NaN


def test_gpt_forward_refuses_what_does_not_fit(model):
    with pytest.raises(ValueError, match="block_size"):
        gpt_forward(model, torch.zeros(1, TINY.block_size + 1, dtype=torch.long))
    cache = KVCache.for_model(model, batch_size=1)
    gpt_forward(model, torch.zeros(1, 10, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="13 positions do not fit"):
        gpt_forward(model, torch.zeros(1, 3, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="batch_size=2"):
        gpt_forward(model, torch.zeros(2, 1, dtype=torch.long), cache=KVCache.for_model(model, batch_size=1))
    with pytest.raises(ValueError, match="n_layer=3"):
        gpt_forward(model, torch.zeros(1, 1, dtype=torch.long), cache=KVCache(3, 1, 2, 12, 8))
    with pytest.raises(ValueError, match="pad_mask must have shape"):
        gpt_forward(model, torch.zeros(2, 3, dtype=torch.long), pad_mask=torch.ones(2, 4, dtype=torch.bool))


def test_a_cached_step_reads_no_value_back(model, no_value_reads):
    cache = KVCache.for_model(model, batch_size=2)
    with torch.no_grad():
        gpt_forward(model, torch.tensor([[1, 2, 3], [4, 5, 6]]), cache=cache)
        pad_mask = torch.ones(2, 4, dtype=torch.bool)
        with no_value_reads():
            gpt_forward(model, torch.tensor([[7], [8]]), cache=cache, pad_mask=pad_mask)
            gpt_forward(model, torch.tensor([[7, 8], [9, 10]]), cache=cache)
    assert cache.length == 6


# --------------------------------------------------------------------------------------------------
# KVCache


def test_cache_shapes_and_update(model):
    cache = KVCache.for_model(model, batch_size=3, max_len=5)
    assert cache.keys.shape == cache.values.shape == (2, 3, 2, 5, 8) and cache.length == 0
    k, v = torch.randn(3, 2, 2, 8), torch.randn(3, 2, 2, 8)
    keys, values = cache.update(1, k, v)
    assert keys.shape == (3, 2, 2, 8) and torch.equal(keys, k) and torch.equal(values, v)
    assert cache.length == 0  # update writes; advance counts
    cache.advance(2)
    keys, values = cache.update(1, k[:, :, :1], v[:, :, :1])
    assert keys.shape == (3, 2, 3, 8) and torch.equal(keys[:, :, :2], k) and torch.equal(values[:, :, 2], v[:, :, 0])
    assert keys.data_ptr() == cache.keys[1].data_ptr()  # a view, not a copy
    assert not cache.keys[0].any()  # layer 0 untouched
    assert "length=2/5" in repr(cache)


def test_cache_follows_the_model_dtype_and_device():
    model = tiny_model().to(torch.float64)
    cache = KVCache.for_model(model, batch_size=1)
    assert cache.keys.dtype == torch.float64 and cache.keys.device == model.lm_head.weight.device
    assert cache.max_len == TINY.block_size
    idx = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(stepped_logits(model, idx, [2, 1, 1]), model(idx)[0])


def test_update_overflow_raises_and_writes_nothing(model):
    cache = KVCache.for_model(model, batch_size=1, max_len=4)
    cache.update(0, torch.ones(1, 2, 3, 8), torch.ones(1, 2, 3, 8))
    cache.advance(3)
    with pytest.raises(ValueError, match="holds 4 positions; 3 are used and 2 more do not fit"):
        cache.update(0, torch.full((1, 2, 2, 8), 7.0), torch.full((1, 2, 2, 8), 7.0))
    assert cache.length == 3 and not (cache.keys == 7).any() and not (cache.values == 7).any()
    cache.update(0, torch.ones(1, 2, 1, 8), torch.ones(1, 2, 1, 8))  # exactly full is fine


@pytest.mark.parametrize(
    "sizes, error, match",
    [
        (dict(n_layer=0), ValueError, "n_layer must be 1 or more, got 0"),
        (dict(batch_size=-1), ValueError, "batch_size must be 1 or more, got -1"),
        (dict(n_head=2.0), TypeError, "n_head must be an int, got float 2.0"),
        (dict(max_len=True), TypeError, "max_len must be an int, got bool True"),
        (dict(head_size="8"), TypeError, "head_size must be an int, got str '8'"),
    ],
)
def test_cache_sizes_are_checked(sizes, error, match):
    args = {**dict(n_layer=2, batch_size=1, n_head=2, max_len=4, head_size=8), **sizes}
    with pytest.raises(error, match=match):
        KVCache(**args)


def test_for_model_checks_its_arguments(model):
    with pytest.raises(ValueError, match="max_len 13 is longer than the model's block_size 12"):
        KVCache.for_model(model, batch_size=1, max_len=13)
    with pytest.raises(ValueError, match="max_len must be 1 or more"):
        KVCache.for_model(model, batch_size=1, max_len=0)
    with pytest.raises(TypeError, match="batch_size must be an int"):
        KVCache.for_model(model, batch_size=None)
    with pytest.raises(TypeError, match="expects a llmcourse GPT"):
        KVCache.for_model(torch.nn.Linear(2, 2), batch_size=1)
    assert isinstance(KVCache(1, 1, 1, 1, 1), KVCache)  # the smallest cache


# --------------------------------------------------------------------------------------------------
# Memory


@pytest.mark.parametrize("dtype, size", [(torch.float32, 4), (torch.float64, 8), (torch.bfloat16, 2), (torch.float16, 2)])
@pytest.mark.parametrize("L, B, nh, T, hs", [(2, 1, 2, 12, 8), (3, 4, 5, 7, 6), (1, 2, 1, 1, 1)])
def test_formula_matches_the_tensors(dtype, size, L, B, nh, T, hs):
    cache = KVCache(L, B, nh, T, hs, dtype=dtype)
    assert cache.nbytes() == kv_cache_bytes(L, B, T, nh * hs, size) == 2 * L * B * T * nh * hs * size


def test_formula_for_gpt2_small_and_the_model(model):
    assert kv_cache_bytes(12, 1, 1024, 768) == 75_497_472  # float32: 72 MiB
    assert kv_cache_bytes(12, 1, 1024, 768, 2) == 37_748_736  # bfloat16: 36 MiB
    gpt2 = GPTConfig()
    meta = KVCache(gpt2.n_layer, 2, gpt2.n_head, gpt2.block_size, gpt2.n_embd // gpt2.n_head, device="meta")
    assert meta.nbytes() == kv_cache_bytes(12, 2, 1024, 768)  # counted without allocating
    assert KVCache.for_model(model, batch_size=3).nbytes() == kv_cache_bytes(TINY.n_layer, 3, TINY.block_size, TINY.n_embd)


# --------------------------------------------------------------------------------------------------
# attention_mask


def test_mask_is_none_when_plain_causal_attention_is_right():
    assert attention_mask(1, 1) is None
    assert attention_mask(1, 9) is None  # one new token reads every key
    assert attention_mask(5, 5) is None  # nothing cached: is_causal does it


@pytest.mark.parametrize("T, S", [(2, 5), (3, 4), (4, 7)])
def test_mask_is_the_bottom_of_the_causal_triangle(T, S):
    mask = attention_mask(T, S)
    assert mask.shape == (1, 1, T, S) and mask.dtype == torch.bool
    assert torch.equal(mask[0, 0], torch.ones(S, S, dtype=torch.bool).tril()[S - T :])
    assert not torch.equal(mask[0, 0], torch.ones(T, S, dtype=torch.bool).tril())  # not is_causal's top-left triangle


def test_mask_with_padding():
    pad_mask = torch.tensor([[False, False, True, True, True], [True, True, True, True, True], [False, True, True, True, True]])
    for T in (5, 2, 1):
        mask = attention_mask(T, 5, pad_mask)
        assert mask.shape == (3, 1, T, 5)
        causal = torch.ones(5, 5, dtype=torch.bool).tril()[5 - T :]  # (T, 5)
        for b in range(3):
            expected = causal & pad_mask[b]
            expected |= torch.eye(5, dtype=torch.bool)[5 - T :]  # every query reads itself
            assert torch.equal(mask[b, 0], expected)
        assert mask.any(dim=-1).all()  # no query is left with nothing to read


def test_reorder_follows_chosen_rows_and_continues_as_from_scratch():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=17, block_size=12, n_layer=2, n_head=2, n_embd=16)).eval()
    texts = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    cache = KVCache.for_model(model, batch_size=2, max_len=8)
    with torch.no_grad():
        gpt_forward(model, texts, cache=cache)
        rows = torch.tensor([1, 1, 0])
        cache.reorder(rows)
        nxt = torch.tensor([[9], [10], [11]])
        continued = gpt_forward(model, nxt, cache=cache)[:, -1]
        from_scratch = model(torch.cat([texts[rows], nxt], dim=1))[0][:, -1]
    assert cache.keys.shape[1] == 3 and cache.length == 5
    assert torch.allclose(continued, from_scratch, atol=1e-5)
