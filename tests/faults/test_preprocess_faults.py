"""tools/preprocess_data.py killed, doubled, fed bad input, on a full disk and a read-only folder.

References are independent of the code under test: an uninterrupted run's bytes, hand-counted skip reasons,
the folder's listing and the file system's own free-space figure."""
from __future__ import annotations

import gzip
import json
import os
import re

import pytest

from faults.helpers import (enospc_open, error_line, folder_bytes, kill9_when, read_only_prefix, run_cli,
                            run_on_small_fs, start, write_jsonl)
from tools import preprocess_data

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, inews_train):
    root = tmp_path_factory.mktemp("pre_faults")
    return root, write_jsonl(root / "news.jsonl", inews_train[:150])


@pytest.fixture(scope="module")
def reference(corpus, tokenizer_dir):
    """An uninterrupted run's files (the byte-identical reference of every rerun)."""
    root, src = corpus
    out = root / "ref"
    preprocess_data.run(["--input", src, "--tokenizer-model", tokenizer_dir, "--output-prefix", str(out / "news"),
                         "--quiet", "--chunk-chars", "20000"])
    return folder_bytes(out)


def args(src, tokenizer_dir, prefix, *extra):
    return ["--input", str(src), "--tokenizer-model", tokenizer_dir, "--output-prefix", str(prefix), *extra]


