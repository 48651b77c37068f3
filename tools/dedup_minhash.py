"""Near-duplicate removal across jsonl corpora on HF datatrove's MinHash pipeline (local executor).

Five stages, each a datatrove LocalPipelineExecutor over ``--tasks`` tasks run by ``--workers``
processes: signatures (our jsonl reader + Chinese character shingles) -> buckets (one task per LSH
band) -> clusters -> filter (kept lines copied byte for byte to ``OUTDIR/<name>.jsonl``) -> report
(``OUTDIR/dedup_report.json``: documents lost per source, bad lines by reason with file:line).
Lines that cannot be read as a document are copied through unchanged and counted.

A stopped or killed run (Ctrl-C, SIGTERM, kill -9) resumes: rerun the same command. datatrove records each
finished task under the work folder (``OUTDIR/.dedup_work`` by default) and the rerun skips it; the tool's
workers die with it, so no task of a killed run keeps writing while the rerun starts. One run at a time per
output and work folder (a second is refused, naming the first one's pid). Output files appear by rename
only; existing outputs that this work folder did not write are replaced only with --force. For a cluster,
the same stages run under Slurm in examples/slurm_dedup.py.

Example:
    python tools/dedup_minhash.py --input wiki.jsonl.gz news/*.jsonl -o dedup/ --tasks 8 --workers 4
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import sys
from typing import Optional

from megatron_cmbert import cli
from megatron_cmbert.data.jsonl import expand_inputs, is_gzip
from megatron_cmbert.data.outputs import (DISK_FULL, DiskFullError, OutputExistsError, check_free_space,
                                          check_writable, remove_stale, stale_temp_pattern)
from megatron_cmbert.errors import ToolFailure


def _dedup():
    """The dedup modules, imported when a run starts (--help works without datatrove)."""
    try:
        from megatron_cmbert.data import dedup, dedup_local
    except ImportError as exc:  # datatrove missing: one line, not a traceback
        raise ToolFailure(f"dedup runs on datatrove: pip install datatrove==0.10.1 ({exc})") from None
    return dedup, dedup_local


def build_parser() -> argparse.ArgumentParser:
    d = dict(ngram=5, buckets=10, rows=11, seed=1, json_key="text")  # DedupSettings' defaults (checked in tests)
    p = cli.ToolParser(
        prog="dedup_minhash.py", description=__doc__)
    p.add_argument("--input", dest="inputs", nargs="+", required=True,
                   help="input .jsonl or .jsonl.gz files or glob patterns (one task reads whole files)")
    p.add_argument("-o", "--output-dir", required=True,
                   help="directory for OUTDIR/<name>.jsonl and dedup_report.json (required)")
    p.add_argument("--work-dir", default=None,
                   help="datatrove signatures, buckets, logs and completions; reuse it to resume "
                   "(default: OUTDIR/.dedup_work)")
    p.add_argument("--force", action="store_true",
                   help="replace outputs in OUTDIR that this work folder did not write, and start over a work "
                   "folder that holds a run with other inputs or settings")
    p.add_argument("--json-key", default=d["json_key"], help="JSON field holding the text (default: %(default)s)")
    p.add_argument("--shingle", choices=("char", "word"), default="char",
                   help="shingle unit: characters, or rjieba words (default: %(default)s)")
    p.add_argument("--ngram", type=int, default=d["ngram"],
                   help="shingle size in units, after NFKC with punctuation/whitespace dropped (default: %(default)s)")
    p.add_argument("--buckets", type=int, default=d["buckets"],
                   help="LSH bands = tasks of the buckets stage (default: %(default)s)")
    p.add_argument("--rows", type=int, default=d["rows"],
                   help="hashes per band; documents sharing one band are duplicates, so the "
                   "Jaccard threshold is about (1/buckets)^(1/rows) (default: %(default)s)")
    p.add_argument("--seed", type=int, default=d["seed"], help="seed of the MinHash permutations (default: %(default)s)")
    p.add_argument("--tasks", type=int, default=1,
                   help="tasks of the signature and filter stages; input file i goes to task i %% tasks (default: %(default)s)")
    p.add_argument("--workers", type=int, default=1, help="processes running tasks at once (default: %(default)s)")
    p.add_argument("--quiet", action="store_true",
                   help="send datatrove's per-task log lines to WORK/logs/stderr.txt instead of stderr (the "
                   "tool's own progress lines, one per stage every 30 s, still show)")
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
    """File descriptor 2 to `path` for the run (worker processes too); yields a stream on the real stderr."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    real = os.fdopen(os.dup(saved), "w")
    with open(path, "ab") as fh:
        os.dup2(fh.fileno(), 2)
        try:
            yield real
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            real.close()


def _terminated(signum, frame):
    raise KeyboardInterrupt(f"stopped by {signal.Signals(signum).name}")


