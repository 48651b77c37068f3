"""The largest token id: written once to the sidecar and read from there (not a full scan at every launch), also
for datasets built before the field or before sidecars; tools/merge_datasets.py on a full disk, with too little
free space, after a kill, and with an older input sidecar. References: numpy over the raw token file."""
from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import pytest

from faults.helpers import enospc_open, folder_bytes, write_jsonl
from megatron_cmbert.data import dataset_checks
from tools import merge_datasets, preprocess_data

pytestmark = pytest.mark.timeout(240)
SUFFIXES = (".bin", ".idx", "_wordstart.bin", "_wordstart.idx")


@pytest.fixture(scope="module")
def built(tmp_path_factory, tokenizer_dir, inews_train):
    """Two datasets (a, b) from real news."""
    root = tmp_path_factory.mktemp("sidecar")
    for name, texts in (("a", inews_train[:20]), ("b", inews_train[20:80])):
        src = write_jsonl(root / f"{name}.jsonl", texts)
        preprocess_data.run(["--input", src, "--tokenizer-model", tokenizer_dir, "--output-prefix", str(root / name),
                             "--quiet"])
    return root


def copy_dataset(root, name, dest, meta: str = "keep"):
    """A copy of dataset `name` in `dest`: its sidecar kept, without max_token_id ("older"), or gone ("none")."""
    src, dst = root / f"{name}_text_document", dest / f"{name}_text_document"
    dest.mkdir(exist_ok=True)
    for s in SUFFIXES:
        shutil.copy(str(src) + s, str(dst) + s)
    record = json.loads(open(str(src) + ".meta.json").read())
    if meta == "older":
        del record["max_token_id"]
    if meta != "none":
        open(str(dst) + ".meta.json", "w").write(json.dumps(record))
    return str(dst)


def true_max(prefix) -> int:
    return int(np.fromfile(prefix + ".bin", dtype=np.uint16).max())


@pytest.mark.parametrize("meta", ["older", "none"])
def test_a_dataset_without_the_field_is_scanned_once_then_read_from_its_sidecar(built, tokenizer_dir, tmp_path,
                                                                                 monkeypatch, meta):
    prefix = copy_dataset(built, "b", tmp_path, meta)
    lines = []
    dataset_checks.check_dataset_tokenizer(prefix, tokenizer_dir, log=lines.append)
    what = "no max_token_id in its older sidecar" if meta == "older" else "no sidecar (built before sidecars)"
    assert lines == [f"{prefix}: {what}: scanned the token file once for its largest id ({true_max(prefix)}), "
                     f"recorded in b_text_document.meta.json, so later launches read it from there"]
    assert json.loads(open(prefix + ".meta.json").read())["max_token_id"] == true_max(prefix)

    def no_scan(_):
        raise AssertionError("scanned the token file again")
    monkeypatch.setattr(dataset_checks, "max_token_id", no_scan)
    dataset_checks.check_dataset_tokenizer(prefix, tokenizer_dir, log=lines.append)  # today's main: scans again
    assert len(lines) == 1
    # a rebuilt token file (another size) is scanned again: the record names the file it describes
    monkeypatch.undo()
    with open(prefix + ".bin", "ab") as fh:
        fh.write(np.uint16(7).tobytes())
    dataset_checks.check_dataset_tokenizer(prefix, tokenizer_dir, log=lines.append)
    assert len(lines) == 2 and "scanned the token file once" in lines[1]


