"""llmcourse.decoding (Day 29): repetition penalty, left padding, stop strings, beam search."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from llmcourse.decoding import (
    StopStrings,
    apply_repetition_penalty,
    beam_search,
    check_repetition_penalty,
    continuation_log_prob,
    left_pad,
)
from llmcourse.generate import generate
from llmcourse.gpt import GPT, GPTConfig
from llmcourse.kvcache import gpt_forward


def random_gpt(vocab_size: int = 11, seed: int = 0, block_size: int = 16, std: float = 0.3, dropout: float = 0.0) -> GPT:
    """A small GPT with large random weights, so that its next-token distributions are peaked and varied."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=2, n_head=2, n_embd=16, dropout=dropout))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model.eval()


@pytest.fixture(scope="module")
def transformers():
    import transformers  # slow to import (seconds): only the tests that compare with it pay for it

    transformers.logging.set_verbosity_error()
    return transformers


@pytest.fixture(scope="module")
def pretrained():
    from llmcourse.checkpoint import load_pretrained

    model, tokenizer, _ = load_pretrained("shakespeare-char")
    return model, tokenizer


# ------------------------------------------------------------------------------ repetition penalty
@pytest.mark.parametrize("penalty", [1, 1.0, 0.5, 1.3, 7])
def test_check_repetition_penalty_accepts_positive_numbers(penalty):
    assert check_repetition_penalty(penalty) == float(penalty)
    assert isinstance(check_repetition_penalty(penalty), float)


@pytest.mark.parametrize("bad", [0, 0.0, -1.2, float("nan"), float("inf"), "1.2", None, True, [1.2]])
def test_check_repetition_penalty_rejects(bad):
    with pytest.raises(ValueError, match="repetition_penalty"):
        check_repetition_penalty(bad)
    with pytest.raises(ValueError, match="repetition_penalty"):
        apply_repetition_penalty(torch.zeros(1, 3), torch.zeros(1, 1, dtype=torch.long), bad)


@pytest.mark.parametrize("penalty", [0.5, 0.9, 1.0, 1.3, 2.0])
def test_repetition_penalty_equals_transformers(transformers, penalty):
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    g = torch.Generator().manual_seed(int(penalty * 10))
    for B, T, V in [(1, 1, 5), (3, 12, 7), (4, 40, 65), (2, 300, 75)]:  # T > V: ids repeat
        logits = 3 * torch.randn(B, V, generator=g)  # both signs
        logits[0, 0] = 0.0  # zero is neither divided nor multiplied into a change
        idx = torch.randint(V, (B, T), generator=g)
        before = logits.clone()
        ours = apply_repetition_penalty(logits, idx, penalty)
        assert torch.equal(logits, before)  # the input is not changed
        assert torch.equal(ours, RepetitionPenaltyLogitsProcessor(penalty)(idx, logits.clone()))


def test_repetition_penalty_by_hand_and_once_per_token():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0], [1.0, 1.0, -4.0, 0.0]])
    idx = torch.tensor([[0, 1, 1, 1], [2, 2, 2, 2]])
    expected = torch.tensor([[1.0, -2.0, 0.5, 3.0], [1.0, 1.0, -8.0, 0.0]])
    assert torch.equal(apply_repetition_penalty(logits, idx, 2.0), expected)
    # a token seen four times is penalized exactly once
    assert torch.equal(apply_repetition_penalty(logits, idx, 2.0), apply_repetition_penalty(logits, idx[:, [0, 1]], 2.0))
    # above 1 a seen token always loses, below 1 it always gains
    assert (apply_repetition_penalty(logits, idx, 1.5) <= logits).all() and (apply_repetition_penalty(logits, idx, 0.5) >= logits).all()


@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_with_repetition_penalty_equals_a_loop_with_transformers(transformers, use_cache):
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    model = random_gpt(seed=1)
    idx = torch.tensor([[1, 2, 3], [4, 4, 5]])
    expected = idx.clone()
    with torch.no_grad():
        for _ in range(8):
            logits = model(expected)[0][:, -1]
            nxt = RepetitionPenaltyLogitsProcessor(1.7)(expected, logits).argmax(dim=-1)
            expected = torch.cat([expected, nxt[:, None]], dim=1)
    assert torch.equal(generate(model, idx, 8, temperature=0, repetition_penalty=1.7, use_cache=use_cache), expected)
    # and the penalty does change what is written (or the test above would prove nothing)
    assert not torch.equal(generate(model, idx, 8, temperature=0, use_cache=use_cache), expected)


