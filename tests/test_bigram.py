"""Tests for llmcourse.bigram (Day 11): the bigram model, estimate_loss and train_language_model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from llmcourse.bigram import BigramLanguageModel, estimate_loss, train_language_model
from llmcourse.optim import AdamW


def _cyclic_ids(V: int = 7, n: int = 2000) -> torch.Tensor:
    """A corpus where token a is always followed by (a + 1) % V: a bigram can learn it perfectly."""
    return torch.arange(n) % V


def test_forward_shapes_and_initial_loss_is_ln_V():
    torch.manual_seed(0)
    V = 13
    model = BigramLanguageModel(V)
    x = torch.randint(0, V, (4, 9))
    y = torch.randint(0, V, (4, 9))
    logits, loss = model(x, y)
    assert logits.shape == (4, 9, V)
    assert abs(loss.item() - math.log(V)) < 1e-6
    torch.testing.assert_close(loss, F.cross_entropy(logits.reshape(-1, V), y.reshape(-1)))
    logits2, none = model(x)
    assert none is None and torch.equal(logits, logits2)


def test_forward_is_a_row_lookup():
    model = BigramLanguageModel(5)
    with torch.no_grad():
        model.logits_table.weight.copy_(torch.randn(5, 5))
    x = torch.tensor([[0, 4, 2]])
    logits, _ = model(x)
    torch.testing.assert_close(logits[0], model.logits_table.weight[x[0]])


def test_loss_matches_torch_after_random_init():
    torch.manual_seed(1)
    model = BigramLanguageModel(6)
    torch.nn.init.normal_(model.logits_table.weight)
    x, y = torch.randint(0, 6, (3, 5)), torch.randint(0, 6, (3, 5))
    _, loss = model(x, y)
    torch.testing.assert_close(loss, F.cross_entropy(model.logits_table.weight[x].reshape(-1, 6), y.reshape(-1)))


@pytest.mark.parametrize(
    "idx,targets,exc,match",
    [
        (torch.tensor([[0, 5]]), None, ValueError, "token id 5"),
        (torch.tensor([[-1, 2]]), None, ValueError, "token id -1"),
        (torch.tensor([[0.0, 1.0]]), None, TypeError, "integer"),
        (torch.tensor([0, 1]), None, ValueError, r"\(B, T\)"),
        (torch.tensor([[0, 1]]), torch.tensor([[0, 1, 2]]), ValueError, "shape"),
        (torch.tensor([[0, 1]]), torch.tensor([[0, 7]]), ValueError, "target 7 is outside"),
    ],
)
def test_forward_errors(idx, targets, exc, match):
    with pytest.raises(exc, match=match):
        BigramLanguageModel(5)(idx, targets)


@pytest.mark.parametrize("bad,exc", [(0, ValueError), (-3, ValueError), (2.0, TypeError), (True, TypeError)])
def test_constructor_errors(bad, exc):
    with pytest.raises(exc, match="vocab_size"):
        BigramLanguageModel(bad)


def test_generate_shape_and_determinism():
    torch.manual_seed(0)
    model = BigramLanguageModel(11)
    torch.nn.init.normal_(model.logits_table.weight)
    prompt = torch.randint(0, 11, (3, 4))
    out1 = model.generate(prompt, 20, generator=torch.Generator().manual_seed(5))
    out2 = model.generate(prompt, 20, generator=torch.Generator().manual_seed(5))
    out3 = model.generate(prompt, 20, generator=torch.Generator().manual_seed(6))
    assert out1.shape == (3, 24) and out1.dtype == torch.int64
    assert torch.equal(out1, out2) and not torch.equal(out1, out3)
    assert torch.equal(out1[:, :4], prompt)
    assert torch.equal(model.generate(prompt, 0), prompt)
    # only the last token matters: a different history with the same last token continues identically
    other = prompt.clone()
    other[:, :3] = (other[:, :3] + 1) % 11
    out4 = model.generate(other, 20, generator=torch.Generator().manual_seed(5))
    assert torch.equal(out4[:, 4:], out1[:, 4:])


def test_generate_follows_a_confident_table():
    V = 6
    model = BigramLanguageModel(V)
    with torch.no_grad():  # a huge logit on (a + 1) % V: sampling is deterministic
        model.logits_table.weight.copy_(torch.roll(torch.eye(V), 1, dims=1) * 100)
    out = model.generate(torch.tensor([[2]]), 8)
    assert out[0].tolist() == [2, 3, 4, 5, 0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    "prompt,n,exc",
    [(torch.zeros(1, 0, dtype=torch.long), 3, ValueError), (torch.tensor([[1]]), -1, ValueError), (torch.tensor([[1]]), 2.0, TypeError)],
)
def test_generate_errors(prompt, n, exc):
    with pytest.raises(exc):
        BigramLanguageModel(4).generate(prompt, n)


def test_estimate_loss_is_repeatable_and_restores_mode():
    V = 7
    model = BigramLanguageModel(V)
    ids = _cyclic_ids(V)
    splits = {"train": ids[:1500], "val": ids[1500:]}
    model.train()
    out = estimate_loss(model, splits, 4, 8, 3, torch.Generator().manual_seed(0))
    assert list(out) == ["train", "val"] and model.training
    assert all(abs(v - math.log(V)) < 1e-5 for v in out.values())
    model.eval()
    estimate_loss(model, splits, 4, 8, 1)
    assert not model.training
    torch.nn.init.normal_(model.logits_table.weight)
    a = estimate_loss(model, splits, 4, 8, 3, torch.Generator().manual_seed(1))
    b = estimate_loss(model, splits, 4, 8, 3, torch.Generator().manual_seed(1))
    assert a == b


@pytest.mark.parametrize("kwargs,exc", [({"iters": 0}, ValueError), ({"iters": 1.5}, TypeError), ({"splits": {}}, ValueError), ({"splits": [1]}, TypeError)])
def test_estimate_loss_errors(kwargs, exc):
    args = {"model": BigramLanguageModel(3), "splits": {"train": torch.arange(50) % 3}, "batch_size": 2, "block_size": 4, "iters": 2}
    with pytest.raises(exc):
        estimate_loss(**(args | kwargs))


def test_training_reduces_the_loss_and_returns_the_history():
    torch.manual_seed(0)
    V = 7
    ids = _cyclic_ids(V)
    model = BigramLanguageModel(V)
    opt = AdamW(model.parameters(), lr=0.3, weight_decay=0.0)
    history = train_language_model(
        model, opt, {"train": ids[:1500], "val": ids[1500:]}, steps=60, batch_size=8, block_size=16,
        eval_interval=20, eval_iters=2, generator=torch.Generator().manual_seed(0), progress=False,
    )
    assert history["step"] == [0, 20, 40, 60]
    assert len(history["batch_loss"]) == 60 and len(history["train"]) == len(history["val"]) == 4
    assert abs(history["val"][0] - math.log(V)) < 1e-5
    assert history["val"][-1] < 0.1  # the cycle is perfectly predictable
    out = model.generate(torch.tensor([[3]]), 5)
    assert out[0].tolist() == [3, 4, 5, 6, 0, 1]


def test_training_is_repeatable_with_generators():
    def run():
        torch.manual_seed(0)
        model = BigramLanguageModel(5)
        ids = torch.randint(0, 5, (500,), generator=torch.Generator().manual_seed(9))
        opt = AdamW(model.parameters(), lr=0.1)
        return train_language_model(model, opt, {"train": ids}, steps=10, batch_size=4, block_size=8,
                                    eval_interval=5, eval_iters=1, generator=torch.Generator().manual_seed(3), progress=False)

    assert run() == run()


@pytest.mark.parametrize(
    "kwargs,match",
    [({"splits": {"val": torch.arange(50) % 3}}, "train"), ({"steps": 0}, "steps"), ({"eval_interval": 0}, "eval_interval"), ({"grad_clip": 0.0}, "grad_clip")],
)
def test_training_errors(kwargs, match):
    model = BigramLanguageModel(3)
    args = {"splits": {"train": torch.arange(50) % 3}, "steps": 2, "batch_size": 2, "block_size": 4, "progress": False}
    with pytest.raises(ValueError, match=match):
        train_language_model(model, AdamW(model.parameters()), **(args | kwargs))