def remove_leftovers(paths: list[str], out_dir: str, work_dir: str) -> None:
    """Temporaries a killed run left: NAME.tmp<pid> of its outputs, stats and manifest (dead pids only)."""
    from megatron_cmbert.data.dedup import output_name

    names = [output_name(p) for p in paths] + ["dedup_report.json"]
    remove_stale(out_dir, stale_temp_pattern(names, r"\.tmp"))
    remove_stale(os.path.join(work_dir, "stats"), re.compile(r"(?:read|write)_\d{5}\.json\.tmp(?P<pid>\d+)"))
    remove_stale(work_dir, stale_temp_pattern(["manifest.json"], r"\.tmp"))


def run_local(paths, out_dir, work_dir, settings, tasks, workers, quiet=False, force=False) -> dict:
    """Runs the five stages on this machine (data/dedup_local.py); returns the report."""
    dedup, local = _dedup()
    outputs = [os.path.join(out_dir, dedup.output_name(p)) for p in paths] + [os.path.join(out_dir, "dedup_report.json")]
    check_writable(out_dir, "-o")
    locks = [local.FolderLock(out_dir, "the output folder")]  # before anything else is written there
    try:
        check_writable(work_dir, "--work-dir")
        if os.path.abspath(work_dir) != os.path.abspath(out_dir):
            locks.append(local.FolderLock(work_dir, "the work folder"))
        remove_leftovers(paths, out_dir, work_dir)
        manifest, found = dedup.work_manifest(paths, settings, tasks, out_dir), dedup.read_manifest(work_dir)
        owned = dedup.same_run(found, manifest, work_dir)  # then the outputs are this work folder's own
        if found is not None and not owned and not force:
            raise dedup.other_run_error(work_dir)
        existing = [o for o in outputs if os.path.exists(o)]
        if existing and not owned and not force:
            raise OutputExistsError(f"{existing[0]} exists (from an earlier run, not from the work folder "
                                    f"{work_dir}); pass --force to replace it, or choose another -o")
        state = dedup.check_work_dir(work_dir, paths, settings, tasks, out_dir, restart=force)
        if state != "resume":  # the kept lines are at most the plain inputs' size
            check_free_space(out_dir, sum(os.path.getsize(p) for p in paths if not is_gzip(p)), "the deduplicated copy")
        ran = 0
        signal.signal(signal.SIGTERM, _terminated)  # a scheduler's stop: the same clean message as Ctrl-C
        with _stderr_to(os.path.join(work_dir, "logs", "stderr.txt")) if quiet else contextlib.nullcontext(sys.stderr) as err:
            for stage in dedup.build_stages(paths, out_dir, work_dir, settings, tasks):
                executor = local.StageExecutor(stage.name, stage.pipeline, stage.tasks, workers,
                                               os.path.join(work_dir, "logs", stage.name))
                try:
                    ran += executor.run_stage(progress_stream=err)
                except OSError as exc:
                    if exc.errno in DISK_FULL:
                        raise DiskFullError(f"disk full during the {stage.name} stage ({exc.filename or work_dir}: "
                                            f"{exc.strerror}); finished tasks are kept: free space and rerun the "
                                            f"same command to resume") from None
                    raise
                except KeyboardInterrupt as exc:
                    raise KeyboardInterrupt(f"{exc or 'Ctrl-C'} during the {stage.name} stage; finished tasks are kept in {work_dir}: "
                                            f"rerun the same command to resume") from None
        if ran == 0:
            print(f"every stage was already complete in {work_dir}; nothing was run", file=sys.stderr)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        for lock in locks:
            lock.release()
    with open(os.path.join(out_dir, "dedup_report.json"), encoding="utf-8") as fh:
        return json.load(fh)


def run(argv: Optional[list[str]] = None) -> dict:
    """Deduplicate; returns the report (also OUTDIR/dedup_report.json)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.tasks < 1 or args.workers < 1:
        parser.error("--tasks and --workers must be >= 1")
    dedup, _ = _dedup()
    settings = dedup.DedupSettings(ngram=args.ngram, buckets=args.buckets, rows=args.rows, seed=args.seed,
                                   json_key=args.json_key, shingle=args.shingle)
    settings.check()
    paths = expand_inputs(args.inputs)
    outputs = [os.path.join(args.output_dir, dedup.output_name(p)) for p in paths]
    if len(set(outputs)) != len(outputs):  # same file twice, or same basename in two folders
        raise dedup.DedupError("two inputs map to the same output file name: " + ", ".join(paths))
    for src, dst in zip(paths, outputs):
        if os.path.exists(dst) and os.path.samefile(src, dst):
            raise dedup.DedupError(f"output {dst} would overwrite its input; choose another --output-dir")
    work_dir = args.work_dir or os.path.join(args.output_dir, ".dedup_work")
    report = run_local(paths, args.output_dir, work_dir, settings, args.tasks, args.workers,
                       quiet=args.quiet or args.no_progress, force=args.force)
    print_table(report)
    return report


def main(argv: Optional[list[str]] = None) -> int:
    return cli.run_tool(run, argv)


if __name__ == "__main__":
    sys.exit(main())