@pytest.mark.parametrize("penalty", [0.3, 2.0])
def test_repetition_penalty_does_not_count_padding(penalty):
    model = random_gpt(seed=2)
    prompts = [[3, 4], [5, 6, 7, 8, 9], [2]]  # padding (id 0) in front of rows 0 and 2; no real 0
    batched = generate(model, prompts, 6, temperature=0, repetition_penalty=penalty)
    alone = [generate(model, [p], 6, temperature=0, repetition_penalty=penalty)[0] for p in prompts]
    assert batched == alone


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), "strong"])
def test_generate_rejects_a_bad_repetition_penalty(bad):
    with pytest.raises(ValueError, match="repetition_penalty"):
        generate(random_gpt(), torch.tensor([[1, 2]]), 3, repetition_penalty=bad)


# ------------------------------------------------------------------------------------ left padding
def test_left_pad_values_and_mask():
    ids, mask = left_pad([[5, 6], torch.tensor([7, 8, 9, 10]), [3]], pad_id=1)
    assert ids.tolist() == [[1, 1, 5, 6], [7, 8, 9, 10], [1, 1, 1, 3]]
    assert mask.tolist() == [[False, False, True, True], [True] * 4, [False, False, False, True]]
    assert ids.dtype == torch.long and mask.dtype == torch.bool
    ids, mask = left_pad([[4, 2, 2]])
    assert ids.tolist() == [[4, 2, 2]] and mask.all()


@pytest.mark.parametrize("bad", [[], [[1, 2], []], [[[1, 2]]], [torch.ones(2, 2, dtype=torch.long)]])
def test_left_pad_rejects(bad):
    with pytest.raises(ValueError, match="left_pad"):
        left_pad(bad)


def test_padded_forward_equals_each_prompt_alone():
    model = random_gpt(seed=3)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [2], [3, 3, 3, 3, 3]]
    ids, mask = left_pad(prompts)
    with torch.no_grad():
        padded = gpt_forward(model, ids, pad_mask=mask)  # (B, T, V)
        for i, p in enumerate(prompts):
            alone = model(torch.tensor([p]))[0][0]  # (len, V)
            torch.testing.assert_close(padded[i, -len(p) :], alone, rtol=0, atol=1e-5)
        plain = model(ids)[0]  # reading the padding as text changes the answer
    assert not torch.allclose(plain[0, -1], padded[0, -1], atol=1e-3)


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("lengths", [(3, 9, 5), (14, 2, 11)])  # the second slides past block_size 16
def test_batched_generation_equals_each_prompt_alone(use_cache, lengths):
    model = random_gpt(seed=4)
    g = torch.Generator().manual_seed(sum(lengths))
    prompts = [torch.randint(1, 11, (n,), generator=g).tolist() for n in lengths]
    batched = generate(model, prompts, 8, temperature=0, use_cache=use_cache)
    alone = [generate(model, [p], 8, temperature=0, use_cache=False)[0] for p in prompts]
    assert batched == alone
    assert [row[: len(p)] for row, p in zip(batched, prompts)] == prompts and all(len(r) == len(p) + 8 for r, p in zip(batched, prompts))


# ------------------------------------------------------------------------------------ stop strings
PIECES = ["ab", "c", "d ", "en", "d.", "x", "yz", "\n"]  # a made-up tokenizer whose tokens are pieces of text


def decode_pieces(ids):
    return "".join(PIECES[i] for i in ids)


def test_stop_strings_arguments():
    with pytest.raises(ValueError, match="stop strings"):
        StopStrings([], decode_pieces)
    with pytest.raises(ValueError, match="stop strings"):
        StopStrings(["end", ""], decode_pieces)
    with pytest.raises(ValueError, match="stop strings"):
        StopStrings([3], decode_pieces)
    with pytest.raises(TypeError, match="decode"):
        StopStrings(["end"], "not a function")
    one = StopStrings("end", decode_pieces)  # one string is a list of one
    assert one.stops == ["end"] and repr(one) == "StopStrings(['end'])"


