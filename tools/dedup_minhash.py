"""Near-duplicate removal across jsonl corpora on HF datatrove's MinHash pipeline (local executor).

Five stages, each a datatrove LocalPipelineExecutor over ``--tasks`` tasks run by ``--workers``
processes: signatures (our jsonl reader + Chinese character shingles) -> buckets (one task per LSH
band) -> clusters -> filter (kept lines copied byte for byte to ``OUTDIR/<name>.jsonl``) -> report
(``OUTDIR/dedup_report.json``: documents lost per source, bad lines by reason with file:line).
Lines that cannot be read as a document are copied through unchanged and counted.

A killed run resumes: datatrove records each finished task under the work folder
(``OUTDIR/.dedup_work`` by default) and skips it next time. Output files appear by rename only.
For a cluster, the same stages run under Slurm in examples/slurm_dedup.py.

Example:
    python tools/dedup_minhash.py --input wiki.jsonl.gz news/*.jsonl -o dedup/ --tasks 8 --workers 4
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from typing import Optional

try:
    from megatron_cmbert.data.dedup import (
        SHINGLES,
        DedupError,
        DedupSettings,
        build_stages,
        check_work_dir,
        output_name,
    )
except ImportError as exc:  # datatrove missing: one line, not a traceback
    sys.exit(f"error: dedup runs on datatrove: pip install datatrove==0.10.1 ({exc})")
from megatron_cmbert.data.jsonl import expand_inputs


def build_parser() -> argparse.ArgumentParser:
    d = DedupSettings()
    p = argparse.ArgumentParser(
        description="Remove near-duplicate documents from .jsonl/.jsonl.gz files with datatrove's "
        "MinHash pipeline (character n-gram shingles for Chinese) on the local executor. "
        "See docs/DEDUP.md; examples/slurm_dedup.py runs the same stages on Slurm.")
    p.add_argument("--input", dest="inputs", nargs="+", required=True,
                   help="input .jsonl or .jsonl.gz files or glob patterns (one task reads whole files)")
    p.add_argument("-o", "--output-dir", required=True,
                   help="directory for OUTDIR/<name>.jsonl and dedup_report.json (required)")
    p.add_argument("--work-dir", default=None,
                   help="datatrove signatures, buckets, logs and completions; reuse it to resume "
                   "(default: OUTDIR/.dedup_work)")
    p.add_argument("--json-key", default=d.json_key, help="JSON field holding the text (default: %(default)s)")
    p.add_argument("--shingle", choices=SHINGLES, default=d.shingle,
                   help="shingle unit: characters, or rjieba words (default: %(default)s)")
    p.add_argument("--ngram", type=int, default=d.ngram,
                   help="shingle size in units, after NFKC with punctuation/whitespace dropped (default: %(default)s)")
    p.add_argument("--buckets", type=int, default=d.buckets,
                   help="LSH bands = tasks of the buckets stage (default: %(default)s)")
    p.add_argument("--rows", type=int, default=d.rows,
                   help="hashes per band; documents sharing one band are duplicates, so the "
                   "Jaccard threshold is about (1/buckets)^(1/rows) (default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the MinHash permutations (default: %(default)s)")
    p.add_argument("--tasks", type=int, default=1,
                   help="tasks of the signature and filter stages; input file i goes to task i %% tasks (default: %(default)s)")
    p.add_argument("--workers", type=int, default=1, help="processes running tasks at once (default: %(default)s)")
    p.add_argument("--quiet", action="store_true",
                   help="send datatrove's per-task log lines to WORK/logs/stderr.txt instead of stderr")
    p.add_argument("--no-progress", action="store_true", help="same as --quiet (kept for older scripts)")
    return p


def print_table(report: dict) -> None:
    head = f"{'file':<40s} {'docs':>9s} {'removed':>9s} {'kept':>9s} {'%lost':>7s} {'bad':>7s}"
    print(head)
    print("-" * len(head))
    rows = [(f["path"], f) for f in report["files"]] + [("TOTAL", report["total"])]
    for i, (name, f) in enumerate(rows):
        if i == len(rows) - 1:
            print("-" * len(head))
        name = name if len(name) <= 40 else "..." + name[-37:]
        lost = 100.0 * f["removed"] / f["docs_in"] if f["docs_in"] else 0.0
        print(f"{name:<40s} {f['docs_in']:>9d} {f['removed']:>9d} {f['kept']:>9d} {lost:>6.2f}% "
              f"{f['bad_lines_passed']:>7d}")
    s = report["settings"]
    print(f"LSH: {s['buckets']} bands x {s['rows']} rows (Jaccard threshold ~{s['threshold_estimate']:.2f}), "
          f"{s['ngram']}-{s['shingle']} shingles")
    for f in report["files"]:
        for reason, n in f["bad_line_reasons"].items():
            print(f"  passed {n:>8d}  {reason:<15s} (first at {', '.join(f['bad_line_examples'][reason])})")


@contextlib.contextmanager
def _stderr_to(path: str):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "ab") as fh:
        os.dup2(fh.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def run_local(paths, out_dir, work_dir, settings, tasks, workers, quiet=False) -> dict:
    """Runs the five stages with datatrove's local executor; returns the report."""
    from datatrove.executor import LocalPipelineExecutor

    check_work_dir(work_dir, paths, settings, tasks)
    previous = None
    for stage in build_stages(paths, out_dir, work_dir, settings, tasks):
        previous = LocalPipelineExecutor(
            stage.pipeline, tasks=stage.tasks, workers=min(workers, stage.tasks),
            logging_dir=os.path.join(work_dir, "logs", stage.name), depends=previous)
    # datatrove logs every task to stderr at INFO (and to WORK/logs/<stage>/logs). Quiet sends
    # file descriptor 2 to WORK/logs/stderr.txt for the run, so worker processes are quiet too.
    with _stderr_to(os.path.join(work_dir, "logs", "stderr.txt")) if quiet else contextlib.nullcontext():
        previous.run()
    with open(os.path.join(out_dir, "dedup_report.json"), encoding="utf-8") as fh:
        return json.load(fh)


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.tasks < 1 or args.workers < 1:
        parser.error("--tasks and --workers must be >= 1")
    settings = DedupSettings(ngram=args.ngram, buckets=args.buckets, rows=args.rows, seed=args.seed,
                             json_key=args.json_key, shingle=args.shingle)
    try:
        settings.check()
        paths = expand_inputs(args.inputs)
    except (DedupError, FileNotFoundError) as exc:
        parser.error(str(exc))
    outputs = [os.path.join(args.output_dir, output_name(p)) for p in paths]
    if len(set(outputs)) != len(outputs):  # same file twice, or same basename in two folders
        parser.error("two inputs map to the same output file name: " + ", ".join(paths))
    os.makedirs(args.output_dir, exist_ok=True)
    for src, dst in zip(paths, outputs):
        if os.path.exists(dst) and os.path.samefile(src, dst):
            parser.error(f"output {dst} would overwrite its input; choose another --output-dir")
    work_dir = args.work_dir or os.path.join(args.output_dir, ".dedup_work")
    try:
        report = run_local(paths, args.output_dir, work_dir, settings, args.tasks, args.workers,
                           quiet=args.quiet or args.no_progress)
    except DedupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
