"""Tests for llmcourse.gpt (Day 18): GPTConfig, GPT, initialization, tying, counting, from_hf."""

import dataclasses
import math

import pytest
import torch

from llmcourse.gpt import GPT, GPTConfig
from llmcourse.linear import count_parameters
from llmcourse.loss import cross_entropy

SMALL = GPTConfig(vocab_size=97, block_size=16, n_layer=2, n_head=2, n_embd=32)


@pytest.fixture(scope="module")
def transformers():
    import transformers  # slow to import (seconds): only the from_hf tests pay for it

    return transformers


def tiny_hf(transformers, **overrides):
    torch.manual_seed(0)
    settings = dict(n_layer=2, n_head=2, n_embd=32, vocab_size=100, n_positions=64, bos_token_id=0, eos_token_id=0)
    settings.update(overrides)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**settings)).eval()
    with torch.no_grad():  # move every weight far from its tiny initial value, so that each one matters
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


# ------------------------------------------------------------------------------------------ config
def test_config_defaults_are_gpt2_small():
    c = GPTConfig()
    assert (c.vocab_size, c.block_size, c.n_layer, c.n_head, c.n_embd) == (50257, 1024, 12, 12, 768)
    assert (c.dropout, c.bias, c.tie_weights) == (0.0, True, True)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(vocab_size=0), ValueError, "vocab_size"),
        (dict(block_size=-1), ValueError, "block_size"),
        (dict(n_layer=2.0), TypeError, "n_layer"),
        (dict(n_embd=100, n_head=12), ValueError, "divisible"),
        (dict(dropout=1.0), ValueError, "dropout"),
        (dict(bias="yes"), TypeError, "bias"),
        (dict(tie_weights=1), TypeError, "tie_weights"),
        (dict(implementation="flash"), ValueError, "implementation"),
        (dict(gelu_approximate="fast"), ValueError, "gelu_approximate"),
        (dict(layer_norm_eps=0.0), ValueError, "layer_norm_eps"),
    ],
)
def test_config_validation(kwargs, error, match):
    with pytest.raises(error, match=match):
        GPTConfig(**kwargs)


def test_gpt_needs_a_config():
    with pytest.raises(TypeError, match="GPTConfig"):
        GPT(dict(vocab_size=10))


# ---------------------------------------------------------------------------------------- counting
def test_gpt2_small_has_124_439_808_parameters():
    with torch.device("meta"):
        model = GPT(GPTConfig())
    assert count_parameters(model) == 124_439_808
    assert sum(model.parameter_table().values()) == 124_439_808
    with torch.device("meta"):
        untied = GPT(GPTConfig(tie_weights=False))
    assert count_parameters(untied) == 124_439_808 + 50257 * 768


def test_parameter_table_components():
    model = GPT(SMALL)
    t = model.parameter_table()
    V, T, L, C = 97, 16, 2, 32
    assert t == {
        "token embedding (wte)": V * C,
        "position embedding (wpe)": T * C,
        "attention": L * (4 * C * C + 4 * C),
        "mlp": L * (8 * C * C + 5 * C),
        "layer norms": L * 4 * C + 2 * C,
        "lm head": 0,
    }
    untied = GPT(dataclasses.replace(SMALL, tie_weights=False))
    assert untied.parameter_table()["lm head"] == V * C
    assert sum(untied.parameter_table().values()) == count_parameters(untied)


# -------------------------------------------------------------------------------- init and tying
def test_module_names():
    model = GPT(SMALL)
    for name in ["wte", "wpe", "drop", "h", "ln_f"]:
        assert name in model.transformer
    assert len(model.transformer.h) == 2 and model.lm_head.bias is None


def test_weight_tying_shares_the_tensor():
    model = GPT(SMALL)
    assert model.lm_head.weight is model.transformer.wte.weight
    untied = GPT(dataclasses.replace(SMALL, tie_weights=False))
    assert untied.lm_head.weight is not untied.transformer.wte.weight


def test_tied_gradient_is_the_sum_and_a_step_moves_both():
    torch.manual_seed(0)
    tied = GPT(SMALL)
    untied = GPT(dataclasses.replace(SMALL, tie_weights=False))
    untied.load_state_dict(tied.state_dict())
    idx = torch.randint(97, (2, 16))
    tgt = torch.randint(97, (2, 16))
    tied(idx, tgt)[1].backward()
    untied(idx, tgt)[1].backward()
    torch.testing.assert_close(tied.lm_head.weight.grad, untied.lm_head.weight.grad + untied.transformer.wte.weight.grad)
    before = tied.lm_head.weight.detach().clone()
    torch.optim.SGD(tied.parameters(), lr=1.0).step()
    assert not torch.equal(tied.transformer.wte.weight, before)
    assert tied.lm_head.weight is tied.transformer.wte.weight