def test_stop_string_split_over_tokens_is_found():
    rule = StopStrings(["cd en"], decode_pieces)
    tokens = [0, 1, 2, 3, 4, 5]  # "ab" "c" "d " "en" "d." "x": the stop string spans tokens 1 to 3
    assert [rule(tokens[:n]) for n in range(1, 7)] == [None, None, None, 4, 4, 4]
    # a stop string ending inside a token keeps that whole token
    assert StopStrings(["n"], decode_pieces)(tokens) == 4 and StopStrings(["d"], decode_pieces)(tokens) == 3
    # of several stop strings, the one that ends first decides
    assert StopStrings(["x", "end.", "abc"], decode_pieces)(tokens) == 2
    assert StopStrings(["never"], decode_pieces)(tokens) is None and StopStrings(["a"], decode_pieces)([]) is None


def test_stop_string_with_a_bpe_tokenizer():
    from llmcourse.bpe import BPETokenizer

    text = "the sweet sorrow of the sweetest sorrows; the sweet sorrow of sorrow. " * 20
    bpe = BPETokenizer.train(text, 270)
    line = bpe.encode("parting is such sweet sorrow, that I shall")
    stop_ids = bpe.encode("sorrow")
    assert not any(line[i : i + len(stop_ids)] == stop_ids for i in range(len(line)))  # its ids differ in context
    keep = StopStrings(["sorrow"], bpe.decode)(line)
    assert keep is not None and bpe.decode(line[:keep]).endswith("sorrow") and "sorrow" not in bpe.decode(line[: keep - 1])


@pytest.mark.parametrize("temperature", [0, 1.0])
def test_generate_stops_each_row_at_its_own_stop_string(temperature):
    model = random_gpt(vocab_size=len(PIECES), seed=5)
    prompts = [[0, 1], [5, 6, 5], [3]]
    kwargs = dict(temperature=temperature, generator=torch.Generator().manual_seed(0) if temperature else None)
    free = generate(model, prompts, 20, **kwargs)
    kwargs["generator"] = torch.Generator().manual_seed(0) if temperature else None
    stop = ["d", "yz"]
    stopped = generate(model, prompts, 20, stop=StopStrings(stop, decode_pieces), **kwargs)
    lengths = []
    for row, full, p in zip(stopped, free, prompts):
        new_full = full[len(p) :]
        ends = [n for n in range(1, len(new_full) + 1) if any(s in decode_pieces(new_full[:n]) for s in stop)]
        expected = p + new_full[: ends[0]] if ends else full
        assert row == expected
        lengths.append(len(row) - len(p))
    assert len(set(lengths)) > 1 and min(lengths) < 20  # rows stop at different steps


def test_generation_ends_when_every_row_has_stopped():
    model = random_gpt(vocab_size=len(PIECES), seed=6)
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    every_piece = StopStrings(PIECES, decode_pieces)  # whatever comes first stops the row
    stopped = generate(model, torch.tensor([[0, 1], [2, 3]]), 30, temperature=0, use_cache=False, stop=every_piece)
    assert [len(row) for row in stopped] == [3, 3] and len(calls) == 1  # every row stops at its first token


# ------------------------------------------------------------------------------------- beam search
@torch.no_grad()
def brute_force(model: GPT, prompt: list[int], n: int) -> tuple[list[int], float]:
    """The most likely continuation of n tokens, by scoring all V ** n of them."""
    V = model.config.vocab_size
    every = torch.cartesian_prod(*[torch.arange(V)] * n)  # (V ** n, n)
    seqs = torch.cat([torch.tensor(prompt).expand(len(every), -1), every], dim=1)
    logp = F.log_softmax(model(seqs[:, :-1])[0][:, -n:], dim=-1)
    totals = logp.gather(2, seqs[:, -n:, None]).sum(dim=(1, 2))
    best = totals.argmax().item()
    return every[best].tolist(), totals[best].item()


