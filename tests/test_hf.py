"""Tests of llmcourse.hf (Day 38): the Hugging Face export and `llmcourse export-hf`."""

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may reach the Hub; set before transformers is imported
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

transformers = pytest.importorskip("transformers")
from packaging.requirements import Requirement  # noqa: E402  (a dependency of transformers)
from packaging.version import Version  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline  # noqa: E402

from llmcourse.bpe import BPETokenizer  # noqa: E402
from llmcourse.chartok import CharTokenizer  # noqa: E402
from llmcourse.checkpoint import load_pretrained  # noqa: E402
from llmcourse.core import set_seed  # noqa: E402
from llmcourse.generate import generate  # noqa: E402
from llmcourse.gpt import GPT, GPTConfig  # noqa: E402
from llmcourse.hf import EXPORT_FILES, MODEL_FILE, TOKENIZER_FILE, check_export_dir, export_hf  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmcourse", *args], capture_output=True, text=True, env=ENV, cwd=cwd)


def dev_requirement(name: str) -> Requirement:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    found = [Requirement(r) for r in extras if Requirement(r).name == name]
    assert len(found) == 1, f"the dev extra names {name} {len(found)} times"
    return found[0]


@pytest.fixture(scope="module")
def pretrained():
    model, tokenizer, _ = load_pretrained("shakespeare-char")
    return model, tokenizer


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The shipped model, exported by the command line."""
    out = tmp_path_factory.mktemp("hf") / "shakespeare-char"
    done = cli("export-hf", "--checkpoint", "shakespeare-char", "--out", str(out))
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture(scope="module")
def tiny_model():
    """A small random GPT with every non-default setting: biases, an untied head, tanh GELU, eps 1e-6, block 16."""
    set_seed(0)
    tokenizer = CharTokenizer.from_text("abcdefgh \n")
    config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=16, n_layer=2, n_head=2, n_embd=16, dropout=0.1,
                       bias=True, tie_weights=False, gelu_approximate="tanh", layer_norm_eps=1e-6)
    return GPT(config).eval(), tokenizer


# --- versions -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["transformers", "accelerate"])
def test_installed_version_lies_within_the_dev_bound(name):
    requirement = dev_requirement(name)
    assert any(s.operator == "<" for s in requirement.specifier), f"{requirement} has no upper bound"
    module = pytest.importorskip(name)
    assert Version(module.__version__) in requirement.specifier, f"{name} {module.__version__} is outside {requirement}"


# --- the folder -----------------------------------------------------------------------------------------------


def test_export_writes_the_files_and_auto_maps(exported):
    assert sorted(p.name for p in exported.iterdir()) == sorted(EXPORT_FILES)
    config = json.loads((exported / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == MODEL_FILE[:-3] + ".LLMCourseGPTForCausalLM"
    assert config["auto_map"]["AutoConfig"] == MODEL_FILE[:-3] + ".LLMCourseGPTConfig"
    assert (config["n_layer"], config["bias"], config["tie_word_embeddings"], config["use_cache"]) == (4, False, True, False)
    tokenizer_config = json.loads((exported / "tokenizer_config.json").read_text())
    assert tokenizer_config["auto_map"]["AutoTokenizer"][0] == TOKENIZER_FILE[:-3] + ".LLMCourseCharTokenizer"


def test_folder_loads_and_runs_without_llmcourse(exported, pretrained, tmp_path):
    """In a fresh process where `import llmcourse` fails, the folder alone gives our logits and ids."""
    model, tokenizer = pretrained
    text = "KING LEAR:\nBlow, winds, and crack your cheeks!\n"
    script = f"""
