"""Near-duplicate removal across jsonl corpora with MinHash + LSH.

Two passes over the inputs so texts are never all held in memory: pass 1 computes one MinHash
signature per document (optionally in worker processes), LSH + union-find decides which documents
to drop (the first document of each cluster in input order is kept), and pass 2 copies every other
line byte-for-byte to ``OUTDIR/<name>.jsonl``. Lines that cannot be read as a document (bad JSON,
missing key, ...) are passed through unchanged and counted: dedup is not a quality filter.

Example:
    python tools/dedup_minhash.py --input wiki.jsonl.gz news/*.jsonl -o dedup/ --threshold 0.8 --workers 4
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np
from tqdm import tqdm

from megatron_cmbert.data.jsonl import SkipCounter, expand_inputs, get_text, iter_records, open_binary
from megatron_cmbert.data.minhash import (
    MinHasher,
    estimate_jaccard,
    find_duplicates,
    init_worker,
    optimal_bands,
    sign_chunk,
)


@dataclass
class FileStats:
    path: str
    output: str
    docs_in: int = 0  # non-blank input lines, bad ones included
    removed: int = 0
    cross_source: int = 0  # removed lines whose kept document is in another input file
    bad_lines: int = 0  # passed through unchanged
    no_content: int = 0  # nothing left after normalisation (e.g. only punctuation): never removed
    bad_reasons: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        kept = self.docs_in - self.removed
        return {
            "path": self.path, "output": self.output, "docs_in": self.docs_in,
            "removed": self.removed, "kept": kept,
            "percent_lost": round(100.0 * self.removed / self.docs_in, 3) if self.docs_in else 0.0,
            "cross_source_removed": self.cross_source, "bad_lines_passed": self.bad_lines,
            "bad_line_reasons": dict(sorted(self.bad_reasons.items())),
            "no_content": self.no_content,
        }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Remove near-duplicate documents (MinHash + LSH over character n-grams) from "
        "one or more .jsonl/.jsonl.gz files. The first document of each duplicate cluster in input "
        "order (files in the order given, then line order) is kept.",
    )
    p.add_argument("--input", dest="inputs", nargs="+", required=True,
                   help="input .jsonl or .jsonl.gz files or glob patterns, in keep-priority order")
    p.add_argument("-o", "--output-dir", required=True,
                   help="directory for the cleaned OUTDIR/<name>.jsonl files and dedup_report.json (required)")
    p.add_argument("--json-key", default="text", help="JSON field holding the document text (default: %(default)s)")
    p.add_argument("--ngram", type=int, default=5,
                   help="shingle size in characters (after NFKC, punctuation/whitespace removed) (default: %(default)s)")
    p.add_argument("--num-perm", type=int, default=128, help="MinHash permutations per signature (default: %(default)s)")
    p.add_argument("--threshold", type=float, default=0.8,
                   help="Jaccard similarity at or above which two documents are duplicates (default: %(default)s)")
    p.add_argument("--bands", type=int, default=None,
                   help="LSH bands (default: chosen from --threshold and --num-perm by minimising "
                   "false-positive + false-negative area; --rows alone gives num_perm // rows)")
    p.add_argument("--rows", type=int, default=None,
                   help="rows per LSH band (default: chosen with --bands; --bands alone gives "
                   "num_perm // bands)")
    p.add_argument("--seed", type=int, default=1, help="seed for the MinHash permutations (default: %(default)s)")
    p.add_argument("--workers", type=int, default=1,
                   help="processes computing signatures (the output is identical for any value) (default: %(default)s)")
    p.add_argument("--chunk-size", type=int, default=256, help="documents per worker task (default: %(default)s)")
    p.add_argument("--removed-out", default=None,
                   help="optional jsonl file listing each removed line with the file:line of the "
                   "kept document it duplicates (default: none)")
    p.add_argument("--no-progress", action="store_true", help="disable the tqdm progress bar on stderr (default: shown)")
    return p


def resolve_bands(args, parser) -> tuple[int, int]:
    """Explicit --bands/--rows win; one of them alone fixes the other to fill num_perm."""
    if args.bands is None and args.rows is None:
        return optimal_bands(args.threshold, args.num_perm)
    bands = args.bands if args.bands is not None else args.num_perm // args.rows
    rows = args.rows if args.rows is not None else args.num_perm // args.bands
    if bands < 1 or rows < 1 or bands * rows > args.num_perm:
        parser.error(f"need bands >= 1, rows >= 1 and bands*rows <= num_perm ({args.num_perm})")
    return bands, rows


def output_name(path: str) -> str:
    base = os.path.basename(path)
    return base[:-3] if base.endswith(".gz") else base


def read_chunks(paths, key, stats, skips, chunk_size) -> Iterator[tuple[list, list]]:
    """Pass 1 reader: ([(file index, lineno)], [text]) chunks; bad lines are only counted."""
    index = {path: i for i, path in enumerate(paths)}
    meta, texts = [], []
    for rec in iter_records(paths):
        fi = index[rec.path]
        stats[fi].docs_in += 1
        text, reason = get_text(rec, key)
        if text is None:
            stats[fi].bad_lines += 1
            stats[fi].bad_reasons[reason] = stats[fi].bad_reasons.get(reason, 0) + 1
            skips.add(reason, rec.where)
            continue
        meta.append((fi, rec.lineno))
        texts.append(text)
        if len(texts) >= chunk_size:
            yield meta, texts
            meta, texts = [], []
    if texts:
        yield meta, texts


def sign_all(chunks, args) -> Iterator[tuple[list, np.ndarray, np.ndarray]]:
    """Signatures chunk by chunk, in input order. With workers, at most 2*workers chunks are in
    flight, so memory stays bounded (Pool.imap would read the whole input ahead)."""
    if args.workers <= 1:
        hasher = MinHasher(args.num_perm, args.seed, args.ngram)
        for meta, texts in chunks:
            yield (meta, *hasher.signatures_for_texts(texts))
        return
    with multiprocessing.Pool(args.workers, initializer=init_worker,
                              initargs=(args.num_perm, args.seed, args.ngram)) as pool:
        pending: deque = deque()
        for meta, texts in chunks:
            pending.append((meta, pool.apply_async(sign_chunk, (texts,))))
            if len(pending) >= 2 * args.workers:
                meta0, res = pending.popleft()
                yield (meta0, *res.get())
        while pending:
            meta0, res = pending.popleft()
            yield (meta0, *res.get())


def print_table(stats: list[FileStats], bands: int, rows: int, clusters: int) -> None:
    head = f"{'file':<40s} {'docs':>9s} {'removed':>9s} {'kept':>9s} {'%lost':>7s} {'cross-src':>9s} {'bad':>7s}"
    print(head)
    print("-" * len(head))
    tot = FileStats("TOTAL", "")
    for s in stats:
        d = s.as_dict()
        name = s.path if len(s.path) <= 40 else "..." + s.path[-37:]
        print(f"{name:<40s} {d['docs_in']:>9d} {d['removed']:>9d} {d['kept']:>9d} "
              f"{d['percent_lost']:>6.2f}% {d['cross_source_removed']:>9d} {d['bad_lines_passed']:>7d}")
        tot.docs_in += s.docs_in
        tot.removed += s.removed
        tot.cross_source += s.cross_source
        tot.bad_lines += s.bad_lines
    d = tot.as_dict()
    print("-" * len(head))
    print(f"{'TOTAL':<40s} {d['docs_in']:>9d} {d['removed']:>9d} {d['kept']:>9d} "
          f"{d['percent_lost']:>6.2f}% {d['cross_source_removed']:>9d} {d['bad_lines_passed']:>7d}")
    print(f"LSH: {bands} bands x {rows} rows; {clusters} duplicate clusters")


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.ngram < 1 or args.num_perm < 1 or args.workers < 1 or args.chunk_size < 1:
        parser.error("--ngram, --num-perm, --workers and --chunk-size must be >= 1")
    if not 0.0 < args.threshold <= 1.0:
        parser.error("--threshold must be in (0, 1]")
    try:
        paths = expand_inputs(args.inputs)
    except FileNotFoundError as exc:
        parser.error(str(exc))
    bands, rows = resolve_bands(args, parser)

    os.makedirs(args.output_dir, exist_ok=True)
    outputs = [os.path.join(args.output_dir, output_name(p)) for p in paths]
    if len(set(outputs)) != len(outputs):  # same file twice, or same basename in two folders
        parser.error("two inputs map to the same output file name: " + ", ".join(paths))
    for src, dst in zip(paths, outputs):
        if os.path.exists(dst) and os.path.samefile(src, dst):
            parser.error(f"output {dst} would overwrite its input; choose another --output-dir")

    stats = [FileStats(p, o) for p, o in zip(paths, outputs)]
    skips = SkipCounter()

    # Pass 1: signatures. Only (file, line) and the uint64 signature of each document are kept.
    doc_file: list[int] = []
    doc_line: list[int] = []
    sig_chunks: list[np.ndarray] = []
    bar = tqdm(desc="minhash", unit="doc", file=sys.stderr, disable=args.no_progress)
    chunks = read_chunks(paths, args.json_key, stats, skips, args.chunk_size)
    for meta, sigs, valid in sign_all(chunks, args):
        for (fi, lineno), ok in zip(meta, valid):
            if ok:
                doc_file.append(fi)
                doc_line.append(lineno)
            else:
                stats[fi].no_content += 1
        sig_chunks.append(sigs[valid])
        bar.update(len(meta))
    bar.close()
    sigs = (np.concatenate(sig_chunks) if sig_chunks
            else np.zeros((0, args.num_perm), dtype=np.uint64))

    keep_of = find_duplicates(sigs, bands, rows, args.threshold)
    removed_by_file: list[dict[int, tuple[int, int]]] = [{} for _ in paths]  # line -> (doc, kept)
    for i in np.flatnonzero(keep_of != np.arange(len(keep_of))):
        fi, kept = doc_file[i], int(keep_of[i])
        removed_by_file[fi][doc_line[i]] = (int(i), kept)
        stats[fi].removed += 1
        if doc_file[kept] != fi:
            stats[fi].cross_source += 1
    clusters = len(np.unique(keep_of[keep_of != np.arange(len(keep_of))]))

    # Pass 2: copy kept lines byte-for-byte under temporary names, rename all at the very end.
    tmp_suffix = f".tmp{os.getpid()}"
    renames: list[tuple[str, str]] = []
    removed_fh = None
    try:
        if args.removed_out:
            renames.append((args.removed_out + tmp_suffix, args.removed_out))
            removed_fh = open(renames[-1][0], "w", encoding="utf-8")
        for fi, (src, dst) in enumerate(tqdm(list(zip(paths, outputs)), desc="write", unit="file",
                                             file=sys.stderr, disable=args.no_progress)):
            renames.append((dst + tmp_suffix, dst))
            removed = removed_by_file[fi]
            with open_binary(src) as fin, open(renames[-1][0], "wb") as fout:
                for lineno, raw in enumerate(fin, start=1):  # same numbering as iter_records
                    if lineno not in removed:
                        fout.write(raw)
                    elif removed_fh is not None:
                        me, kept = removed[lineno]
                        removed_fh.write(json.dumps({
                            "removed": f"{src}:{lineno}",
                            "duplicate_of": f"{paths[doc_file[kept]]}:{doc_line[kept]}",
                            "estimated_jaccard": round(estimate_jaccard(sigs[me], sigs[kept]), 4),
                            "line": raw.decode("utf-8").rstrip("\r\n"),
                        }, ensure_ascii=False) + "\n")
        if removed_fh is not None:
            removed_fh.close()
        report = {
            "settings": {"ngram": args.ngram, "num_perm": args.num_perm, "threshold": args.threshold,
                         "bands": bands, "rows": rows, "seed": args.seed, "json_key": args.json_key},
            "files": [s.as_dict() for s in stats],
            "total": {k: sum(s.as_dict()[k] for s in stats) for k in (
                "docs_in", "removed", "kept", "cross_source_removed", "bad_lines_passed",
                "no_content")},
            "duplicate_clusters": clusters,
        }
        report_path = os.path.join(args.output_dir, "dedup_report.json")
        renames.append((report_path + tmp_suffix, report_path))
        with open(renames[-1][0], "w", encoding="utf-8") as fh:
            json.dump(report, fh, ensure_ascii=False, indent=2)
            fh.write("\n")
    except BaseException:
        if removed_fh is not None:
            removed_fh.close()
        for tmp, _ in renames:
            if os.path.exists(tmp):
                os.remove(tmp)
        raise
    for tmp, final in renames:
        os.replace(tmp, final)

    print_table(stats, bands, rows, clusters)
    if skips.total:
        print(f"bad lines passed through unchanged: {skips.total}")
        print("\n".join(skips.summary_lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