def test_a_read_only_dataset_folder_says_every_launch_scans(built, tokenizer_dir, tmp_path, monkeypatch):
    prefix = copy_dataset(built, "b", tmp_path, "none")
    real_open = open

    def read_only(path, mode="r", *a, **k):  # chmod does not stop root: the write is refused here instead
        if "w" in mode and str(path).startswith(prefix):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, mode, *a, **k)
    monkeypatch.setattr(dataset_checks, "open", read_only, raising=False)
    lines = []
    dataset_checks.check_dataset_tokenizer(prefix, tokenizer_dir, log=lines.append)
    assert re.fullmatch(rf"{prefix}: no sidecar \(built before sidecars\): scanned the token file once for its "
                        rf"largest id \({true_max(prefix)}\), not recorded \(.*: Permission denied\), so every "
                        rf"launch scans it", lines[0]), lines
    assert sorted(os.listdir(tmp_path)) == sorted(f"b_text_document{s}" for s in SUFFIXES)


def test_merge_scans_an_older_input_sidecar_for_the_merged_maximum(built, tmp_path, capsys):
    older, newer = sorted("ab", key=lambda n: -true_max(str(built / f"{n}_text_document")))
    old = copy_dataset(built, older, tmp_path, "older")  # the input with the larger id lacks the field
    new = copy_dataset(built, newer, tmp_path, "keep")
    assert true_max(old) > true_max(new)  # today's main drops the unknown maximum and records the other
    meta = merge_datasets.run(["--input", old, new, "--output", str(tmp_path / "ab_text_document"), "--quiet"])
    assert meta["max_token_id"] == true_max(old)
    assert json.loads(open(tmp_path / "ab_text_document.meta.json").read())["max_token_id"] == true_max(old)
    assert f"{old}: no max_token_id in its sidecar (an older build): scanned its tokens once" in capsys.readouterr().err


def test_merge_on_a_full_disk_leaves_nothing_and_is_one_line(built, tmp_path, monkeypatch, capsys):
    from megatron_cmbert.data import indexed

    monkeypatch.setattr(indexed, "open", enospc_open(20_000), raising=False)
    out = tmp_path / "out"
    out.mkdir()
    code = merge_datasets.main(["--input", str(built / "a_text_document"), str(built / "b_text_document"),
                                "--output", str(out / "ab_text_document"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert re.fullmatch(rf"error: disk full while writing {out}/ab_text_document\S*\.partial-{os.getpid()} \(No "
                        rf"space left on device\); partial files removed, nothing written", err), err
    assert os.listdir(out) == []


def test_merge_refuses_before_writing_when_the_inputs_do_not_fit(built, tmp_path, monkeypatch, capsys):
    from megatron_cmbert.data import outputs

    monkeypatch.setattr(outputs, "free_bytes", lambda folder: 1000)
    code = merge_datasets.main(["--input", str(built / "a_text_document"), str(built / "b_text_document"),
                                "--output", str(tmp_path / "ab_text_document"), "--quiet"])
    assert code == 1
    need = sum(os.path.getsize(str(built / f"{n}_text_document") + s) for n in "ab" for s in SUFFIXES) / 1024
    assert capsys.readouterr().err.strip() == (f"error: {tmp_path}: the merged dataset needs about {need:.1f} KB, "
                                               f"but only 1000 B are free there; free some space or write elsewhere")
    assert os.listdir(tmp_path) == []


def test_merge_removes_a_killed_merge_s_temporaries_and_refuses_to_overwrite(built, tmp_path, dead_pid, capsys):
    out = str(tmp_path / "ab_text_document")
    for kind in (".bin", ".idx", ".lengths", "_wordstart.bin"):
        open(f"{out}{kind}.partial-{dead_pid}", "w").write("half")
    argv = ["--input", str(built / "a_text_document"), str(built / "b_text_document"), "--output", out, "--quiet"]
    merge_datasets.run(argv)
    assert f"removed 4 leftover temporary file(s) of a stopped run in {tmp_path}" in capsys.readouterr().err
    assert not [n for n in os.listdir(tmp_path) if ".partial-" in n]
    before = folder_bytes(tmp_path)
    assert merge_datasets.main(argv) == 2
    assert capsys.readouterr().err.strip() == f"error: {out}.bin exists; pass --force to replace it"
    assert folder_bytes(tmp_path) == before
