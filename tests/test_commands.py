"""llmcourse.commands (Day 30): `llmcourse generate` end to end, and the pieces behind it."""

from __future__ import annotations

import io
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmcourse import checkpoint, cli, commands
from llmcourse.bpe import BPETokenizer
from llmcourse.chartok import CharTokenizer
from llmcourse.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    CheckpointError,
    load_pretrained,
    pretrained_path,
    save_checkpoint,
    tokenizer_to_dict,
)
from llmcourse.generate import generate
from llmcourse.gpt import GPT, GPTConfig
from llmcourse.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shipped():
    """The pretrained model and its tokenizer, on the CPU."""
    model, tokenizer, _ = load_pretrained("shakespeare-char")
    return model, tokenizer


def run(capsys, *argv) -> tuple[int, str, str]:
    """`llmcourse generate ARGV` in this process, through cli.main: (exit status, stdout, stderr)."""
    capsys.readouterr()
    try:
        status = cli.main(["generate", *map(str, argv)])
    except SystemExit as stop:  # argparse ends --help and refused lines itself
        status = stop.code
    out, err = capsys.readouterr()
    return status, out, err


def library_text(model, tokenizer, prompt: str, n: int, seed: int, **knobs) -> str:
    """What Day 25's generate writes for one prompt and seed (the command must print exactly this)."""
    generator = torch.Generator().manual_seed(seed)
    ids = generate(model, torch.tensor([tokenizer.encode(prompt)]), n, generator=generator, **knobs)[0]
    return tokenizer.decode(ids)


def tiny_checkpoint(path: Path, tokenizer, *, seed: int = 0, **model_overrides) -> Path:
    """Save an untrained one-layer GPT with ``tokenizer`` as an llmcourse checkpoint at ``path``."""
    torch.manual_seed(seed)
    settings = dict(vocab_size=tokenizer.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16)
    model = GPT(GPTConfig(**{**settings, **model_overrides}))
    bundle = {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "model": model.state_dict(),
        "model_config": vars(model.config).copy(), "config": TrainConfig().to_dict(), "tokenizer": tokenizer_to_dict(tokenizer),
    }
    return save_checkpoint(bundle, path)


# ---- flags and defaults --------------------------------------------------------------------------------


def test_defaults_and_help(capsys):
    parser = commands.OneLineParser(prog="llmcourse generate")
    commands.add_generate_arguments(parser)
    args = parser.parse_args([])
    assert (args.checkpoint, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed,
            args.num_samples, args.output_file, args.use_cache, args.device) == \
           ("shakespeare-char", "\n", 500, 0.8, 0, 1.0, 1337, 1, None, True, "auto")
    assert commands.check_generate_args(args) == dict(max_new_tokens=500, temperature=0.8, top_k=None, top_p=None, use_cache=True)
    status, out, _ = run(capsys, "--help")
    assert status == 0
    for flag in ("--checkpoint", "--prompt", "--max-new-tokens", "--temperature", "--top-k", "--top-p", "--seed",
                 "--num-samples", "--output-file", "--no-cache", "--device"):
        assert flag in out, flag
    status, out, _ = run(capsys, "--max-new-tokens", 50)  # every other flag at its default
    assert status == 0 and out[0] == "\n" and len(out) == 1 + 50 + 1
    assert cli.main([]) == 0 and "generate" in capsys.readouterr().out  # the top-level help lists the command


def test_the_command_prints_what_generate_writes(shipped, capsys):
    model, tokenizer = shipped
    status, out, err = run(capsys, "--prompt", "ROMEO:\n", "--max-new-tokens", 60, "--seed", 3, "--device", "cpu")
    assert status == 0 and err == ""
    assert out == library_text(model, tokenizer, "ROMEO:\n", 60, 3, temperature=0.8) + "\n"


def test_sampling_flags_reach_the_sampler(shipped, capsys):
    model, tokenizer = shipped
    argv = ["--prompt", "KING:\n", "--max-new-tokens", 50, "--seed", 11, "--device", "cpu"]
    for flags, knobs in ((["--temperature", 1.3], dict(temperature=1.3)),
                         (["--top-k", 3], dict(temperature=0.8, top_k=3)),
                         (["--top-p", 0.5, "--temperature", 1.0], dict(temperature=1.0, top_p=0.5)),
                         (["--top-k", 10, "--top-p", 0.9], dict(temperature=0.8, top_k=10, top_p=0.9))):
        status, out, _ = run(capsys, *argv, *flags)
        assert status == 0 and out == library_text(model, tokenizer, "KING:\n", 50, 11, **knobs) + "\n", flags
    top1 = run(capsys, *argv, "--top-k", 1)[1]
    assert top1 == run(capsys, *argv, "--temperature", 0)[1]  # top-1 sampling is greedy
    assert run(capsys, *argv, "--max-new-tokens", 0)[1] == "KING:\n\n"  # the prompt alone, then the newline


