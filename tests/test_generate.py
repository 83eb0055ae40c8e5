"""Day 25: the generation loop (`llmcourse.generate`)."""

from __future__ import annotations

import pytest
import torch

from llmcourse.generate import (
    check_count,
    check_temperature,
    choose_next_token,
    crop_context,
    generate,
    generate_tokens,
    prepare_prompts,
    repeated_lines,
)
from llmcourse.gpt import GPT, GPTConfig


def tiny_gpt(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    settings = dict(vocab_size=11, block_size=12, n_layer=2, n_head=2, n_embd=16)
    settings.update(overrides)
    return GPT(GPTConfig(**settings)).eval()


def greedy_by_hand(model: GPT, idx: torch.Tensor, n: int) -> torch.Tensor:
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(idx[:, -model.config.block_size :])
            idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


def test_greedy_equals_the_loop_written_out_with_and_without_cache():
    model = tiny_gpt()
    idx = torch.tensor([[1, 2, 3], [4, 5, 6]])
    expected = greedy_by_hand(model, idx, 20)  # runs past block_size 12: the window slides
    assert torch.equal(generate(model, idx, 20, temperature=0, use_cache=False), expected)
    assert torch.equal(generate(model, idx, 20, temperature=0, use_cache=True), expected)


def test_seeded_sampling_repeats_and_cache_does_not_change_tokens():
    model = tiny_gpt(1)
    idx = torch.tensor([[3, 1]])
    runs = [generate(model, idx, 25, temperature=1.0, generator=torch.Generator().manual_seed(5), use_cache=c) for c in (True, False, True)]
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])
    other = generate(model, idx, 25, temperature=1.0, generator=torch.Generator().manual_seed(6))
    assert not torch.equal(runs[0], other)


def test_shapes_and_return_types():
    model = tiny_gpt()
    out = generate(model, torch.tensor([[1, 2]]), 5)
    assert out.shape == (1, 7) and out.dtype == torch.int64 and torch.equal(out[:, :2], torch.tensor([[1, 2]]))
    assert torch.equal(generate(model, torch.tensor([[1, 2]]), 0), torch.tensor([[1, 2]]))
    rows = generate(model, [[1, 2], [3]], 4, temperature=0)
    assert isinstance(rows, list) and [len(r) for r in rows] == [6, 5] and rows[0][:2] == [1, 2] and rows[1][:1] == [3]
    assert generate(model, [[1, 2], [3]], 0) == [[1, 2], [3]]


def test_list_of_prompts_equals_each_prompt_alone():
    model = tiny_gpt(2)
    prompts = [[1, 2, 3, 4], [5], [6, 7]]
    batch = generate(model, prompts, 10, temperature=0)
    alone = [generate(model, [p], 10, temperature=0)[0] for p in prompts]
    assert batch == alone
    assert generate(model, prompts, 10, temperature=0, use_cache=False) == alone


def test_tensor_and_list_prompts_agree():
    model = tiny_gpt()
    idx = torch.tensor([[1, 2, 3]])
    assert generate(model, [[1, 2, 3]], 6, temperature=0) == generate(model, idx, 6, temperature=0).tolist()


def test_generate_tokens_yields_one_token_per_row_per_step():
    model = tiny_gpt()
    steps = list(generate_tokens(model, torch.tensor([[1], [2], [3]]), 4, temperature=0))
    assert len(steps) == 4 and all(s.shape == (3,) for s in steps)
    assert torch.equal(torch.stack(steps, 1), generate(model, torch.tensor([[1], [2], [3]]), 4, temperature=0)[:, 1:])


def test_model_mode_is_restored_and_no_graph_is_recorded():
    model = tiny_gpt(dropout=0.3).train()
    out = generate(model, torch.tensor([[1, 2]]), 3)
    assert model.training and not out.requires_grad
    steps = generate_tokens(model, torch.tensor([[1]]), 5)
    next(steps)
    assert not model.training  # eval while writing
    steps.close()
    assert model.training  # back, also when the loop is left early


