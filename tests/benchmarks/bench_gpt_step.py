"""Benchmark: one training step of the course's `GPT` against a GPT written with `torch.nn` built-ins.

Not a test (no `test_` prefix, so pytest does not collect it). Run it from the repository root:

    python tests/benchmarks/bench_gpt_step.py                 # both settings below, on the CPU
    python tests/benchmarks/bench_gpt_step.py --device cuda --rounds 30 --json report.json

A step is what training does: forward with targets, backward, a `torch.optim.AdamW` step. The shape is
nanoGPT's CPU recipe for shakespeare_char (4 layers, 4 heads, width 128, block 64, batch 12, a
vocabulary of 65). Two settings are measured: no dropout and no biases (that recipe), then dropout 0.1
with biases (GPT-2's layout). The reference model below is written here with `nn.LayerNorm`,
`nn.GELU`, `nn.Dropout` and `F.scaled_dot_product_attention`, the way nanoGPT's `model.py` builds it.

Both models start from the same weights, see the same batches, and run in the same process, taking
turns: each round times a few steps of one, then of the other (the order alternates), so that a busy
machine slows both alike. It prints tokens/s of each per round and the median ratio ours / reference.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time

# OpenMP threads that spin while they wait steal the cores from the other run and make timings erratic on
# a busy machine; waiting passively keeps the side-by-side comparison fair. Set before torch starts OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
import torch.nn.functional as F
from torch import nn

from llmcourse.gpt import GPT, GPTConfig


class ReferenceBlock(nn.Module):
    """A pre-norm transformer block from torch.nn pieces (the layout of GPT-2 and nanoGPT)."""

    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.gelu = nn.GELU()
        self.mlp_proj = nn.Linear(4 * n_embd, n_embd, bias=bias)
        self.resid_drop = nn.Dropout(dropout)
        self.mlp_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)  # 3 x (B, T, C)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        x = x + self.resid_drop(self.c_proj(y))
        return x + self.mlp_drop(self.mlp_proj(self.gelu(self.c_fc(self.ln_2(x)))))


class ReferenceGPT(nn.Module):
    """GPT-2's architecture from torch.nn pieces, with a tied head: the yardstick for our `GPT`."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        C = config.n_embd
        self.wte = nn.Embedding(config.vocab_size, C)
        self.wpe = nn.Embedding(config.block_size, C)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(ReferenceBlock(C, config.n_head, config.dropout, config.bias) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(C, bias=config.bias)
        self.lm_head = nn.Linear(C, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, T = idx.shape
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))  # (B, T, V)
        return logits, F.cross_entropy(logits.view(B * T, -1), targets.view(B * T))


def copy_weights(reference: ReferenceGPT, ours: GPT) -> None:
    """Give the reference model our model's weights, so both start from the same point."""
    with torch.no_grad():
        pairs = [(reference.wte.weight, ours.transformer.wte.weight), (reference.wpe.weight, ours.transformer.wpe.weight)]
        for ref, blk in zip(reference.blocks, ours.transformer.h):
            pairs += [
                (ref.ln_1.weight, blk.ln_1.weight), (ref.ln_2.weight, blk.ln_2.weight),
                (ref.c_attn.weight, blk.attn.c_attn.weight), (ref.c_proj.weight, blk.attn.c_proj.weight),
                (ref.c_fc.weight, blk.mlp.c_fc.weight), (ref.mlp_proj.weight, blk.mlp.c_proj.weight),
            ]
            if ours.config.bias:
                pairs += [
                    (ref.ln_1.bias, blk.ln_1.bias), (ref.ln_2.bias, blk.ln_2.bias),
                    (ref.c_attn.bias, blk.attn.c_attn.bias), (ref.c_proj.bias, blk.attn.c_proj.bias),
                    (ref.c_fc.bias, blk.mlp.c_fc.bias), (ref.mlp_proj.bias, blk.mlp.c_proj.bias),
                ]
        pairs.append((reference.ln_f.weight, ours.transformer.ln_f.weight))
        if ours.config.bias:
            pairs.append((reference.ln_f.bias, ours.transformer.ln_f.bias))
        for dst, src in pairs:
            dst.copy_(src)


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, batches: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> float:
    """Seconds for one training step per batch (forward, backward, AdamW), waiting for the device at the end."""
    start = time.perf_counter()
    for x, y in batches:
        _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(config: GPTConfig, batch_size: int, rounds: int, steps: int, warmup: int, device: torch.device) -> dict:
    """Tokens/s of ours and of the reference, round by round, taking turns; returns the figures."""
    torch.manual_seed(0)
    ours = GPT(config).to(device).train()
    reference = ReferenceGPT(config).to(device).train()
    copy_weights(reference, ours)
    models = {"ours": ours, "reference": reference}
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-3) for name, m in models.items()}
    gen = torch.Generator().manual_seed(1)

    def batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        ids = torch.randint(config.vocab_size, (n, batch_size, config.block_size + 1), generator=gen).to(device)
        return [(b[:, :-1].contiguous(), b[:, 1:].contiguous()) for b in ids]

    for name in models:  # warm-up: allocator, kernels, caches
        train_steps(models[name], optimizers[name], batches(warmup), device)
    tokens = steps * batch_size * config.block_size
    rates: dict[str, list[float]] = {"ours": [], "reference": []}
    for r in range(rounds):
        work = batches(steps)
        order = ["ours", "reference"] if r % 2 == 0 else ["reference", "ours"]
        for name in order:
            rates[name].append(tokens / train_steps(models[name], optimizers[name], work, device))
    ratios = [a / b for a, b in zip(rates["ours"], rates["reference"])]
    return {
        "config": {k: getattr(config, k) for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "dropout", "bias", "implementation")},
        "batch_size": batch_size,
        "ours_tokens_per_s": statistics.median(rates["ours"]),
        "reference_tokens_per_s": statistics.median(rates["reference"]),
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=15, help="rounds of taking turns")
    parser.add_argument("--steps", type=int, default=10, help="training steps per model per round")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=12)
    parser.add_argument("--implementation", default="fused", help="our GPT's layers: fused or manual")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()

    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or platform.machine()} CPU"
    print(f"device: {name}; torch {torch.__version__}; {torch.get_num_threads()} threads; {os.cpu_count()} CPU(s)")
    print("load average before (1, 5, 15 min): " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))
    settings = {
        "nanoGPT CPU recipe: dropout 0, no biases": dict(dropout=0.0, bias=False),
        "dropout 0.1 and biases": dict(dropout=0.1, bias=True),
    }
    results = {}
    for label, extra in settings.items():
        config = GPTConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128, implementation=args.implementation, **extra)
        figures = measure(config, args.batch_size, args.rounds, args.steps, args.warmup, device)
        results[label] = figures
        print(
            f"{label}: ours {figures['ours_tokens_per_s']:,.0f} tokens/s, reference {figures['reference_tokens_per_s']:,.0f} tokens/s, "
            f"ratio {figures['ratio_median']:.3f} (rounds: {figures['ratio_min']:.3f} to {figures['ratio_max']:.3f})"
        )
    if args.json:
        report = {
            "device": name,
            "torch": torch.__version__,
            "date": datetime.date.today().isoformat(),
            "threads": torch.get_num_threads(),
            "rounds": args.rounds,
            "steps_per_round": args.steps,
            "results": results,
        }
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
