"""Tests of llmcourse.kernels (Day 33): compiling, graph breaks, plain checkpoint keys, fused AdamW, SDPA backends."""

import shutil
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llmcourse import kernels
from llmcourse.gpt import GPT, GPTConfig
from llmcourse.kernels import (
    compile_model,
    count_graph_breaks,
    explain_compile,
    gpu_report_section,
    inductor_compiler,
    kernel_benchmarks,
    make_adamw,
    plain_state_dict,
    sdpa_backend_for,
    unwrap_compiled,
)

TINY = dict(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=32)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test starts and ends with TorchDynamo's caches empty, so no test sees another's compiled code."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def batch(config: GPTConfig, B: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, config.vocab_size, (B, config.block_size), generator=g)  # (B, T)
    y = torch.randint(0, config.vocab_size, (B, config.block_size), generator=g)  # (B, T)
    return x, y


class CheckedScale(nn.Module):
    """Breaks the graph on purpose: reads a value back into Python in forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = 2 * x
        if not torch.isfinite(y).all().item():
            raise ValueError("not finite")
        return torch.relu(y) + 1


# --- graph breaks -------------------------------------------------------------------------------


@pytest.mark.parametrize("implementation", ["fused", "manual"])
def test_gpt_forward_with_loss_has_no_graph_breaks(implementation):
    config = GPTConfig(**TINY, implementation=implementation)
    x, y = batch(config)
    report = explain_compile(GPT(config), x, y)
    assert (report.graph_count, report.graph_break_count, report.break_reasons) == (1, 0, [])
    assert report.op_count > 0
    assert count_graph_breaks(GPT(config), x) == 0  # without targets too


def test_a_host_sync_is_counted_with_its_reason():
    report = explain_compile(CheckedScale(), torch.randn(5))
    assert report.graph_break_count == 1 and report.graph_count == 2
    assert len(report.break_reasons) == 1 and "item()" in report.break_reasons[0]
    assert "\n" not in report.break_reasons[0]


def test_explain_compile_unwraps_a_compiled_model_and_rejects_non_callables():
    config = GPTConfig(**TINY)
    x, _ = batch(config)
    assert count_graph_breaks(compile_model(GPT(config), backend="eager"), x) == 0
    assert count_graph_breaks(compile_model(CheckedScale(), backend="eager"), torch.randn(3)) == 1
    with pytest.raises(TypeError, match="module or function"):
        explain_compile(42)


def test_fullgraph_refuses_a_break_and_accepts_the_gpt():
    with pytest.raises(Exception):
        compile_model(CheckedScale(), backend="eager", fullgraph=True)(torch.randn(3))
    torch._dynamo.reset()
    config = GPTConfig(**TINY)
    x, y = batch(config)
    model = GPT(config)
    compiled = compile_model(model, backend="eager", fullgraph=True)
    logits, loss = compiled(x, y)
    ref_logits, ref_loss = model(x, y)
    torch.testing.assert_close(logits, ref_logits)
    torch.testing.assert_close(loss, ref_loss)


# --- compile_model --------------------------------------------------------------------------------


def test_compile_model_wraps_and_unwrap_gives_the_original_back():
    model = GPT(GPTConfig(**TINY))
    compiled = compile_model(model, backend="aot_eager")
    assert isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule)
    assert unwrap_compiled(compiled) is model and unwrap_compiled(model) is model
    assert compiled.transformer.wte.weight is model.transformer.wte.weight  # no copy of the weights


def test_compile_model_refuses_inductor_without_a_compiler(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    assert inductor_compiler("cpu") is None and inductor_compiler("cuda") is None
    with pytest.raises(RuntimeError) as caught:
        compile_model(nn.Linear(3, 3))
    message = str(caught.value)
    assert "\n" not in message and "C++ compiler" in message
    assert "build-essential" in message and "backend='aot_eager'" in message
    compile_model(nn.Linear(3, 3), backend="aot_eager")  # the way out needs no compiler


def test_inductor_compiler_follows_inductors_own_search(monkeypatch):
    import torch._inductor.config as inductor_config

    with inductor_config.patch({"cpp.cxx": (None, "no-such-compiler-here")}):
        assert inductor_compiler("cpu") is None
    found = shutil.which("sh")
    with inductor_config.patch({"cpp.cxx": (None, "sh")}):  # any program on PATH counts as found
        assert inductor_compiler("cpu") == found
    monkeypatch.setenv("CC", "sh")
    assert inductor_compiler("cuda") == found


def test_compile_model_validates_its_arguments():
    with pytest.raises(TypeError, match="nn.Module"):
        compile_model(lambda x: x)
    with pytest.raises(ValueError, match="backend"):
        compile_model(nn.Linear(2, 2), backend="cudagraphs")
    with pytest.raises(ValueError, match="mode"):
        compile_model(nn.Linear(2, 2), mode="fast")
    with pytest.raises(ValueError, match="needs backend='inductor'"):
        compile_model(nn.Linear(2, 2), backend="eager", mode="max-autotune")


@pytest.mark.skipif(inductor_compiler("cpu") is None, reason="Inductor needs a C++ compiler (g++ or $CXX)")
def test_inductor_compiles_a_small_step_on_the_cpu():
    """The one test that runs Inductor for real (a few seconds with a cold cache)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.LayerNorm(16))
    compiled = compile_model(model)
    x = torch.randn(4, 8)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


