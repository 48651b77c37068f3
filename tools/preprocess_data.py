#!/usr/bin/env python3
"""Build Megatron indexed datasets (token ids + whole-word start flags) from jsonl corpora.

Example:
    python tools/preprocess_data.py --input corpus/*.jsonl.gz --json-keys text \\
        --tokenizer-model tok32k --output-prefix data/corpus --workers 8

For each key K it writes PREFIX_K_document.bin/.idx (token ids, one sequence per document, no special
tokens) and PREFIX_K_document_wordstart.bin/.idx (uint8, 1 where a token starts a whole-word unit),
both readable by megatron.core.datasets.indexed_dataset.IndexedDataset, and a sidecar
PREFIX_K_document.meta.json recording the tokenizer (sha256 of tokenizer.json, size, path), the document
and token counts and the largest token id, so that training can refuse a dataset built with another
tokenizer. Output is byte-identical for any --workers. Bad lines are skipped and counted (or stop the
run with --strict). Files appear under their final names only after success.

A corpus of thousands of files is processed as K shards, one job each (a Slurm array:
examples/slurm_preprocess.sbatch), then merged:
    python tools/preprocess_data.py --input-list files.txt ... --output-prefix data/corpus --shards 64 --shard-index $i
        # -> data/corpus_shard00003-of-00064_text_document.* : shard i takes the i-th contiguous block of the
        #    input list (in the order given, each glob sorted), so the shards in index order are the inputs in order
    python tools/merge_datasets.py --input 'data/corpus_shard*-of-00064_text_document' --output data/corpus_text_document
        # byte-identical to one run over all the inputs
"""
from __future__ import annotations

import argparse
import collections
import multiprocessing as mp
import os
import signal
import sys
import time
from typing import Iterator, Optional

import numpy as np

from megatron_cmbert import cli
from megatron_cmbert.data.dataset_checks import tokenizer_fingerprint
from megatron_cmbert.data.encode import DocumentEncoder, EncodedChunk, encode_in_worker, init_worker
from megatron_cmbert.data.indexed import IndexedDatasetWriter, commit_all, token_dtype
from megatron_cmbert.data.jsonl import BadInputError, SkipCounter, expand_inputs, get_text, is_gzip, iter_records
from megatron_cmbert.data.outputs import check_writable, refuse_existing, remove_stale, stale_temp_pattern, write_errors
from megatron_cmbert.data.tokenizer import load_tokenizer
from megatron_cmbert.errors import UserError

SUFFIXES = (".bin", ".idx", ".meta.json")  # of the token dataset; the word-start dataset has .bin/.idx
TEMP_KINDS = (".bin", ".idx", ".lengths", ".meta.json")  # IndexedDatasetWriter's NAME<kind>.partial-<pid>


class PreprocessError(UserError, ValueError):
    """Inputs or flags that cannot give a dataset, in one line."""


def build_parser() -> argparse.ArgumentParser:
    p = cli.ToolParser(prog="preprocess_data.py", description=__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", nargs="+", help="jsonl / jsonl.gz files or globs, read in order")
    src.add_argument("--input-list", metavar="FILE",
                     help="a text file naming the inputs, one file or glob per line (# comments, blank lines skipped)")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="fields to index, one dataset each (default: text)")
    p.add_argument("--tokenizer-model", required=True, help="directory written by tools/train_tokenizer.py")
    p.add_argument("--output-prefix", required=True, help="path prefix of the output files")
    p.add_argument("--force", action="store_true",
                   help="replace an existing dataset at the output prefix (without it the run stops, naming the file)")
    p.add_argument("--workers", type=int, default=1, help="encoding processes (default: 1)")
    p.add_argument("--segmenter", default="rjieba", choices=["rjieba", "jieba"],
                   help="word segmenter for whole-word units (default: rjieba)")
    p.add_argument("--user-dict", default=None,
                   help="jieba-format user dictionary (one 'word [freq]' per line) of words never to split")
    p.add_argument("--chunk-chars", type=int, default=1_000_000,
                   help="characters per unit of work sent to a worker (default: 1,000,000)")
    p.add_argument("--strict", action="store_true", help="stop at the first bad line instead of skipping it")
    p.add_argument("--quiet", action="store_true",
                   help="no progress (a bar on a terminal, otherwise a line every 30 s)")
    p.add_argument("--shards", type=int, default=1, help="split the input list into K contiguous blocks (default 1)")
    p.add_argument("--shard-index", type=int, default=0,
                   help="which block this run processes (0-based; e.g. $SLURM_ARRAY_TASK_ID); output goes to "
                        "PREFIX_shardIIIII-of-KKKKK_KEY_document, for tools/merge_datasets.py")
    return p


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.shards < 1 or not 0 <= args.shard_index < args.shards:
        p.error(f"--shard-index must be in 0..{args.shards - 1} for --shards {args.shards}, got {args.shard_index}")
    if args.workers < 1 or args.chunk_chars < 1:
        p.error("--workers and --chunk-chars must be >= 1")
    return args


