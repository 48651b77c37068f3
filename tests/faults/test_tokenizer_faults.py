"""tools/train_tokenizer.py killed, doubled, fed bad input, on a full disk and a read-only folder."""
from __future__ import annotations

import os
import re

import pytest

from faults.helpers import (error_line, folder_bytes, kill9_when, read_only_prefix, run_cli, run_on_small_fs, start,
                            write_jsonl)
from tools import train_tokenizer

pytestmark = pytest.mark.timeout(240)
FLAGS = ("--vocab-size", "2048", "--quiet")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, inews_train):
    root = tmp_path_factory.mktemp("tok_faults")
    return root, write_jsonl(root / "news.jsonl", inews_train[:600])


@pytest.fixture(scope="module")
def reference(corpus):
    root, src = corpus
    train_tokenizer.run(["--input", src, "--output-dir", str(root / "ref"), *FLAGS])
    return folder_bytes(root / "ref")


def test_kill9_mid_training_and_a_leftover_temporary_then_the_rerun_is_identical(corpus, reference, tmp_path,
                                                                                 dead_pid):
    _, src = corpus
    out = tmp_path / "tok"
    proc = start("train_tokenizer.py", "--input", src, "--output-dir", out, *FLAGS[:-1])  # progress lines on
    # the kill point: the line closing the first pass over the corpus (the second pass and training follow)
    kill9_when(proc, lambda: any(line.startswith("train_tokenizer: counting characters: ") for line in proc.lines))
    assert not out.exists()
    # what a run killed while saving leaves: its temporary folder, half written, named after DIR and its pid
    leftover = tmp_path / f".tok.tokenizer-tmp-{dead_pid}"
    leftover.mkdir()
    (leftover / "tokenizer.json").write_text('{"half')
    res = run_cli("train_tokenizer.py", "--input", src, "--output-dir", out, *FLAGS)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"removed 1 leftover temporary file(s) of a stopped run in {tmp_path}: .tok.tokenizer-tmp-{dead_pid}" \
        in res.stderr
    assert sorted(os.listdir(tmp_path)) == ["tok"]
    info = folder_bytes(out).pop("training_info.json")
    ref = dict(reference)
    ref_info = ref.pop("training_info.json")
    assert folder_bytes(out) | {"training_info.json": info} == ref | {"training_info.json": info}
    strip = re.compile(rb'"train_seconds": [0-9.]+')  # the one field that is a clock, not the corpus
    assert strip.sub(b"", info) == strip.sub(b"", ref_info)


def test_second_run_refuses_to_overwrite_and_force_replaces(corpus, reference, tmp_path, inews_train):
    _, src = corpus
    out = tmp_path / "tok"
    train_tokenizer.run(["--input", src, "--output-dir", str(out), *FLAGS])
    before = folder_bytes(out)
    other = write_jsonl(tmp_path / "other.jsonl", inews_train[600:900])
    res = run_cli("train_tokenizer.py", "--input", other, "--output-dir", out, *FLAGS)
    assert res.returncode == 2
    assert error_line(res) == f"error: {out}/tokenizer.json exists (and 3 more outputs); pass --force to replace it"
    assert folder_bytes(out) == before
    res = run_cli("train_tokenizer.py", "--input", other, "--output-dir", out, *FLAGS, "--force")
    assert res.returncode == 0, res.stderr
    assert folder_bytes(out)["tokenizer.json"] != before["tokenizer.json"]


def test_no_usable_text_is_one_line_with_the_reasons(tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"text": 7}\n{"body": "x"}\n{nope\n', encoding="utf-8")
    res = run_cli("train_tokenizer.py", "--input", src, "--output-dir", tmp_path / "tok", *FLAGS)
    assert res.returncode == 2
    assert error_line(res) == (f"error: {src}: no usable text under key 'text' (3 line(s) skipped: 1 malformed_json "
                               f"(first at {src}:3), 1 missing_key (first at {src}:2), 1 non_string (first at {src}:1))")
    assert not (tmp_path / "tok").exists()


def test_read_only_output_folder_is_refused_before_the_corpus_is_read(corpus, tmp_path):
    _, src = corpus
    folder = tmp_path / "ro"
    res = run_cli("train_tokenizer.py", "--input", src, "--output-dir", folder / "tok", *FLAGS,
                  prefix=read_only_prefix(folder))
    os.chmod(folder, 0o755)
    assert res.returncode == 2
    assert re.fullmatch(rf"error: --output-dir {folder}: cannot write there \((Read-only file system|Permission "
                        rf"denied)\)", error_line(res)), error_line(res)


def test_full_disk_while_saving_leaves_nothing(corpus, tmp_path):
    _, src = corpus
    disk = tmp_path / "disk"
    res, left, used = run_on_small_fs(disk, 40, "train_tokenizer.py", "--input", src, "--output-dir", disk / "tok",
                                      *FLAGS)
    assert res.returncode == 1, res.stderr[-2000:]
    assert re.fullmatch(rf"error: disk full while writing {disk}/\.tok\.tokenizer-tmp-\d+/tokenizer\.json \(.*No "
                        rf"space left on device.*\); nothing written to {disk}/tok", error_line(res)), error_line(res)
    assert (left, used) == (0, 0)


def test_full_disk_in_process(corpus, tmp_path, monkeypatch, capsys):
    """Where no small file system can be made: the Rust writer's error as it reports ENOSPC."""
    _, src = corpus

    def full(tok, folder):
        open(os.path.join(folder, "tokenizer.json"), "w").write("{")
        raise Exception("No space left on device (os error 28)")
    monkeypatch.setattr(train_tokenizer, "save_tokenizer", full)
    assert train_tokenizer.main(["--input", src, "--output-dir", str(tmp_path / "tok"), *FLAGS]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: disk full while writing {tmp_path}/.tok.tokenizer-tmp-{os.getpid()}/tokenizer.json")
    assert os.listdir(tmp_path) == []