def test_init_standard_deviations():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=2000, block_size=256, n_layer=8, n_head=4, n_embd=256)
    model = GPT(cfg)
    proj = 0.02 / math.sqrt(2 * 8)
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):
            assert abs(p.std().item() / proj - 1) < 0.05, name
        elif name.endswith(("wte.weight", "wpe.weight", "c_attn.weight", "c_fc.weight")):
            assert abs(p.std().item() / 0.02 - 1) < 0.05, name
            assert abs(p.mean().item()) < 0.002, name
        elif "ln_" in name and name.endswith(".weight"):
            assert torch.equal(p, torch.ones_like(p)), name
        elif name.endswith(".bias"):
            assert torch.equal(p, torch.zeros_like(p)), name
        else:
            raise AssertionError(f"unexpected parameter {name}")


def test_initial_loss_is_near_ln_v():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=500, block_size=32, n_layer=3, n_head=4, n_embd=64)
    model = GPT(cfg)
    idx = torch.randint(500, (8, 32))
    tgt = torch.randint(500, (8, 32))
    logits, loss = model(idx, tgt)
    assert abs(loss.item() - math.log(500)) < 0.05
    torch.testing.assert_close(loss, cross_entropy(logits, tgt))


def test_ignore_index_and_no_targets():
    model = GPT(SMALL)
    idx = torch.randint(97, (2, 8))
    tgt = torch.randint(97, (2, 8))
    logits, loss = model(idx)
    assert logits.shape == (2, 8, 97) and loss is None
    masked = tgt.clone()
    masked[:, :4] = -100
    _, loss_masked = model(idx, masked)
    expected = torch.nn.functional.cross_entropy(logits[:, 4:].reshape(-1, 97), tgt[:, 4:].reshape(-1))
    torch.testing.assert_close(loss_masked, expected)


# ------------------------------------------------------------------------------------- behaviour
@pytest.mark.parametrize("implementation", ["fused", "manual"])
def test_whole_model_is_causal(implementation):
    torch.manual_seed(0)
    model = GPT(dataclasses.replace(SMALL, implementation=implementation)).eval()
    idx = torch.randint(97, (2, 16))
    with torch.no_grad():
        base = model(idx)[0]
        for t in [0, 5, 15]:
            changed = idx.clone()
            changed[:, t:] = (changed[:, t:] + 1) % 97
            out = model(changed)[0]
            torch.testing.assert_close(out[:, :t], base[:, :t])
            assert not torch.allclose(out[:, t:], base[:, t:])


