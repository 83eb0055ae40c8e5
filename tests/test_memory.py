"""llmcourse.memory (Day 34): gradient accumulation equals the big batch; activation checkpointing saves memory, not accuracy."""

import copy
import pickle

import pytest
import torch

from llmcourse.block import Block
from llmcourse.gpt import GPT, GPTConfig
from llmcourse.memory import (
    IGNORE_INDEX,
    CheckpointedBlock,
    accumulate_gradients,
    accumulation_step,
    activation_checkpointing_enabled,
    checkpointed_activation_memory,
    checkpointing_tradeoff,
    disable_activation_checkpointing,
    enable_activation_checkpointing,
    gpu_report_section,
    memory_benchmarks,
    split_batch,
)
from llmcourse.optim import configure_optimizer
from llmcourse.perf import activation_memory, saved_tensor_bytes

TINY = GPTConfig(vocab_size=37, block_size=16, n_layer=2, n_head=2, n_embd=32)


def batch(B: int = 8, T: int = 16, seed: int = 0, config: GPTConfig = TINY) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (B, T), generator=g), torch.randint(0, config.vocab_size, (B, T), generator=g)


def model(config: GPTConfig = TINY, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(config)


def grads(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in m.named_parameters()}


def all_close(a: dict, b: dict, rtol: float = 1e-5, atol: float = 1e-7) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[n], b[n], rtol=rtol, atol=atol) for n in a)


# --- split_batch ---------------------------------------------------------------------------------


def test_split_batch_gives_equal_views_in_order():
    x, y = batch(8)
    parts = split_batch(x, y, 4)
    assert len(parts) == 4 and all(a.shape == (2, 16) and b.shape == (2, 16) for a, b in parts)
    assert torch.equal(torch.cat([a for a, _ in parts]), x) and torch.equal(torch.cat([b for _, b in parts]), y)
    assert all(a.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() for a, _ in parts)
    assert len(split_batch(x, y, 1)) == 1 and len(split_batch(x, y, 8)) == 8


@pytest.mark.parametrize(
    "steps, error, words",
    [(3, ValueError, "batch size 8 is not divisible by steps=3"), (0, ValueError, "steps must be >= 1, got 0"),
     (-2, ValueError, "got -2"), (2.0, TypeError, "steps must be an int"), (True, TypeError, "steps must be an int")],
)
def test_split_batch_refuses_with_one_line(steps, error, words):
    x, y = batch(8)
    with pytest.raises(error, match=words) as info:
        split_batch(x, y, steps)
    assert "\n" not in str(info.value)


def test_split_batch_refuses_mismatched_inputs():
    x, y = batch(8)
    with pytest.raises(ValueError, match="one shape"):
        split_batch(x, y[:4], 2)
    with pytest.raises(TypeError, match="must be tensors"):
        split_batch(x.tolist(), y, 2)


# --- accumulation --------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [2, 4, 8])
@pytest.mark.parametrize("weighting", ["tokens", "mean"])
def test_accumulated_gradients_equal_the_big_batch(steps, weighting):
    x, y = batch(8)
    big = model()
    accum = copy.deepcopy(big)
    _, loss = big(x, y)
    loss.backward()
    accumulated = accumulate_gradients(accum, split_batch(x, y, steps), weighting=weighting)
    assert accumulated.shape == () and not accumulated.requires_grad
    assert torch.allclose(accumulated, loss.detach(), atol=1e-6)
    assert all_close(grads(big), grads(accum))


def test_accumulation_adds_to_existing_gradients():
    x, y = batch(8)
    m = model()
    accumulate_gradients(m, split_batch(x, y, 2))
    once = grads(m)
    accumulate_gradients(m, split_batch(x, y, 2))
    assert all_close({n: 2 * g for n, g in once.items()}, grads(m))


def test_accumulation_steps_follow_the_big_batch():
    a = model()
    b = copy.deepcopy(a)
    opt_a, opt_b = configure_optimizer(a, lr=1e-3), configure_optimizer(b, lr=1e-3)
    for seed in range(3):
        x, y = batch(8, seed=seed)
        loss_a, norm_a = accumulation_step(a, opt_a, x, y, 1, grad_clip=0.5)
        loss_b, norm_b = accumulation_step(b, opt_b, x, y, 4, grad_clip=0.5)
        assert torch.allclose(loss_a, loss_b, atol=1e-6) and torch.allclose(norm_a, norm_b, rtol=1e-5)
    for name, p in a.named_parameters():  # AdamW magnifies the rounding of near-zero gradients: 1% of a step
        assert torch.allclose(p, b.get_parameter(name), rtol=1e-5, atol=1e-5), name
    assert not torch.equal(a.lm_head.weight, model().lm_head.weight)


