"""Data pipeline throughput: prepare-data vs the reference path, loader tokens/s, loader memory vs corpus size.

    .venv/bin/python bench/data.py [--copies 2] [--tokenizer tests/fixtures/reference/tokenizer-51200.json]

The corpus is the embedded one (corpus:shakespeare) repeated --copies times as JSONL. The
reference path encodes one document at a time and saves a list of tensors with torch.save, as
the reference trainer's preprocessing does. Memory: the loader runs in a fresh process over a
1x and a 10x corpus and reports its peak resident memory after the same number of batches.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer

from dual_lm.data.corpus import expand_sources, iter_documents
from dual_lm.data.loader import PackedLoader, TokenShards
from dual_lm.data.prepare import PrepareRequest, prepare_data

LOADER_PROBE = r"""
import resource, sys, time
from dual_lm.data.loader import PackedLoader, TokenShards
loader = PackedLoader(TokenShards(sys.argv[1]), seq_len=2048, rows_per_rank=8, seed=0)
for _ in range(int(sys.argv[2])):
    loader.next_batch()
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def write_corpus(path: Path, docs: list[str], copies: int) -> int:
    with open(path, "w") as handle:
        for _ in range(copies):
            for doc in docs:
                handle.write(json.dumps({"text": doc}) + "\n")
    return path.stat().st_size


def reference_path(tokenizer_path: str, docs: list[str], out: Path) -> float:
    tokenizer = Tokenizer.from_file(tokenizer_path)
    start = time.perf_counter()
    tensors = [torch.tensor(tokenizer.encode(doc).ids, dtype=torch.long) for doc in docs]
    torch.save(tensors, out)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", default="tests/fixtures/reference/tokenizer-51200.json")
    parser.add_argument("--copies", type=int, default=2)
    parser.add_argument("--loader-seconds", type=float, default=5.0)
    args = parser.parse_args()
    base_docs = list(iter_documents(expand_sources(["corpus:shakespeare"])))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        size = write_corpus(tmp / "corpus.jsonl", base_docs, args.copies)
        docs = base_docs * args.copies
        ref_seconds = reference_path(args.tokenizer, docs, tmp / "reference.pt")
        start = time.perf_counter()
        request = PrepareRequest(args.tokenizer, (str(tmp / "corpus.jsonl"),), str(tmp / "ours"), 0, 2)
        manifest = prepare_data(request)
        ours_seconds = time.perf_counter() - start
        tokens = manifest["train_tokens"]
        mb = size / 1e6
        print(f"corpus: {mb:.1f} MB JSONL, {len(docs)} documents, {tokens:,} tokens, {torch.get_num_threads()} cores")
        for name, sec in (
            ("reference path (encode one by one + torch.save)", ref_seconds),
            ("dual-lm prepare-data (both passes, all writes)", ours_seconds),
        ):
            print(f"  {name:<48} {mb / sec:6.2f} MB/s {tokens / sec:>12,.0f} tok/s")
        print(f"  ratio prepare-data / reference: {ref_seconds / ours_seconds:.2f}  (target >= 3)")

        loader = PackedLoader(TokenShards(tmp / "ours"), seq_len=2048, rows_per_rank=8, seed=0)
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < args.loader_seconds:
            count += loader.next_batch().inputs.numel()
        print(f"  loader: {count / (time.perf_counter() - start):,.0f} tokens/s (seq 2048, 8 rows; target >= 1M)")

        write_corpus(tmp / "big.jsonl", base_docs, 10 * args.copies)
        prepare_data(PrepareRequest(args.tokenizer, (str(tmp / "big.jsonl"),), str(tmp / "big"), 0, 8))
        peaks = []
        for folder in ("ours", "big"):
            probe = subprocess.run(
                [sys.executable, "-c", LOADER_PROBE, str(tmp / folder), "200"],
                capture_output=True,
                text=True,
                check=True,
            )
            peaks.append(int(probe.stdout.strip()) / 1024)
        print(f"  loader peak RSS after 200 batches: {peaks[0]:.0f} MiB (1x corpus) vs {peaks[1]:.0f} MiB (10x corpus)")
        print(f"  this process peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
