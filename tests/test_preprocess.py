"""tools/preprocess_data.py: megatron-core compatibility, exact tokens and flags, bad input,
determinism across workers, and no complete-looking output after an interrupted run."""
import bisect
import gzip
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest

from megatron_cmbert.data.indexed import IndexedDatasetWriter, commit_all
from megatron_cmbert.data.segment import Segmenter
from megatron_cmbert.data.tokenizer import load_tokenizer, save_tokenizer, train_bpe
from tools import preprocess_data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def indexed_dataset(prefix):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDataset
    return IndexedDataset(prefix)


def write_jsonl(path, texts, key="text"):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as fh:
        for t in texts:
            fh.write(json.dumps({key: t}, ensure_ascii=False) + "\n")


def reference_flags(text, offsets, segmenter):
    """Word-start flags by the rule, written plainly: first token, or a token whose start is a
    segmenter word start and differs from the previous token's start."""
    word_starts = {int(s) for s, _ in segmenter.spans(text)}
    flags = []
    for i, (s, _) in enumerate(offsets):
        flags.append(1 if i == 0 or (s in word_starts and s != offsets[i - 1][0]) else 0)
    return flags


@pytest.fixture(scope="module")
def small_tokenizer_dir(tmp_path_factory, inews_dev):
    out = tmp_path_factory.mktemp("small_tok")
    save_tokenizer(train_bpe(inews_dev[:300], vocab_size=1024, show_progress=False), str(out))
    return str(out)


def build(tmp_path, tokenizer_dir, texts, name="corpus", extra=()):
    src = tmp_path / f"{name}.jsonl"
    write_jsonl(src, texts)
    prefix = str(tmp_path / "out" / name)
    summary = preprocess_data.run(["--input", str(src), "--tokenizer-model", tokenizer_dir,
                                    "--output-prefix", prefix, "--quiet", *extra])
    return prefix + "_text_document", summary


def test_tokens_and_flags_match_the_tokenizer_and_segmenter(tmp_path, tokenizer_dir, inews_dev):
    texts = inews_dev[:120] + ["𠀀𪚥 稀有字, ㎏ and ASCII words 2024"]
    prefix, summary = build(tmp_path, tokenizer_dir, texts)
    tokens, flags = indexed_dataset(prefix), indexed_dataset(prefix + "_wordstart")
    assert len(tokens) == len(flags) == len(texts)
    np.testing.assert_array_equal(tokens.sequence_lengths, flags.sequence_lengths)
    assert tokens.index.dtype == np.uint16 and flags.index.dtype == np.uint8
    tok, seg = load_tokenizer(tokenizer_dir), Segmenter("rjieba")
    for i, text in enumerate(texts):
        enc = tok.encode(text, add_special_tokens=False)
        assert tokens[i].tolist() == enc.ids, f"document {i}: tokens differ from the tokenizer's ids"
        assert flags[i].tolist() == reference_flags(text, enc.offsets, seg), f"document {i}: flags differ"
    info = summary["keys"]["text"]
    assert info["documents"] == len(texts) and info["tokens"] == int(tokens.sequence_lengths.sum())
    assert info["chars"] == sum(map(len, texts))


def test_sidecar_records_the_tokenizer_and_the_counts(tmp_path, tokenizer_dir, inews_dev, small_tokenizer_dir):
    texts = inews_dev[:40]
    prefix, _ = build(tmp_path, tokenizer_dir, texts)
    meta = json.loads(open(prefix + ".meta.json", encoding="utf-8").read())
    tok_file = os.path.join(tokenizer_dir, "tokenizer.json")
    ids = [e.ids for e in load_tokenizer(tokenizer_dir).encode_batch(texts, add_special_tokens=False)]
    assert meta == {"tokenizer": {"sha256": hashlib.sha256(open(tok_file, "rb").read()).hexdigest(),
                                  "vocab_size": 8192, "path": os.path.abspath(tokenizer_dir)},
                    "documents": 40, "tokens": sum(map(len, ids)), "max_token_id": max(map(max, ids)),
                    "json_key": "text", "inputs": [str(tmp_path / "corpus.jsonl")],
                    "created_by": "tools/preprocess_data.py"}
    assert not os.path.exists(prefix + "_wordstart.meta.json")
    # rebuilt in place with another tokenizer: the sidecar describes the new data, never the old
    build(tmp_path, small_tokenizer_dir, texts, extra=("--force",))  # replacing needs --force
    rebuilt = json.loads(open(prefix + ".meta.json", encoding="utf-8").read())
    small_ids = [e.ids for e in load_tokenizer(small_tokenizer_dir).encode_batch(texts, add_special_tokens=False)]
    assert rebuilt["tokenizer"]["path"] == os.path.abspath(small_tokenizer_dir)
    assert (rebuilt["tokenizer"]["vocab_size"], rebuilt["max_token_id"]) == (1024, max(map(max, small_ids)))
    assert not [n for n in os.listdir(tmp_path / "out") if ".partial-" in n]