def test_accumulation_step_equals_plain_step_with_sgd_exactly_enough():
    a = model()
    b = copy.deepcopy(a)
    opt_a, opt_b = torch.optim.SGD(a.parameters(), lr=0.1), torch.optim.SGD(b.parameters(), lr=0.1)
    x, y = batch(8)
    accumulation_step(a, opt_a, x, y, 1, grad_clip=0)
    accumulation_step(b, opt_b, x, y, 4, grad_clip=0)
    for name, p in a.named_parameters():  # no amplification: the tight tolerance of the gradients holds
        assert torch.allclose(p, b.get_parameter(name), rtol=1e-5, atol=1e-7), name


def test_token_weighting_is_needed_when_counts_differ():
    x, y = batch(8)
    y = y.clone()
    y[:2, 4:] = IGNORE_INDEX  # the first micro-batch counts 2 x 4 targets, the others 2 x 16
    big = model()
    by_tokens, by_mean = copy.deepcopy(big), copy.deepcopy(big)
    _, loss = big(x, y)
    loss.backward()
    token_loss = accumulate_gradients(by_tokens, split_batch(x, y, 4), weighting="tokens")
    mean_loss = accumulate_gradients(by_mean, split_batch(x, y, 4), weighting="mean")
    assert torch.allclose(token_loss, loss.detach(), atol=1e-6) and all_close(grads(big), grads(by_tokens))
    assert not torch.allclose(mean_loss, loss.detach(), atol=1e-4) and not all_close(grads(big), grads(by_mean))


def test_accumulation_reads_nothing_back(no_value_reads):
    x, y = batch(8)
    y = y.clone()
    y[0, :3] = IGNORE_INDEX
    m = model()
    opt = configure_optimizer(m, lr=1e-3)
    with no_value_reads():
        loss, norm = accumulation_step(m, opt, x, y, 4)
    assert torch.isfinite(loss) and torch.isfinite(norm)


def test_accumulation_refuses_bad_arguments():
    x, y = batch(8)
    m = model()
    with pytest.raises(ValueError, match="weighting must be one of"):
        accumulate_gradients(m, split_batch(x, y, 2), weighting="sum")
    with pytest.raises(ValueError, match="at least one micro-batch"):
        accumulate_gradients(m, [])
    with pytest.raises(ValueError, match="grad_clip must be a number >= 0"):
        accumulation_step(m, configure_optimizer(m, lr=1e-3), x, y, 2, grad_clip=-1.0)


def test_accumulation_under_autocast_with_a_scaler():
    x, y = batch(8)
    a = model()
    b = copy.deepcopy(a)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    opt_a, opt_b = torch.optim.SGD(a.parameters(), lr=0.1), torch.optim.SGD(b.parameters(), lr=0.1)
    accumulation_step(a, opt_a, x, y, 1, dtype=torch.bfloat16, scaler=torch.amp.GradScaler("cpu", enabled=False))
    loss, _ = accumulation_step(b, opt_b, x, y, 2, dtype=torch.bfloat16, scaler=scaler)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    for name, p in a.named_parameters():  # bf16 forward passes: same step within bf16's precision
        assert torch.allclose(p, b.get_parameter(name), rtol=1e-2, atol=1e-3), name


# --- activation checkpointing --------------------------------------------------------------------


def test_checkpointing_keeps_names_and_gives_equal_gradients():
    x, y = batch(8)
    plain = model()
    ckpt = copy.deepcopy(plain)
    assert enable_activation_checkpointing(ckpt) == TINY.n_layer
    assert all(type(b) is CheckpointedBlock and isinstance(b, Block) for b in ckpt.transformer.h)
    assert list(plain.state_dict()) == list(ckpt.state_dict())
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in ckpt.named_parameters()]
    plain(x, y)[1].backward()
    ckpt(x, y)[1].backward()
    g_plain, g_ckpt = grads(plain), grads(ckpt)
    assert all(torch.equal(g_plain[n], g_ckpt[n]) for n in g_plain)  # the same kernels on the same inputs


def test_checkpointing_repeats_dropout_masks():
    config = GPTConfig(**{**TINY.__dict__, "dropout": 0.2})
    x, y = batch(8)
    plain = model(config)
    ckpt = copy.deepcopy(plain)
    enable_activation_checkpointing(ckpt)
    torch.manual_seed(5)
    plain(x, y)[1].backward()
    torch.manual_seed(5)
    ckpt(x, y)[1].backward()
    assert all_close(grads(plain), grads(ckpt), atol=1e-6)


