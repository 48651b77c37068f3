"""Running the dedup stages on one machine so that a killed run resumes: datatrove's tasks, our process handling.

datatrove's LocalPipelineExecutor records each finished task (``logs/<stage>/completions/NNNNN``) and skips
it next time, which is what makes a rerun resume. Its process handling is what broke resuming (issue 23):
its pool workers come from a forkserver and outlive a ``kill -9`` of the tool, finishing their tasks while
the rerun starts the same tasks again; two writers of one signature file leave records twice, and the
cluster step then fails with ``KeyError`` on every later rerun (or, worse, removes the wrong documents).
Its Manager process also stays behind after every kill. Here, instead:

- tasks run in this process (``--workers 1``) or in forked workers that die with the tool
  (``PR_SET_PDEATHSIG``), ignore Ctrl-C (the tool stops them) and are all ended before the stage returns;
  no Manager process is started;
- one run at a time per work folder and per output folder: an ``fcntl`` lock (released by the kernel when
  the holder dies, so a killed run never leaves a stale lock; forked workers share it while they live);
- a task failure reaches the tool as its own exception (a UserError stays one line, in the task's log too).
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import multiprocessing
import os
import signal
import socket
from multiprocessing.connection import wait
from copy import deepcopy
from typing import Optional

from datatrove.executor import LocalPipelineExecutor
from datatrove.utils.logging import add_task_logger, close_task_logger, log_pipeline, logger
from datatrove.utils.stats import PipelineStats

from megatron_cmbert import cli
from megatron_cmbert.data.dedup import DedupError
from megatron_cmbert.errors import ToolFailure, UserError

_PR_SET_PDEATHSIG = 1
_STAGE: Optional["StageExecutor"] = None  # the stage a forked worker runs (inherited, never pickled)


def _die_with_parent(parent: int) -> None:
    """In a forked worker: SIGKILL when the tool dies (Linux), Ctrl-C left to the tool, and SIGTERM ending
    the worker (not raising the tool's handler, inherited with the fork)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the lock still keeps a rerun out while workers live
        pass
    if os.getppid() != parent:  # the tool died before prctl took effect
        os._exit(1)


def _worker(parent: int, local_rank: int, ranks, results) -> None:
    """A forked worker: tasks from `ranks` until None; (rank, None) or (rank, exception) to `results`."""
    _die_with_parent(parent)
    while (rank := ranks.get()) is not None:
        try:
            _STAGE.run_task(rank, local_rank=local_rank)
            results.put((rank, None))
        except BaseException as exc:  # the tool re-raises it; the worker ends
            results.put((rank, exc))
            return


def _run_forked(todo: list[int], workers: int, on_done) -> None:
    """Run _STAGE's tasks `todo` in `workers` forked processes. A small pool of our own: multiprocessing's
    Pool, stopped after its last task, sometimes left an idle worker that its terminate() never ended, and
    the tool waited for it forever. Here every worker is killed and joined before this returns or raises."""
    ctx = multiprocessing.get_context("fork")
    ranks, results = ctx.SimpleQueue(), ctx.SimpleQueue()
    for rank in todo:
        ranks.put(rank)
    for _ in range(workers):
        ranks.put(None)
    procs = [ctx.Process(target=_worker, args=(os.getpid(), i, ranks, results), daemon=True) for i in range(workers)]
    for proc in procs:
        proc.start()
    try:
        pending, running = len(todo), list(procs)
        while pending:
            ready = wait([results._reader] + [p.sentinel for p in running])
            if results._reader in ready:
                rank, exc = results.get()
                if exc is not None:
                    raise exc
                on_done(rank)
                pending -= 1
                continue
            for proc in [p for p in running if p.sentinel in ready]:
                running.remove(proc)
                proc.join(10)  # its sentinel fires as it exits, a moment before it can be reaped
                if proc.exitcode != 0:  # killed (out of memory?) or crashed outside Python
                    raise ToolFailure(f"a worker process died (exit code {proc.exitcode}) with tasks left; "
                                      f"finished tasks are kept: rerun the same command to resume")
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
            proc.join()


class StageExecutor(LocalPipelineExecutor):
    """One stage: datatrove's completions and logs, our processes (module docstring)."""

    def __init__(self, name: str, pipeline: list, tasks: int, workers: int, logging_dir: str):
        super().__init__(pipeline, tasks=tasks, workers=min(workers, tasks), logging_dir=logging_dir)
        self.name = name
        self._template = pipeline

    def run_task(self, rank: int, local_rank: int = 0) -> None:
        """datatrove's _run_for_rank with a fresh copy of the pipeline; a UserError is logged in one line."""
        self.pipeline = deepcopy(self._template)
        logfile = add_task_logger(self.logging_dir, rank, local_rank)
        log_pipeline(self.pipeline)
        try:
            data = None
            for step in self.pipeline:
                data = step(data, rank, self.world_size)
            if data:
                for _ in data:
                    pass
            logger.success(f"Processing done for {rank=}")
            with self.logging_dir.open(f"stats/{rank:05d}.json", "w") as f:
                PipelineStats(self.pipeline).save_to_disk(f)
            self.mark_rank_as_completed(rank)
        except UserError as exc:
            logger.error(cli.one_line(exc))
            raise
        except Exception as exc:
            logger.exception(exc)
            raise
        finally:
            close_task_logger(logfile)

    def run_stage(self, progress: bool = True, progress_stream=None) -> int:
        """Run this stage's unfinished tasks; returns how many ran."""
        global _STAGE
        todo = self.get_incomplete_ranks(range(self.tasks))
        if not todo:
            return 0
        self.save_executor_as_json()
        done = self.tasks - len(todo)
        with cli.Progress(self.tasks, f"dedup {self.name}", "tasks", stream=progress_stream,
                          disable=not progress) as bar:
            bar.n = done
            if self.workers == 1 or len(todo) == 1:
                for rank in todo:
                    self.run_task(rank)
                    bar.update()
            else:
                _STAGE = self
                try:
                    _run_forked(todo, min(self.workers, len(todo)), lambda rank: bar.update())
                finally:
                    _STAGE = None
        return len(todo)


class FolderLock:
    """An exclusive fcntl lock on FOLDER/.dedup.lock for the life of this process (and its workers)."""

    def __init__(self, folder: str, what: str):
        os.makedirs(folder, exist_ok=True)
        self.path = os.path.join(folder, ".dedup.lock")
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(self.fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(self.fd)
            raise DedupError(f"{folder}: {what} is in use by another dedup run ({holder}); wait for it to "
                             f"finish, or stop it, then rerun to resume") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # the kernel drops the lock with the last descriptor
            self.fd = None
