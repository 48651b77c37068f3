"""tools/dedup_minhash.py killed, rerun, doubled and pointed at another work folder.

The reference is an uninterrupted run's output bytes; "no task keeps running" is read from `ps`."""
from __future__ import annotations

import fcntl
import json
import os
import re
import time

import numpy as np
import pytest

from faults.helpers import (error_line, folder_bytes, kill9_when, kill_session, live_processes_of, run_cli,
                            run_on_small_fs, start, write_jsonl)

pytest.importorskip("datatrove", reason="needs the PyPI package datatrove (==0.10.1)")
pytestmark = pytest.mark.timeout(300)
FLAGS = ("--tasks", "4", "--workers", "2", "--quiet")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, inews_train):
    """8 files of real news, each with copies of other files' articles (duplicates across and within)."""
    root = tmp_path_factory.mktemp("dedup_faults")
    texts = inews_train[:800]
    paths = []
    for f in range(8):
        part = texts[f * 100:(f + 1) * 100] + texts[(f * 37) % 700:(f * 37) % 700 + 15]
        paths.append(write_jsonl(root / f"c{f}.jsonl", part))
    return root, paths


@pytest.fixture(scope="module")
def reference(corpus):
    root, paths = corpus
    res = run_cli("dedup_minhash.py", "--input", *paths, "-o", root / "ref", *FLAGS)
    assert res.returncode == 0, res.stderr
    return {k: v for k, v in folder_bytes(root / "ref").items() if k.endswith(".jsonl")}


def outputs(folder) -> dict:
    return {k: v for k, v in folder_bytes(folder).items() if k.endswith(".jsonl")}


def outputs_stamps(folder) -> dict:
    return {n: os.stat(folder / n).st_mtime_ns for n in os.listdir(folder) if not n.startswith(".dedup")}


def test_kill9_during_signatures_leaves_no_task_running_and_the_rerun_resumes(corpus, reference, tmp_path):
    _, paths = corpus
    out = tmp_path / "out"
    proc = start("dedup_minhash.py", "--input", *paths, "-o", out, *FLAGS)
    sigs = out / ".dedup_work" / "signatures" / "bucket_000"
    try:
        kill9_when(proc, lambda: sigs.is_dir() and any(p.stat().st_size > 0 for p in sigs.iterdir()))
        time.sleep(0.5)
        # datatrove's own pool workers outlived the tool here and kept writing the signatures the rerun writes
        assert live_processes_of(proc.pid) == [], "a task of the killed run is still running"
    finally:
        kill_session(proc.pid)
    res = run_cli("dedup_minhash.py", "--input", *paths, "-o", out, *FLAGS)
    assert res.returncode == 0, res.stderr[-3000:]
    assert outputs(out) == reference


def _older_work_folder_with_doubled_signatures(out):
    """What a killed run of the older tool left: signatures of one task written twice (by the killed run's
    surviving worker and by the rerun), its stage marked complete, a manifest without "format"."""
    work = out / ".dedup_work"
    manifest = json.loads((work / "manifest.json").read_text())
    manifest.pop("format", None), manifest.pop("output_dir", None)
    (work / "manifest.json").write_text(json.dumps(manifest))
    dtype = np.dtype([("h", "<u8", (11,)), ("doc", "<u4")])
    for bucket in (work / "signatures").iterdir():
        sig = bucket / "00000.minhash.sig"
        records = np.fromfile(sig, dtype=dtype)
        doubled = np.concatenate([records, records])
        doubled[np.lexsort((doubled["doc"], *doubled["h"].T[::-1]))].tofile(sig)  # sorted, as datatrove sorts
    for stage in ("buckets", "clusters", "filter", "report"):
        for done in (work / "logs" / stage / "completions").iterdir():
            done.unlink()
    for name in os.listdir(out):
        if name.endswith(".jsonl") or name == "dedup_report.json":
            os.remove(out / name)


def test_a_work_folder_of_the_older_tool_is_started_over_saying_so(corpus, reference, tmp_path):
    _, paths = corpus
    out = tmp_path / "out"
    assert run_cli("dedup_minhash.py", "--input", *paths, "-o", out, *FLAGS).returncode == 0
    _older_work_folder_with_doubled_signatures(out)
    res = run_cli("dedup_minhash.py", "--input", *paths, "-o", out, *FLAGS)  # today's main: KeyError, every time
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"{out}/.dedup_work: a work folder of an older dedup_minhash.py (a killed run of it could leave " \
           f"signatures written twice): starting it over" in res.stderr
    assert outputs(out) == reference