def test_eval_mode_makes_greedy_repeatable_with_dropout():
    model = tiny_gpt(dropout=0.5).train()
    a = generate(model, torch.tensor([[1, 2]]), 15, temperature=0)
    b = generate(model, torch.tensor([[1, 2]]), 15, temperature=0)
    assert torch.equal(a, b)


def test_stop_rule_cuts_each_row():
    model = tiny_gpt()
    full = generate(model, torch.tensor([[1, 2], [3, 4]]), 8, temperature=0)
    calls = []

    def stop_after_three(new_tokens):
        calls.append(len(new_tokens))
        return 3 if len(new_tokens) >= 3 else None

    rows = generate(model, torch.tensor([[1, 2], [3, 4]]), 8, temperature=0, stop=stop_after_three)
    assert rows == [r[:5] for r in full.tolist()]
    assert max(calls) == 3  # generation ended once every row had stopped


def test_crop_context():
    x = torch.arange(10)[None]
    assert crop_context(x, 4).tolist() == [[6, 7, 8, 9]] and crop_context(x, 10) is x


def test_choose_next_token_greedy_and_sampled():
    logits = torch.tensor([[0.0, 5.0, 1.0], [2.0, 0.0, 0.0]])
    assert choose_next_token(logits, 0).tolist() == [1, 0]
    draws = choose_next_token(logits[:1].expand(2000, -1), 1.0, generator=torch.Generator().manual_seed(0))
    share = (draws == 1).float().mean().item()
    expected = torch.softmax(logits[0], -1)[1].item()
    assert abs(share - expected) < 0.03
    assert (choose_next_token(logits[:1].expand(200, -1), 1.0, top_k=1, generator=torch.Generator().manual_seed(0)) == 1).all()


@pytest.mark.parametrize("value", [-0.1, float("inf"), float("nan")])
def test_bad_temperature_is_refused(value):
    with pytest.raises(ValueError, match="temperature"):
        check_temperature(value)
    with pytest.raises(ValueError, match="temperature"):
        generate(tiny_gpt(), torch.tensor([[1]]), 2, temperature=value)


def test_bad_arguments_are_refused_before_any_work():
    model = tiny_gpt()
    with pytest.raises(TypeError, match="temperature"):
        check_temperature("hot")
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, torch.tensor([[1]]), -1)
    with pytest.raises(TypeError, match="max_new_tokens"):
        check_count(2.5, "max_new_tokens")
    with pytest.raises(ValueError, match="out of range"):
        generate(model, torch.tensor([[1, 11]]), 2)
    with pytest.raises(ValueError, match="prompt 1"):
        generate(model, [[1], [20]], 2)
    with pytest.raises(ValueError, match="prompt 0"):
        generate(model, [[]], 2)
    with pytest.raises(TypeError, match="list of prompts"):
        generate(model, "hello", 2)
    with pytest.raises(TypeError, match="GPT"):
        generate(torch.nn.Linear(2, 2), torch.tensor([[1]]), 2)
    with pytest.raises(ValueError, match="top_k"):
        generate(model, torch.tensor([[1]]), 2, top_k=-1)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, torch.tensor([[1]]), 2, top_p=1.5)
    with pytest.raises(TypeError, match="stop"):
        generate(model, torch.tensor([[1]]), 2, stop="\n")
    with pytest.raises(ValueError):
        prepare_prompts(model, torch.zeros(1, 0, dtype=torch.long))


def test_repeated_lines():
    assert repeated_lines("a\nb\na\n\na\n") == 0.5
    assert repeated_lines("one\ntwo\n") == 0.0 and repeated_lines("\n\n") == 0.0


def test_pretrained_model_greedy_is_the_same_with_and_without_cache():
    from llmcourse.checkpoint import load_pretrained

    model, tokenizer, _ = load_pretrained("shakespeare-char")
    idx = torch.tensor([tokenizer.encode("ROMEO:\n")])
    assert torch.equal(generate(model, idx, 60, temperature=0), generate(model, idx, 60, temperature=0, use_cache=False))
