#!/usr/bin/env python3
"""Data at the paper's scale: the cost of the cached sample indices (data/sample_cache.py) as the
number of documents grows.

For each --documents N it writes a synthetic indexed dataset pair (tokens + word starts, random lengths,
sparse .bin files: the index is real, the token bytes are holes that read as zeros), then measures, each
in fresh processes:

  build     the first build of the sample indices (one process, empty cache): seconds and peak RSS;
  first     time from process start to the first micro-batch, the cache already built;
  uss       private memory (USS) of one rank that has read --batches micro-batches;
  pss 8x2   total PSS of --ranks ranks, each reading through a DataLoader with --workers workers.

    python tools/bench_data_scale.py --documents 1e6 1e7 1e8 --workdir /tmp/scale
    python tools/bench_data_scale.py --smoke                  # 10^4 documents, seconds (CI)

Goals (issue 13, at 10^8 documents): USS <= 300 MB per rank and flat in N; first micro-batch <= 5 s from
the cache; first build <= 3 min on one core.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import struct
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Optional

from megatron_cmbert import cli

import numpy as np

GOALS = {"uss_mb": 300.0, "first_s": 5.0, "build_s": 180.0}
TOKEN_DTYPE, FLAG_DTYPE = np.uint16, np.uint8
_CODES = {np.uint16: 8, np.uint8: 1}  # Megatron's dtype codes
_CHUNK = 1 << 22


def _write_pair(path: str, lengths: np.ndarray, dtype, content) -> None:
    """One Megatron indexed dataset (version 1 .idx, one sequence per document); ``content(lo, hi)`` gives
    the values of tokens lo..hi, or None for a sparse .bin. Written under temporary names, .idx last."""
    n, itemsize = len(lengths), np.dtype(dtype).itemsize
    total = int(lengths.sum(dtype=np.int64))
    with open(path + ".bin.tmp", "wb") as fh:
        if content is None:
            fh.truncate(total * itemsize)
        else:
            for lo in range(0, total, _CHUNK):
                fh.write(np.ascontiguousarray(content(lo, min(total, lo + _CHUNK)), dtype=dtype).tobytes())
    with open(path + ".idx.tmp", "wb") as idx:
        idx.write(b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, _CODES[dtype], n, n + 1))
        for lo in range(0, n, _CHUNK):
            idx.write(np.ascontiguousarray(lengths[lo:lo + _CHUNK], dtype=np.int32).tobytes())
        offset = 0
        for lo in range(0, n, _CHUNK):
            ends = np.cumsum(lengths[lo:lo + _CHUNK], dtype=np.int64) * itemsize + offset
            idx.write((ends - lengths[lo:lo + _CHUNK].astype(np.int64) * itemsize).tobytes())
            offset = int(ends[-1])
        for lo in range(0, n + 1, _CHUNK):
            idx.write(np.arange(lo, min(lo + _CHUNK, n + 1), dtype=np.int64).tobytes())
    os.replace(path + ".bin.tmp", path + ".bin")
    os.replace(path + ".idx.tmp", path + ".idx")


def write_synthetic(prefix: str, lengths, vocab: int = 32000, seed: int = 0, sparse: bool = False) -> str:
    """Tokens ``prefix`` and word starts ``prefix_wordstart`` with the given document lengths: random
    token ids (>= 6, past the special tokens) and word starts, or sparse files. Returns ``prefix``."""
    lengths = np.asarray(lengths, dtype=np.int32)
    rng = np.random.default_rng(seed)
    tokens = None if sparse else (lambda lo, hi: rng.integers(6, vocab, hi - lo))
    flags = None if sparse else (lambda lo, hi: rng.random(hi - lo) < 0.6)
    _write_pair(prefix, lengths, TOKEN_DTYPE, tokens)
    _write_pair(prefix + "_wordstart", lengths, FLAG_DTYPE, flags)
    return prefix


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = cli.ToolParser(prog="bench_data_scale.py", description=__doc__)
    p.add_argument("--documents", type=float, nargs="+", default=[1e6, 1e7, 1e8],
                   help="dataset sizes in documents (default 1e6 1e7 1e8)")
    p.add_argument("--mean-length", type=int, default=300, help="mean document length in tokens (default 300)")
    p.add_argument("--seq-length", type=int, default=1024, help="tokens per packed sample (default 1024)")
    p.add_argument("--micro-batch-size", type=int, default=8, help="samples per micro-batch (default 8)")
    p.add_argument("--batches", type=int, default=20, help="micro-batches each rank reads (default 20)")
    p.add_argument("--ranks", type=int, default=8, help="rank processes of the PSS run (default 8)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers per rank (default 2)")
    p.add_argument("--workdir", default=None, help="where the datasets go (default: a temporary folder, deleted)")
    p.add_argument("--smoke", action="store_true", help="10^4 documents, 2 ranks (CI)")
    p.add_argument("--output-json", default=None, help="write the figures here")
    p.add_argument("--role", default=None, help=argparse.SUPPRESS)  # internal: a measured child process
    p.add_argument("--prefix", default=None, help=argparse.SUPPRESS)
    p.add_argument("--samples", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# -- the measured processes -----------------------------------------------------------------------
def _samples(args):
    from megatron_cmbert.data.masking import MaskingConfig
    from megatron_cmbert.data.pretrain_data import PretrainSamples
    from megatron_cmbert.data.tokenizer import MASK_ID

    return PretrainSamples([args.prefix], "100,0,0", "train", args.seq_length, seed=1, num_samples=args.samples,
                           masking=MaskingConfig(mask_token_id=MASK_ID, vocab_size=32000))


def _rate(step: int) -> float:  # module level: loader workers pickle the schedule
    return 0.3


def _child(args) -> dict:
    """Runs in a fresh interpreter; prints one JSON line of its figures."""
    import psutil

    import torch

    from megatron_cmbert.data.pretrain_data import StepSchedule, step_loader

    with warnings.catch_warnings():  # megatron-core warns about optional TE/apex at import
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDataset  # noqa: F401  (timed with the imports)

    torch.set_num_threads(1)
    me = psutil.Process()
    # A training rank imports torch and megatron-core anyway: their cost is measured apart from the data's.
    base = {"import_s": time.time() - me.create_time(), "import_uss_mb": me.memory_full_info().uss / 2**20}
    samples = _samples(args)
    if args.role == "build":
        return {"build_s": time.time() - me.create_time() - base["import_s"], "peak_rss_mb": _peak_rss_mb()}
    mb = args.micro_batch_size
    schedule = StepSchedule(samples, mb, mb, 1, 0, _rate, num_steps=args.batches)
    loader = iter(step_loader(schedule, args.workers if args.role == "rank" else 0))
    next(loader)
    first = time.time() - me.create_time()  # from the process start: interpreter, imports, opening the cache
    for _ in range(args.batches - 1):
        next(loader)
    out = {**base, "first_s": first, "uss_mb": me.memory_full_info().uss / 2**20, "pss_mb": me.memory_full_info().pss / 2**20}
    out["worker_pss_mb"] = sum(c.memory_full_info().pss for c in me.children(recursive=True)) / 2**20
    if args.role == "rank":  # hold the memory until the parent has read every rank
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()
        sys.stdin.readline()
    return out


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _spawn(args, role: str, prefix: str, samples: int, workers: int = 0) -> subprocess.Popen:
    cmd = [sys.executable, os.path.abspath(__file__), "--role", role, "--prefix", prefix, "--samples", str(samples),
           "--seq-length", str(args.seq_length), "--micro-batch-size", str(args.micro_batch_size),
           "--batches", str(args.batches), "--workers", str(workers)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True, env=env)


def _result(proc: subprocess.Popen) -> dict:
    line = proc.stdout.readline()
    if not line:
        proc.wait()
        raise RuntimeError(f"measured process exited {proc.returncode} without a result")
    return json.loads(line)


def measure(args, n_docs: int, workdir: str) -> dict:
    rng = np.random.default_rng(n_docs)
    lengths = np.minimum(rng.geometric(1.0 / args.mean_length, size=n_docs), 1 << 20).astype(np.int32)
    prefix = os.path.join(workdir, f"synthetic_{n_docs}")
    t = time.perf_counter()
    write_synthetic(prefix, lengths, sparse=True)
    write_s = time.perf_counter() - t
    tokens = int(lengths.sum(dtype=np.int64))
    del lengths
    samples = tokens // args.seq_length  # about one epoch
    row = {"documents": n_docs, "tokens": tokens, "write_s": write_s}
    proc = _spawn(args, "build", prefix, samples)  # empty cache: this process builds
    row.update(_result(proc))
    proc.wait()
    proc = _spawn(args, "first", prefix, samples)
    got = _result(proc)
    proc.wait()
    row.update(first_s=got["first_s"], import_s=got["import_s"])
    single = _spawn(args, "rank", prefix, samples, workers=0)  # one rank, no workers: its own USS
    got = _result(single)
    single.communicate("\n")
    row.update(uss_mb=got["uss_mb"], import_uss_mb=got["import_uss_mb"])
    ranks = [_spawn(args, "rank", prefix, samples, workers=args.workers) for _ in range(args.ranks)]
    results = [_result(p) for p in ranks]  # all alive at once: PSS splits their shared pages
    for p in ranks:
        p.communicate("\n")
    row["pss_total_mb"] = sum(r["pss_mb"] + r["worker_pss_mb"] for r in results)
    row["uss_rank_max_mb"] = max(r["uss_mb"] for r in results)
    cache = os.path.join(workdir, "cache")
    row["cache_mb"] = sum(os.path.getsize(os.path.join(cache, f)) for f in os.listdir(cache)) / 2**20
    return row


def run(argv: Optional[list[str]] = None) -> dict:
    """Measure; returns the figures (also --output-json)."""
    args = parse_args(argv)
    if args.role:
        out = _child(args)
        if args.role != "rank":
            print(json.dumps(out), flush=True)
        return out
    if args.smoke:
        args.documents, args.ranks, args.batches = [1e4], 2, 3
    import torch

    results = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                          f"python {platform.python_version()}, torch {torch.__version__}",
               "goals": GOALS, "runs": []}
    print(f"machine: {results['machine']}")
    print(f"goals: USS <= {GOALS['uss_mb']:.0f} MB/rank, first micro-batch <= {GOALS['first_s']:.0f} s from the "
          f"cache, first build <= {GOALS['build_s']:.0f} s (at 10^8 documents)")
    print("first s and USS MB: total (of which the torch + megatron-core imports, before any data)")
    print(f"{'documents':>12} {'tokens':>15} {'build s':>8} {'build peak MB':>13} {'first s':>13} "
          f"{'USS MB':>11} {f'PSS {args.ranks}x{args.workers + 1} MB':>14} {'cache MB':>9}")
    with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
        for n in args.documents:
            row = measure(args, int(n), workdir)
            row["ratios"] = {"uss": row["uss_mb"] / GOALS["uss_mb"], "first": row["first_s"] / GOALS["first_s"],
                             "build": row["build_s"] / GOALS["build_s"]}
            results["runs"].append(row)
            first = f"{row['first_s']:.1f} ({row['import_s']:.1f})"
            uss = f"{row['uss_mb']:.0f} ({row['import_uss_mb']:.0f})"
            print(f"{row['documents']:>12,} {row['tokens']:>15,} {row['build_s']:>8.1f} {row['peak_rss_mb']:>13,.0f} "
                  f"{first:>13} {uss:>11} {row['pss_total_mb']:>14,.0f} {row['cache_mb']:>9,.0f}", flush=True)
    if args.output_json:
        tmp = args.output_json + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(results, fh, indent=2)
        os.replace(tmp, args.output_json)
    return results


def main(argv: Optional[list[str]] = None) -> int:
    return cli.run_tool(run, argv)


if __name__ == "__main__":
    sys.exit(main())