def test_same_seed_same_text_with_and_without_the_cache(capsys):
    argv = ["--max-new-tokens", 80, "--device", "cpu"]
    cached = run(capsys, *argv, "--seed", 5)
    uncached = run(capsys, *argv, "--seed", 5, "--no-cache")
    assert cached[0] == uncached[0] == 0 and cached[1] == uncached[1]
    assert run(capsys, *argv, "--seed", 5)[1] == cached[1]  # and again
    assert run(capsys, *argv, "--seed", 6)[1] != cached[1]  # another seed, another text


def test_past_the_context_the_cache_still_changes_nothing(tmp_path, capsys):
    """The tiny model's context is 16 tokens: 40 new tokens slide the window (the cache is dropped)."""
    path = tiny_checkpoint(tmp_path / "tiny.pt", CharTokenizer("abcdefgh \n"))
    argv = ["--checkpoint", path, "--prompt", "abc", "--max-new-tokens", 40, "--seed", 2, "--temperature", 1.5]
    cached, uncached = run(capsys, *argv), run(capsys, *argv, "--no-cache")
    assert cached[0] == 0 and cached == uncached and len(cached[1]) == 3 + 40 + 1


def test_greedy_ignores_the_seed(capsys):
    argv = ["--temperature", 0, "--max-new-tokens", 40, "--device", "cpu"]
    assert run(capsys, *argv, "--seed", 1)[1] == run(capsys, *argv, "--seed", 2)[1]


def test_num_samples_draw_from_one_generator_seeded_once(shipped, capsys):
    model, tokenizer = shipped
    argv = ["--max-new-tokens", 40, "--seed", 9, "--device", "cpu"]
    one = run(capsys, *argv)[1]
    status, three, _ = run(capsys, *argv, "--num-samples", 3)
    samples = three.split(commands.SAMPLE_SEPARATOR + "\n")
    assert status == 0 and len(samples) == 3 and samples[0] == one and len(set(samples)) == 3
    generator = torch.Generator().manual_seed(9)  # the same stream of random numbers, sample after sample
    prompt = torch.tensor([tokenizer.encode("\n")])
    expected = [tokenizer.decode(generate(model, prompt, 40, temperature=0.8, generator=generator)[0]) + "\n" for _ in range(3)]
    assert samples == expected


# ---- streaming -----------------------------------------------------------------------------------------


class Recorder(io.StringIO):
    """A stdout that logs every write and flush into a shared list of events."""

    def __init__(self, events: list):
        super().__init__()
        self.events = events

    def write(self, text):
        self.events.append(("write", text))
        return super().write(text)

    def flush(self):
        self.events.append(("flush", None))


def test_each_token_is_printed_and_flushed_before_the_next_is_made(monkeypatch, capsys):
    import llmcourse.generate

    events: list = []
    original = llmcourse.generate.generate_tokens

    def spy(*args, **kwargs):
        for nxt in original(*args, **kwargs):
            events.append(("token", int(nxt)))
            yield nxt

    monkeypatch.setattr(llmcourse.generate, "generate_tokens", spy)
    monkeypatch.setattr(sys, "stdout", Recorder(events))
    assert cli.main(["generate", "--prompt", "ROMEO:\n", "--max-new-tokens", "25", "--device", "cpu"]) == 0
    kinds = [kind for kind, _ in events]
    assert kinds[:2] == ["write", "flush"]  # the prompt, at once
    assert kinds[2:-2] == ["token", "write", "flush"] * 25  # every token on the screen before the next is made
    assert kinds[-2:] == ["write", "flush"] and events[-2] == ("write", "\n")


