"""llmcourse.capstone (Day 36): the capstone's configs and command, bits per character, TorchGPT, the GPU report's runs."""

from __future__ import annotations

import importlib.util
import json
import math
import shlex
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from llmcourse.capstone import (
    CAPSTONE_SIZES,
    GPU_REPORT_STEPS,
    TorchGPT,
    bits_per_character,
    capstone_arguments,
    capstone_benchmarks,
    capstone_command,
    capstone_config,
    chars_per_token,
    gpu_report_section,
    train_torch_builtin,
    train_with_trainer,
)
from llmcourse.bpe import BPETokenizer
from llmcourse.chartok import CharTokenizer
from llmcourse.commands import OneLineParser, add_train_arguments
from llmcourse.gpt import GPT, GPTConfig
from llmcourse.presets import preset_config
from llmcourse.train import TrainConfig, TrainingData, encode_text

ROOT = Path(__file__).resolve().parents[1]


def parse_back(command: str) -> tuple[list[str], str, TrainConfig]:
    """(words before `train`, --out, TrainConfig) as `llmcourse train`'s own parser reads the command."""
    words = shlex.split(command)
    cut = words.index("train")
    parser = OneLineParser(prog="llmcourse train")
    add_train_arguments(parser)
    args = parser.parse_args(words[cut + 1:])
    overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name) is not None}
    return words[:cut], args.out, preset_config(args.preset, **overrides)


# --- sizes ---------------------------------------------------------------------------------------------

def test_gpu_size_is_nanogpts_gpu_recipe_with_bpe_mixed_precision_and_compile():
    cfg = capstone_config("gpu")
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.batch_size) == (6, 6, 384, 256, 64)
    assert (cfg.dropout, cfg.lr, cfg.max_steps) == (0.2, 1e-3, 5000)
    assert cfg.tokenizer == "bpe" and cfg.dtype == "auto" and cfg.compile is True


def test_cpu_size_uses_the_week6_paths_a_cpu_has_and_stays_small():
    cfg = capstone_config("cpu")
    assert cfg.tokenizer == "bpe" and 512 <= cfg.bpe_vocab_size <= 1024
    assert cfg.device == "cpu" and cfg.dtype == "bfloat16" and cfg.grad_accum_steps == 2 and not cfg.compile
    assert 2 <= cfg.n_layer <= 4 and 64 <= cfg.n_embd <= 128 and cfg.block_size == 64 and cfg.max_steps <= 500


def test_capstone_config_overrides_and_refusals():
    assert capstone_config("gpu", max_steps=10, warmup_steps=5).max_steps == 10
    assert capstone_config("cpu", n_layer=3).n_layer == 3
    with pytest.raises(ValueError, match="size must be one of"):
        capstone_config("tpu")
    with pytest.raises(ValueError, match="unknown TrainConfig setting"):
        capstone_config("cpu", layers=3)
    assert set(CAPSTONE_SIZES) == {"cpu", "gpu"}


# --- the command ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("size", "nproc"), [("cpu", 1), ("cpu", 2), ("cpu", 4), ("gpu", 1), ("gpu", 2), ("gpu", 8)])
def test_command_round_trips_through_llmcourse_trains_parser(size, nproc):
    cfg = capstone_config(size)
    command = capstone_command(cfg, "runs/my run", nproc_per_node=nproc)
    prefix, out, parsed = parse_back(command)
    assert out == "runs/my run" and parsed == cfg
    expected = ["llmcourse"] if nproc == 1 else ["torchrun", "--standalone", f"--nproc_per_node={nproc}", "-m", "llmcourse"]
    assert prefix == expected


def test_command_names_only_the_settings_that_differ_from_the_defaults():
    assert capstone_command(TrainConfig(), "out") == "llmcourse train --out out"
    cfg = TrainConfig(lr=3e-4, min_lr=1e-5, compile=True, activation_checkpointing=True, corpus="my text.txt")
    words = shlex.split(capstone_command(cfg, "out"))
    assert words[words.index("--lr") + 1] == "0.0003" and words[words.index("--min-lr") + 1] == "1e-05"
    assert "--compile" in words and "--activation-checkpointing" in words and "my text.txt" in words
    assert "--n-layer" not in words and "--no-compile" not in words
    assert parse_back(capstone_command(cfg, "out"))[2] == cfg


def test_command_refuses_bad_input():
    cfg = capstone_config("gpu")
    with pytest.raises(ValueError, match="does not split into 3 processes"):
        capstone_command(cfg, "out", nproc_per_node=3)
    with pytest.raises(ValueError, match="divisible by 128"):
        capstone_command(capstone_config("gpu", grad_accum_steps=16), "out", nproc_per_node=8)
    with pytest.raises(ValueError, match="at least 1"):
        capstone_command(cfg, "out", nproc_per_node=0)
    with pytest.raises(TypeError, match="nproc_per_node must be an int"):
        capstone_command(cfg, "out", nproc_per_node=True)
    with pytest.raises(TypeError, match="config must be a TrainConfig"):
        capstone_command(cfg.to_dict(), "out")
    with pytest.raises(TypeError, match="out_dir must be a path"):
        capstone_command(cfg, None)
    with pytest.raises(ValueError, match="out_dir is empty"):
        capstone_command(cfg, "")


