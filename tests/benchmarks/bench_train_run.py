"""Benchmark: a whole training run of `llmcourse train` against a reference loop written with torch built-ins.

Not a test (no `test_` prefix, so pytest does not collect it). Run it from the repository root:

    python tests/benchmarks/bench_train_run.py                     # nanoGPT's CPU recipe, tinyshakespeare
    python tests/benchmarks/bench_train_run.py --max-steps 500     # a shorter check

The recipe is the one nanoGPT's README gives for a CPU (shakespeare_char: 4 layers, 4 heads, width 128,
blocks of 64 characters, batches of 12, 2,000 steps, learning rate 1e-3 warmed up for 100 steps and
decayed to 1e-4, beta2 0.99, no dropout, evaluation every 250 steps on 20 batches); nanoGPT reports a
validation loss of about 1.88 for it. Both runs see the same split of the text (the last 10% is
validation) and the same kind of batches.

The course's side is `llmcourse.train.Trainer`, exactly what `llmcourse train` runs. The reference is
the loop nanoGPT's train.py runs, written here with torch's own pieces: the torch.nn GPT of
bench_gpt_step.py (started from the same weights as ours: GPT-2's initialization), `torch.optim.AdamW` with nanoGPT's parameter groups (every matrix decays, the
embeddings too), nanoGPT's warmup formula, `torch.nn.utils.clip_grad_norm_`, and a log line (with
`loss.item()`) every 10 steps. The two runs take turns, one evaluation interval at a time, so that a busy
machine slows both alike. It prints each run's wall time, tokens/s and final validation loss, and the
ratio of the wall times.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

# OpenMP threads that spin while they wait steal the cores from the other run and make timings erratic on
# a busy machine; waiting passively keeps the side-by-side comparison fair. Set before torch starts OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gpt_step import ReferenceGPT, copy_weights  # noqa: E402  (the torch.nn GPT, beside this file)

from llmcourse.batches import get_batch  # noqa: E402
from llmcourse.gpt import GPT  # noqa: E402
from llmcourse.train import Callback, TrainConfig, Trainer, prepare_data  # noqa: E402

NANOGPT_CPU_RECIPE = dict(
    n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, max_steps=2000, lr=1e-3, min_lr=1e-4,
    warmup_steps=100, dropout=0.0, beta2=0.99, weight_decay=0.1, grad_clip=1.0, eval_interval=250, eval_iters=20,
    log_interval=10, bias=False,
)


class PauseAtEvaluations(Callback):
    """Ends `Trainer.run` after every evaluation but the first, so that the two runs can take turns."""

    def on_eval(self, trainer, record) -> None:
        if trainer.step > 0:
            trainer.should_stop = True


def reference_run(config: TrainConfig, data, chunks: list[float]):
    """nanoGPT's loop with torch built-ins, as a generator: it yields after every evaluation but the first.

    The seconds of every chunk are appended to ``chunks``; the generator returns the last validation loss.
    """
    torch.manual_seed(config.seed)
    ours = GPT(config.model_config(data.tokenizer.vocab_size))  # GPT-2's initialization, as nanoGPT's
    model = ReferenceGPT(ours.config)
    copy_weights(model, ours)  # so both runs start from the very same weights
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr, betas=(config.beta1, config.beta2),
    )
    batches = torch.Generator().manual_seed(config.seed)

    def lr_at(it: int) -> float:  # nanoGPT's warmup and cosine decay
        if it < config.warmup_steps:
            return config.lr * (it + 1) / (config.warmup_steps + 1)
        if it > config.max_steps:
            return config.min_lr
        ratio = (it - config.warmup_steps) / (config.max_steps - config.warmup_steps)
        return config.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (config.lr - config.min_lr)

    @torch.no_grad()
    def estimate() -> float:
        model.eval()
        gen = torch.Generator().manual_seed(config.seed + 1)
        losses = [model(*get_batch(data.val, config.batch_size, config.block_size, generator=gen))[1].item() for _ in range(config.eval_iters)]
        model.train()
        return sum(losses) / len(losses)

    start = time.perf_counter()
    val = estimate()
    for it in range(config.max_steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(it)
        x, y = get_batch(data.train, config.batch_size, config.block_size, generator=batches)
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (it + 1) % config.log_interval == 0:
            loss.item()  # nanoGPT reads the loss back for its log line
        if (it + 1) % config.eval_interval == 0 or it + 1 == config.max_steps:
            val = estimate()
            chunks.append(time.perf_counter() - start)
            if it + 1 < config.max_steps:
                yield val
            start = time.perf_counter()
    return val


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", default="tinyshakespeare")
    parser.add_argument("--max-steps", type=int, default=NANOGPT_CPU_RECIPE["max_steps"])
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()

    config = TrainConfig(corpus=args.corpus, **{**NANOGPT_CPU_RECIPE, "max_steps": args.max_steps})
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPU(s), torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("load average before (1, 5, 15 min): " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))
    data = prepare_data(config)
    ours = Trainer(config, data, callbacks=[PauseAtEvaluations()], progress=False)
    ours_chunks: list[float] = []
    reference_chunks: list[float] = []
    reference = reference_run(config, data, reference_chunks)
    reference_val = None
    while ours.step < config.max_steps:
        start = time.perf_counter()
        ours.run()
        ours_chunks.append(time.perf_counter() - start)
        try:
            next(reference)
        except StopIteration as done:
            reference_val = done.value
    if reference_val is None:
        for reference_val in reference:  # pragma: no cover - the reference always finishes with ours
            pass
    ours_val = [r["val_loss"] for r in ours.history if r["eval"]][-1]
    tokens = config.max_steps * config.batch_size * config.block_size
    ours_s, reference_s = sum(ours_chunks), sum(reference_chunks)
    print(f"{config.max_steps} steps, {tokens:,} tokens, corpus {args.corpus!r}")
    print(f"llmcourse Trainer: {ours_s:7.1f} s, {tokens / ours_s:8,.0f} tokens/s, final val loss {ours_val:.4f}")
    print(f"torch reference:   {reference_s:7.1f} s, {tokens / reference_s:8,.0f} tokens/s, final val loss {reference_val:.4f}")
    print(f"wall-time ratio reference / ours: {reference_s / ours_s:.3f} (above 1: the course's loop is faster)")
    if args.json:
        report = {
            "date": datetime.date.today().isoformat(), "torch": torch.__version__, "machine": platform.platform(),
            "steps": config.max_steps, "corpus": args.corpus, "ours_s": ours_s, "reference_s": reference_s,
            "ours_val_loss": ours_val, "reference_val_loss": reference_val, "ratio": reference_s / ours_s,
        }
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