def test_kill9_mid_write_then_rerun_removes_the_leftovers_and_gives_the_same_bytes(corpus, tokenizer_dir, reference,
                                                                                   tmp_path, inews_train):
    big = write_jsonl(tmp_path / "news.jsonl", inews_train[:150] * 6)  # long enough to be caught writing
    out = tmp_path / "out"
    proc = start("preprocess_data.py", *args(big, tokenizer_dir, out / "news", "--quiet", "--chunk-chars", "20000"))

    def writing():
        names = os.listdir(out) if out.exists() else []
        return any(".bin.partial-" in n and os.path.getsize(out / n) > 50_000 for n in names)
    kill9_when(proc, writing)
    left = sorted(os.listdir(out))
    assert left and all(f".partial-{proc.pid}" in n for n in left), left  # only temporaries, never a dataset
    # the rerun (the same command, no --force: nothing complete was there) cleans up and builds the same bytes
    _, src = corpus
    res = run_cli("preprocess_data.py", *args(src, tokenizer_dir, out / "news", "--quiet", "--chunk-chars", "20000"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert re.search(rf"removed {len(left)} leftover temporary file\(s\) of a stopped run in {out}", res.stderr), \
        res.stderr
    assert folder_bytes(out) == reference


def test_second_run_refuses_to_overwrite_and_force_replaces(corpus, tokenizer_dir, reference, tmp_path,
                                                             small_news):
    _, src = corpus
    out = tmp_path / "out"
    preprocess_data.run(args(src, tokenizer_dir, out / "news", "--quiet", "--chunk-chars", "20000"))
    stamps = {n: os.stat(out / n).st_mtime_ns for n in os.listdir(out)}
    res = run_cli("preprocess_data.py", *args(small_news, tokenizer_dir, out / "news", "--quiet"))
    assert res.returncode == 2
    assert error_line(res) == f"error: {out}/news_text_document.bin exists (and 4 more outputs); pass --force " \
                              f"to replace it"
    assert {n: os.stat(out / n).st_mtime_ns for n in os.listdir(out)} == stamps  # untouched
    res = run_cli("preprocess_data.py", *args(src, tokenizer_dir, out / "news", "--quiet", "--chunk-chars", "20000",
                                              "--force"))
    assert res.returncode == 0, res.stderr
    assert folder_bytes(out) == reference


@pytest.fixture
def small_news(tmp_path, inews_train):
    return write_jsonl(tmp_path / "small.jsonl", inews_train[:5])


BAD_LINES = [b'{"text": 1}', b"{broken", b'{"title": "x"}', b"", b'{"text": "   "}', b'["a list"]',
             b'{"text": "\xff bad"}']
# by hand: non_string 1 (line 1), malformed_json 2 (lines 2, 6), missing_key 1 (3), blank line 4 not counted,
# empty_text 1 (5), invalid_utf8 1 (7)


@pytest.mark.parametrize("content,reason", [
    (b"", r"no usable document under key 'text' \(no non-blank line\); nothing written"),
    (b"\n".join(BAD_LINES) + b"\n",
     r"no usable document under key 'text' \(6 line\(s\) skipped: 2 malformed_json \(first at \S+bad.jsonl:2\), "
     r"1 empty_text \(first at \S+:5\), 1 invalid_utf8 \(first at \S+:7\), 1 missing_key \(first at \S+:3\), "
     r"1 non_string \(first at \S+:1\)\); nothing written"),
])
def test_empty_or_all_malformed_input_is_an_error_with_the_skip_counts(tmp_path, tokenizer_dir, content, reason):
    src = tmp_path / "bad.jsonl"
    src.write_bytes(content)
    res = run_cli("preprocess_data.py", *args(src, tokenizer_dir, tmp_path / "out" / "x", "--quiet"))
    assert res.returncode == 2
    assert re.fullmatch(rf"error: {re.escape(str(src))}: {reason}", error_line(res)), error_line(res)
    assert os.listdir(tmp_path / "out") == []


def test_truncated_gzip_names_the_file_and_the_line(tmp_path, tokenizer_dir, inews_train):
    lines = [json.dumps({"text": t}, ensure_ascii=False).encode() + b"\n" for t in inews_train[:200]]
    data = gzip.compress(b"".join(lines))
    src = tmp_path / "cut.jsonl.gz"
    src.write_bytes(data[:len(data) // 2])
    with gzip.open(src, "rb") as fh:  # the reference: how many whole lines gzip gives before the cut
        whole = 0
        try:
            for _ in fh:
                whole += 1
        except EOFError:
            pass
    res = run_cli("preprocess_data.py", *args(src, tokenizer_dir, tmp_path / "out" / "x", "--quiet"))
    assert res.returncode == 2
    assert error_line(res).startswith(f"error: {src}: truncated or corrupt gzip data after line {whole} ")
    assert os.listdir(tmp_path / "out") == []


def test_unreadable_input_is_named(tmp_path, tokenizer_dir, monkeypatch, capsys, small_news):
    """Not root: chmod 000. Root reads anything, so there the file's open is made to fail (EACCES) in-process."""
    if os.geteuid() != 0:
        os.chmod(small_news, 0)
    else:
        from megatron_cmbert.data import jsonl

        real_open = open

        def deny(path, *a, **k):
            if str(path) == small_news:
                raise PermissionError(13, "Permission denied", str(path))
            return real_open(path, *a, **k)
        monkeypatch.setattr(jsonl, "open", deny, raising=False)
    code = preprocess_data.main(args(small_news, tokenizer_dir, tmp_path / "out" / "x", "--quiet"))
    assert code == 2
    assert capsys.readouterr().err.strip() == f"error: {small_news}: cannot read it (Permission denied)"
    assert not (tmp_path / "out").exists()


def test_read_only_output_folder_is_refused_before_reading(tmp_path, tokenizer_dir, small_news):
    folder = tmp_path / "ro"
    res = run_cli("preprocess_data.py", *args(small_news, tokenizer_dir, folder / "x", "--quiet"),
                  prefix=read_only_prefix(folder))
    os.chmod(folder, 0o755)
    assert res.returncode == 2
    assert re.fullmatch(rf"error: --output-prefix {folder}: cannot write there \((Read-only file system|"
                        rf"Permission denied)\)", error_line(res)), error_line(res)


def test_full_disk_in_process_leaves_no_partial_file(corpus, tokenizer_dir, tmp_path, monkeypatch, capsys):
    """The write wrapper: 200 KB, then ENOSPC on every write (buffered, so closing fails as well)."""
    from megatron_cmbert.data import indexed

    _, src = corpus
    monkeypatch.setattr(indexed, "open", enospc_open(200_000), raising=False)
    out = tmp_path / "out"
    code = preprocess_data.main(args(src, tokenizer_dir, out / "news", "--quiet", "--chunk-chars", "20000"))
    err = capsys.readouterr().err.strip()
    assert code == 1, err
    assert re.fullmatch(rf"error: disk full while writing {out}/news_text_document\S*\.partial-{os.getpid()} "
                        rf"\(No space left on device\); partial files removed, nothing written", err), err
    assert os.listdir(out) == []


def test_full_disk_on_a_small_file_system_frees_what_it_took(corpus, tokenizer_dir, tmp_path):
    _, src = corpus
    disk = tmp_path / "disk"
    res, left, used_kb = run_on_small_fs(disk, 300, "preprocess_data.py",
                                         *args(src, tokenizer_dir, disk / "news", "--quiet", "--chunk-chars", "20000"))
    assert res.returncode == 1, res.stderr
    assert re.fullmatch(rf"error: disk full while writing {disk}/news_text_document\S*\.partial-\d+ \(No space "
                        rf"left on device\); partial files removed, nothing written", error_line(res))
    assert (left, used_kb) == (0, 0)  # no file left, and the file system's own figure: nothing used


def test_progress_lines_when_stderr_is_not_a_terminal(small_news, tokenizer_dir, tmp_path):
    res = run_cli("preprocess_data.py", *args(small_news, tokenizer_dir, tmp_path / "out" / "x"))
    assert res.returncode == 0, res.stderr
    size = os.path.getsize(small_news)
    assert re.search(rf"^preprocess: {size:,}/{size:,} \(100%\) bytes, \d+ s$", res.stderr, re.M), res.stderr