def test_enable_disable_round_trip():
    m = model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    assert not activation_checkpointing_enabled(m)
    assert enable_activation_checkpointing(m) == 2 and activation_checkpointing_enabled(m)
    assert enable_activation_checkpointing(m) == 2  # twice does no harm
    assert disable_activation_checkpointing(m) == 2 and not activation_checkpointing_enabled(m)
    assert disable_activation_checkpointing(m) == 0
    assert all(type(b) is Block for b in m.transformer.h)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_checkpointed_model_copies_pickles_and_loads_plain_weights():
    m = model()
    enable_activation_checkpointing(m)
    clone = pickle.loads(pickle.dumps(m))
    assert activation_checkpointing_enabled(clone) and activation_checkpointing_enabled(copy.deepcopy(m))
    plain = GPT(TINY)
    plain.load_state_dict(m.state_dict())  # a checkpointed model's weights load into a plain GPT
    x, _ = batch(2)
    with torch.no_grad():
        assert torch.equal(plain(x)[0], m(x)[0])


def test_checkpointing_refuses_models_without_blocks():
    with pytest.raises(ValueError, match="has no transformer Block"):
        enable_activation_checkpointing(torch.nn.Linear(3, 3))
    with pytest.raises(TypeError, match="expected an nn.Module"):
        enable_activation_checkpointing("gpt")


@pytest.mark.parametrize("T", [4, 16])
def test_checkpointing_saves_memory_as_predicted(T):
    config = GPTConfig(vocab_size=37, block_size=16, n_layer=4, n_head=2, n_embd=32)
    x, y = batch(4, T, config=config)
    m = model(config)
    plain_bytes = saved_tensor_bytes(lambda: m(x, y), exclude=m.parameters())
    enable_activation_checkpointing(m)
    ckpt_bytes = saved_tensor_bytes(lambda: m(x, y), exclude=m.parameters())
    assert plain_bytes == activation_memory(config, 4, T).total
    assert ckpt_bytes == checkpointed_activation_memory(config, 4, T).total
    blocks = activation_memory(config, 4, T).per_layer * config.n_layer
    assert plain_bytes - ckpt_bytes > 0.5 * blocks


def test_no_grad_runs_plainly():
    m = model()
    enable_activation_checkpointing(m)
    x, _ = batch(2)
    with torch.no_grad():
        logits, _ = m(x)
    assert logits.shape == (2, 16, TINY.vocab_size) and not logits.requires_grad


def test_checkpointing_tradeoff_measures_both_and_restores_state():
    x, y = batch(4)
    m = model()
    result = checkpointing_tradeoff(m, x, y, repeats=1, warmup=0)
    assert set(result) == {"plain", "checkpointed"}
    assert result["checkpointed"]["saved_bytes"] < result["plain"]["saved_bytes"]
    assert all(r["step_seconds"] > 0 and r["max_memory_allocated"] is None for r in result.values())
    assert not activation_checkpointing_enabled(m) and all(p.grad is None for p in m.parameters())
    enable_activation_checkpointing(m)
    checkpointing_tradeoff(m, x, y, repeats=1, warmup=0)
    assert activation_checkpointing_enabled(m)
    with pytest.raises(ValueError, match="repeats must be an int >= 1"):
        checkpointing_tradeoff(m, x, y, repeats=0)


# --- the GPU report --------------------------------------------------------------------------------


def test_memory_benchmarks_run_on_the_cpu():
    config = GPTConfig(vocab_size=37, block_size=16, n_layer=2, n_head=2, n_embd=32)
    result = memory_benchmarks("cpu", config, batch_size=4, steps=2, repeats=1, warmup=0, dtype=torch.float32)
    assert set(result["runs"]) == {"one_batch", "checkpointing", "accumulation", "accumulation_checkpointing"}
    assert result["checks"]["checkpointing_bitwise_equal"] and result["checks"]["accumulation_max_relative_difference"] < 1e-5
    assert all(r["max_memory_allocated"] is None and r["median_step_ms"] > 0 for r in result["runs"].values())
    assert result["runs"]["accumulation"]["micro_batches"] == 2 and result["dtype"] == "float32"


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the section measures for real")
def test_gpu_report_section_refuses_without_cuda():
    with pytest.raises(RuntimeError, match="needs a CUDA GPU") as info:
        gpu_report_section()
    assert "\n" not in str(info.value)