def test_implementations_agree():
    torch.manual_seed(0)
    a = GPT(SMALL).eval()
    b = GPT(dataclasses.replace(SMALL, implementation="manual")).eval()
    b.load_state_dict(a.state_dict())
    idx = torch.randint(97, (2, 16))
    torch.testing.assert_close(a(idx)[0], b(idx)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
def test_fused_and_manual_agree_in_loss_and_every_gradient(bias):
    """The one switch: PyTorch's kernels and the course's code train the same model."""
    torch.manual_seed(0)
    config = dataclasses.replace(SMALL, bias=bias)
    fused = GPT(config).train()
    manual = GPT(dataclasses.replace(config, implementation="manual")).train()
    manual.load_state_dict(fused.state_dict())
    idx, targets = torch.randint(97, (3, 16)), torch.randint(97, (3, 16))
    targets[0, :4] = -100  # ignored positions, in both losses
    results = []
    for model in (fused, manual):
        logits, loss = model(idx, targets)
        loss.backward()
        results.append((logits, loss, {n: p.grad for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-5)
    for name, grad in results[0][2].items():
        torch.testing.assert_close(grad, results[1][2][name], rtol=1e-4, atol=1e-5, msg=name)


def test_every_layer_follows_the_switch():
    from llmcourse.mha import CausalSelfAttention
    from llmcourse.mlp import MLP, Dropout
    from llmcourse.norms import LayerNorm

    for implementation in ("fused", "manual"):
        model = GPT(dataclasses.replace(SMALL, dropout=0.1, implementation=implementation))
        layers = [m for m in model.modules() if isinstance(m, (CausalSelfAttention, MLP, Dropout, LayerNorm))]
        assert len(layers) == 1 + 2 * (4 + 1) + 1  # drop; per block ln_1, ln_2, attn, mlp, mlp.dropout; ln_f
        assert {m.implementation for m in layers} == {implementation}


@pytest.mark.parametrize("implementation", ["fused", "manual"])
def test_forward_loss_and_backward_read_no_value_back(implementation, no_value_reads):
    """No host synchronization: nothing in a training step's forward, loss or backward reads a tensor value."""
    torch.manual_seed(0)
    model = GPT(dataclasses.replace(SMALL, dropout=0.1, implementation=implementation)).train()
    idx, targets = torch.randint(97, (2, 16)), torch.randint(97, (2, 16))
    with no_value_reads():
        _, loss = model(idx, targets)
        loss.backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("implementation", ["fused", "manual"])
def test_no_graph_breaks_under_dynamo(implementation):
    """torch.compile can take the whole forward with targets as one graph."""
    import torch._dynamo

    torch._dynamo.reset()
    model = GPT(dataclasses.replace(SMALL, dropout=0.1, implementation=implementation)).train()
    idx, targets = torch.randint(97, (2, 16)), torch.randint(97, (2, 16))
    explanation = torch._dynamo.explain(model)(idx, targets)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_position_vectors_are_the_first_rows_of_wpe():
    """wpe.weight[:T] gives the values and gradients of the lookup wpe(arange(T))."""
    torch.manual_seed(0)
    model = GPT(SMALL)
    idx = torch.randint(97, (2, 10))
    model(idx)[0].pow(2).mean().backward()
    grad_slice = model.transformer.wpe.weight.grad.clone()
    model.zero_grad()
    x = model.transformer.wte(idx) + model.transformer.wpe(torch.arange(10))
    for block in model.transformer.h:
        x = block(x)
    model.lm_head(model.transformer.ln_f(x)).pow(2).mean().backward()
    torch.testing.assert_close(model.transformer.wpe.weight.grad, grad_slice)
    assert not grad_slice[10:].any()  # positions beyond T get no gradient


def test_errors_for_long_sequences_and_bad_ids():
    model = GPT(SMALL)
    with pytest.raises(ValueError, match=r"17.*block_size 16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token id 97 in idx.*\[0, 96\]"):
        model(torch.tensor([[0, 97]]))
    with pytest.raises(ValueError, match=r"token id -1 in idx.*\[0, 96\]"):
        model(torch.tensor([[-1, 3]]))
    manual = GPT(dataclasses.replace(SMALL, implementation="manual"))
    with pytest.raises(ValueError, match="target 97 is outside"):
        manual(torch.zeros(1, 4, dtype=torch.long), torch.tensor([[1, 2, 97, 3]]))
    with pytest.raises(IndexError, match="97"):  # the fused loss: PyTorch's own message names it too
        model(torch.zeros(1, 4, dtype=torch.long), torch.tensor([[1, 2, 97, 3]]))
    with pytest.raises(TypeError, match="int64"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        model(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="shape of idx"):
        model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="targets"):
        model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4))


def test_int32_ids_and_full_block_size():
    model = GPT(SMALL).eval()
    idx = torch.randint(97, (1, 16))
    torch.testing.assert_close(model(idx.int())[0], model(idx)[0])


# --------------------------------------------------------------------------------------- from_hf
def test_from_hf_logits_equal_transformers(transformers):
    hf = tiny_hf(transformers)
    model = GPT.from_hf(hf).eval()
    assert model.config.gelu_approximate == "tanh" and model.config.tie_weights
    assert model.lm_head.weight is model.transformer.wte.weight
    assert count_parameters(model) == hf.num_parameters()
    idx = torch.randint(100, (3, 64))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], hf(idx).logits, rtol=0, atol=1e-5)
    # loss agrees too (transformers shifts the labels itself)
    with torch.no_grad():
        _, loss = model(idx[:, :-1], idx[:, 1:])
        torch.testing.assert_close(loss, hf(idx, labels=idx).loss, rtol=0, atol=1e-5)


def test_from_hf_untied_and_manual_attention(transformers):
    hf = tiny_hf(transformers, tie_word_embeddings=False, layer_norm_epsilon=1e-6)
    model = GPT.from_hf(hf, implementation="manual").eval()
    assert not model.config.tie_weights and model.config.layer_norm_eps == 1e-6
    torch.testing.assert_close(model.lm_head.weight, hf.lm_head.weight)
    idx = torch.randint(100, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], hf(idx).logits, rtol=0, atol=1e-5)


def test_from_hf_errors(transformers):
    with pytest.raises(TypeError, match="GPT2LMHeadModel"):
        GPT.from_hf(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="activation_function"):
        GPT.from_hf(tiny_hf(transformers, activation_function="relu"))
    with pytest.raises(ValueError, match="n_inner"):
        GPT.from_hf(tiny_hf(transformers, n_inner=64))