def test_text_stream_never_prints_half_a_character():
    tokenizer = BPETokenizer.train("café naïve 🙂 smile " * 20, 270)
    text = "a naïve café 🙂, then 日本語 and more 🙂🙂"
    ids = tokenizer.encode(text)
    events: list = []
    stream = commands.TextStream(tokenizer, Recorder(events))
    pieces = [stream.add_token(i) for i in ids]
    stream.end_tokens()
    assert stream.text == text and "".join(pieces) == text and "\ufffd" not in "".join(pieces)
    assert stream.tokens_written == len(ids)
    assert sum(p == "" for p in pieces) > 0  # some tokens held back a cut character


def test_text_stream_equals_decode_for_any_ids():
    """Random ids make bytes that are not UTF-8 at all: the stream still shows what decode shows."""
    tokenizer = BPETokenizer.train("café naïve 🙂 smile " * 20, 270)
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randrange(1, 12))]
        stream = commands.TextStream(tokenizer, io.StringIO())
        for i in ids:
            stream.add_token(i)
        stream.end_tokens()
        assert stream.text == tokenizer.decode(ids), ids


def test_bpe_checkpoint_streams_what_decode_gives(tmp_path, capsys):
    tokenizer = BPETokenizer.train("To be, or not to be: that is the question. Café 🙂 " * 10, 280)
    model_path = tiny_checkpoint(tmp_path / "bpe.pt", tokenizer, seed=1)
    status, out, err = run(capsys, "--checkpoint", model_path, "--prompt", "To be 🙂", "--max-new-tokens", 30, "--seed", 4,
                           "--temperature", 2.0)
    model, _ = commands.load_model(str(model_path))
    assert status == 0 and err == ""
    assert out == library_text(model, tokenizer, "To be 🙂", 30, 4, temperature=2.0) + "\n"


# ---- checkpoints: names, files, run folders --------------------------------------------------------------


def test_load_model_takes_a_name_a_file_or_a_run_folder(tmp_path, capsys, corpus_file):
    model, tokenizer = commands.load_model("shakespeare-char")
    assert not model.training and tokenizer.vocab_size == model.config.vocab_size
    run_dir = tmp_path / "run"
    assert cli.main(["train", "--preset", "tiny", "--corpus", str(corpus_file), "--max-steps", "10", "--warmup-steps", "2", "--eval-interval", "5",
                     "--eval-iters", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "4", "--out", str(run_dir)]) == 0
    argv = ["--prompt", "ROMEO:\n", "--max-new-tokens", 30, "--seed", 2]
    from_folder = run(capsys, "--checkpoint", run_dir, *argv)
    from_file = run(capsys, "--checkpoint", run_dir / "best.pt", *argv)
    assert from_folder[0] == 0 and from_folder == from_file
    trained, trained_tokenizer = commands.load_model(str(run_dir / "best.pt"))
    assert from_file[1] == library_text(trained, trained_tokenizer, "ROMEO:\n", 30, 2, temperature=0.8) + "\n"
    with pytest.raises(CheckpointError, match="neither a model the package ships"):
        commands.load_model("shakespeare-word")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        commands.load_model(str(tmp_path / "empty-folder"))  # not a folder yet: a missing file
    (tmp_path / "empty-folder").mkdir()
    with pytest.raises(CheckpointError, match="best.pt: no such checkpoint"):
        commands.load_model(str(tmp_path / "empty-folder"))


def test_a_model_that_writes_ids_its_tokenizer_cannot_read_is_refused(tmp_path):
    path = tiny_checkpoint(tmp_path / "mismatch.pt", CharTokenizer("abc"), vocab_size=10)
    with pytest.raises(CheckpointError, match="writes 10 token ids but its tokenizer reads only 3"):
        commands.load_model(str(path))


# ---- bad input: one line, status 2, nothing written ------------------------------------------------------