# --- plain checkpoint keys -----------------------------------------------------------------------------


def test_plain_state_dict_strips_the_prefix_and_loads_into_a_plain_gpt():
    config = GPTConfig(**TINY)
    torch.manual_seed(0)
    compiled = compile_model(GPT(config), backend="eager")
    raw = compiled.state_dict()
    assert all(k.startswith("_orig_mod.") for k in raw)
    plain = plain_state_dict(compiled)
    assert list(plain) == [k.removeprefix("_orig_mod.") for k in raw]
    assert list(plain) == list(unwrap_compiled(compiled).state_dict())
    fresh = GPT(config)
    fresh.load_state_dict(plain)  # strict
    x, _ = batch(config)
    with torch.no_grad():
        assert torch.equal(fresh(x)[0], unwrap_compiled(compiled)(x)[0])
    with pytest.raises(RuntimeError, match="Missing key"):
        GPT(config).load_state_dict(raw)


def test_plain_state_dict_of_compiled_submodules_and_of_a_plain_model():
    config = GPTConfig(**TINY)
    model = GPT(config)
    model.transformer.h[0] = torch.compile(model.transformer.h[0], backend="eager")  # prefix in the middle
    assert any("h.0._orig_mod." in k for k in model.state_dict())
    plain = plain_state_dict(model)
    assert not any("_orig_mod" in k for k in plain)
    GPT(config).load_state_dict(plain)
    assert list(plain_state_dict(GPT(config))) == list(GPT(config).state_dict())


# --- fused AdamW --------------------------------------------------------------------------------------


def test_make_adamw_leaves_the_default_on_the_cpu_and_fuses_on_request():
    model = nn.Linear(4, 4)
    assert make_adamw(model.parameters(), lr=1e-3).defaults["fused"] is None
    opt = make_adamw(model.parameters(), lr=1e-3, fused=True)
    assert opt.defaults["fused"] is True
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["weight_decay"] == 0.1


def test_make_adamw_chooses_fused_when_every_parameter_is_on_cuda(monkeypatch):
    seen = {}

    def fake_adamw(params, **kwargs):
        seen.update(kwargs)
        return types.SimpleNamespace(defaults=kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", fake_adamw)
    on_cuda = [types.SimpleNamespace(device=torch.device("cuda", 0)) for _ in range(3)]
    assert make_adamw(on_cuda, lr=1e-3).defaults["fused"] is True
    assert make_adamw([{"params": on_cuda[:2]}, {"params": on_cuda[2:], "weight_decay": 0.0}], lr=1e-3).defaults["fused"] is True
    assert make_adamw(on_cuda, lr=1e-3, fused=False).defaults["fused"] is False
    mixed = on_cuda + [types.SimpleNamespace(device=torch.device("cpu"))]
    assert make_adamw(mixed, lr=1e-3).defaults["fused"] is None


def test_fused_adamw_matches_the_default_path_on_the_cpu():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
    b = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
    b.load_state_dict(a.state_dict())
    opt_a, opt_b = make_adamw(a.parameters(), lr=1e-2), make_adamw(b.parameters(), lr=1e-2, fused=True)
    for _ in range(4):
        a(torch.randn(5, 8)).square().mean().backward()
        for pa, pb in zip(a.parameters(), b.parameters()):
            pb.grad = pa.grad.clone()
        opt_a.step(), opt_b.step()
        opt_a.zero_grad(), opt_b.zero_grad()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-6)