import sys
sys.modules["llmcourse"] = None  # any import of llmcourse now raises ImportError
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained({str(exported)!r}, trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained({str(exported)!r}, trust_remote_code=True)
ids = tokenizer({text!r})["input_ids"]
with torch.no_grad():
    logits = model(torch.tensor([ids])).logits
torch.save({{"ids": ids, "logits": logits}}, {str(tmp_path / "result.pt")!r})
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=ENV, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    result = torch.load(tmp_path / "result.pt", weights_only=True)
    assert result["ids"] == tokenizer.encode(text)
    with torch.no_grad():
        ours, _ = model(torch.tensor([result["ids"]]))
    assert torch.allclose(result["logits"], ours, rtol=0, atol=1e-6)


def test_logits_and_loss_equal_ours(exported, pretrained):
    model, tokenizer = pretrained
    hf = AutoModelForCausalLM.from_pretrained(exported, trust_remote_code=True)
    assert not hf.training and hf.lm_head.weight is hf.transformer.wte.weight
    set_seed(1)
    x = torch.randint(0, tokenizer.vocab_size, (3, 256))  # (3, block_size)
    with torch.no_grad():
        ours, _ = model(x)
        _, our_loss = model(x[:, :-1], x[:, 1:])  # the loss of the same next-token pairs
        out = hf(input_ids=x, labels=x)
    assert torch.allclose(out.logits, ours, rtol=0, atol=1e-6)  # logits of order 10: agreement to ~1e-7 relative
    assert abs(out.loss.item() - our_loss.item()) < 1e-4  # T = 256 against 255: other blocking in the matmuls
    with pytest.raises(ValueError, match="block_size"):
        hf(torch.zeros(1, 257, dtype=torch.long))


def test_padding_mask_leaves_the_real_tokens_alone(exported, pretrained):
    """A left-padded row gives the same logits at its real positions as the row alone would."""
    model, tokenizer = pretrained
    hf = AutoModelForCausalLM.from_pretrained(exported, trust_remote_code=True)
    ids = tokenizer.encode("ROMEO:\nAy me!")
    padded = torch.tensor([[0, 0, 0] + ids])
    mask = torch.tensor([[0, 0, 0] + [1] * len(ids)])
    with torch.no_grad():
        alone = hf(torch.tensor([ids])).logits
        both = hf(padded, attention_mask=mask).logits
    assert torch.isfinite(both).all()
    # positions differ (the pad shifts them), so only the masking is checked: the real tokens never read the pads
    changed = padded.clone()
    changed[0, :3] = 5
    with torch.no_grad():
        other = hf(changed, attention_mask=mask).logits
    assert torch.allclose(both[0, 3:], other[0, 3:], rtol=0, atol=1e-6)
    assert alone.shape[1] == len(ids)


def test_every_gptconfig_setting_round_trips(tiny_model, tmp_path):
    model, tokenizer = tiny_model
    out = export_hf(model, tokenizer, tmp_path / "tiny")
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert hf.lm_head.weight is not hf.transformer.wte.weight and hf.transformer.h[0].mlp.c_fc.bias is not None
    assert hf.config.gelu_approximate == "tanh" and hf.config.layer_norm_eps == 1e-6 and hf.config.dropout == 0.1
    x = torch.randint(0, tokenizer.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.allclose(hf(x).logits, model(x)[0], rtol=0, atol=1e-6)


def test_greedy_generation_past_block_size_matches_ours(tiny_model, tmp_path):
    """Beyond block_size both slide a window over the last block_size tokens: the greedy tokens stay equal."""
    model, tokenizer = tiny_model
    out = export_hf(model, tokenizer, tmp_path / "tiny")
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    prompt = torch.tensor([tokenizer.encode("abc d")])
    ours = generate(model, prompt, 30, temperature=0, use_cache=False)
    theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=30)
    assert theirs.shape == (1, 35)
    assert theirs[0].tolist() == torch.as_tensor(ours)[0].tolist()


# --- the tokenizer --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "\n", "ROMEO:\nWherefore art thou Romeo?\n", "  a  b  , . ! ?\n\n"])
def test_tokenizer_encodes_and_decodes_as_ours(exported, pretrained, text):
    _, tokenizer = pretrained
    hf_tokenizer = AutoTokenizer.from_pretrained(exported, trust_remote_code=True)
    assert hf_tokenizer.vocab_size == tokenizer.vocab_size
    ids = hf_tokenizer(text)["input_ids"]
    assert ids == tokenizer.encode(text)
    assert hf_tokenizer.decode(ids) == text


def test_tokenizer_keeps_the_unknown_policy(tmp_path, tiny_model):
    model, _ = tiny_model
    for unknown, expected in (("replace", "ab\ufffd"), ("skip", "ab")):
        tokenizer = CharTokenizer.from_text("abcdefgh \n", unknown=unknown)
        config = GPTConfig(**{**model.config.__dict__, "vocab_size": tokenizer.vocab_size})
        out = export_hf(GPT(config), tokenizer, tmp_path / unknown)
        hf_tokenizer = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
        ids = hf_tokenizer("abZ")["input_ids"]
        assert ids == tokenizer.encode("abZ") and hf_tokenizer.decode(ids) == expected
    strict = AutoTokenizer.from_pretrained(export_hf(*tiny_model, tmp_path / "strict"), trust_remote_code=True)
    with pytest.raises(ValueError, match="'Z'"):
        strict("abZ")


# --- pipeline against the command line -------------------------------------------------------------------------


def test_pipeline_writes_what_llmcourse_generate_writes(exported):
    prompt, n = "First Citizen:\n", 150
    writer = pipeline("text-generation", model=str(exported), trust_remote_code=True)
    text = writer(prompt, do_sample=False, max_new_tokens=n)[0]["generated_text"]
    done = cli("generate", "--temperature", "0", "--prompt", prompt, "--max-new-tokens", str(n))
    assert done.returncode == 0, done.stderr
    assert done.stdout == text + "\n"
    assert len(text) == len(prompt) + n


# --- Trainer ----------------------------------------------------------------------------------------------------


def test_transformers_trainer_trains_the_export(tiny_model, tmp_path):
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments

    model, tokenizer = tiny_model
    hf = AutoModelForCausalLM.from_pretrained(export_hf(model, tokenizer, tmp_path / "tiny"), trust_remote_code=True)
    text = "abc defg habc defg h\n" * 4
    rows = [torch.tensor(tokenizer.encode(text[i : i + 16])) for i in range(0, 64, 4)]  # 16 x (16,)
    batch = torch.stack(rows)

    def loss() -> float:
        hf.eval()
        with torch.no_grad():
            return hf(input_ids=batch, labels=batch).loss.item()

    before, head = loss(), hf.lm_head.weight.detach().clone()
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=6, per_device_train_batch_size=8,
                             learning_rate=1e-2, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
                             logging_strategy="no", seed=0)
    result = Trainer(model=hf, args=args, train_dataset=[{"input_ids": r, "labels": r} for r in rows]).train()
    assert result.global_step == 6
    assert loss() < before - 0.1
    assert not torch.equal(hf.lm_head.weight, head)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").rglob("*.safetensors"))  # no checkpoints