def test_another_work_dir_refuses_to_overwrite_and_force_replaces(corpus, reference, tmp_path):
    root, paths = corpus
    out = tmp_path / "out"
    assert run_cli("dedup_minhash.py", "--input", *paths, "-o", out, *FLAGS).returncode == 0
    stamps = outputs_stamps(out)
    res = run_cli("dedup_minhash.py", "--input", *paths[:2], "-o", out, "--work-dir", tmp_path / "w2", *FLAGS)
    assert res.returncode == 2
    assert error_line(res) == f"error: {out}/c0.jsonl exists (from an earlier run, not from the work folder " \
                              f"{tmp_path}/w2); pass --force to replace it, or choose another -o"
    assert outputs_stamps(out) == stamps
    # the same run again: its own work folder, nothing to redo, nothing replaced
    res = run_cli("dedup_minhash.py", "--input", *paths, "-o", out, *FLAGS)
    assert res.returncode == 0 and "every stage was already complete" in res.stderr
    res = run_cli("dedup_minhash.py", "--input", *paths, "-o", out, "--work-dir", tmp_path / "w2", "--force", *FLAGS)
    assert res.returncode == 0, res.stderr
    assert outputs(out) == reference


def test_a_second_run_on_the_same_folders_is_refused(corpus, tmp_path):
    _, paths = corpus
    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".dedup.lock", "w") as lock:  # another run holds the output folder
        fcntl.flock(lock, fcntl.LOCK_EX)
        lock.write(f"pid {os.getpid()} on testhost\n")
        lock.flush()
        res = run_cli("dedup_minhash.py", "--input", *paths, "-o", out, *FLAGS)
    assert res.returncode == 2
    assert error_line(res) == f"error: {out}: the output folder is in use by another dedup run (pid {os.getpid()} " \
                              f"on testhost); wait for it to finish, or stop it, then rerun to resume"
    assert sorted(os.listdir(out)) == [".dedup.lock"]


def test_leftover_temporaries_of_a_dead_run_are_removed(corpus, tmp_path, dead_pid):
    _, paths = corpus
    out = tmp_path / "out"
    assert run_cli("dedup_minhash.py", "--input", *paths, "-o", out, *FLAGS).returncode == 0
    stats = out / ".dedup_work" / "stats"
    dead = [out / f"c1.jsonl.tmp{dead_pid}", out / f"dedup_report.json.tmp{dead_pid}",
            stats / f"read_00000.json.tmp{dead_pid}"]
    alive = out / f"c2.jsonl.tmp{os.getpid()}"  # a live run's temporary is never touched
    for p in dead + [alive]:
        p.write_text("{half")
    for done in (out / ".dedup_work" / "logs" / "report" / "completions").iterdir():
        done.unlink()  # the report stage reruns and reads the stats folder
    res = run_cli("dedup_minhash.py", "--input", *paths, "-o", out, *FLAGS)
    assert res.returncode == 0, res.stderr[-3000:]
    assert not any(p.exists() for p in dead) and alive.exists()
    assert f"removed 2 leftover temporary file(s) of a stopped run in {out}: c1.jsonl.tmp{dead_pid}, " \
           f"dedup_report.json.tmp{dead_pid}" in res.stderr
    assert f"removed 1 leftover temporary file(s) of a stopped run in {stats}" in res.stderr


def test_truncated_gzip_input_is_one_line(corpus, tmp_path):
    import gzip

    _, paths = corpus
    data = gzip.compress(open(paths[0], "rb").read())
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(data[:len(data) // 3])
    res = run_cli("dedup_minhash.py", "--input", cut, paths[1], "-o", tmp_path / "out", *FLAGS)
    assert res.returncode == 2
    assert re.fullmatch(rf"error: {cut}: truncated or corrupt gzip data after line \d+ \(Compressed file ended "
                        r"before the end-of-stream marker was reached\); recompress or re-download it",
                        error_line(res)), error_line(res)


def test_full_disk_known_before_or_met_during_a_stage_is_one_line(corpus, tmp_path):
    import gzip

    _, paths = corpus
    disk = tmp_path / "disk"
    # plain inputs: the copy's size is known (at most the inputs'), so it is refused before any work
    res, left, _ = run_on_small_fs(disk, 200, "dedup_minhash.py", "--input", *paths, "-o", disk / "out", *FLAGS)
    assert res.returncode == 1
    need = sum(os.path.getsize(p) for p in paths) / 2**20
    assert re.fullmatch(rf"error: {disk}/out: the deduplicated copy needs about {need:.1f} MB, but only \S+ KB "
                        rf"are free there; free some space or write elsewhere", error_line(res)), error_line(res)
    # gzip inputs: no size known up front; the signatures fill the disk, the finished tasks stay for a resume
    packed = []
    for p in paths:
        packed.append(str(tmp_path / (os.path.basename(p) + ".gz")))
        with open(p, "rb") as src, gzip.open(packed[-1], "wb") as dst:
            dst.write(src.read())
    res, _, _ = run_on_small_fs(disk, 200, "dedup_minhash.py", "--input", *packed, "-o", disk / "out", *FLAGS)
    assert res.returncode == 1, res.stderr[-2000:]
    assert re.fullmatch(r"error: disk full during the signatures stage \(.*No space left on device\); finished "
                        r"tasks are kept: free space and rerun the same command to resume", error_line(res)), \
        error_line(res)