def test_make_adamw_validates_its_arguments():
    params = list(nn.Linear(2, 2).parameters())
    with pytest.raises(ValueError, match="lr"):
        make_adamw(params, lr=-1.0)
    with pytest.raises(TypeError, match="lr"):
        make_adamw(params, lr="0.1")
    with pytest.raises(TypeError, match="fused"):
        make_adamw(params, lr=0.1, fused="yes")
    with pytest.raises(ValueError, match="no parameters"):
        make_adamw([], lr=0.1)


# --- SDPA backends ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "capability, dtype, expected",
    [
        (None, torch.float32, "flash"),
        (None, torch.bfloat16, "flash"),
        ((3, 7), torch.float16, "math"),
        ((6, 0), torch.float16, "efficient"),
        ((7, 5), torch.float16, "efficient"),  # a T4
        ((7, 5), torch.float32, "efficient"),
        ((7, 5), torch.bfloat16, "math"),
        ((8, 0), torch.float16, "flash"),  # an A100
        ((8, 0), torch.bfloat16, "flash"),
        ((8, 0), torch.float32, "efficient"),
        ((9, 0), torch.bfloat16, "flash"),  # an H100
    ],
)
def test_sdpa_backend_for(capability, dtype, expected):
    assert sdpa_backend_for(capability, dtype) == expected


def test_sdpa_backend_for_validates():
    with pytest.raises(TypeError, match="capability"):
        sdpa_backend_for("8.0")
    with pytest.raises(TypeError, match="capability"):
        sdpa_backend_for((8,))
    with pytest.raises(ValueError, match="dtype"):
        sdpa_backend_for((8, 0), torch.float64)


def test_the_cpu_runs_math_and_its_flash_kernel_and_they_agree():
    from torch.nn.attention import sdpa_kernel

    q, k, v = torch.randn(3, 2, 2, 8, 16, generator=torch.Generator().manual_seed(0)).unbind(0)
    outputs = {}
    for name in ("math", "flash"):
        with sdpa_kernel(kernels.SDPA_BACKENDS[name]):
            outputs[name] = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(outputs["flash"], outputs["math"], rtol=1e-5, atol=1e-6)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="No viable backend"):
            with sdpa_kernel(kernels.SDPA_BACKENDS["efficient"]):
                F.scaled_dot_product_attention(q, k, v, is_causal=True)


# --- GPU report -----------------------------------------------------------------------------------------


def test_gpu_report_section_refuses_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="needs a CUDA GPU") as caught:
        gpu_report_section()
    assert "\n" not in str(caught.value)


def test_kernel_benchmarks_runs_on_the_cpu_with_a_tiny_config():
    report = kernel_benchmarks("cpu", GPTConfig(**TINY), batch_size=2, repeats=2, backend="eager", sdpa_shape=(1, 2, 16, 8))
    assert report["compiled_loss_matches"] is True and report["capability"] is None
    assert report["compile_seconds"] > 0 and report["eager_step_ms"] > 0 and report["compiled_step_ms"] > 0
    assert set(report["adamw_step_ms"]) == {"foreach", "fused"}
    assert report["sdpa_expected"] == "flash" and report["sdpa"]["math"]["runs"] and report["sdpa"]["flash"]["runs"]
    assert report["sdpa"]["efficient"]["runs"] is False and report["sdpa"]["efficient"]["error"]
    import json

    json.dumps(report)  # JSON-ready for notebooks/data/gpu_report.json
