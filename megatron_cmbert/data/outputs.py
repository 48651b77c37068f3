"""Writing a tool's outputs so that nothing is lost or half-written: the checks every data and evaluation
tool makes before it writes, and the one-line messages when writing fails.

- ``refuse_existing``: an output that exists is replaced only with ``--force`` (one line naming the file).
- ``remove_stale``: temporaries a killed run left (``NAME.partial-<pid>``, ``NAME.tmp<pid>``, ...) are removed
  at the next start, with a line saying so, but only those of the same output whose owner pid is dead on
  this machine: a live run's temporaries (or another output's) are never touched.
- ``check_writable`` / ``check_free_space``: before a long job, the output folder must take a file, and
  have room for what is known to come (a merge's size is the inputs' size).
- ``write_errors``: around the writing itself, a full disk (ENOSPC, EDQUOT) becomes ``DiskFullError``
  (exit 1) and a read-only or forbidden folder ``OutputFolderError`` (exit 2), after the caller's cleanup.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import sys
import tempfile
from typing import Callable, Iterable, Optional

from megatron_cmbert.errors import ToolFailure, UserError

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


class OutputExistsError(UserError, FileExistsError):
    """An output that is there already, and no --force."""


class OutputFolderError(UserError, PermissionError):
    """An output folder that cannot be written (read-only file system, permissions)."""


class DiskFullError(ToolFailure, OSError):
    """The disk (or quota) ran full; what was written is removed or kept for a resume, as the message says."""


def refuse_existing(paths: Iterable[str], force: bool, what: str = "") -> list[str]:
    """The outputs among `paths` that exist; raises OutputExistsError for them unless `force`."""
    existing = [p for p in paths if os.path.lexists(p)]
    if existing and not force:
        more = f" (and {len(existing) - 1} more output{'s' * (len(existing) > 2)})" if len(existing) > 1 else ""
        raise OutputExistsError(f"{existing[0]} exists{more}{what}; pass --force to replace it")
    return existing


def pid_alive(pid: int) -> bool:
    """Whether a process `pid` exists on this machine (one of another user counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_temp_pattern(names: Iterable[str], marker: str = r"\.partial-") -> re.Pattern:
    """A pattern of the temporaries of the outputs `names` (base names): NAME + marker + <pid>."""
    alternatives = "|".join(re.escape(n) for n in sorted(set(names), key=len, reverse=True))
    return re.compile(rf"(?P<name>{alternatives}){marker}(?P<pid>\d+)")


def remove_stale(folder: str, pattern: re.Pattern, log: Optional[Callable[[str], None]] = None) -> list[str]:
    """Remove the entries of `folder` whose name matches `pattern` in full (group "pid": the owner) and
    whose owner is dead; returns their paths and logs one line when there were any."""
    try:
        names = sorted(os.listdir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return []
    removed = []
    for name in names:
        match = pattern.fullmatch(name)
        if not match or pid_alive(int(match.group("pid"))):
            continue
        path = os.path.join(folder, name)
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
        except FileNotFoundError:
            continue  # another run cleaned it at the same moment
        removed.append(path)
    if removed:
        shown = ", ".join(os.path.basename(p) for p in removed[:3]) + (", ..." if len(removed) > 3 else "")
        (log or _stderr)(f"removed {len(removed)} leftover temporary file(s) of a stopped run in "
                         f"{folder or '.'}: {shown}")
    return removed


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def check_writable(folder: str, flag: str = "") -> None:
    """Create `folder` if needed and make sure a file can be written in it (a test file, removed):
    permissions alone do not tell (root ignores them; a read-only mount does not show in the mode)."""
    label = f"{flag} {folder}" if flag else folder
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        if exc.errno in NOT_WRITABLE:
            raise OutputFolderError(f"{label}: cannot write there ({exc.strerror})") from None
        if exc.errno in DISK_FULL:
            raise DiskFullError(f"{label}: the disk is full ({exc.strerror})") from None
        if exc.errno in (errno.ENOTDIR, errno.EEXIST):
            raise OutputFolderError(f"{label}: not a folder ({exc.strerror})") from None
        raise


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def free_bytes(folder: str) -> int:
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


def check_free_space(folder: str, needed: int, what: str) -> None:
    """DiskFullError before anything is written when `folder`'s file system has less than `needed` bytes."""
    free = free_bytes(folder)
    if needed > free:
        raise DiskFullError(f"{folder}: {what} needs about {human_bytes(needed)}, but only {human_bytes(free)} "
                            f"are free there; free some space or write elsewhere")


@contextlib.contextmanager
def write_errors(where: str, cleanup: Optional[Callable[[], None]] = None, kept: str = "partial files removed"):
    """Around writing `where`: on a full disk or an unwritable folder, run `cleanup` and raise the one-line
    DiskFullError / OutputFolderError (`kept` says what the user finds afterwards); anything else passes."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in DISK_FULL + NOT_WRITABLE or isinstance(exc, (UserError, ToolFailure)):
            raise
        if cleanup is not None:
            cleanup()
        target = exc.filename or where
        if exc.errno in DISK_FULL:
            raise DiskFullError(f"disk full while writing {target} ({exc.strerror}); {kept}") from None
        raise OutputFolderError(f"cannot write {target} ({exc.strerror}); {kept}") from None