# --- refusals ---------------------------------------------------------------------------------------------------


def test_cli_refuses_a_folder_holding_other_files(tmp_path):
    (tmp_path / "mine.txt").write_text("keep")
    done = cli("export-hf", "--out", str(tmp_path))
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("llmcourse export-hf: error:") and len(done.stderr.splitlines()) == 1
    assert "mine.txt" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]


def test_cli_overwrites_an_earlier_export_and_an_empty_folder(tmp_path, tiny_model):
    export_hf(*tiny_model, tmp_path / "again")
    (tmp_path / "empty").mkdir()
    for name in ("again", "empty"):
        done = cli("export-hf", "--out", str(tmp_path / name))
        assert done.returncode == 0, done.stderr
        assert json.loads((tmp_path / name / "config.json").read_text())["n_layer"] == 4  # the shipped model now


def test_cli_refuses_a_foreign_config_a_file_and_a_bad_checkpoint(tmp_path):
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text('{"model_type": "gpt2"}')
    (tmp_path / "file").write_text("x")
    for args in (["--out", str(tmp_path / "gpt2")], ["--out", str(tmp_path / "file")],
                 ["--checkpoint", "shakespeare-word", "--out", str(tmp_path / "new")],
                 ["--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "new")]):
        done = cli("export-hf", *args)
        assert done.returncode == 2 and len(done.stderr.splitlines()) == 1, (args, done.stderr)
    assert not (tmp_path / "new").exists()
    assert (tmp_path / "gpt2" / "config.json").read_text() == '{"model_type": "gpt2"}'


def test_cli_needs_out_and_help_names_the_flags():
    done = cli("export-hf")
    assert done.returncode == 2 and "--out" in done.stderr and len(done.stderr.splitlines()) == 1
    helped = cli("export-hf", "--help")
    assert helped.returncode == 0 and "--checkpoint" in helped.stdout and "trust_remote_code" in helped.stdout


def test_export_hf_refuses_what_it_cannot_write(tiny_model, tmp_path):
    model, tokenizer = tiny_model
    with pytest.raises(TypeError, match="BPETokenizer"):
        export_hf(model, BPETokenizer(), tmp_path / "bpe")
    with pytest.raises(TypeError, match="GPT"):
        export_hf(torch.nn.Linear(2, 2), tokenizer, tmp_path / "linear")
    with pytest.raises(ValueError, match="reads only"):
        export_hf(model, CharTokenizer("ab"), tmp_path / "small")
    assert not any(tmp_path.iterdir())  # nothing written by a refusal
    assert check_export_dir(tmp_path / "new") == tmp_path / "new"


# --- a checkpoint file and a run folder of llmcourse train ------------------------------------------------------


def test_cli_exports_a_run_folder_and_its_best_checkpoint(tmp_path, corpus_file, capsys):
    from llmcourse.cli import main

    run_dir = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--corpus", str(corpus_file), "--max-steps", "10", "--warmup-steps", "2",
                     "--eval-interval", "5", "--eval-iters", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "4",
                     "--out", str(run_dir)]) == 0
    assert main(["export-hf", "--checkpoint", str(run_dir), "--out", str(tmp_path / "from-folder")]) == 0
    assert main(["export-hf", "--checkpoint", str(run_dir / "best.pt"), "--out", str(tmp_path / "from-file")]) == 0
    capsys.readouterr()
    weights = [(tmp_path / name / "model.safetensors").read_bytes() for name in ("from-folder", "from-file")]
    assert weights[0] == weights[1]
    writer = pipeline("text-generation", model=str(tmp_path / "from-folder"), trust_remote_code=True)
    text = writer("ROMEO:\n", do_sample=False, max_new_tokens=40)[0]["generated_text"]  # past block_size 16: a sliding window
    done = cli("generate", "--checkpoint", str(run_dir), "--temperature", "0", "--no-cache", "--prompt", "ROMEO:\n",
               "--max-new-tokens", "40")
    assert done.returncode == 0, done.stderr
    assert done.stdout == text + "\n"


def test_cli_refuses_a_bpe_checkpoint_in_one_line(tmp_path):
    from llmcourse.checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, save_checkpoint, tokenizer_to_dict
    from llmcourse.train import TrainConfig

    tokenizer = BPETokenizer()
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=8, n_layer=1, n_head=2, n_embd=8))
    bundle = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "model": model.state_dict(),
              "model_config": vars(model.config).copy(), "config": TrainConfig().to_dict(), "tokenizer": tokenizer_to_dict(tokenizer)}
    path = save_checkpoint(bundle, tmp_path / "bpe.pt")
    done = cli("export-hf", "--checkpoint", str(path), "--out", str(tmp_path / "out"))
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1 and "BPETokenizer" in done.stderr, done.stderr
    assert not (tmp_path / "out").exists()
