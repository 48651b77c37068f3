"""Helpers of the fault-injection tests (tests/faults/conftest.py says what the suite is).

Mechanisms, each chosen to work without root and to be honest when run as root:
- kill -9 at a scripted point: the tool runs as a subprocess in its own session; the test polls the files
  it writes and SIGKILLs the process (only that pid, like a user's `kill -9`) once some output exists.
- a full disk: `small_fs` runs a command inside a private mount namespace (`unshare`, with a user namespace
  when not root) on a tmpfs of a few hundred KB, so ENOSPC is the kernel's; where namespaces are not allowed
  those tests skip, naming it, and the in-process write wrapper (`enospc_open`: a file whose writes raise
  OSError(ENOSPC) after N bytes) covers the same code paths everywhere.
- a read-only folder: chmod 0555 when not root; as root (permissions do not stop root) a read-only tmpfs
  mounted the same way.
"""
from __future__ import annotations

import errno
import functools
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL_TIMEOUT_S = 120


def tool_cmd(name: str, *args) -> list[str]:
    return [sys.executable, os.path.join(REPO, "tools", name), *map(str, args)]


def tool_env() -> dict:
    return dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
                PYTHONWARNINGS="ignore")


def run_cli(name: str, *args, timeout: float = TOOL_TIMEOUT_S, prefix: tuple = ()) -> subprocess.CompletedProcess:
    """The tool as a user runs it (stdout and stderr are pipes, not a terminal)."""
    return subprocess.run([*prefix, *tool_cmd(name, *args)], capture_output=True, text=True, timeout=timeout,
                          env=tool_env(), cwd=REPO)


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one `error: ...` line a refused run prints (asserted to be the only error line, no traceback)."""
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in lines if line.startswith("error")]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


def start(name: str, *args) -> subprocess.Popen:
    """The tool in its own session; `proc.lines` collects its stderr lines as they come (a kill point can
    be a line the tool prints, e.g. the end of a pass)."""
    proc = subprocess.Popen(tool_cmd(name, *args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=tool_env(), cwd=REPO, start_new_session=True, text=True)
    proc.lines = []

    def collect():
        for line in proc.stderr:
            proc.lines.append(line.rstrip("\n"))
    proc.reader = threading.Thread(target=collect, daemon=True)
    proc.reader.start()
    return proc


def kill9_when(proc: subprocess.Popen, ready, timeout: float = 90.0) -> None:
    """SIGKILL `proc` (its pid only) as soon as ready() is true; fails if it ended first or never got there."""
    deadline = time.time() + timeout
    while not ready():
        if proc.poll() is not None:
            proc.reader.join(10)
            pytest.fail(f"the tool ended (rc {proc.returncode}) before the kill point:\n" + "\n".join(proc.lines[-20:]))
        if time.time() > deadline:
            proc.kill()
            pytest.fail("the kill point was never reached")
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    proc.reader.join(10)


def live_processes_of(session: int) -> list[int]:
    """Processes still running (zombies excluded) in the session/process group `session`."""
    out = subprocess.run(["ps", "-eo", "pid=,pgid=,stat="], capture_output=True, text=True).stdout.split("\n")
    return [int(f[0]) for f in (line.split() for line in out) if len(f) == 3 and int(f[1]) == session
            and not f[2].startswith("Z")]


def kill_session(session: int) -> None:
    try:
        os.killpg(session, signal.SIGKILL)
    except ProcessLookupError:
        pass


# ---- a small or read-only file system in a private mount namespace ----------------------------------------
@functools.lru_cache(maxsize=None)
def _namespace_prefix() -> tuple:
    if shutil.which("unshare") is None:
        return ()
    prefix = ("unshare", "--mount") if os.geteuid() == 0 else ("unshare", "--user", "--map-root-user", "--mount")
    probe = subprocess.run([*prefix, "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt 2>/dev/null || "
                            "mount -t tmpfs -o size=64k tmpfs /tmp"], capture_output=True, timeout=30)
    return prefix if probe.returncode == 0 else ()


def mounted(folder, size_kb: int, read_only: bool = False) -> tuple:
    """A command prefix: run the rest with `folder` a fresh tmpfs of size_kb (read-only if asked), visible to
    that command only. Skips when this machine allows no mount namespace for this user."""
    prefix = _namespace_prefix()
    if not prefix:
        pytest.skip("needs a private mount namespace for a small tmpfs (unshare --mount; as non-root also "
                    "unprivileged user namespaces), not allowed here")
    opts = f"size={size_kb}k" + (",ro" if read_only else "")
    os.makedirs(folder, exist_ok=True)
    return (*prefix, "sh", "-c", f'mount -t tmpfs -o {opts} tmpfs "{folder}" && exec "$@"', "sh")


def run_on_small_fs(folder, size_kb: int, name: str, *args, timeout: float = TOOL_TIMEOUT_S):
    """The tool with `folder` a tmpfs of size_kb; returns (its CompletedProcess with the tool's own exit
    status, the entries left in `folder`, KB used there afterwards), all seen inside the namespace."""
    prefix = mounted(folder, size_kb)
    script = prefix[-2].replace('exec "$@"', f'"$@"; rc=$?; echo; echo "@@ $rc $(ls -A "{folder}" | wc -l) '
                                              f'$(df -k --output=used "{folder}" | tail -1)"; exit $rc')
    res = subprocess.run([*prefix[:-2], script, "sh", *tool_cmd(name, *args)], capture_output=True, text=True,
                         timeout=timeout, env=tool_env(), cwd=REPO)
    marker = [line for line in res.stdout.splitlines() if line.startswith("@@ ")]
    assert marker, res.stdout + res.stderr
    _, rc, left, used = marker[-1].split()
    assert int(rc) == res.returncode
    return res, int(left), int(used)


def read_only_prefix(folder) -> tuple:
    """A read-only folder for the command: chmod 0555 (not root), or a read-only mount (root ignores modes)."""
    os.makedirs(folder, exist_ok=True)
    if os.geteuid() != 0:
        os.chmod(folder, 0o555)
        return ()
    return mounted(folder, 64, read_only=True)


# ---- a disk that fills up after N bytes, in-process -------------------------------------------------------
class _FullDisk:
    def __init__(self, limit: int):
        self.left = limit


class _LimitedFile(io.RawIOBase):
    def __init__(self, raw, disk: _FullDisk):
        self.raw, self.disk = raw, disk

    def writable(self):
        return True

    def write(self, data):
        n = len(data)
        if n > self.disk.left:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.disk.left -= n
        return self.raw.write(data)

    def close(self):
        self.raw.close()
        super().close()


def enospc_open(limit: int):
    """An `open` for monkeypatching into a module: files opened for writing take `limit` bytes in all, then
    every write raises OSError(ENOSPC) (buffered like a real file, so close() fails too when data is left)."""
    disk = _FullDisk(limit)
    real_open = open

    def fake_open(path, mode="r", *args, **kwargs):
        if not any(c in mode for c in "wax+"):
            return real_open(path, mode, *args, **kwargs)
        raw = real_open(path, mode.replace("t", "") + ("b" if "b" not in mode else ""), buffering=0)
        buffered = io.BufferedWriter(_LimitedFile(raw, disk), buffer_size=8192)
        if "b" in mode:
            return buffered
        return io.TextIOWrapper(buffered, encoding=kwargs.get("encoding") or "utf-8")
    return fake_open


def write_jsonl(path, texts, key="text") -> str:
    with open(path, "w", encoding="utf-8") as fh:
        for t in texts:
            fh.write(json.dumps({key: t}, ensure_ascii=False) + "\n")
    return str(path)


def folder_bytes(folder) -> dict:
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))
            if os.path.isfile(os.path.join(folder, name))}