def test_the_command_trains_from_the_shell(tiny_config, tmp_path):
    """The arguments really run: `python -m llmcourse train ...` in bfloat16 with 2 micro-batches writes the run."""
    cfg = tiny_config(max_steps=4, warmup_steps=1, eval_interval=2, eval_iters=1, log_interval=2, dtype="bfloat16", grad_accum_steps=2)
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "llmcourse", *capstone_arguments(cfg, out)], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert TrainConfig.from_dict(json.loads((out / "config.json").read_text())) == cfg
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["eval"]] == [0, 2, 4]
    assert "bfloat16 autocast; 2 micro-batches per step" in done.stdout


# --- bits per character --------------------------------------------------------------------------------

def test_chars_per_token():
    text = "to be or not to be, that is the question"
    assert chars_per_token(CharTokenizer.from_text(text), text) == 1.0
    bpe = BPETokenizer.train(text * 20, 270)
    assert chars_per_token(bpe, text) == len(text) / len(encode_text(bpe, text)) > 1.0
    with pytest.raises(ValueError, match="empty"):
        chars_per_token(bpe, "")
    with pytest.raises(TypeError, match="text must be a str"):
        chars_per_token(bpe, b"bytes")
    with pytest.raises(TypeError, match="tokenizer must be"):
        chars_per_token("abc", text)


def test_bits_per_character():
    assert bits_per_character(math.log(2)) == pytest.approx(1.0)
    assert bits_per_character(2 * math.log(2), 2.0) == pytest.approx(1.0)
    assert bits_per_character(5.0, 2.5) == pytest.approx(5.0 / math.log(2) / 2.5)
    assert bits_per_character(0) == 0.0
    for bad in (math.nan, math.inf):
        with pytest.raises(ValueError, match="finite"):
            bits_per_character(bad)
    with pytest.raises(ValueError, match=">= 0"):
        bits_per_character(-1.0)
    with pytest.raises(ValueError, match="positive"):
        bits_per_character(1.0, 0.0)
    with pytest.raises(TypeError, match="number"):
        bits_per_character(torch.tensor(1.0))
    with pytest.raises(TypeError, match="number"):
        bits_per_character(1.0, True)


# --- TorchGPT ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bias", [False, True])
def test_torch_gpt_has_our_gpts_parameter_count_and_shapes(bias):
    config = GPTConfig(vocab_size=50, block_size=16, n_layer=3, n_head=4, n_embd=32, bias=bias)
    torch.manual_seed(0)
    ours, theirs = GPT(config), TorchGPT(config)
    assert sum(p.numel() for p in theirs.parameters()) == sum(p.numel() for p in ours.parameters())
    idx = torch.randint(0, 50, (3, 10))  # (B, T) shorter than block_size
    logits, loss = theirs(idx, idx)
    assert logits.shape == (3, 10, 50) and loss.shape == ()
    assert abs(loss.item() - math.log(50)) < 0.5  # GPT-2's small initialization: nearly uniform
    assert theirs(idx)[1] is None
    assert theirs.lm_head.weight is theirs.wte.weight


def test_torch_gpt_is_causal_and_refuses_long_inputs():
    config = GPTConfig(vocab_size=20, block_size=8, n_layer=2, n_head=2, n_embd=16, bias=False)
    model = TorchGPT(config).eval()
    idx = torch.randint(0, 20, (2, 8))
    later = idx.clone()
    later[:, 5:] = (later[:, 5:] + 3) % 20
    with torch.no_grad():
        a, b = model(idx)[0], model(later)[0]
    assert torch.allclose(a[:, :5], b[:, :5], atol=1e-5) and not torch.allclose(a[:, 5:], b[:, 5:])
    with pytest.raises(ValueError, match="longer than block_size"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(TypeError, match="GPTConfig"):
        TorchGPT({"n_layer": 2})


def char_data(text_len: int = 20_000) -> TrainingData:
    from llmcourse.data import load_corpus

    text = load_corpus("shakespeare")[:text_len]
    tok = CharTokenizer.from_text(text)
    cut = int(len(text) * 0.9)
    return TrainingData(tok, encode_text(tok, text[:cut]), encode_text(tok, text[cut:]))


def small_recipe(**overrides) -> TrainConfig:
    settings = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, batch_size=8, max_steps=40, lr=3e-3, min_lr=3e-4,
                    warmup_steps=5, eval_interval=20, eval_iters=3, log_interval=5, device="cpu")
    return preset_config(None, **{**settings, **overrides})


