#!/usr/bin/env python3
"""Pretrain Chinese ModernBERT with whole-word masking: TP x DP on megatron-core, launched by torchrun.

    torchrun --nproc_per_node 2 tools/pretrain.py --preset tiny --tensor-model-parallel-size 2 \\
        --tokenizer-model tok --data-path data/corpus_text_document --split 98,2,0 \\
        --seq-length 256 --micro-batch-size 4 --global-batch-size 8 --train-iters 100 \\
        --lr 8e-4 --lr-warmup-iters 10 --save ckpt --save-interval 50

A plain `python tools/pretrain.py ...` runs as a world of one process.

Checkpoints: a new run does not pass --load, and refuses a --save directory that already holds checkpoints
(--overwrite replaces them). --load DIR resumes exactly (same losses as an uninterrupted run) from DIR's
newest complete checkpoint, falling back to an older one with a warning when it does not load;
--load DIR/iter_NNNNNNN picks one; --finetune --load loads weights only (Stage II: --seq-length 8192).
A resume with other schedule flags than the checkpoint's is refused unless --override-schedule.

Stopping: SIGTERM or Ctrl-C (SIGINT) makes every rank finish its step, save (with --save) and exit 0,
printing the command that resumes; --exit-duration-in-mins does the same before a wall-clock limit.

Mistakes in the flags, the data, the kernels or the checkpoint directories are found before any process
group is set up (megatron_cmbert/training/run.py resolve_run) and reported as one line `error: ...` by rank 0
with exit status 2 (another rank waits 10 s, so that torchrun ends it once rank 0 has reported, then
reports `error (rank N): ...` itself); --check-only runs just those checks (WORLD_SIZE=N in the environment
for N ranks) and prints the resolved run. The configuration is a tree of dataclasses
(megatron_cmbert/training/config.py); every flag below is generated from one of its fields.
"""
from __future__ import annotations

import os
import shlex
import signal
import sys
from typing import Optional

from megatron_cmbert import cli
from megatron_cmbert.training.config import ConfigError, TrainConfig


def build_parser() -> cli.ToolParser:
    parser = cli.ToolParser(description=__doc__, error_class=ConfigError)
    TrainConfig.add_args(parser)
    parser.add_argument("--check-only", action="store_true",
                        help="run the pre-launch checks for $WORLD_SIZE ranks (default 1), print the resolved run "
                             "and exit 0 when they pass; launch scripts run this before torchrun, whose own "
                             "failure report would otherwise surround the one-line error")
    return parser


def parse_args(argv: Optional[list[str]] = None) -> TrainConfig:
    """The validated configuration tree (raises ConfigError)."""
    return TrainConfig.from_namespace(build_parser().parse_args(argv))


def resume_command(argv: list[str], save: str) -> str:
    """The command that continues this run: the same flags with --load SAVE (and without --overwrite,
    --finetune or an earlier --load, which a resume must not repeat)."""
    kept, skip = [], False
    for word in argv:
        if skip:
            skip = False
            continue
        if word in ("--load",):
            skip = True
            continue
        if word.startswith("--load=") or word in ("--overwrite", "--finetune"):
            continue
        kept.append(word)
    if "LOCAL_WORLD_SIZE" in os.environ:  # started by torchrun
        launcher = ["torchrun", "--nproc_per_node", os.environ["LOCAL_WORLD_SIZE"]]
        if int(os.environ.get("WORLD_SIZE", "1")) > int(os.environ["LOCAL_WORLD_SIZE"]):
            launcher += ["..."]  # multi-node: the same launcher flags as before
    else:
        launcher = ["python"]
    return shlex.join(launcher + ["tools/pretrain.py"] + kept + ["--load", save])


def run(argv: Optional[list[str]] = None) -> list[dict]:
    """Resolve, print and train the run; returns the logged rows (empty for --check-only)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    from megatron_cmbert.checkpoint.lock import SaveLock, remove_leftovers
    from megatron_cmbert.errors import UserError
    from megatron_cmbert.parallel.world import World, agree
    from megatron_cmbert.training.run import resolve_run

    namespace = build_parser().parse_args(argv)
    world = World.from_env()
    if namespace.check_only:  # one process, checking for WORLD_SIZE ranks
        spec = resolve_run(TrainConfig.from_namespace(namespace), world)
        print(spec.describe(), flush=True)
        print(f"checks passed for {world.size} rank(s)", flush=True)
        return []
    spec, error, lock = None, None, None
    try:
        spec = resolve_run(TrainConfig.from_namespace(namespace), world)
        if world.rank == 0 and spec.cfg.checkpoint.save:  # one writer per --save, before anything is written
            lock = SaveLock(spec.cfg.checkpoint.save).acquire(warn=lambda text: print(text, file=sys.stderr))
    except UserError as exc:
        if world.size == 1:
            raise
        error = exc
    if world.size > 1:  # every rank's checks agreed before the first collective: no rank waits forever
        reason = agree(error)
        if reason:
            raise ConfigError(reason)
    if world.rank == 0:
        print(spec.describe(), flush=True)
        if lock:
            remove_leftovers(spec.cfg.checkpoint.save, log=lambda text: print(text, flush=True))
    import torch

    if not torch.cuda.is_available():
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from megatron_cmbert.training.trainer import Trainer

    try:
        trainer = Trainer(spec)
        history = trainer.run()
    except KeyboardInterrupt as exc:  # the second Ctrl-C: stop at once (it says what was kept)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # and quietly: a third would only add a traceback
        raise KeyboardInterrupt(str(exc) or "second Ctrl-C: nothing saved since the last checkpoint") from None
    if trainer.ctrl_c_received:
        # a run stopping on Ctrl-C ends quietly: a further one during the process's own shutdown (the
        # checkpoint writer's finalisers, torchrun's teardown) would only print a traceback
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    save = spec.cfg.checkpoint.save
    if world.rank == 0 and trainer.stop_reason:
        if trainer.saved_step == trainer.step and save:
            print(f"stopped by {trainer.stop_reason}: saved step {trainer.step}; resume with: "
                  f"{resume_command(argv, save)}", flush=True)
        else:
            print(f"stopped by {trainer.stop_reason} at step {trainer.step}; nothing saved (no --save)", flush=True)
    torch.distributed.destroy_process_group()
    return history


def main(argv: Optional[list[str]] = None) -> int:
    return cli.run_tool(run, argv)


if __name__ == "__main__":
    sys.exit(main())