@pytest.fixture(scope="module")
def broken_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("broken")
    shipped_bytes = pretrained_path("shakespeare-char").read_bytes()
    (folder / "truncated.pt").write_bytes(shipped_bytes[: len(shipped_bytes) // 2])
    (folder / "empty.pt").write_bytes(b"")
    torch.save({"weights": torch.zeros(2)}, folder / "foreign.pt")
    bundle = torch.load(pretrained_path("shakespeare-char"), weights_only=True)
    bundle["model_config"]["n_embd"] = 64  # the weights no longer fit the model it describes
    torch.save(bundle, folder / "wrong-shapes.pt")
    return folder


BAD_INPUTS = [
    (["--temperature", "-1"], "temperature must be 0 (greedy) or a positive number"),
    (["--temperature", "nan"], "temperature must be 0 (greedy) or a positive number"),
    (["--temperature", "inf"], "temperature must be 0 (greedy) or a positive number"),
    (["--temperature", "warm"], "invalid float value"),
    (["--top-p", "0"], "top_p must be a number in (0, 1]"),
    (["--top-p", "1.01"], "top_p must be a number in (0, 1]"),
    (["--top-p", "-0.5"], "top_p must be a number in (0, 1]"),
    (["--top-p", "nan"], "top_p must be a number in (0, 1]"),
    (["--top-k", "-1"], "top_k must be a positive whole number"),
    (["--top-k", "2.5"], "invalid int value"),
    (["--max-new-tokens", "-1"], "max_new_tokens must be 0 or more"),
    (["--num-samples", "0"], "num_samples must be 1 or more"),
    (["--num-samples", "-2"], "num_samples must be 1 or more, got -2"),
    (["--seed", "-1"], "seed must be 0 or more"),
    (["--seed", str(2**64)], "seed must be below 2**64"),
    (["--prompt", ""], "the prompt is empty"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--bogus", "1"], "unrecognized arguments: --bogus 1"),
]


def assert_one_line(status: int, out: str, err: str) -> str:
    assert status == 2, (status, err)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and "error:" in err, err
    assert out == ""
    return err.strip()


@pytest.mark.parametrize(("argv", "message"), BAD_INPUTS, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_values_are_refused_before_the_model_is_loaded(argv, message, tmp_path, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before every value was checked")

    monkeypatch.setattr(commands, "load_model", refuse)
    target = tmp_path / "out.txt"
    line = assert_one_line(*run(capsys, *argv, "--output-file", target))
    assert message in line and line.startswith("llmcourse"), line
    assert not target.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("checkpoint", "message"), [
    ("missing.pt", "missing.pt: no such checkpoint"),
    ("truncated.pt", "damaged or truncated"),
    ("empty.pt", "damaged or truncated"),
    ("foreign.pt", "not an llmcourse checkpoint"),
    ("wrong-shapes.pt", "cannot be rebuilt"),
    ("no-such-model", "neither a model the package ships"),
])
def test_missing_and_broken_checkpoints(checkpoint, message, broken_files, tmp_path, capsys):
    where = checkpoint if checkpoint == "no-such-model" else broken_files / checkpoint
    target = tmp_path / "out.txt"
    line = assert_one_line(*run(capsys, "--checkpoint", where, "--output-file", target))
    assert line.startswith("llmcourse generate: error: argument --checkpoint:") and message in line, line
    assert not target.exists()


def test_characters_the_tokenizer_does_not_know_are_named(tmp_path, capsys):
    target = tmp_path / "out.txt"
    line = assert_one_line(*run(capsys, "--prompt", "Roméo\tet Juliette", "--output-file", target))
    assert "the characters 'é' (U+00E9), '\\t' (U+0009)" in line and "75 characters" in line
    line = assert_one_line(*run(capsys, "--prompt", "ROMEO 🙂"))
    assert "the character '🙂' (U+1F642);" in line
    assert not target.exists()
    # a tokenizer that skips unknown characters may be left with nothing to continue
    path = tiny_checkpoint(tmp_path / "skip.pt", CharTokenizer("ab", unknown="skip"))
    line = assert_one_line(*run(capsys, "--checkpoint", path, "--prompt", "xyz"))
    assert "the prompt gives no tokens" in line


def test_output_file_in_a_missing_folder_or_on_a_folder(tmp_path, capsys):
    line = assert_one_line(*run(capsys, "--output-file", tmp_path / "nowhere" / "out.txt"))
    assert "the folder" in line and "does not exist" in line
    line = assert_one_line(*run(capsys, "--output-file", tmp_path))
    assert "is a folder" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: asking for one is no error")
def test_asking_for_a_gpu_that_is_not_there(capsys):
    line = assert_one_line(*run(capsys, "--device", "cuda"))
    assert "no CUDA GPU" in line


# ---- the output file ------------------------------------------------------------------------------------


def test_output_file_holds_exactly_what_was_printed(tmp_path, capsys):
    target = tmp_path / "samples.txt"
    target.write_text("an older file\n", encoding="utf-8")
    status, out, _ = run(capsys, "--prompt", "JULIET:\n", "--max-new-tokens", 30, "--num-samples", 2, "--output-file", target,
                         "--device", "cpu")
    assert status == 0 and target.read_text(encoding="utf-8") == out  # prompts and separator included
    assert out.startswith("JULIET:\n") and out.count(commands.SAMPLE_SEPARATOR) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples.txt"]  # no temporary file left
    assert target.stat().st_mode & 0o777 == 0o666 & ~checkpoint._umask()


def test_a_crash_while_writing_leaves_the_old_file_whole(tmp_path, monkeypatch, capsys):
    target = tmp_path / "samples.txt"
    target.write_text("an older file\n", encoding="utf-8")

    def crash(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    status, out, err = run(capsys, "--max-new-tokens", 5, "--output-file", target)
    assert status == 2 and "No space left on device" in err and len(err.strip().splitlines()) == 1
    assert target.read_text(encoding="utf-8") == "an older file\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples.txt"]


# ---- Ctrl-C ---------------------------------------------------------------------------------------------


class InterruptedScreen(io.StringIO):
    """A stdout on which Ctrl-C is pressed during the n-th write."""

    def __init__(self, n: int):
        super().__init__()
        self.left = n

    def write(self, text):
        self.left -= 1
        if self.left == 0:
            raise KeyboardInterrupt
        return super().write(text)


def test_ctrl_c_keeps_the_text_so_far_and_writes_no_file(shipped, tmp_path, monkeypatch, capsys):
    target = tmp_path / "out.txt"
    screen = InterruptedScreen(11)
    monkeypatch.setattr(sys, "stdout", screen)
    status = cli.main(["generate", "--prompt", "ROMEO:\n", "--max-new-tokens", "50", "--output-file", str(target), "--device", "cpu"])
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert status == commands.INTERRUPTED_EXIT == 130
    assert err.strip() == "llmcourse generate: interrupted after 9 tokens; no output file written"
    so_far = library_text(*shipped, "ROMEO:\n", 9, 1337, temperature=0.8)  # the prompt and the 9 tokens printed
    assert screen.getvalue() == so_far + ("" if so_far.endswith("\n") else "\n")  # then a newline for the note
    assert not target.exists() and list(tmp_path.iterdir()) == []


# ---- the real command, in a fresh Python -----------------------------------------------------------------


def llmcourse(*argv, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmcourse", *map(str, argv)], capture_output=True, text=True, timeout=180, **kwargs)


def test_python_m_llmcourse_generate_end_to_end(tmp_path, capsys):
    target = tmp_path / "out.txt"
    argv = ["generate", "--prompt", "ROMEO:\n", "--max-new-tokens", 80, "--seed", 21, "--device", "cpu"]
    real = llmcourse(*argv, "--output-file", target)
    assert real.returncode == 0 and real.stderr == ""
    assert target.read_text(encoding="utf-8") == real.stdout
    assert real.stdout == run(capsys, *argv[1:])[1]  # the same text as in this process: only the seed decides
    refused = llmcourse("generate", "--top-p", "1.5", "--output-file", tmp_path / "never.txt")
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.strip().splitlines() == ["llmcourse generate: error: argument --top-p: top_p must be a number in (0, 1], got 1.5"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_help_needs_no_torch():
    probe = ("import contextlib, io, sys\nfrom llmcourse import cli\nwith contextlib.redirect_stdout(io.StringIO()):\n"
             "    for argv in (['--help'], ['generate', '--help']):\n        try:\n            cli.main(argv)\n"
             "        except SystemExit:\n            pass\nprint('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "False", result.stderr


def default_sigint() -> None:
    """In the child, before Python starts: SIGINT as a terminal delivers it (a background shell may ignore it)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT and closed pipes work differently on Windows")
def test_real_streaming_ctrl_c_and_a_closed_pipe():
    """Text arrives while the command still runs; SIGINT then ends it with 130; a reader that leaves ends it quietly."""
    command = [sys.executable, "-m", "llmcourse", "generate", "--max-new-tokens", "100000", "--device", "cpu"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=default_sigint)
    try:
        first = proc.stdout.read(40)  # returns once 40 bytes are printed, long before 100000 tokens are made
        assert len(first) == 40 and proc.poll() is None
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llmcourse generate: interrupted after ") and "Traceback" not in err.decode()

    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert len(proc.stdout.read(40)) == 40
        proc.stdout.close()  # like `| head`: the reader goes away
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == commands.BROKEN_PIPE_EXIT and err == b"", err.decode()
