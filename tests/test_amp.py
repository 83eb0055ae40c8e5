"""Tests of llmcourse.amp (Day 32): formats, the dtype rule, resolve_dtype, the GradScaler step, bf16 training."""

from __future__ import annotations

import math

import pytest
import torch

from llmcourse.amp import (
    DTYPES,
    amp_dtype_for_capability,
    amp_train_step,
    autocast_context,
    bit_pattern,
    choose_amp_dtype,
    describe_format,
    gpu_report_section,
    make_grad_scaler,
    precision_comparison,
    resolve_dtype,
    small_gpt,
    train_precision,
)
from llmcourse.optim import configure_optimizer


@pytest.fixture
def fake_gpu(monkeypatch):
    """Pretend CUDA is here with a chosen compute capability (nothing runs on it)."""

    def install(capability: tuple[int, int]) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)

    return install


def test_describe_format_matches_ieee():
    assert describe_format(torch.float32)["exponent_bits"] == 8 and describe_format(torch.float32)["mantissa_bits"] == 23
    assert describe_format(torch.float16) == {"bits": 16, "exponent_bits": 5, "mantissa_bits": 10, "max": 65504.0, "tiny": 2.0**-14, "eps": 2.0**-10}
    assert describe_format(torch.bfloat16)["mantissa_bits"] == 7 and describe_format(torch.bfloat16)["eps"] == 2.0**-7
    with pytest.raises(TypeError):
        describe_format(torch.int32)


def test_bit_pattern():
    assert bit_pattern(1.0, torch.float16) == "0 01111 0000000000"
    assert bit_pattern(-2.0, torch.float32) == "1 10000000 " + "0" * 23
    assert bit_pattern(-2.5, torch.bfloat16) == "1 10000000 0100000"
    with pytest.raises(TypeError):
        bit_pattern(1.0, torch.float64)


@pytest.mark.parametrize("capability, expected", [((7, 0), torch.float16), ((7, 5), torch.float16), ((8, 0), torch.bfloat16),
                                                  ((8, 6), torch.bfloat16), ((8, 9), torch.bfloat16), ((9, 0), torch.bfloat16),
                                                  ((10, 0), torch.bfloat16)])
def test_dtype_by_capability(capability, expected):
    assert amp_dtype_for_capability(*capability) == expected


def test_dtype_by_capability_refuses_nonsense():
    for bad in ((-1, 0), (8.0, 0), (True, 0)):
        with pytest.raises(ValueError, match="compute capability"):
            amp_dtype_for_capability(*bad)


def test_choose_amp_dtype_cpu_and_fake_gpus(fake_gpu):
    assert choose_amp_dtype("cpu") == choose_amp_dtype(torch.device("cpu")) == torch.bfloat16
    fake_gpu((7, 5))  # a T4: torch.cuda.is_bf16_supported() would say True here, the rule says float16
    assert choose_amp_dtype("cuda") == torch.float16
    fake_gpu((8, 0))
    assert choose_amp_dtype("cuda:0") == torch.bfloat16
    with pytest.raises(ValueError, match="no mixed-precision rule"):
        choose_amp_dtype("meta")


def test_choose_amp_dtype_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available"):
        choose_amp_dtype("cuda")


def test_resolve_dtype(fake_gpu):
    assert resolve_dtype("float32", "cpu") == torch.float32
    assert resolve_dtype("auto", "cpu") == resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    assert resolve_dtype("float16", "cpu") == torch.float16  # allowed: CPU autocast and GradScaler support it
    assert resolve_dtype("auto", "mps") == resolve_dtype("float32", "mps") == torch.float32
    fake_gpu((7, 5))
    assert resolve_dtype("auto", "cuda") == resolve_dtype("float16", "cuda") == torch.float16
    with pytest.raises(ValueError, match="compute capability 8.0") as err:
        resolve_dtype("bfloat16", "cuda")
    assert "7.5" in str(err.value) and "\n" not in str(err.value)
    fake_gpu((9, 0))
    assert resolve_dtype("auto", "cuda") == resolve_dtype("bfloat16", "cuda") == torch.bfloat16


@pytest.mark.parametrize("name, device, message", [("half", "cpu", "got 'half'"), ("fp16", "cpu", "auto"),
                                                   ("bfloat16", "mps", "use float32"), ("float16", "mps", "use float32")])
def test_resolve_dtype_errors(name, device, message):
    with pytest.raises(ValueError, match=message) as err:
        resolve_dtype(name, device)
    assert "\n" not in str(err.value)


def test_resolve_dtype_refuses_cuda_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_dtype("float16", "cuda")
    assert resolve_dtype("float32", "cuda") == torch.float32


def test_scaler_enabled_only_for_float16():
    assert make_grad_scaler("cpu", torch.float16).is_enabled()
    assert not make_grad_scaler("cpu", torch.bfloat16).is_enabled()
    assert not make_grad_scaler("cpu", torch.float32).is_enabled()
    assert make_grad_scaler("cpu", torch.float16, init_scale=2.0**10).get_scale() == 2.0**10
    with pytest.raises(ValueError):
        make_grad_scaler("cpu", torch.float64)
    with pytest.raises(ValueError, match="init_scale"):
        make_grad_scaler("cpu", torch.float16, init_scale=0.0)


