"""llmcourse.finetune (Day 37): a classification head on a GPT, LoRA layers applied and merged, a fine-tuning loop."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llmcourse.checkpoint import load_pretrained
from llmcourse.finetune import (
    DEFAULT_LORA_TARGETS,
    GPTClassifier,
    LoRALinear,
    accuracy,
    apply_lora,
    char_histogram,
    finetune_lm,
    fit_logistic,
    lm_loss,
    lm_windows,
    lora_layers,
    merge_lora,
    speech_windows,
    speeches,
    trainable_parameters,
)
from llmcourse.gpt import GPT, GPTConfig
from llmcourse.perf import optimizer_state_bytes

TINY = GPTConfig(vocab_size=13, block_size=16, n_layer=2, n_head=2, n_embd=16)


def tiny_gpt(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    config = GPTConfig(**{**TINY.__dict__, **overrides})
    return GPT(config).eval()


def ids(B: int = 3, T: int = 10, seed: int = 1, vocab: int = 13) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def lora_parameter_count(config: GPTConfig, rank: int) -> int:
    C = config.n_embd
    per_block = rank * ((C + 3 * C) + (C + C) + (C + 4 * C) + (4 * C + C))  # c_attn, attn c_proj, c_fc, mlp c_proj
    return config.n_layer * per_block


# ---------------------------------------------------------------- data helpers and baselines

PLAY = "ROMEO:\nBut soft!\nWhat light?\n\nJULIET:\nAy me!\n\nROMEO:\nShe speaks.\n\nFIRST ROMEO:\nnot him\n\n"


def test_speeches_finds_one_speakers_speeches_only():
    assert speeches(PLAY, "ROMEO") == ["But soft!\nWhat light?", "She speaks."]
    assert speeches(PLAY, "JULIET") == ["Ay me!"]
    with pytest.raises(ValueError, match="'TYBALT'"):
        speeches(PLAY, "TYBALT")
    with pytest.raises(TypeError):
        speeches(PLAY, 3)


def test_speech_windows_are_disjoint_and_of_equal_length():
    assert speech_windows(["abcdefg", "xy", "123456"], 3) == ["abc", "def", "123", "456"]
    with pytest.raises(ValueError, match="length"):
        speech_windows(["abc"], 0)


def test_the_corpus_gives_the_notebooks_speakers():
    from llmcourse.data import load_corpus, shakespeare_plays

    text = load_corpus("shakespeare")
    assert len(speeches(text, "FALSTAFF")) > 400 and len(speeches(text, "KING HENRY V")) > 100
    othello = shakespeare_plays()["tragedies/othello"]
    assert othello in text[int(len(text) * 0.9) :]  # Iago is in the pretrained model's validation text only
    assert len(speeches(othello, "IAGO")) == 272


def test_char_histogram_rows_are_shares():
    h = char_histogram(torch.tensor([[0, 0, 1, 2], [3, 3, 3, 3]]), 5)
    assert h.shape == (2, 5)
    assert torch.equal(h, torch.tensor([[0.5, 0.25, 0.25, 0, 0], [0, 0, 0, 1.0, 0]]))


def test_fit_logistic_learns_and_folds_the_standardization():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 3, generator=g) * torch.tensor([100.0, 0.01, 1.0]) + torch.tensor([5.0, -3.0, 0.0])
    y = ((x[:, 0] - 5.0) / 100 + (x[:, 1] + 3.0) / 0.01 > 0).long()  # needs both badly scaled features
    layer = fit_logistic(x, y, n_classes=2, steps=300)
    assert isinstance(layer, nn.Linear) and layer.weight.shape == (2, 3)
    with torch.no_grad():
        assert accuracy(layer(x), y) > 0.95  # on raw features: the standardization is inside the layer
    with pytest.raises(ValueError, match="fit_logistic"):
        fit_logistic(x, y[:5], n_classes=2)


def test_accuracy():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0], [0.0, 1.0]])
    assert accuracy(logits, torch.tensor([0, 1, 1, 1])) == 0.75


# ---------------------------------------------------------------- GPTClassifier

def test_classifier_shapes_and_loss():
    clf = GPTClassifier(tiny_gpt(), n_classes=3)
    logits, loss = clf(ids())
    assert logits.shape == (3, 3) and loss is None
    labels = torch.tensor([0, 2, 1])
    logits, loss = clf(ids(), labels)
    assert torch.allclose(loss, F.cross_entropy(logits, labels))
    with pytest.raises(ValueError, match="labels"):
        clf(ids(), torch.tensor([0, 1]))


def test_classifier_body_is_the_gpts_and_reads_the_last_position():
    gpt = tiny_gpt()
    clf = GPTClassifier(gpt, n_classes=TINY.vocab_size)
    assert clf.transformer is gpt.transformer
    with torch.no_grad():
        clf.head.weight.copy_(gpt.lm_head.weight)
        clf.head.bias.zero_()
        x = ids()
        assert torch.allclose(clf(x)[0], gpt(x)[0][:, -1], atol=1e-6)
        h = clf.embed(x)
        split = clf.run_blocks(clf.run_blocks(h, 0, 1), 1)  # blocks 0, then 1..: the same as all at once
        assert torch.allclose(clf.classify(split), clf(x)[0], atol=1e-6)
    assert "lm_head" not in dict(clf.named_modules())


def test_classifier_on_the_pretrained_model_trains_its_head():
    model = load_pretrained("shakespeare-char")[0]
    clf = GPTClassifier(model, n_classes=2)
    x = ids(4, 20, vocab=model.config.vocab_size)
    _, loss = clf(x, torch.tensor([0, 1, 0, 1]))
    loss.backward()
    assert clf.head.weight.grad is not None and clf.transformer.h[0].attn.c_attn.weight.grad is not None


@pytest.mark.parametrize("bad", [1, 0, 2.0, True])
def test_classifier_refuses_bad_class_counts(bad):
    with pytest.raises(ValueError, match="n_classes"):
        GPTClassifier(tiny_gpt(), n_classes=bad)


def test_classifier_refuses_a_non_gpt():
    with pytest.raises(TypeError, match="GPT"):
        GPTClassifier(nn.Linear(2, 2), n_classes=2)


def test_classifier_refuses_a_too_long_window():
    with pytest.raises(ValueError, match="block_size"):
        GPTClassifier(tiny_gpt(), 2)(ids(1, TINY.block_size + 1))


# ---------------------------------------------------------------- LoRALinear

@pytest.mark.parametrize("bias", [True, False])
def test_lora_linear_starts_exactly_as_its_base(bias):
    torch.manual_seed(0)
    base = nn.Linear(7, 5, bias=bias)
    lora = LoRALinear(base, rank=2, alpha=4)
    x = torch.randn(3, 4, 7)
    assert torch.equal(lora(x), base(x))
    assert torch.count_nonzero(lora.lora_B) == 0 and torch.count_nonzero(lora.lora_A) > 0
    assert lora.lora_A.shape == (2, 7) and lora.lora_B.shape == (5, 2) and lora.scaling == 2.0
    assert [n for n, p in lora.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]


def test_lora_linear_update_is_scaled_low_rank_and_merges():
    torch.manual_seed(0)
    base = nn.Linear(8, 6)
    lora = LoRALinear(base, rank=3, alpha=1.5)
    with torch.no_grad():
        lora.lora_B.normal_()
    x = torch.randn(4, 8)
    expected = base(x) + 0.5 * (x @ lora.lora_A.T @ lora.lora_B.T)
    assert torch.allclose(lora(x), expected, atol=1e-6)
    assert torch.linalg.matrix_rank(lora.delta_weight()).item() == 3
    merged = lora.merged()
    assert type(merged) is nn.Linear and torch.allclose(merged(x), lora(x), atol=1e-5)
    assert torch.equal(merged.bias, base.bias)


def test_lora_linear_gradients_reach_only_a_and_b():
    torch.manual_seed(0)
    lora = LoRALinear(nn.Linear(4, 4), rank=2, alpha=2)
    lora(torch.randn(5, 4)).pow(2).sum().backward()
    assert lora.base.weight.grad is None and lora.base.bias.grad is None
    assert lora.lora_B.grad is not None and torch.count_nonzero(lora.lora_B.grad) > 0
    assert torch.count_nonzero(lora.lora_A.grad) == 0  # B is zero, so nothing flows back to A on the first step


@pytest.mark.parametrize("rank, alpha, error, words", [
    (0, 1.0, ValueError, "at least 1"),
    (-2, 1.0, ValueError, "at least 1"),
    (2.0, 1.0, TypeError, "int"),
    (True, 1.0, TypeError, "int"),
    (2, 0.0, ValueError, "alpha"),
    (2, -1, ValueError, "alpha"),
    (2, "8", ValueError, "alpha"),
])
def test_lora_refuses_bad_rank_and_alpha(rank, alpha, error, words):
    with pytest.raises(error, match=words):
        LoRALinear(nn.Linear(3, 3), rank, alpha)
    with pytest.raises(error, match=words):
        apply_lora(tiny_gpt(), rank=rank, alpha=alpha)


# ---------------------------------------------------------------- apply_lora, merge_lora

def test_apply_lora_keeps_the_logits_and_freezes_all_but_a_and_b():
    gpt = tiny_gpt()
    x = ids()
    with torch.no_grad():
        before = gpt(x)[0]
    out = apply_lora(gpt, rank=2, alpha=4)
    assert out is gpt
    with torch.no_grad():
        assert torch.equal(gpt(x)[0], before)
    assert sorted(n.rsplit(".", 1)[-1] for n, p in gpt.named_parameters() if p.requires_grad) == sorted(["lora_A", "lora_B"] * 8)
    trainable, total = trainable_parameters(gpt)
    assert trainable == lora_parameter_count(TINY, 2)
    assert total == trainable + sum(p.numel() for p in tiny_gpt().parameters())
    assert len(lora_layers(gpt)) == 4 * TINY.n_layer and type(gpt.lm_head) is nn.Linear


def test_apply_lora_on_the_pretrained_model():
    model = load_pretrained("shakespeare-char")[0]
    x = ids(2, 32, vocab=model.config.vocab_size)
    with torch.no_grad():
        before = model(x)[0]
        apply_lora(model, rank=8, alpha=16)
        assert torch.equal(model(x)[0], before)
    assert trainable_parameters(model)[0] == lora_parameter_count(model.config, 8) == 98_304


def test_targets_by_suffix_and_by_pattern():
    gpt = apply_lora(tiny_gpt(), rank=1, alpha=1, targets="c_fc")
    assert sorted(lora_layers(gpt)) == ["transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"]
    gpt = apply_lora(tiny_gpt(), rank=1, alpha=1, targets=("transformer.h.1.*",))
    assert sorted(lora_layers(gpt)) == [f"transformer.h.1.{n}" for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    gpt = apply_lora(tiny_gpt(), rank=1, alpha=1, targets=("c_proj",))  # both attention's and the MLP's
    assert len(lora_layers(gpt)) == 2 * TINY.n_layer
    assert DEFAULT_LORA_TARGETS == ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def test_a_target_that_matches_nothing_is_named_with_what_exists():
    with pytest.raises(ValueError, match=r"'q_proj' matches no nn.Linear; some that exist: transformer.h.0.attn.c_attn"):
        apply_lora(tiny_gpt(), targets=("c_fc", "q_proj"))
    with pytest.raises(ValueError, match="targets"):
        apply_lora(tiny_gpt(), targets=())


def test_a_tied_lm_head_is_refused_and_an_untied_one_accepted():
    with pytest.raises(ValueError, match="lm_head shares its weight"):
        apply_lora(tiny_gpt(), targets=("lm_head",))
    untied = apply_lora(tiny_gpt(tie_weights=False), rank=2, alpha=2, targets=("lm_head",))
    assert list(lora_layers(untied)) == ["lm_head"]


def test_applying_twice_is_refused_but_again_after_merging_works():
    gpt = apply_lora(tiny_gpt(), rank=2, alpha=2)
    with pytest.raises(ValueError, match="already has 8 LoRA layers"):
        apply_lora(gpt)
    merge_lora(gpt)
    assert len(lora_layers(apply_lora(gpt, rank=2, alpha=2))) == 8


def test_merge_lora_gives_plain_linears_with_the_same_logits():
    gpt = apply_lora(tiny_gpt(), rank=2, alpha=4)
    x = ids()
    _, loss = gpt(x, ids(seed=2))
    loss.backward()
    torch.optim.SGD([p for p in gpt.parameters() if p.requires_grad], lr=0.5).step()
    torch.optim.SGD([p for p in gpt.parameters() if p.requires_grad], lr=0.5).step()
    with torch.no_grad():
        adapted = gpt(x)[0]
        assert not torch.equal(adapted, tiny_gpt()(x)[0])  # training changed something
        assert merge_lora(gpt) is gpt
        assert torch.allclose(gpt(x)[0], adapted, atol=1e-5)
    assert not lora_layers(gpt)
    assert all(type(m) is nn.Linear for n, m in gpt.named_modules() if n.endswith(("c_attn", "c_proj", "c_fc")))
    assert sorted(k for k in gpt.state_dict()) == sorted(tiny_gpt().state_dict())  # loads like the original
    assert gpt.lm_head.weight is gpt.transformer.wte.weight  # the tie survives


def test_merge_lora_without_lora_layers_is_refused():
    with pytest.raises(ValueError, match="no LoRA layers"):
        merge_lora(tiny_gpt())


def test_trainable_parameters_counts_a_tied_weight_once():
    gpt = tiny_gpt()
    trainable, total = trainable_parameters(gpt)
    assert trainable == total == sum(p.numel() for n, p in gpt.named_parameters() if n != "lm_head.weight")
    gpt.transformer.wte.requires_grad_(False)
    assert trainable_parameters(gpt)[0] == total - TINY.vocab_size * TINY.n_embd


# ---------------------------------------------------------------- windows, losses, fine-tuning

def test_lm_windows_are_fixed_and_shifted():
    data = torch.arange(100)
    x, y = lm_windows(data, 8, 5)
    assert x.shape == y.shape == (5, 8)
    assert torch.equal(y, x + 1) and x[0, 0] == 0 and y[-1, -1] == 99
    assert all(torch.equal(a, b) for a, b in zip((x, y), lm_windows(data, 8, 5)))
    with pytest.raises(ValueError, match="lm_windows"):
        lm_windows(torch.arange(8), 8, 2)


def test_lm_loss_matches_the_model_and_restores_the_mode():
    gpt = tiny_gpt().train()
    windows = lm_windows(torch.randint(0, 13, (200,), generator=torch.Generator().manual_seed(0)), 8, 6)
    value = lm_loss(gpt, windows)
    assert gpt.training
    with torch.no_grad():
        assert value == pytest.approx(gpt.eval()(*windows)[1].item())


def periodic_ids(n: int = 400) -> torch.Tensor:
    return torch.tensor([0, 1, 2, 3, 4, 5, 6] * (n // 7))


@pytest.mark.parametrize("use_lora", [False, True])
def test_finetune_lm_learns_and_reports(use_lora):
    gpt = tiny_gpt()
    if use_lora:
        apply_lora(gpt, rank=4, alpha=8)
        frozen = {n: p.detach().clone() for n, p in gpt.named_parameters() if not p.requires_grad}
    data = periodic_ids()
    evals = {"held": lm_windows(data, 8, 4)}
    history, optimizer = finetune_lm(gpt, data, steps=25, batch_size=4, length=8, lr=1e-2, eval_every=10, evals=evals)
    assert history["eval_step"] == [0, 10, 20, 25] and len(history["train"]) == 25 and len(history["held"]) == 4
    assert history["held"][-1] < history["held"][0] - (0.15 if use_lora else 0.3), history["held"]  # LoRA on random weights learns slower
    assert not gpt.training
    n_trainable = trainable_parameters(gpt)[0]
    n_tensors = sum(1 for p in gpt.parameters() if p.requires_grad)
    assert optimizer_state_bytes(optimizer) == 2 * 4 * n_trainable + 4 * n_tensors  # exp_avg, exp_avg_sq, step
    if use_lora:
        assert all(torch.equal(p, frozen[n]) for n, p in gpt.named_parameters() if not p.requires_grad)
        assert n_trainable == lora_parameter_count(TINY, 4)


def test_finetune_lm_is_reproducible_with_a_seed():
    runs = [finetune_lm(tiny_gpt(), periodic_ids(), steps=5, batch_size=2, length=8, seed=3)[0]["train"] for _ in range(2)]
    assert runs[0] == runs[1]
    other = finetune_lm(tiny_gpt(), periodic_ids(), steps=5, batch_size=2, length=8, seed=4)[0]["train"]
    assert other != runs[0]


def test_finetune_lm_refuses_a_frozen_model_and_short_data():
    with pytest.raises(ValueError, match="no trainable parameters"):
        finetune_lm(tiny_gpt().requires_grad_(False), periodic_ids(), steps=1)
    with pytest.raises(ValueError, match="too few"):
        finetune_lm(tiny_gpt(), torch.arange(5), steps=1, length=8)
