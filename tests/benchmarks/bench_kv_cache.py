"""Benchmark: writing with Day 28's KV cache against writing without it, side by side in one run.

Not a test (no `test_` prefix, so pytest does not collect it). Run it from the repository root:

    python tests/benchmarks/bench_kv_cache.py --json notebooks/data/day28_kv_cache_bench.json
    python tests/benchmarks/bench_kv_cache.py --new-tokens 100 --repeats 1      # a quick look

The model is a GPT of 6 layers, 6 heads and width 384 with a context of 1,024 positions and a vocabulary
of 65 (the shape of nanoGPT's shakespeare_char GPU recipe, with a longer context), randomly initialized
from a fixed seed: speed does not depend on what the weights have learned. From a 4-token prompt it
writes 500 new tokens greedily with `llmcourse.generate.generate_tokens`, once with `use_cache=True` and
once with `use_cache=False`. Every step is timed, so the file records how the speed of each path changes
as the text grows, not only the total.

The two paths take turns (the order alternates from repeat to repeat) so that a machine that gets
busier or quieter slows or speeds both alike; the figures are medians over the repeats. The tokens of
the two paths must be identical, or the script stops. Day 28's notebook plots the JSON this writes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

# OpenMP threads that spin while they wait steal the cores from the other run and make timings erratic on
# a busy machine; waiting passively keeps the side-by-side comparison fair. Set before torch starts OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from llmcourse.generate import generate_tokens
from llmcourse.gpt import GPT, GPTConfig


def cpu_name() -> str:
    """The processor's name as Linux reports it, or what `platform` knows elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def timed_steps(model: GPT, prompt: torch.Tensor, new_tokens: int, use_cache: bool) -> tuple[torch.Tensor, list[float]]:
    """Greedy tokens (1, new_tokens) and the seconds each step took, measured as the tokens arrive."""
    tokens, seconds = [], []
    steps = generate_tokens(model, prompt, new_tokens, temperature=0, use_cache=use_cache)
    while True:
        start = time.perf_counter()
        try:
            nxt = next(steps)
        except StopIteration:
            break
        seconds.append(time.perf_counter() - start)
        tokens.append(nxt)
    return torch.stack(tokens, dim=1), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=500)
    parser.add_argument("--prompt-tokens", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each path, taking turns")
    parser.add_argument("--bin", type=int, default=50, help="tokens per point of the speed-against-length curve")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()

    config = GPTConfig(n_layer=6, n_head=6, n_embd=384, block_size=1024, vocab_size=65)
    if args.prompt_tokens + args.new_tokens > config.block_size:
        parser.error(f"prompt and new tokens must fit the context of {config.block_size}")
    torch.manual_seed(args.seed)
    model = GPT(config).eval()
    prompt = torch.randint(config.vocab_size, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(args.seed))
    print(f"CPU: {cpu_name()}, {os.cpu_count()} CPU(s); torch {torch.__version__}, {torch.get_num_threads()} threads")
    load_before = os.getloadavg()
    print("load average before (1, 5, 15 min): " + ", ".join(f"{x:.2f}" for x in load_before))
    print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters; prompt {args.prompt_tokens} tokens, "
          f"{args.new_tokens} new tokens, greedy, {args.repeats} repeat(s) of each path")

    timed_steps(model, prompt, 8, use_cache=True)  # warm-up: allocator, kernels
    timed_steps(model, prompt, 8, use_cache=False)
    runs: dict[str, list[list[float]]] = {"cached": [], "uncached": []}
    tokens: dict[str, torch.Tensor] = {}
    for r in range(args.repeats):
        order = ["cached", "uncached"] if r % 2 == 0 else ["uncached", "cached"]
        for name in order:
            new, seconds = timed_steps(model, prompt, args.new_tokens, use_cache=name == "cached")
            if name in tokens and not torch.equal(tokens[name], new):
                raise SystemExit(f"greedy tokens of the {name} path changed between repeats")
            tokens[name] = new
            runs[name].append(seconds)
            print(f"repeat {r + 1}, {name:8s}: {args.new_tokens / sum(seconds):8.1f} tokens/s")
    tokens_equal = torch.equal(tokens["cached"], tokens["uncached"])
    if not tokens_equal:
        raise SystemExit("the cached and uncached paths wrote different tokens")

    totals = {name: statistics.median(sum(s) for s in steps) for name, steps in runs.items()}
    rates = {name: args.new_tokens / total for name, total in totals.items()}
    speedup = rates["cached"] / rates["uncached"]
    per_step = {name: [statistics.median(s[i] for s in steps) for i in range(args.new_tokens)] for name, steps in runs.items()}
    lengths = list(range(args.bin, args.new_tokens + 1, args.bin))
    curve = {name: [args.bin / sum(per_step[name][end - args.bin : end]) for end in lengths] for name in per_step}
    print(f"cached {rates['cached']:,.1f} tokens/s, uncached {rates['uncached']:,.1f} tokens/s: "
          f"the cache is {speedup:.1f} times faster (tokens identical: {tokens_equal})")
    print("tokens/s over each stretch of " + str(args.bin) + " tokens, ending at length:")
    for i, end in enumerate(lengths):
        print(f"  {end:5d}: cached {curve['cached'][i]:8.1f}   uncached {curve['uncached'][i]:8.1f}")
    load_after = os.getloadavg()
    print("load average after (1, 5, 15 min): " + ", ".join(f"{x:.2f}" for x in load_after))
    if args.json:
        report = {
            "date": datetime.date.today().isoformat(),
            "torch": torch.__version__,
            "cpu": cpu_name(),
            "machine": platform.platform(),
            "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "load_average_before": [round(x, 2) for x in load_before],  # 1, 5, 15 minutes: was the machine busy?
            "load_average_after": [round(x, 2) for x in load_after],
            "config": {k: getattr(config, k) for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")},
            "parameters": sum(p.numel() for p in model.parameters()),
            "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens,
            "repeats": args.repeats,
            "tokens_equal": tokens_equal,
            "tokens_per_s": rates,
            "speedup": speedup,
            "lengths": lengths,
            "tokens_per_s_at_length": curve,
        }
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