def input_patterns(args: argparse.Namespace) -> list[str]:
    if args.input:
        return args.input
    try:
        with open(args.input_list, encoding="utf-8") as fh:
            lines = [line.strip() for line in fh]
    except OSError as exc:
        raise PreprocessError(f"--input-list {args.input_list}: {exc.strerror}") from None
    patterns = [line for line in lines if line and not line.startswith("#")]
    if not patterns:
        raise PreprocessError(f"--input-list {args.input_list}: names no input file")
    return patterns


def shard_paths(paths: list[str], shards: int, index: int) -> list[str]:
    """The index-th of `shards` contiguous, near-equal blocks of the input list (every file in exactly one)."""
    return paths[index * len(paths) // shards:(index + 1) * len(paths) // shards]


def shard_prefix(prefix: str, shards: int, index: int) -> str:
    return prefix if shards == 1 else f"{prefix}_shard{index:05d}-of-{shards:05d}"


def _raise_terminated(signum, frame):  # SIGTERM behaves like Ctrl-C: clean up, leave nothing behind
    raise KeyboardInterrupt(f"stopped by {signal.Signals(signum).name}")


def dataset_names(output_prefix: str, keys: list[str]) -> list[str]:
    """Every final file a run writes (tokens .bin/.idx/.meta.json and word starts .bin/.idx, per key)."""
    names = []
    for key in keys:
        base = f"{output_prefix}_{key}_document"
        names += [base + s for s in SUFFIXES] + [base + "_wordstart" + s for s in SUFFIXES[:2]]
    return names


def remove_leftovers(output_prefix: str, keys: list[str]) -> list[str]:
    """Temporaries of these outputs left by a killed run (a dead pid's *.partial-<pid>), removed."""
    bases = [f"{os.path.basename(output_prefix)}_{k}_document{w}" for k in keys for w in ("", "_wordstart")]
    pattern = stale_temp_pattern([b + kind for b in bases for kind in TEMP_KINDS])
    return remove_stale(os.path.dirname(os.path.abspath(output_prefix)), pattern)


def no_documents_error(key: str, paths: list[str], skipped: SkipCounter) -> PreprocessError:
    where = paths[0] if len(paths) == 1 else f"{paths[0]} (and {len(paths) - 1} more inputs)"
    why = f"{skipped.total:,} line(s) skipped: {skipped.describe()}" if skipped.total else "no non-blank line"
    return PreprocessError(f"{where}: no usable document under key {key!r} ({why}); nothing written")


class Reader:
    """Streams documents in chunks of about ``chunk_chars`` characters, per key, counting skips."""

    def __init__(self, paths: list[str], keys: list[str], chunk_chars: int, strict: bool, progress):
        self.paths, self.keys, self.chunk_chars, self.strict = paths, keys, chunk_chars, strict
        self.progress = progress
        self.skipped = {k: SkipCounter() for k in keys}

    def chunks(self) -> Iterator[tuple[str, list[str]]]:
        pending = {k: [] for k in self.keys}
        sizes = dict.fromkeys(self.keys, 0)
        for record in iter_records(self.paths):
            self.progress.update(record.nbytes)
            for key in self.keys:
                text, reason = get_text(record, key)
                if text is None:
                    if self.strict:
                        detail = f" ({record.detail})" if record.detail else ""
                        raise BadInputError(f"{record.where}: {reason}{detail} [key {key!r}]")
                    self.skipped[key].add(reason, record.where)
                    continue
                pending[key].append(text)
                sizes[key] += len(text)
                if sizes[key] >= self.chunk_chars:
                    yield key, pending[key]
                    pending[key], sizes[key] = [], 0
        for key in self.keys:
            if pending[key]:
                yield key, pending[key]


def _ordered_map(chunks, workers: int, init_args: tuple) -> Iterator[tuple[str, EncodedChunk]]:
    """Encode chunks in input order. In-process for one worker; otherwise a pool with at most
    2 chunks in flight per worker, so memory stays bounded however long the input is."""
    if workers <= 1:
        encoder = DocumentEncoder(*init_args)
        for key, texts in chunks:
            yield key, encoder.encode(texts)
        return
    ctx = mp.get_context("spawn")  # no fork of a process that may hold tokenizer threads
    with ctx.Pool(workers, initializer=init_worker, initargs=init_args) as pool:
        pending: collections.deque = collections.deque()
        for key, texts in chunks:
            pending.append((key, pool.apply_async(encode_in_worker, (texts,))))
            if len(pending) >= 2 * workers:
                key_done, result = pending.popleft()
                yield key_done, result.get()
        while pending:
            key_done, result = pending.popleft()
            yield key_done, result.get()


def run(argv: Optional[list[str]] = None) -> dict:
    """Build the datasets; returns the summary (per key: documents, tokens, chars, skipped, output)."""
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # parallelism comes from --workers
    all_paths = expand_inputs(input_patterns(args))
    paths = shard_paths(all_paths, args.shards, args.shard_index)
    if not paths:
        raise PreprocessError(f"shard {args.shard_index} of {args.shards} gets no input file (only "
                              f"{len(all_paths)} files): use --shards {len(all_paths)} or fewer")
    output_prefix = shard_prefix(args.output_prefix, args.shards, args.shard_index)
    vocab_size = load_tokenizer(args.tokenizer_model).get_vocab_size()
    tokenizer = {**tokenizer_fingerprint(args.tokenizer_model), "path": os.path.abspath(args.tokenizer_model)}
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    check_writable(out_dir, "--output-prefix")
    remove_leftovers(output_prefix, args.json_keys)
    refuse_existing(dataset_names(output_prefix, args.json_keys), args.force)

    writers, all_writers = {}, []

    def abort():  # every temporary goes, so a failed run leaves nothing and frees what it took
        for w in all_writers:
            w.abort()

    stats = {k: {"documents": 0, "tokens": 0, "chars": 0} for k in args.json_keys}
    total_bytes = sum(os.path.getsize(p) for p in paths)
    # Progress counts uncompressed bytes: the total is only known when no input is gzip-compressed.
    progress_total = None if any(is_gzip(p) for p in paths) else total_bytes
    old_handler = signal.signal(signal.SIGTERM, _raise_terminated)
    start = time.time()
    progress = cli.Progress(progress_total, "preprocess", "bytes", disable=args.quiet)
    try:
        with write_errors(output_prefix + "_*_document*", abort, kept="partial files removed, nothing written"):
            for key in args.json_keys:
                base = f"{output_prefix}_{key}_document"
                writers[key] = (IndexedDatasetWriter(base, token_dtype(vocab_size)),
                                IndexedDatasetWriter(base + "_wordstart", np.uint8))
                all_writers.extend(writers[key])
            reader = Reader(paths, args.json_keys, args.chunk_chars, args.strict, progress)
            init_args = (args.tokenizer_model, args.segmenter, args.user_dict)
            for key, chunk in _ordered_map(reader.chunks(), args.workers, init_args):
                tokens_writer, flags_writer = writers[key]
                tokens_writer.add_documents(chunk.tokens, chunk.lengths)
                flags_writer.add_documents(chunk.word_starts, chunk.lengths)
                s = stats[key]
                s["documents"] += len(chunk.lengths)
                s["tokens"] += int(chunk.lengths.sum())
                s["chars"] += chunk.chars
            for key in args.json_keys:  # a 0-document dataset passes every later check and fails in training
                if stats[key]["documents"] == 0:
                    raise no_documents_error(key, paths, reader.skipped[key])
            for w in all_writers:
                w.finalize()
            for key, (tokens_writer, _) in writers.items():
                tokens_writer.write_meta({
                    "tokenizer": tokenizer, "documents": tokens_writer.num_documents,
                    "tokens": tokens_writer.num_elements, "max_token_id": tokens_writer.max_value,
                    "json_key": key, "inputs": [os.path.abspath(p) for p in paths],
                    "created_by": "tools/preprocess_data.py"})
            commit_all(all_writers)
    except BaseException as exc:
        abort()
        if isinstance(exc, KeyboardInterrupt):
            raise KeyboardInterrupt(f"{exc or 'Ctrl-C'}; no output was written") from None
        raise
    finally:
        progress.close()
        signal.signal(signal.SIGTERM, old_handler)

    seconds = time.time() - start
    summary = {"seconds": round(seconds, 3), "input_bytes": total_bytes, "keys": {}}
    for key in args.json_keys:
        s = stats[key]
        skipped = reader.skipped[key]
        summary["keys"][key] = {**s, "chars_per_token": s["chars"] / max(s["tokens"], 1),
                                "skipped": dict(sorted(skipped.counts.items())),
                                "output": writers[key][0].prefix}
        print(f"[{key}] {s['documents']:,} documents, {s['tokens']:,} tokens, {s['chars']:,} chars, "
              f"{s['chars'] / max(s['tokens'], 1):.3f} chars/token, skipped {skipped.total:,}")
        for line in skipped.summary_lines():
            print(line)
        print(f"[{key}] wrote {writers[key][0].prefix}.bin/.idx/.meta.json and {writers[key][1].prefix}.bin/.idx")
    chars = sum(s["chars"] for s in stats.values())
    print(f"done in {seconds:.1f} s: {chars / max(seconds, 1e-9):,.0f} chars/s, "
          f"{total_bytes / max(seconds, 1e-9) / 1e6:.1f} MB/s with {args.workers} worker(s)")
    return summary


def main(argv: Optional[list[str]] = None) -> int:
    return cli.run_tool(run, argv)


if __name__ == "__main__":
    sys.exit(main())