@pytest.mark.parametrize("use_cache", [True, False])
def test_one_beam_is_greedy(use_cache):
    for seed in range(4):
        model = random_gpt(seed=seed)
        prompt = [1, 2, 3, 4]
        tokens, score = beam_search(model, prompt, 10, num_beams=1, use_cache=use_cache)[0]
        assert tokens == generate(model, [prompt], 10, temperature=0, use_cache=use_cache)[0][len(prompt) :]
        assert math.isclose(score * 10, continuation_log_prob(model, prompt, tokens), abs_tol=1e-4)


@pytest.mark.parametrize("vocab_size", [4, 5])
def test_enough_beams_find_the_best_sequence(vocab_size):
    greedy_missed = 0
    for seed in range(10):
        model = random_gpt(vocab_size=vocab_size, seed=seed, block_size=8)
        best, best_logp = brute_force(model, [1, 3], 3)
        results = beam_search(model, [1, 3], 3, num_beams=vocab_size**2)
        assert results[0][0] == best and math.isclose(results[0][1] * 3, best_logp, abs_tol=1e-5)
        assert len(results) == vocab_size**2 and [s for _, s in results] == sorted((s for _, s in results), reverse=True)
        greedy_missed += beam_search(model, [1, 3], 3, num_beams=1)[0][0] != best
    assert greedy_missed > 0  # the search matters on these models


@pytest.mark.parametrize("eos_id", [None, 1])
@pytest.mark.parametrize("length_penalty", [1.0, 0.0, 2.0, -1.0])
def test_beam_search_equals_transformers(transformers, length_penalty, eos_id):
    V = 7
    for seed in range(6):
        torch.manual_seed(seed)
        config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=V, n_positions=32, bos_token_id=0, eos_token_id=0)
        hf = transformers.GPT2LMHeadModel(config).eval()
        with torch.no_grad():
            for p in hf.parameters():
                p.add_(0.5 * torch.randn_like(p))
        ours = GPT.from_hf(hf).eval()
        prompt = torch.randint(V, (1, 3))
        for num_beams in (2, 3):
            out = hf.generate(
                prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, num_beams=num_beams, do_sample=False,
                length_penalty=length_penalty, eos_token_id=eos_id, pad_token_id=V - 1 if eos_id is None else eos_id,
                num_return_sequences=num_beams, early_stopping=False, output_scores=True, return_dict_in_generate=True,
            )
            theirs = []
            for seq in out.sequences[:, 3:].tolist():
                theirs.append(seq[: seq.index(eos_id) + 1] if eos_id in seq else seq)  # drop the padding after eos
            mine = beam_search(ours, prompt, 6, num_beams=num_beams, length_penalty=length_penalty, eos_id=eos_id)
            assert [tokens for tokens, _ in mine] == theirs
            torch.testing.assert_close(torch.tensor([s for _, s in mine]), out.sequences_scores, rtol=0, atol=1e-4)


def test_beam_search_cached_equals_uncached_and_long_prompts_slide():
    model = random_gpt(seed=7)
    for prompt, n in [([1, 2, 3], 9), (list(range(1, 11)) * 2, 6)]:  # the second is longer than block_size 16
        cached = beam_search(model, prompt, n, num_beams=3, eos_id=2)
        uncached = beam_search(model, prompt, n, num_beams=3, eos_id=2, use_cache=False)
        assert [t for t, _ in cached] == [t for t, _ in uncached]
        torch.testing.assert_close(torch.tensor([s for _, s in cached]), torch.tensor([s for _, s in uncached]), rtol=0, atol=1e-5)


def test_finished_scores_follow_the_length_penalty():
    model = random_gpt(seed=8)
    prompt = [3, 4, 5]
    for length_penalty in (0.0, 1.0, 2.0):
        for tokens, score in beam_search(model, prompt, 8, num_beams=4, length_penalty=length_penalty, eos_id=2):
            assert tokens[-1] == 2 or len(tokens) == 8
            assert 2 not in tokens[:-1]  # a continuation ends at its first eos
            expected = continuation_log_prob(model, prompt, tokens) / len(tokens) ** length_penalty
            assert math.isclose(score, expected, rel_tol=1e-4, abs_tol=1e-4)


