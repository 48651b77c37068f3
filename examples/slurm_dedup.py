"""Near-duplicate removal on a Slurm cluster: the same five stages as tools/dedup_minhash.py, each a
datatrove SlurmPipelineExecutor job array that starts when the previous one has finished.

    python examples/slurm_dedup.py --input 'corpus/*.jsonl.gz' -o /scratch/dedup \\
        --partition cpu --tasks 512 --time 04:00:00 --venv .venv

This submits the jobs and returns; progress is in WORK/logs/<stage>/ (one completion file per
task). Running the same command again resubmits only the tasks that have not completed, so a
preempted or failed run is resumed, not restarted. Sizing: the signature and filter stages run
--tasks tasks over whole input files (use at least as many files as tasks); the buckets stage runs
--buckets tasks (times --workers-per-bucket); clustering is one task whose memory grows with the
number of duplicate pairs, not with the corpus.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_cmbert.data import dedup  # noqa: E402
from megatron_cmbert.data.dedup import DedupSettings, build_stages, check_work_dir  # noqa: E402
from megatron_cmbert.data.jsonl import expand_inputs  # noqa: E402
from megatron_cmbert.errors import UserError  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    d = DedupSettings()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--input", dest="inputs", nargs="+", required=True, help="input files or glob patterns")
    p.add_argument("-o", "--output-dir", required=True, help="OUTDIR/<name>.jsonl and dedup_report.json")
    p.add_argument("--work-dir", default=None, help="shared-filesystem work folder (default: OUTDIR/.dedup_work)")
    p.add_argument("--force", action="store_true",
                   help="replace outputs this work folder did not write; start over a work folder of another run")
    p.add_argument("--tasks", type=int, default=64, help="signature/filter tasks (default: %(default)s)")
    p.add_argument("--partition", required=True, help="Slurm partition")
    p.add_argument("--time", default="04:00:00", help="time limit per task (default: %(default)s)")
    p.add_argument("--mem-per-cpu-gb", type=int, default=4, help="(default: %(default)s)")
    p.add_argument("--cluster-mem-gb", type=int, default=64, help="memory of the clustering task (default: %(default)s)")
    p.add_argument("--qos", default="normal", help="(default: %(default)s)")
    p.add_argument("--venv", default=None, help="virtualenv activated in each job (default: none)")
    p.add_argument("--ngram", type=int, default=d.ngram, help="(default: %(default)s)")
    p.add_argument("--buckets", type=int, default=d.buckets, help="(default: %(default)s)")
    p.add_argument("--rows", type=int, default=d.rows, help="(default: %(default)s)")
    p.add_argument("--json-key", default=d.json_key, help="(default: %(default)s)")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    from datatrove.executor.slurm import SlurmPipelineExecutor

    args = build_parser().parse_args(argv)
    settings = DedupSettings(ngram=args.ngram, buckets=args.buckets, rows=args.rows, json_key=args.json_key)
    work = args.work_dir or os.path.join(args.output_dir, ".dedup_work")
    try:
        paths = [os.path.abspath(p) for p in expand_inputs(args.inputs)]
        out = os.path.abspath(args.output_dir)
        found = dedup.read_manifest(work)
        owned = dedup.same_run(found, dedup.work_manifest(paths, settings, args.tasks, out), work)
        if found is not None and not owned and not args.force:
            raise dedup.other_run_error(work)
        outputs = [os.path.join(out, dedup.output_name(p)) for p in paths] + [os.path.join(out, "dedup_report.json")]
        existing = [o for o in outputs if os.path.exists(o)]
        if existing and not owned and not args.force:  # the same rule as tools/dedup_minhash.py
            raise dedup.DedupError(f"{existing[0]} exists (from an earlier run, not from the work folder {work}); "
                                   f"pass --force to replace it, or choose another -o")
        check_work_dir(work, paths, settings, args.tasks, out, restart=args.force)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    previous = None
    for stage in build_stages(paths, os.path.abspath(args.output_dir), os.path.abspath(work), settings, args.tasks):
        one_big = stage.name == "clusters"
        previous = SlurmPipelineExecutor(
            stage.pipeline, tasks=stage.tasks, time=args.time, partition=args.partition, qos=args.qos,
            job_name=f"dedup_{stage.name}", logging_dir=os.path.join(work, "logs", stage.name),
            slurm_logs_folder=os.path.join(work, "slurm_logs", stage.name), venv_path=args.venv,
            mem_per_cpu_gb=args.cluster_mem_gb if one_big else args.mem_per_cpu_gb, depends=previous)
    previous.run()  # submits every stage, each depending on the one before
    return 0


if __name__ == "__main__":
    sys.exit(main())