def test_train_torch_builtin_learns_on_the_cpu():
    data = char_data()
    run = train_torch_builtin(small_recipe(), data=data)
    assert [r["step"] for r in run["history"]] == [0, 20, 40] and run["steps"] == 40
    assert run["final_val_loss"] < run["history"][0]["val_loss"] - 0.5  # the loss falls
    assert run["best_val_loss"] == min(r["val_loss"] for r in run["history"])
    assert run["n_params"] == sum(p.numel() for p in GPT(small_recipe().model_config(data.tokenizer.vocab_size)).parameters())
    assert run["dtype"] == "float32" and run["compiled"] is False
    assert run["tokens_per_s"] > 0 and run["wall_s"] > 0
    json.dumps(run)  # JSON-ready


def test_train_torch_builtin_in_bfloat16_with_max_steps_and_a_float16_scaler():
    data = char_data(8_000)
    run = train_torch_builtin(small_recipe(dtype="bfloat16", max_steps=500), "cpu", max_steps=6, data=data)
    assert run["steps"] == 6 and run["dtype"] == "bfloat16" and math.isfinite(run["final_val_loss"])
    run16 = train_torch_builtin(small_recipe(dtype="float16"), "cpu", max_steps=6, data=data)
    assert run16["dtype"] == "float16" and math.isfinite(run16["final_val_loss"])


def test_train_torch_builtin_sees_the_trainers_batches():
    """Same seed, same generator: with equal starting weights the first step's loss is the trainer's."""
    from llmcourse.batches import get_batch
    from llmcourse.train import Trainer

    data, cfg = char_data(8_000), small_recipe(max_steps=6, eval_interval=6)
    trainer = Trainer(cfg, data, progress=False)
    x_trainer, _ = get_batch(data.train, cfg.batch_size, cfg.block_size, generator=trainer.batch_generator)
    x_builtin, _ = get_batch(data.train, cfg.batch_size, cfg.block_size, generator=torch.Generator().manual_seed(cfg.seed))
    assert torch.equal(x_trainer, x_builtin)


def test_train_torch_builtin_refusals():
    with pytest.raises(TypeError, match="TrainConfig"):
        train_torch_builtin(small_recipe().to_dict())
    with pytest.raises(ValueError, match="warmup_steps"):
        train_torch_builtin(small_recipe(), max_steps=2, data=char_data(8_000))
    with pytest.raises(TypeError, match="TrainingData"):
        train_torch_builtin(small_recipe(), data="text")


# --- the GPU report's runs -----------------------------------------------------------------------------

def test_capstone_benchmarks_on_the_cpu(tiny_config):
    capstone = tiny_config(tokenizer="bpe", bpe_vocab_size=300, max_steps=6, warmup_steps=1, eval_interval=3, dtype="bfloat16")
    recipe = tiny_config(max_steps=6, warmup_steps=1, eval_interval=3, log_interval=2)
    report = capstone_benchmarks("cpu", capstone=capstone, recipe=recipe)
    assert set(report["runs"]) == {"capstone_bpe", "nanogpt_recipe", "torch_builtins"}
    assert report["steps"] == {"capstone_bpe": 6, "nanogpt_recipe": 6, "torch_builtins": 6}
    assert report["nanogpt_reported"]["val_loss"] == 1.4697
    for name, run in report["runs"].items():
        for key in ("final_val_loss", "best_val_loss", "val_bits_per_char", "wall_s", "tokens_per_s", "n_params"):
            assert math.isfinite(run[key]) and run[key] > 0, (name, key)
        assert run["mfu"] is None  # no published peak for a CPU
        assert run["flops_per_token"] > 6 * run["n_params"] // 2
    runs = report["runs"]
    assert runs["capstone_bpe"]["tokenizer"] == "bpe" and runs["capstone_bpe"]["dtype"] == "bfloat16"
    assert runs["capstone_bpe"]["val_chars_per_token"] > 1.0 == runs["nanogpt_recipe"]["val_chars_per_token"]
    assert runs["nanogpt_recipe"]["n_params"] == runs["torch_builtins"]["n_params"]
    bpc = runs["capstone_bpe"]
    assert bpc["val_bits_per_char"] == pytest.approx(bits_per_character(bpc["final_val_loss"], bpc["val_chars_per_token"]), rel=1e-3)
    json.dumps(report)


def test_train_with_trainer_refuses_a_dict():
    with pytest.raises(TypeError, match="TrainConfig"):
        train_with_trainer({"max_steps": 3})


def test_gpu_report_default_steps_fit_the_budget():
    assert 500 <= GPU_REPORT_STEPS <= 5000


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the section trains for minutes")
def test_gpu_report_section_needs_a_gpu():
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        gpu_report_section()
    with pytest.raises(ValueError, match="measures a CUDA GPU"):
        gpu_report_section("cpu")


def test_the_weekly_report_script_runs_day36():
    spec = importlib.util.spec_from_file_location("gpu_report_script", ROOT / "tests" / "benchmarks" / "gpu_report.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.SECTIONS["day36"] == "llmcourse.capstone"
