"""Fault injection for pretraining (issue 23): stop signals at random points of checkpoint saves (plain runs
and torchrun, once and twice), two runs on one --save, a rank that fails its launch checks without torchrun,
a full disk and a read-only folder under --save. Every case ends with a loadable newest checkpoint (or none
written), one line saying what happened, and nothing left running."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest

from faults.helpers import REPO, mounted, read_only_prefix

PRETRAIN = os.path.join(REPO, "tools", "pretrain.py")
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
TRIES = 20
pytestmark = pytest.mark.timeout(900)


def flags(tokenizer_dir, prefix, save, iters=400, save_interval=1, metrics=None):
    return ["--preset", "tiny", "--tokenizer-model", tokenizer_dir, "--data-path", prefix, "--split", "98,2,0",
            "--seq-length", "64", "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", str(iters),
            "--lr-warmup-iters", str(min(2, iters - 1)), "--log-interval", "1", "--save", str(save), "--save-interval", str(save_interval),
            "--metrics-file", str(metrics or f"{save}.jsonl")]


def start(args, procs=1, env=None):
    launcher = [sys.executable, PRETRAIN] if procs == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs), PRETRAIN]
    return subprocess.Popen(launcher + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env or ENV, cwd=REPO, start_new_session=True)


def wait_rows(metrics, n, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while not (os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= n):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no training rows in time"
        time.sleep(0.05)


def wait_marker(save, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while not os.path.exists(os.path.join(save, "latest_checkpointed_iteration.txt")):
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint saved in time"
        time.sleep(0.05)


def newest_loads(save) -> int:
    """The step of the newest checkpoint --load would take, after checking it reads back whole."""
    from megatron_cmbert.checkpoint import store
    from megatron_cmbert.checkpoint.reader import read_checkpoint

    path = store.resolve_load(str(save))[0]
    store.verify_checkpoint(path)
    ck = read_checkpoint(str(save))  # every tensor read back by torch.distributed.checkpoint
    assert ck.path == path and ck.state_dict
    return ck.state.step


def alive(session) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=,stat=", "-s", str(session)], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines() if line.split() and "Z" not in line.split()[1]]


PLANS = [("SIGTERM",), ("SIGINT",), ("SIGINT", "SIGINT"), ("group SIGTERM",), ("group SIGINT", "group SIGINT")]


@pytest.mark.slow
def test_stop_signals_during_saves_leave_a_complete_newest_checkpoint(tokenizer_dir, news_prefix, tmp_path):
    """TRIES runs saving at every step (a save takes most of a step here, so a signal usually lands in one),
    stopped at a random moment by a random plan: SIGTERM or Ctrl-C, once or twice, to the process or to its
    whole process group (what a terminal's Ctrl-C and torchrun's stop reach: loader workers and the checkpoint
    writer's helpers too); the last ones under torchrun (SIGTERM to torchrun, Ctrl-C twice). Each must end with
    its newest checkpoint complete and loadable, the stop named by the first signal, nothing running."""
    rng = random.Random(23)
    outcomes = []
    for i in range(TRIES):
        torchrun = i >= TRIES - 4
        plan = (("SIGTERM",), ("SIGINT", "SIGINT"))[i % 2] if torchrun else rng.choice(PLANS)
        save = tmp_path / f"run{i}"
        proc = start(flags(tokenizer_dir, news_prefix, save), procs=2 if torchrun else 1)
        try:
            wait_rows(f"{save}.jsonl", rng.randint(1, 3), proc)
            wait_marker(save, proc)  # a complete checkpoint exists: the newest must stay complete
            time.sleep(rng.uniform(0.0, 0.4))
            for sig in plan:
                name = sig.split()[-1]
                (os.killpg if sig.startswith("group") else os.kill)(proc.pid, getattr(signal, name))
                time.sleep(rng.uniform(0.02, 0.3))
            out, err = proc.communicate(timeout=180)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        time.sleep(0.5)
        assert alive(proc.pid) == [], f"try {i} {plan}: processes left running"
        step = newest_loads(save)
        first = plan[0].split()[-1]
        stopped = [line for line in out.splitlines() if line.startswith("stopped by")]
        if proc.returncode == 0 or torchrun:  # torchrun itself exits 1 after forwarding a signal
            assert stopped and stopped[-1].startswith(f"stopped by {first}: saved step {step};"), (i, plan, out[-800:], err[-2000:])
        else:  # a second Ctrl-C: 130 and one line saying what was kept
            assert proc.returncode == 130 and len(plan) == 2, (i, plan, proc.returncode, err[-2000:])
            assert "error: interrupted (second Ctrl-C" in err, err[-2000:]
        assert "Traceback" not in err or torchrun, err[-3000:]  # torchrun prints its own SignalException
        outcomes.append((plan, proc.returncode, step))
    assert len({o[2] for o in outcomes}) > 1  # the stops came at different steps
    # the next start removes what a killed save leaves, saying so
    save = tmp_path / "run0"
    (save / "iter_0000999.tmp").mkdir()
    res = subprocess.run([sys.executable, PRETRAIN, *flags(tokenizer_dir, news_prefix, save, iters=400), "--load",
                          str(save), "--exit-interval", str(outcomes[0][2] + 1)], capture_output=True, text=True,
                         timeout=180, env=ENV, cwd=REPO)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "removed iter_0000999.tmp" in res.stdout and not (save / "iter_0000999.tmp").exists()


@pytest.mark.slow
def test_a_second_run_on_the_same_save_is_refused_and_a_killed_run_leaves_no_lock(tokenizer_dir, news_prefix,
                                                                                  tmp_path):
    save = tmp_path / "shared"
    first = start(flags(tokenizer_dir, news_prefix, save, save_interval=1000, metrics=tmp_path / "a.jsonl"))
    try:
        wait_rows(tmp_path / "a.jsonl", 2, first)
        second = subprocess.run([sys.executable, PRETRAIN, *flags(tokenizer_dir, news_prefix, save,
                                                                  metrics=tmp_path / "b.jsonl")],
                                capture_output=True, text=True, timeout=180, env=ENV, cwd=REPO)
        assert second.returncode == 2
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and "is in use by a run still going" in lines[0]
        assert f"pid {first.pid}" in lines[0] and "host " in lines[0]
        assert not (tmp_path / "b.jsonl").exists()  # refused before anything was written
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # kill -9: the kernel drops the lock with the process
        first.wait()
    steps = [int(line.split('"step": ')[1].split(",")[0]) for line in open(tmp_path / "a.jsonl")]
    assert steps == list(range(1, len(steps) + 1))  # one run's rows only
    third = subprocess.run([sys.executable, PRETRAIN, *flags(tokenizer_dir, news_prefix, save, iters=3,
                                                             metrics=tmp_path / "c.jsonl")],
                           capture_output=True, text=True, timeout=180, env=ENV, cwd=REPO)
    assert third.returncode == 0, third.stderr[-2000:]  # no stale lock


def test_a_rank_failing_its_checks_ends_every_rank_without_torchrun(tokenizer_dir, news_prefix, tmp_path):
    """Two ranks started by environment variables (as a scheduler's own launcher does), rank 1 seeing no
    dataset: both end within the timeout with rank 1's reason, instead of rank 0 waiting in its first
    collective forever."""
    from megatron_cmbert.parallel.world import free_port

    port = str(free_port())
    procs = []
    for rank, prefix in ((0, news_prefix), (1, str(tmp_path / "missing_text_document"))):
        env = dict(ENV, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, CMBERT_JOIN_TIMEOUT_S="60")
        procs.append(start(flags(tokenizer_dir, prefix, tmp_path / "ck", metrics=tmp_path / f"m{rank}.jsonl"),
                           env=env))
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [2, 2]
    rank0 = results[0][1].strip().splitlines()
    assert len(rank0) == 1 and rank0[0].startswith("error: rank 1: ") and "missing_text_document" in rank0[0]
    assert "error (rank 1): " in results[1][1] and "missing_text_document" in results[1][1]


def _one_checkpoint_kb(tokenizer_dir, news_prefix, tmp_path) -> int:
    save = tmp_path / "measure"
    res = subprocess.run([sys.executable, PRETRAIN, *flags(tokenizer_dir, news_prefix, save, iters=1)],
                         capture_output=True, text=True, timeout=180, env=ENV, cwd=REPO)
    assert res.returncode == 0, res.stderr[-2000:]
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(save) for f in fs) // 1024


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(tokenizer_dir, news_prefix, tmp_path):
    """--save on a tmpfs with room for one checkpoint and a half: the launch check passes, the first save
    succeeds, the second meets ENOSPC in the middle of its write: one line naming it, exit 2, the torn .tmp
    removed, the first checkpoint and the marker intact (checked inside the filesystem's namespace)."""
    size = int(_one_checkpoint_kb(tokenizer_dir, news_prefix, tmp_path) * 1.6) + 64
    save = tmp_path / "small"
    prefix = mounted(save, size)
    check = (f'{sys.executable} -c "import sys; sys.path.insert(0, \'{REPO}\'); '
             f'from megatron_cmbert.checkpoint import store; p = store.resolve_load(\'{save}\')[0]; '
             f'store.verify_checkpoint(p); print(\'@@ newest\', p, sorted(__import__(\'os\').listdir(\'{save}\')))"')
    script = prefix[-2].replace('exec "$@"', f'"$@"; rc=$?; {check}; exit $rc')
    args = flags(tokenizer_dir, news_prefix, save, iters=5, metrics=tmp_path / "full.jsonl")
    res = subprocess.run([*prefix[:-2], script, "sh", sys.executable, PRETRAIN, *args], capture_output=True,
                         text=True, timeout=300, env=ENV, cwd=REPO)
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "iter_0000002.tmp: cannot save (" in lines[0], lines
    assert "no space left on the device" in lines[0] or "the filesystem is full" in lines[0], lines
    assert "previous checkpoint and the latest marker are untouched" in lines[0]
    newest = [line for line in res.stdout.splitlines() if line.startswith("@@ newest")]
    assert newest and newest[0].split()[2].endswith("iter_0000001"), res.stdout[-1000:]
    assert "iter_0000002.tmp" not in newest[0]


def test_a_read_only_or_too_small_save_folder_is_refused_before_training(tokenizer_dir, news_prefix, tmp_path):
    save = tmp_path / "ro"
    prefix = read_only_prefix(save)
    res = subprocess.run([*prefix, sys.executable, PRETRAIN, *flags(tokenizer_dir, news_prefix, save / "ck")],
                         capture_output=True, text=True, timeout=180, env=ENV, cwd=REPO)
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0, res.stderr[-2000:]
    assert "not writable" in res.stderr and str(save) in res.stderr
    tiny = tmp_path / "tiny"
    prefix = mounted(tiny, 64)
    res = subprocess.run([*prefix, sys.executable, PRETRAIN, *flags(tokenizer_dir, news_prefix, tiny)],
                         capture_output=True, text=True, timeout=180, env=ENV, cwd=REPO)
    assert res.returncode == 2 and "a checkpoint of this model needs" in res.stderr, res.stderr[-2000:]
