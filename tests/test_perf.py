"""llmcourse.perf (Day 31): byte tables, activation and FLOP estimates against PyTorch's own counts, MFU."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from llmcourse.gpt import GPT, GPTConfig
from llmcourse.optim import AdamW
from llmcourse.perf import (
    PEAK_FLOPS,
    _training_run,
    activation_memory,
    flops_per_token,
    gpu_report_section,
    matmul_parameters,
    mfu,
    optimizer_state_bytes,
    peak_flops,
    saved_tensor_bytes,
    tensor_bytes,
    training_memory,
)

TINY = GPTConfig(vocab_size=37, block_size=32, n_layer=2, n_head=2, n_embd=32)


def batch(config: GPTConfig, B: int, T: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (B, T), generator=g), torch.randint(0, config.vocab_size, (B, T), generator=g)


@pytest.mark.parametrize(
    "precision, optimizer, parts",
    [
        ("fp32", "adamw", (4, 4, 0, 8)),
        ("mixed", "adamw", (2, 2, 4, 8)),
        ("bf16", "adamw", (2, 2, 0, 4)),
        ("fp32", "adam", (4, 4, 0, 8)),
        ("fp32", "sgd_momentum", (4, 4, 0, 4)),
        ("fp32", "sgd", (4, 4, 0, 0)),
        ("mixed", "sgd", (2, 2, 4, 0)),
    ],
)
def test_bytes_per_parameter(precision, optimizer, parts):
    one = training_memory(1, precision, optimizer)
    assert (one.weights, one.gradients, one.master_weights, one.optimizer_state) == parts
    many = training_memory(1000, precision, optimizer)
    assert many.total == 1000 * sum(parts)


def test_the_sixteen_and_the_twelve():
    assert training_memory(1).total == 16  # fp32 AdamW: 4 + 4 + 8
    mixed = training_memory(1, "mixed")
    assert mixed.total == 16 and mixed.master_weights + mixed.optimizer_state == 12  # ZeRO's K = 12
    assert training_memory(0).total == 0


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(n_params=-1), ValueError),
        (dict(n_params=1.5), TypeError),
        (dict(n_params=True), TypeError),
        (dict(n_params=10, precision="fp16"), ValueError),
        (dict(n_params=10, optimizer="lion"), ValueError),
    ],
)
def test_training_memory_rejects(kwargs, error):
    with pytest.raises(error):
        training_memory(**kwargs)


def test_tensor_bytes_counts_shared_storage_once():
    a = torch.zeros(10, 10)
    assert tensor_bytes([a, a[2:], a.view(100), a.t()]) == 400
    assert tensor_bytes([a, torch.zeros(5, dtype=torch.float16)]) == 410
    with pytest.raises(TypeError):
        tensor_bytes([a, 3])


@pytest.mark.parametrize("which", ["course", "torch"])
def test_optimizer_state_matches_the_formula(which):
    torch.manual_seed(0)
    model = GPT(TINY)
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    optimizer = AdamW(params, lr=1e-3) if which == "course" else torch.optim.AdamW(params, lr=1e-3, foreach=False)
    assert optimizer_state_bytes(optimizer) == 0  # nothing until the first step
    _, loss = model(*batch(TINY, 2, 16))
    loss.backward()
    optimizer.step()
    predicted = training_memory(n)
    assert tensor_bytes(params) == predicted.weights
    assert tensor_bytes(p.grad for p in params) == predicted.gradients
    steps = 0 if which == "course" else 4 * len(params)  # torch keeps "step" as a float32 scalar tensor per parameter
    assert optimizer_state_bytes(optimizer) == predicted.optimizer_state + steps


@pytest.mark.parametrize("B, T", [(1, 1), (2, 16), (3, 32)])
def test_activation_estimate_matches_saved_tensors(B, T):
    torch.manual_seed(0)
    model = GPT(TINY)
    idx, targets = batch(TINY, B, T)
    saved = saved_tensor_bytes(lambda: model(idx, targets), exclude=model.parameters())
    estimate = activation_memory(TINY, B, T)
    assert abs(saved / estimate.total - 1) < 0.02
    assert estimate.total == estimate.per_layer * TINY.n_layer + estimate.outside_layers


def test_activation_estimate_under_cpu_autocast():
    torch.manual_seed(0)
    model = GPT(TINY)
    idx, targets = batch(TINY, 2, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        saved = saved_tensor_bytes(lambda: model(idx, targets), exclude=model.parameters())
    predicted = activation_memory(TINY, 2, 32, dtype_bytes=2, residual_bytes=4).total + 2 * matmul_parameters(TINY)
    assert abs(saved / predicted - 1) < 0.02


def test_manual_attention_saves_more_and_is_refused_by_the_estimate():
    manual_config = GPTConfig(**{**TINY.__dict__, "implementation": "manual"})
    torch.manual_seed(0)
    fused, manual = GPT(TINY), GPT(manual_config)
    idx, targets = batch(TINY, 2, 32)
    assert saved_tensor_bytes(lambda: manual(idx, targets), exclude=manual.parameters()) > 1.5 * saved_tensor_bytes(
        lambda: fused(idx, targets), exclude=fused.parameters()
    )
    with pytest.raises(ValueError, match="fused"):
        activation_memory(manual_config, 2, 32)


@pytest.mark.parametrize(
    "args, error",
    [
        (("not a config", 1, 1), TypeError),
        ((TINY, 0, 8), ValueError),
        ((TINY, 1, 33), ValueError),
        ((TINY, 1, -4), ValueError),
        ((TINY, 1, 8.0), TypeError),
        ((TINY, 1, 8, -2), ValueError),
    ],
)
def test_activation_memory_rejects(args, error):
    with pytest.raises(error):
        activation_memory(*args)


def test_flops_per_token_closed_form():
    gpt2 = GPTConfig()
    N = 12 * 12 * 768 * 768 + 768 * 50257
    assert matmul_parameters(gpt2) == N
    assert flops_per_token(gpt2, 1024) == 6 * N + 12 * 12 * 1024 * 768
    assert flops_per_token(gpt2, 1024, attention=False) == 6 * N
    for bad, error in ((0, ValueError), (1025, ValueError), (-1, ValueError), (2.0, TypeError)):
        with pytest.raises(error):
            flops_per_token(gpt2, bad)
    with pytest.raises(TypeError):
        matmul_parameters("gpt2")


@pytest.mark.parametrize("T", [8, 32])
def test_flops_per_token_matches_flop_counter(T):
    """The manual model's attention is two visible bmm's: FlopCounterMode counts exactly 6N + 12LTC per token."""
    torch.manual_seed(0)
    manual = GPT(GPTConfig(**{**TINY.__dict__, "implementation": "manual"}))
    fused = GPT(TINY)
    idx, targets = batch(TINY, 2, T)
    counted = {}
    for name, model in (("manual", manual), ("fused", fused)):
        with FlopCounterMode(display=False) as counter:
            _, loss = model(idx, targets)
            loss.backward()
        counted[name] = counter.get_total_flops()
    tokens = 2 * T
    assert counted["manual"] == flops_per_token(TINY, T) * tokens
    # the fused count includes the attention term where the counter knows the SDPA kernel, and not where it does not
    assert counted["fused"] in (flops_per_token(TINY, T) * tokens, flops_per_token(TINY, T, attention=False) * tokens)


def test_mfu_arithmetic_and_errors():
    assert mfu(1000.0, 1e9, 1e13) == pytest.approx(0.1)
    assert mfu(0, 1e9, 1e12) == 0
    assert mfu(2, 3, 12) == 0.5
    for args, error in (
        ((-1.0, 1e9, 1e12), ValueError),
        ((1.0, 0, 1e12), ValueError),
        ((1.0, 1e9, -5), ValueError),
        ((1.0, 1e9, float("inf")), TypeError),
        (("fast", 1e9, 1e12), TypeError),
        ((True, 1e9, 1e12), TypeError),
    ):
        with pytest.raises(error):
            mfu(*args)


def test_peak_flops_table_and_lookup():
    assert PEAK_FLOPS["T4"] == (65e12, "fp16")
    assert PEAK_FLOPS["A100"] == (312e12, "bf16")
    assert PEAK_FLOPS["H100"] == PEAK_FLOPS["H200"] == (989e12, "bf16")
    assert peak_flops("Tesla T4") == (65e12, "fp16")
    assert peak_flops("NVIDIA A100-SXM4-40GB") == (312e12, "bf16")
    assert peak_flops("NVIDIA H100 80GB HBM3") == (989e12, "bf16")
    assert peak_flops("NVIDIA H100 PCIe") == (756e12, "bf16")  # the longest matching key wins
    assert peak_flops("NVIDIA H200") == (989e12, "bf16")
    assert peak_flops("NVIDIA GeForce RTX 4090") is None
    with pytest.raises(TypeError):
        peak_flops(None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_report_section_refuses_without_cuda():
    with pytest.raises(RuntimeError, match="CUDA"):
        gpu_report_section()
    with pytest.raises(RuntimeError, match="CUDA"):
        gpu_report_section(torch.device("cuda"))


def test_gpu_report_section_refuses_a_cpu_device():
    with pytest.raises(ValueError, match="cpu"):
        gpu_report_section("cpu")


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_training_run_predictions_hold_on_the_cpu(dtype):
    """The report's measuring loop, run on the CPU with a tiny model: its activation prediction is exact here."""
    run = _training_run(TINY, 2, 32, torch.device("cpu"), dtype, steps=2)
    assert run["dtype"] == ("fp32" if dtype is None else "bfloat16")
    assert abs(run["measured_activation_bytes"] / run["predicted_activation_bytes"] - 1) < 0.02
    n = sum(p.numel() for p in GPT(TINY).parameters())
    assert run["predicted_persistent_bytes"] == 16 * n
    assert run["predicted_peak_bytes"] == run["predicted_persistent_bytes"] + run["predicted_activation_bytes"]
    assert run["max_memory_allocated"] is None and run["tokens_per_s"] > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_report_section_on_a_gpu():
    section = gpu_report_section("cuda", steps=1)
    assert section["flops_per_token"] == flops_per_token(GPTConfig(vocab_size=50304), 1024)
    assert len(section["runs"]) == 2
    for run in section["runs"].values():
        assert abs(run["measured_persistent_bytes"] / run["predicted_persistent_bytes"] - 1) < 0.05
        assert abs(run["measured_activation_bytes"] / run["predicted_activation_bytes"] - 1) < 0.1
        assert run["max_memory_allocated"] >= run["measured_persistent_bytes"]
        assert run["tokens_per_s"] > 0 and (run["mfu"] is None or 0 < run["mfu"] < 1)
