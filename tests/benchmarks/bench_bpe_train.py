"""Benchmark: train the Day 8 BPE tokenizer (2,048 tokens) on the whole `shakespeare` corpus.

Not a test (no `test_` prefix, so pytest does not collect it). Run it from the repository root:

    python tests/benchmarks/bench_bpe_train.py                  # the whole corpus, 2,048 tokens
    python tests/benchmarks/bench_bpe_train.py --vocab-size 4096 --naive-merges 3

It prints the machine's load, the time of each stage (pre-split and counting, the merges), the
compression of the trained tokenizer on the training text and on the validation text, and, with
`--naive-merges N`, what N merges cost when every pair is recounted after every merge (the slow
method), extrapolated to the full number of merges.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

from llmcourse.bpe import BPETokenizer, _learn_merges, chunk_counts, merge_pair, pair_counts
from llmcourse.data import load_corpus, split_text


def naive_seconds_per_merge(chunks: dict[bytes, int], merges: int) -> float:
    """Seconds per merge of the slow method: recount every pair of every distinct chunk, then merge."""
    words, weights = [list(c) for c in chunks], list(chunks.values())
    start = time.perf_counter()
    for new_id in range(256, 256 + merges):
        counts: dict[tuple[int, int], int] = {}
        for word, weight in zip(words, weights):
            pair_counts(word, counts, weight)
        pair = min(counts, key=lambda p: (-counts[p], p))
        words = [merge_pair(word, pair, new_id) for word in words]
    return (time.perf_counter() - start) / merges


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", default="shakespeare", help="a corpus name or path for load_corpus")
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--naive-merges", type=int, default=0, help="also time this many merges of the naive method")
    args = parser.parse_args()

    print(f"machine: {platform.platform()}, {os.cpu_count()} CPU(s), Python {platform.python_version()}")
    print("load average before (1, 5, 15 min): " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))
    text = load_corpus(args.corpus)
    _, val = split_text(text)
    print(f"corpus {args.corpus!r}: {len(text):,} characters ({len(text.encode('utf-8')):,} bytes); training on all of it")

    wall, cpu = time.perf_counter(), time.process_time()
    tokenizer = BPETokenizer.train(text, args.vocab_size)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(f"train({args.vocab_size}): {wall:.1f} s wall, {cpu:.1f} s CPU -> {tokenizer}")

    start = time.perf_counter()
    chunks = chunk_counts(text, special_tokens=list(tokenizer.special_tokens))
    split_seconds = time.perf_counter() - start
    start = time.perf_counter()
    _learn_merges(chunks, len(tokenizer.merges))
    merge_seconds = time.perf_counter() - start
    print(f"  of which: pre-split and count {split_seconds:.1f} s ({sum(chunks.values()):,} chunks, {len(chunks):,} distinct), "
          f"{len(tokenizer.merges):,} merges {merge_seconds:.1f} s")

    start = time.perf_counter()
    ids = tokenizer.encode(text)
    encode_seconds = time.perf_counter() - start
    assert tokenizer.decode(ids) == text, "round trip failed"
    val_ids = tokenizer.encode(val)
    print(f"encode the corpus: {encode_seconds:.1f} s; {len(ids):,} tokens, {len(text) / len(ids):.2f} characters per token "
          f"(validation part: {len(val) / len(val_ids):.2f}); round trip exact")

    if args.naive_merges:
        per_merge = naive_seconds_per_merge(chunks, args.naive_merges)
        print(f"naive method: {per_merge:.2f} s per merge over the distinct chunks -> about "
              f"{per_merge * len(tokenizer.merges) / 60:.0f} min for {len(tokenizer.merges):,} merges")
    print("load average after (1, 5, 15 min): " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
