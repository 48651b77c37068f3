"""tools/dedup_minhash.py through datatrove's local executor, on real Chinese news text.

Expected removals and counts are known by construction (injected copies with a few characters
changed, exact Jaccard from plain Python sets); shingles are checked against a plain-string rule.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import os
import random
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

pytest.importorskip("datatrove", reason="needs the PyPI package datatrove (==0.10.1)")
from megatron_cmbert.data.dedup import DedupError, DedupSettings, char_shingles, check_work_dir  # noqa: E402

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("dedup_minhash_tool", ROOT / "tools" / "dedup_minhash.py")
tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tool)


def ref_norm(text: str) -> str:
    """NFKC without punctuation, separators, control and format characters, one by one."""
    return "".join(c for c in unicodedata.normalize("NFKC", text)
                   if not (unicodedata.category(c)[0] in "PZ" or unicodedata.category(c) in ("Cc", "Cf")))


def ref_shingles(text: str, n: int = 5) -> set:
    s = ref_norm(text)
    if len(s) < n:
        return {s} if s else set()
    return {s[i: i + n] for i in range(len(s) - n + 1)}


@pytest.fixture(scope="module")
def docs(inews_train) -> list[str]:
    """24 distinct articles of 600-1500 characters, pairwise exact Jaccard < 0.3 (unrelated)."""
    picked, sets = [], []
    for text in inews_train:
        if not 600 <= len(text) <= 1500:
            continue
        sh = ref_shingles(text)
        if all(len(sh & o) / len(sh | o) < 0.3 for o in sets):
            picked.append(text)
            sets.append(sh)
        if len(picked) == 24:
            return picked
    raise AssertionError("inews has fewer than 24 unrelated articles of 600-1500 characters")


def change_chars(text: str, count: int, seed: int) -> str:
    rng = random.Random(seed)
    chars = list(text)
    for i in rng.sample([i for i, c in enumerate(chars) if "\u4e00" <= c <= "\u9fff"], count):
        chars[i] = "鑫" if chars[i] != "鑫" else "淼"
    return "".join(chars)


def write_jsonl(path: Path, items, gz: bool = False) -> list[bytes]:
    lines = [(t if isinstance(t, bytes) else json.dumps({"text": t}, ensure_ascii=False).encode()) + b"\n"
             for t in items]
    data = b"".join(lines)
    path.write_bytes(gzip.compress(data) if gz else data)
    return lines


def run_tool(inputs, outdir: Path, *extra) -> dict:
    report = tool.run(["--input", *map(str, inputs), "-o", str(outdir), "--quiet", *extra])
    assert report == json.loads((outdir / "dedup_report.json").read_text(encoding="utf-8"))
    return report


def test_char_shingles_match_plain_rule(docs):
    for text in docs[:4]:  # no 64-bit collisions: as many hashes as distinct 5-character strings
        assert len(char_shingles(text, 5)) == len(ref_shingles(text))
    assert len(char_shingles("你好", 5)) == 1 and len(char_shingles("。。！ ", 5)) == 0
    assert (char_shingles(docs[0], 5) == char_shingles(docs[0].replace("，", ",  "), 5)).all()


def test_word_shingles_are_rjieba_word_ngrams(docs):
    rjieba = pytest.importorskip("rjieba", reason="needs the PyPI package rjieba")
    from megatron_cmbert.data.dedup import word_shingles

    for text in docs[:3]:
        words = rjieba.cut(ref_norm(text))
        assert len(word_shingles(text, 3)) == len({tuple(words[i: i + 3]) for i in range(len(words) - 2)})


@pytest.fixture(scope="module")
def corpus(docs, tmp_path_factory):
    """Two sources (one gzipped) with near-duplicates inside and across them, and bad lines."""
    tmp = tmp_path_factory.mktemp("dedup")
    near = change_chars(docs[0], 3, seed=1)  # 3 characters of 600+: Jaccard well above 0.8
    cross = change_chars(docs[1], 3, seed=2)
    assert len(ref_shingles(near) & ref_shingles(docs[0])) / len(ref_shingles(near) | ref_shingles(docs[0])) > 0.9
    a_items = [docs[0], docs[2], near, b"{not json", docs[3], json.dumps({"title": "x"}).encode(), docs[0]]
    b_items = [docs[1], docs[4], cross, docs[5], b"\xff\xfe broken", docs[2]]
    a_lines = write_jsonl(tmp / "a.jsonl", a_items)
    b_lines = write_jsonl(tmp / "b.jsonl.gz", b_items, gz=True)
    return tmp, a_lines, b_lines


def test_local_executor_removes_injected_duplicates(corpus):
    tmp, a_lines, b_lines = corpus
    report = run_tool([tmp / "a.jsonl", tmp / "b.jsonl.gz"], tmp / "out", "--tasks", "2")
    out_a = (tmp / "out" / "a.jsonl").read_bytes()
    out_b = (tmp / "out" / "b.jsonl").read_bytes()
    # a: line 3 (near copy of line 1) and line 7 (exact copy of 1) go; bad lines stay, byte for byte.
    # b: line 3 (near copy of b:1) goes; b:6 repeats a:2, so one of the two goes.
    assert out_a.count(b"\n") + out_b.count(b"\n") == len(a_lines) + len(b_lines) - 4
    for keep in (a_lines[3], a_lines[4], a_lines[5]):
        assert keep in out_a
    assert b_lines[4] in out_b and b_lines[1] in out_b and b_lines[3] in out_b
    assert (a_lines[1] in out_a) != (b_lines[5] in out_b)  # exactly one copy of docs[2] kept
    kept_a = out_a.count(a_lines[0]) + out_a.count(a_lines[2])  # a:1 and a:7 are the same bytes
    kept_b = out_b.count(b_lines[0]) + out_b.count(b_lines[2])
    assert kept_a == 1 and kept_b == 1  # one per cluster
    files = {Path(f["path"]).name: f for f in report["files"]}
    assert files["a.jsonl"]["docs_in"] == 7 and files["b.jsonl.gz"]["docs_in"] == 6
    assert report["total"]["removed"] == 4 and report["total"]["kept"] == 9
    assert files["a.jsonl"]["removed"] + files["b.jsonl.gz"]["removed"] == 4
    assert files["a.jsonl"]["bad_line_reasons"] == {"malformed_json": 1, "missing_key": 1}
    assert files["a.jsonl"]["bad_line_examples"]["missing_key"] == [f"{tmp / 'a.jsonl'}:6"]
    assert files["b.jsonl.gz"]["bad_line_reasons"] == {"invalid_utf8": 1}
    assert not [n for n in os.listdir(tmp / "out") if ".tmp" in n]  # nothing half-written


def test_rerun_resumes_and_refuses_other_inputs(corpus, tmp_path):
    tmp, _, _ = corpus
    out = tmp_path / "out"
    first = run_tool([tmp / "a.jsonl", tmp / "b.jsonl.gz"], out)
    done = sorted((out / ".dedup_work" / "logs").glob("*/completions/*"))
    assert len(done) == 1 + 10 + 1 + 1 + 1  # one task per stage, buckets: one per band
    before = (out / "a.jsonl").read_bytes()
    # as if killed during the filter stage: its completions and outputs are gone; the rerun redoes
    # that stage (and the report) only, and the finished earlier stages are not touched
    redo = [p for p in done if p.parent.parent.name in ("filter", "report")]
    for p in redo + [out / "a.jsonl", out / "dedup_report.json"]:
        p.unlink()
    stamp = {p: p.stat().st_mtime_ns for p in done if p not in redo}
    assert run_tool([tmp / "a.jsonl", tmp / "b.jsonl.gz"], out) == first
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp
    assert (out / "a.jsonl").read_bytes() == before and all(p.exists() for p in redo)
    # the same work folder with other settings is refused before anything runs
    with pytest.raises(DedupError, match=".dedup_work"):
        check_work_dir(str(out / ".dedup_work"), [str(tmp / "a.jsonl")], DedupSettings(), 1)
    assert tool.main(["--input", str(tmp / "a.jsonl"), "-o", str(out), "--quiet", "--ngram", "4"]) == 2


def test_cli_errors_and_script_help(corpus, tmp_path, capsys):
    tmp, _, _ = corpus
    for argv, said in ((["--input", str(tmp / "missing.jsonl"), "-o", str(tmp_path)], "input file not found"),
                       (["--input", str(tmp / "a.jsonl"), "-o", str(tmp)], "would overwrite its input"),
                       (["--input", str(tmp / "a.jsonl"), "-o", str(tmp_path), "--shingle", "bytes"], "--shingle")):
        assert tool.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and said in err[0], err
    d = DedupSettings()  # the parser's defaults are the settings' (it is built without datatrove)
    args = tool.build_parser().parse_args(["--input", "x", "-o", "y"])
    assert (args.ngram, args.buckets, args.rows, args.seed, args.json_key, args.shingle) == \
        (d.ngram, d.buckets, d.rows, d.seed, d.json_key, d.shingle)
    res = subprocess.run([sys.executable, str(ROOT / "tools" / "dedup_minhash.py"), "--help"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "datatrove" in res.stdout and "--tasks" in res.stdout


def test_slurm_example_submits_five_dependent_stages(corpus, tmp_path, monkeypatch):
    """No Slurm here: datatrove's sbatch call is replaced by a recorder, everything before it (the
    pickled pipelines, the generated batch scripts, the dependency chain) is the real thing."""
    slurm = pytest.importorskip("datatrove.executor.slurm", reason="needs datatrove's Slurm executor")
    tmp, _, _ = corpus
    scripts = []

    def fake_launch(contents, retriever, *args):
        scripts.append((contents, args))
        return str(1000 + len(scripts))

    monkeypatch.setattr(slurm, "launch_slurm_job", fake_launch)
    spec = importlib.util.spec_from_file_location("slurm_dedup", ROOT / "examples" / "slurm_dedup.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = tmp_path / "out"
    assert example.main(["--input", str(tmp / "a.jsonl"), str(tmp / "b.jsonl.gz"), "-o", str(out),
                         "--partition", "cpu", "--tasks", "2"]) == 0
    stages = [c for c, _ in scripts if "--job-name=dedup_" in c and "merge_stats" not in c]
    names = [c.split("--job-name=dedup_")[1].split()[0] for c in stages]
    assert names == ["signatures", "buckets", "clusters", "filter", "report"]
    assert all("--partition=cpu" in c for c in stages)
    for stage in ("signatures", "buckets", "clusters", "filter", "report"):  # pickled for the jobs
        assert (out / ".dedup_work" / "logs" / stage / "executor.pik").exists()
    # sbatch arguments per stage, and the id the recorder gave each stage's job
    runs = [(str(1001 + i), args) for i, (c, args) in enumerate(scripts) if c in stages]
    assert not any("dependency" in a for a in runs[0][1])
    for (before, _), (_, args) in zip(runs, runs[1:]):  # each stage waits for the previous one's success
        assert f"--dependency=afterok:{before}" in args