def test_autocast_runs_matmuls_in_16_bits_and_keeps_the_loss_in_float32():
    layer = torch.nn.Linear(8, 4)
    x = torch.randn(3, 8)
    for dtype in (torch.bfloat16, torch.float16):
        with autocast_context("cpu", dtype):
            out = layer(x)
            assert out.dtype == dtype and (x @ x.T).dtype == dtype
            assert torch.nn.functional.cross_entropy(out, torch.tensor([0, 1, 2])).dtype == torch.float32
    with autocast_context("cpu", torch.float32):
        assert layer(x).dtype == torch.float32
    assert layer.weight.dtype == torch.float32
    with pytest.raises(ValueError):
        autocast_context("cpu", torch.float64)
    with pytest.raises(ValueError, match="use torch.float32"):
        autocast_context("mps", torch.bfloat16)


def test_gpt_forward_under_bf16_autocast():
    model = small_gpt(20, block_size=8, n_layer=1, n_head=2, n_embd=16)
    idx = torch.randint(0, 20, (2, 8))
    with autocast_context("cpu", torch.bfloat16):
        logits, loss = model(idx, idx)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32 and torch.isfinite(loss)


def _tiny_setup(init_scale: float, dtype: torch.dtype = torch.float16):
    model = small_gpt(20, block_size=8, n_layer=1, n_head=2, n_embd=16)
    optimizer = configure_optimizer(model, lr=1e-2)
    scaler = make_grad_scaler("cpu", dtype, init_scale=init_scale)
    generator = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 20, (4, 8), generator=generator)
    return model, optimizer, scaler, idx


def test_a_skipped_step_leaves_the_weights_and_halves_the_scale():
    model, optimizer, scaler, idx = _tiny_setup(init_scale=2.0**60)  # 2**60 * any gradient overflows float16
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss, grad_norm, skipped = amp_train_step(model, optimizer, scaler, idx, idx, torch.float16)
    assert bool(skipped) and not math.isfinite(grad_norm.item()) and math.isfinite(loss.item())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert scaler.get_scale() == 2.0**59


def test_a_good_step_changes_the_weights_and_keeps_the_scale():
    model, optimizer, scaler, idx = _tiny_setup(init_scale=2.0**8)
    before = model.lm_head.weight.detach().clone()
    loss, grad_norm, skipped = amp_train_step(model, optimizer, scaler, idx, idx, torch.float16)
    assert not bool(skipped) and math.isfinite(grad_norm.item())
    assert not torch.equal(before, model.lm_head.weight) and scaler.get_scale() == 2.0**8


def test_the_gradient_is_unscaled_before_clipping():
    # the reported norm is the true gradient's: the same under any loss scale that does not overflow
    norms = []
    for init_scale in (1.0, 2.0**10):
        model, optimizer, scaler, idx = _tiny_setup(init_scale)
        norms.append(amp_train_step(model, optimizer, scaler, idx, idx, torch.float16, grad_clip=0)[1].item())
    assert norms[0] == pytest.approx(norms[1], rel=1e-2)


def test_a_disabled_scaler_never_reports_a_skip():
    # a disabled scaler never skips: 'skipped' must stay False for bfloat16 and float32
    model, optimizer, scaler, idx = _tiny_setup(init_scale=2.0**16, dtype=torch.bfloat16)
    _, _, skipped = amp_train_step(model, optimizer, scaler, idx, idx, torch.bfloat16)
    assert not bool(skipped) and not scaler.is_enabled()


def test_bf16_training_on_cpu_follows_float32():
    tokens = torch.arange(3000) % 17  # a periodic sequence: learnable, and the same on every machine
    finals = {}
    for dtype in (torch.float32, torch.bfloat16):
        run = train_precision(small_gpt(17, block_size=16, n_layer=1, n_head=2, n_embd=32), tokens, dtype, 60,
                              batch_size=8, block_size=16, lr=3e-3)
        assert len(run.losses) == len(run.step_times) == 60 and not any(run.skipped)
        finals[dtype] = run.final_loss(10)
        assert finals[dtype] < run.losses[0] - 1.0
    assert finals[torch.bfloat16] == pytest.approx(finals[torch.float32], rel=0.05, abs=0.02)


def test_train_precision_validates_steps():
    with pytest.raises(ValueError, match="steps"):
        train_precision(small_gpt(5, block_size=4, n_layer=1, n_head=1, n_embd=8), torch.arange(50) % 5, torch.float32, 0)


def test_dtypes_names():
    assert DTYPES == {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def test_gpu_report_section_needs_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="CUDA"):
        gpu_report_section("cuda")


def test_precision_comparison_on_the_cpu_makes_a_json_report():
    import json

    result = precision_comparison("cpu", (torch.float32, torch.bfloat16), steps=6, warmup=2, n_layer=1, n_head=2,
                                  n_embd=16, block_size=16, batch_size=4)
    assert json.loads(json.dumps(result)) == result  # plain values only: the GPU report stores it as JSON
    assert set(result["runs"]) == {"float32", "bfloat16"} and result["speedup"]["float32"] == 1.0
    for run in result["runs"].values():
        assert run["median_step_ms"] > 0 and run["skipped_steps"] == [] and len(run["loss_every_10"]) == 1
    with pytest.raises(ValueError, match="warmup"):
        precision_comparison("cpu", (torch.float32,), steps=4, warmup=4)