def test_every_unit_is_a_union_of_whole_words(tmp_path, tokenizer_dir, inews_dev):
    texts = inews_dev[200:400]
    prefix, _ = build(tmp_path, tokenizer_dir, texts)
    flags = indexed_dataset(prefix + "_wordstart")
    tok, seg = load_tokenizer(tokenizer_dir), Segmenter("rjieba")
    units = straddles = 0
    for i, text in enumerate(texts):
        offsets = tok.encode(text, add_special_tokens=False).offsets
        boundaries = {0, len(text)} | {int(s) for s, _ in seg.spans(text)}
        starts = [offsets[t][0] for t in np.flatnonzero(flags[i])]
        # a unit spans [its first token's start, the next unit's start): both ends must be word boundaries
        for lo, hi in zip(starts, starts[1:] + [len(text)]):
            assert lo in boundaries and hi in boundaries, f"doc {i}: unit {text[lo:hi]!r} cuts a word"
            units += 1
        ordered = sorted(boundaries)
        straddles += sum(1 for s, e in offsets if ordered[bisect.bisect_right(ordered, s)] < e)
    print(f"\n{units} units; {straddles} tokens straddle a word boundary")
    assert units > 10_000


def test_gold_word_starts_land_on_token_starts(tokenizer_dir, peoples_daily_gold):
    """Report how often a hand-segmented (gold) word start of the 1998 corpus is also a token start,
    i.e. how well whole-word units can follow real word boundaries with this tokenizer."""
    tok = load_tokenizer(tokenizer_dir)
    sentences = peoples_daily_gold[:5000]
    texts = ["".join(words) for words in sentences]
    hits = total = 0
    for words, enc in zip(sentences, tok.encode_batch(texts, add_special_tokens=False)):
        token_starts = {s for s, _ in enc.offsets}
        pos = 0
        for w in words:
            hits += pos in token_starts
            total += 1
            pos += len(w)
    rate = hits / total
    print(f"\n1998 gold segmentation: {hits}/{total} = {100 * rate:.1f}% of gold word starts are token starts")
    # We measured ~11% of tokens straddling a word boundary for this tokenizer design; a broken
    # offset mapping would put this near the share of one-character tokens instead.
    assert rate > 0.80


def test_writer_is_byte_identical_to_megatron_builder(tmp_path):
    import torch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 30000, size=int(n), dtype=np.int64) for n in rng.integers(0, 50, size=37)]
    for dtype in (np.uint16, np.int32, np.uint8):
        ref = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=dtype)
        for d in docs:
            ref.add_item(torch.from_numpy(d.astype(dtype).astype(np.int64)))
            ref.end_document()
        ref.finalize(str(tmp_path / "ref.idx"))
        ours = IndexedDatasetWriter(str(tmp_path / "ours"), dtype)
        ours.add_documents(np.concatenate(docs[:20]).astype(dtype), [len(d) for d in docs[:20]])
        ours.add_documents(np.concatenate(docs[20:]).astype(dtype), [len(d) for d in docs[20:]])
        ours.finalize()
        commit_all([ours])
        for ext in (".bin", ".idx"):
            assert (tmp_path / f"ours{ext}").read_bytes() == (tmp_path / f"ref{ext}").read_bytes(), (dtype, ext)


def test_bad_input_is_skipped_and_counted(tmp_path, tokenizer_dir, capsys):
    src = tmp_path / "bad.jsonl"
    lines = [
        b'{"text": "\xe5\xa5\xbd\xe7\x9a\x84\xe6\x96\x87\xe6\x9c\xac"}',  # 1 ok
        b'{"text": "broken',                                                # 2 malformed
        b'{"body": "no text key"}',                                         # 3 missing key
        b'{"text": 42}',                                                    # 4 non-string
        b'{"text": "   "}',                                                 # 5 empty
        b'{"text": "\xff\xfe bad bytes"}',                                  # 6 invalid utf-8
        b'',                                                                # 7 blank: ignored
        b'["a list"]',                                                      # 8 malformed (not an object)
        b'{"text": "\xe7\xac\xac\xe4\xba\x8c\xe7\xaf\x87"}',                # 9 ok
        b'{"text": "\\ud800 lone surrogate"}',                              # 10 invalid utf-8
    ]
    src.write_bytes(b"\n".join(lines) + b"\n")
    prefix = str(tmp_path / "out")
    summary = preprocess_data.run(["--input", str(src), "--tokenizer-model", tokenizer_dir,
                                    "--output-prefix", prefix, "--quiet"])
    info = summary["keys"]["text"]
    assert info["documents"] == 2
    assert info["skipped"] == {"empty_text": 1, "invalid_utf8": 2, "malformed_json": 2,
                               "missing_key": 1, "non_string": 1}
    out = capsys.readouterr().out
    assert "bad.jsonl:2, " in out and "bad.jsonl:8)" in out and "bad.jsonl:6, " in out
    assert len(indexed_dataset(prefix + "_text_document")) == 2


