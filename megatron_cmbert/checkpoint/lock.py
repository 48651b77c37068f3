"""One writer per --save directory, and the leftovers of runs that were killed.

`SaveLock` is an advisory `fcntl.flock` on `SAVE/.writer.lock`, taken (by rank 0) before anything is written
there and held for the whole run: the kernel releases it when the process ends however it ends, so a
`kill -9` never leaves a stale lock, and a second run on the same directory is refused in one line naming
the first one's host and pid (written into the lock file). flock works on local filesystems and on NFS v4 /
Lustre mounted with flock support; on a filesystem without locks the lock is skipped with a warning rather
than blocking a run.

`remove_leftovers` deletes what a killed save leaves (`iter_N.tmp`, `iter_N.old`, the marker's `.tmp`):
never loaded, and only safe to delete while holding the lock (no other run can be writing them).
"""
from __future__ import annotations

import errno
import fcntl
import os
import shutil
import socket
from typing import Callable, Optional

from megatron_cmbert.checkpoint.records import CheckpointError

LOCK_FILE = ".writer.lock"


class SaveDirInUseError(CheckpointError):
    """Another live run holds the --save directory."""


class SaveLock:
    """Held from acquire() until release() or the process's end."""

    def __init__(self, save_dir: str):
        self.save_dir, self.path = save_dir, os.path.join(save_dir, LOCK_FILE)
        self._fh = None

    def acquire(self, warn: Callable[[str], None] = print) -> "SaveLock":
        try:
            os.makedirs(self.save_dir, exist_ok=True)
            fh = open(self.path, "a+", encoding="utf-8")
        except OSError as exc:
            raise CheckpointError(f"--save {self.save_dir}: cannot write there ({exc.strerror})") from None
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                fh.seek(0)
                holder = fh.read().strip() or "another process"
                fh.close()
                raise SaveDirInUseError(f"--save {self.save_dir} is in use by a run still going ({holder}); wait "
                                        f"for it to finish, stop it, or choose another --save") from None
            warn(f"warning: --save {self.save_dir}: this filesystem has no file locks ({exc.strerror}); nothing "
                 f"stops a second run from writing there")
        fh.seek(0)
        fh.truncate()
        fh.write(f"host {socket.gethostname()} pid {os.getpid()}\n")
        fh.flush()
        self._fh = fh
        return self

    def release(self) -> None:
        if self._fh is not None:
            self._fh.close()  # closing drops the flock
            self._fh = None

    def __enter__(self) -> "SaveLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def holder_of(save_dir: str) -> Optional[str]:
    """Who holds the lock of `save_dir` now ("host H pid P"), or None when nobody does (checks without
    taking it for longer than the check)."""
    path = os.path.join(save_dir, LOCK_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, "a+", encoding="utf-8") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            return fh.read().strip() or "another process"
        fcntl.flock(fh, fcntl.LOCK_UN)
    return None


def remove_leftovers(save_dir: str, log: Callable[[str], None] = print) -> list[str]:
    """Delete the torn saves (`iter_N.tmp`), set-aside copies (`iter_N.old`) and the marker's temporary of
    runs that were killed; returns their names. Call only while holding the SaveLock."""
    from megatron_cmbert.checkpoint.store import LATEST, _ITER

    if not os.path.isdir(save_dir):
        return []
    removed = []
    for name in sorted(os.listdir(save_dir)):
        path = os.path.join(save_dir, name)
        stem, _, suffix = name.rpartition(".")
        torn = suffix in ("tmp", "old") and _ITER.fullmatch(stem)
        if torn or name == LATEST + ".tmp":
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
            removed.append(name)
    if removed:
        log(f"removed {', '.join(removed)} from {save_dir}: left by a run that was stopped or killed during a "
            f"save (never loaded; the complete checkpoints are untouched)")
    return removed