def test_beam_search_keeps_the_model_mode_and_ignores_dropout():
    model = random_gpt(seed=9, dropout=0.5).train()
    first = beam_search(model, [1, 2], 6, num_beams=3)
    assert model.training
    assert beam_search(model.eval(), [1, 2], 6, num_beams=3) == first  # dropout was off during the search


def test_beam_search_takes_tensors_and_lists():
    model = random_gpt(seed=10)
    as_list = beam_search(model, [1, 2, 3], 5, num_beams=2)
    assert beam_search(model, torch.tensor([1, 2, 3]), 5, num_beams=2) == as_list
    assert beam_search(model, torch.tensor([[1, 2, 3]]), 5, num_beams=2) == as_list


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(max_new_tokens=0), ValueError, "max_new_tokens"),
        (dict(max_new_tokens=-2), ValueError, "max_new_tokens"),
        (dict(max_new_tokens=2.5), TypeError, "max_new_tokens"),
        (dict(num_beams=0), ValueError, "num_beams"),
        (dict(num_beams=2.0), TypeError, "num_beams"),
        (dict(num_beams=True), TypeError, "num_beams"),
        (dict(length_penalty=float("nan")), ValueError, "length_penalty"),
        (dict(length_penalty=float("inf")), ValueError, "length_penalty"),
        (dict(length_penalty="long"), ValueError, "length_penalty"),
        (dict(eos_id=11), ValueError, "eos_id"),
        (dict(eos_id=-1), ValueError, "eos_id"),
        (dict(eos_id=1.0), ValueError, "eos_id"),
        (dict(prompt=torch.tensor([[1, 2], [3, 4]])), ValueError, "one prompt"),
        (dict(prompt=[]), ValueError, "prompt"),
        (dict(prompt=[1, 11]), ValueError, "out of range"),
    ],
)
def test_beam_search_rejects_bad_arguments(kwargs, error, match):
    args = dict(prompt=[1, 2], max_new_tokens=4)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        beam_search(random_gpt(), args.pop("prompt"), args.pop("max_new_tokens"), **args)


def test_continuation_log_prob():
    model = random_gpt(seed=11)
    prompt, new = [1, 2, 3], [4, 5]
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([prompt + new]))[0][0], dim=-1)  # (5, V)
    expected = (logp[2, 4] + logp[3, 5]).item()
    assert math.isclose(continuation_log_prob(model, prompt, new), expected, abs_tol=1e-5)
    assert continuation_log_prob(model, prompt, []) == 0.0
    with pytest.raises(ValueError, match="block_size"):
        continuation_log_prob(model, list(range(1, 11)), list(range(1, 11)))


# --------------------------------------------------------------------------- on the pretrained model
def test_beam_search_beats_greedy_on_the_pretrained_model(pretrained):
    model, tokenizer = pretrained
    prompt = tokenizer.encode("ROMEO:\n")
    greedy = generate(model, [prompt], 30, temperature=0)[0][len(prompt) :]
    tokens, score = beam_search(model, prompt, 30, num_beams=4)[0]
    assert len(tokens) == 30 and math.isclose(score * 30, continuation_log_prob(model, prompt, tokens), abs_tol=1e-3)
    assert continuation_log_prob(model, prompt, tokens) > continuation_log_prob(model, prompt, greedy) + 1.0


def test_length_penalty_lengthens_lines_on_the_pretrained_model(pretrained):
    model, tokenizer = pretrained
    newline = tokenizer.encode("\n")[0]
    prompt = tokenizer.encode("ROMEO:\nI will ")
    lengths = []
    for length_penalty in (-1.0, 0.0, 1.0, 2.0):
        tokens, _ = beam_search(model, prompt, 60, num_beams=6, length_penalty=length_penalty, eos_id=newline)[0]
        assert tokens[-1] == newline and newline not in tokens[:-1]
        lengths.append(len(tokens))
    assert lengths == sorted(lengths) and lengths[-1] > 2 * lengths[0]