def test_strict_stops_at_first_bad_line_with_file_and_line(tmp_path, tokenizer_dir, capsys):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"text": "好"}\n{"text": "也好"}\n{"text": 3}\n{"oops\n', encoding="utf-8")
    prefix = str(tmp_path / "out")
    assert preprocess_data.main(["--input", str(src), "--tokenizer-model", tokenizer_dir,
                                 "--output-prefix", prefix, "--quiet", "--strict"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.fullmatch(r"error: .*bad\.jsonl:3: non_string \[key 'text'\]", err[0]), err
    assert os.listdir(tmp_path) == ["bad.jsonl"]  # nothing written, temporaries removed


def test_same_bytes_with_one_and_two_workers(tmp_path, tokenizer_dir, inews_dev):
    src = tmp_path / "c.jsonl.gz"  # gzip input on the way
    write_jsonl(src, inews_dev[:300])
    outputs = {}
    for workers in (1, 2):
        prefix = str(tmp_path / f"w{workers}")
        preprocess_data.run(["--input", str(src), "--tokenizer-model", tokenizer_dir, "--output-prefix",
                              prefix, "--quiet", "--workers", str(workers), "--chunk-chars", "20000"])
        outputs[workers] = {s: open(f"{prefix}_text_document{s}", "rb").read()
                            for s in (".bin", ".idx", "_wordstart.bin", "_wordstart.idx")}
    assert outputs[1] == outputs[2]
    assert len(indexed_dataset(str(tmp_path / "w1_text_document"))) == 300


def test_several_keys_give_several_datasets(tmp_path, tokenizer_dir):
    src = tmp_path / "kv.jsonl"
    src.write_text('{"title": "标题一", "text": "正文一"}\n{"title": "标题二"}\n', encoding="utf-8")
    prefix = str(tmp_path / "kv")
    summary = preprocess_data.run(["--input", str(src), "--json-keys", "title", "text",
                                    "--tokenizer-model", tokenizer_dir, "--output-prefix", prefix, "--quiet"])
    assert summary["keys"]["title"]["documents"] == 2
    assert summary["keys"]["text"]["documents"] == 1
    assert summary["keys"]["text"]["skipped"] == {"missing_key": 1}
    assert len(indexed_dataset(prefix + "_title_document")) == 2


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sig,workers", [(signal.SIGINT, 1), (signal.SIGKILL, 1), (signal.SIGTERM, 2)])
def test_interrupted_build_leaves_no_complete_looking_output(tmp_path, tokenizer_dir, inews_train, sig, workers):
    src = tmp_path / "big.jsonl"
    write_jsonl(src, inews_train * 3)  # ~10M characters: many seconds of work
    prefix = tmp_path / "out" / "big"
    cmd = [sys.executable, os.path.join(REPO, "tools", "preprocess_data.py"), "--input", str(src),
           "--tokenizer-model", tokenizer_dir, "--output-prefix", str(prefix), "--quiet",
           "--chunk-chars", "200000", "--workers", str(workers)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # A test run started in the background (`pytest ... &`) inherits SIGINT ignored, and Python keeps it so:
    # give the tool the disposition an interactive Ctrl-C would meet.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 60
    partial = str(prefix) + "_text_document.bin.partial-"
    while time.time() < deadline:  # wait until data is being written, then interrupt
        names = os.listdir(prefix.parent) if prefix.parent.exists() else []
        files = [prefix.parent / n for n in names if str(prefix.parent / n).startswith(partial)]
        if files and files[0].stat().st_size > 100_000:
            break
        assert proc.poll() is None, proc.stdout.read().decode()
        time.sleep(0.05)
    proc.send_signal(sig)
    output = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode != 0, output
    left = sorted(os.listdir(prefix.parent))
    for ds in ("big_text_document", "big_text_document_wordstart"):
        assert not (ds + ".bin" in left and ds + ".idx" in left), left
        assert ds + ".idx" not in left, left
    if sig != signal.SIGKILL:  # a clean interruption removes its temporaries too
        assert left == [], left
        assert "no output was written" in output
