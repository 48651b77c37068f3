"""The Chinese BPE tokenizer: lossless round trip, exactly the vocabulary size asked (alphabet limited
automatically, too-small corpora refused or padded loudly), fixed special ids, HF loading."""
import collections
import json
import os
import re
import unicodedata
import warnings

import pytest

from megatron_cmbert.data.tokenizer import (
    BYTE_TOKENS, SPECIAL_TOKENS, VOCAB_MULTIPLE, TokenizerSizeError, load_tokenizer, train_bpe, vocabulary_summary,
)

RARE = "𠀀𪚥𰻞 (outside any training vocabulary), ㎏ ＡＢＣ １２３ full-width, tabs\tand  spaces\n▁ end"


def nfkc(text):
    return unicodedata.normalize("NFKC", text)


def test_round_trip_is_lossless_on_real_text(tokenizer_dir, inews_dev, peoples_daily_gold):
    tok = load_tokenizer(tokenizer_dir)
    texts = inews_dev[:500] + ["".join(w) for w in peoples_daily_gold[:2000]] + [RARE]
    encodings = tok.encode_batch(texts, add_special_tokens=False)
    bad = [t[:60] for t, e in zip(texts, encodings) if tok.decode(e.ids, skip_special_tokens=True) != nfkc(t)]
    assert not bad, f"{len(bad)} texts do not decode to their NFKC form, e.g. {bad[:2]}"


def test_rare_characters_fall_back_to_byte_tokens(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    enc = tok.encode("𰻞", add_special_tokens=False)
    assert enc.tokens == [f"<0x{b:02X}>" for b in "𰻞".encode("utf-8")]
    assert tok.token_to_id("[UNK]") not in enc.ids
    assert tok.decode(enc.ids) == "𰻞"


def test_vocabulary_layout(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    assert tok.get_vocab_size() == 8192 and tok.get_vocab_size() % VOCAB_MULTIPLE == 0
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i
    assert [tok.token_to_id(t) for t in BYTE_TOKENS] == list(range(5, 5 + 256))


@pytest.mark.parametrize("vocab_size,corpus_slice", [(4096, slice(0, 300)), (5000, slice(1000, 1200))])
def test_special_ids_stable_and_size_exactly_the_multiple_of_64_asked(inews_train, vocab_size, corpus_slice):
    tok = train_bpe(inews_train[corpus_slice], vocab_size=vocab_size, show_progress=False)
    assert tok.get_vocab_size() == vocab_size // 64 * 64
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]


def test_more_characters_than_the_budget_still_gives_the_size_asked_and_merges(inews_train):
    """1,000 inews articles hold ~4,800 distinct characters, more than a 4,096 vocabulary can take: the
    alphabet is limited to half of the 4096 - 261 learned entries and merges fill the other half."""
    texts = inews_train[:1000]
    counts = collections.Counter(c for t in texts for c in nfkc(t))
    assert len(counts) > 4096 - 261  # before the limit, this gave more than 4,096 entries and no merges
    tok = train_bpe(texts, vocab_size=4096, show_progress=False)
    summary = vocabulary_summary(tok)
    assert tok.get_vocab_size() == 4096
    assert summary == {"characters": 1917, "merges": 4096 - 261 - 1917, "unused": 0}
    # the alphabet: the most frequent characters, ties by code point (a plain reference ranking)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    assert {t for t in tok.get_vocab() if len(t) == 1} == {c for c, _ in ranked[:1917]}
    heldout = inews_train[1000:1100] + [RARE]
    vocab = tok.get_vocab()  # a fresh dict per call: once, not per character
    rare = {c for c in nfkc("".join(heldout)) if c not in vocab}
    assert len(rare) > 100  # many characters now travel as bytes...
    for text, enc in zip(heldout, tok.encode_batch(heldout, add_special_tokens=False)):
        assert tok.decode(enc.ids) == nfkc(text)  # ...losslessly
        assert tok.token_to_id("[UNK]") not in enc.ids


def test_too_small_corpus_is_refused_with_what_to_pass_or_padded_loudly():
    texts = ["天地玄黄宇宙洪荒"] * 3
    with pytest.raises(TokenizerSizeError, match=r"supports 276 vocabulary entries \(8 characters \+ 7 merges "
                                                 r"seen at least 2 times\), not the 4096 asked: pass more text"):
        train_bpe(texts, vocab_size=4096, show_progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tok = train_bpe(texts, vocab_size=4096, show_progress=False, pad=True)
    assert any("padded with 3820 unused entries" in str(w.message) for w in caught)
    assert tok.get_vocab_size() == 4096 and vocabulary_summary(tok)["unused"] == 3820
    assert tok.decode(tok.encode("天地玄黄", add_special_tokens=False).ids) == "天地玄黄"
    tokens = tok.encode("[unused0] [unused3819]", add_special_tokens=False).tokens
    assert not [t for t in tokens if t.startswith("[unused")]  # padding is unreachable


def test_one_shot_iterator_needs_an_explicit_alphabet(inews_train):
    with pytest.raises(TypeError, match="re-iterable"):
        train_bpe(iter(inews_train[:10]), vocab_size=1024, show_progress=False)
    with pytest.raises(TokenizerSizeError, match="pass fewer than 763"):
        train_bpe(inews_train[:10], vocab_size=1024, alphabet=["a"] * 763, show_progress=False)


def test_digits_and_punctuation_are_split(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    tokens = tok.encode("2023年，GDP增长5.2%。", add_special_tokens=False).tokens
    for piece in ("2", "0", "3", ",", "5", ".", "%", "。"):
        assert piece in tokens
    assert not any(len(t) > 1 and any(c.isdigit() for c in t) for t in tokens)


def test_loads_in_transformers_as_fast_tokenizer(tokenizer_dir, inews_dev):
    transformers = pytest.importorskip("transformers", reason="needs transformers")
    hf = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    assert hf.is_fast
    assert (hf.pad_token_id, hf.unk_token_id, hf.cls_token_id, hf.sep_token_id, hf.mask_token_id) == (0, 1, 2, 3, 4)
    for text in inews_dev[:50] + [RARE]:
        ids = hf(text)["input_ids"]
        assert ids[0] == 2 and ids[-1] == 3
        assert hf.decode(ids, skip_special_tokens=True) == nfkc(text)
    ours = load_tokenizer(tokenizer_dir).encode(inews_dev[0], add_special_tokens=False).ids
    assert hf(inews_dev[0], add_special_tokens=False)["input_ids"] == ours


def test_load_rejects_moved_special_tokens(tmp_path, tokenizer_dir):
    spec = json.load(open(os.path.join(tokenizer_dir, "tokenizer.json"), encoding="utf-8"))
    vocab = spec["model"]["vocab"]
    vocab["[MASK]"], vocab["<0x00>"] = vocab["<0x00>"], vocab["[MASK]"]
    spec["added_tokens"] = [a for a in spec["added_tokens"] if a["content"] != "[MASK]"]
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(ValueError, match=r"\[MASK\] has id 5, expected 4"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="train one with"):
        load_tokenizer(str(tmp_path / "missing"))


def test_train_tokenizer_tool(tmp_path, inews_train, capsys):
    from tools import train_tokenizer

    corpus = tmp_path / "corpus.jsonl"
    with open(corpus, "w", encoding="utf-8") as fh:
        for text in inews_train[:400]:
            fh.write(json.dumps({"content": text}, ensure_ascii=False) + "\n")
        fh.write("{broken json\n")
    info = train_tokenizer.run(
        ["--input", str(corpus), "--json-key", "content", "--vocab-size", "4100",
         "--output-dir", str(tmp_path / "tok"), "--heldout-every", "20", "--quiet"])
    out = capsys.readouterr().out
    assert info["vocab_size"] == 4096 and info["heldout_documents"] == 20
    assert info["skipped"] == {"malformed_json": 1}
    assert "chars/token" in out and "embedding share" in out and "corpus.jsonl:401" in out
    assert 1.0 < info["heldout_chars_per_token"] < 3.0
    # the embedding share printed for the paper's vocabulary size matches Table 5 (377.0M, 9.0%)
    params, share = train_tokenizer.embedding_share(32979)
    assert round(params / 1e6, 1) == 377.0 and round(100 * share, 1) == 9.0
    tok = load_tokenizer(str(tmp_path / "tok"))
    assert tok.get_vocab_size() == 4096
    assert not [p for p in os.listdir(tmp_path) if ".tokenizer-tmp-" in p]  # temp dir cleaned up
    assert info["alphabet"] + info["merges"] == 4096 - 261 and info["merges"] > 0 and info["unused_entries"] == 0
    assert "rounded down to 4096" in out


def test_train_tokenizer_help_explains_the_size_rule(capsys):
    from tools import train_tokenizer

    assert train_tokenizer.main(["--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "exactly --vocab-size entries" in out and "at most 50% of the learned entries" in out
    assert "15,869 for 32000" in out and "--pad-vocab" in out


def test_train_tokenizer_tool_refuses_a_size_the_corpus_cannot_reach(tmp_path, capsys):
    from tools import train_tokenizer

    corpus = tmp_path / "tiny.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in ["天地玄黄宇宙洪荒"] * 3),
                      encoding="utf-8")
    base = ["--input", str(corpus), "--vocab-size", "4096", "--heldout-every", "0", "--quiet"]
    assert train_tokenizer.main(base + ["--output-dir", str(tmp_path / "no")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.match(r"^error: the corpus supports 276 .*--pad-vocab", err[0]), err
    assert not (tmp_path / "no").exists()
    assert train_tokenizer.main(base + ["--output-dir", str(tmp_path / "no"), "--limit-alphabet", "3835"]) == 2
    assert "--limit-alphabet" in capsys.readouterr().err
    info = train_tokenizer.run(base + ["--output-dir", str(tmp_path / "padded"), "--pad-vocab"])
    assert "WARNING: the corpus supports 276" in capsys.readouterr().err
    assert info["vocab_size"] == 4096 and info["unused_entries"] == 3820
    assert load_tokenizer(str(tmp_path / "padded")).get_vocab_size() == 4096


def test_training_is_reproducible_with_a_limited_alphabet(tmp_path, inews_train):
    """HF's own limit_alphabet breaks frequency ties in hash order; ours must give the same file twice."""
    from tools import train_tokenizer

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in inews_train[:300]),
                      encoding="utf-8")
    outputs = []
    for run in range(2):
        out = tmp_path / f"tok{run}"
        train_tokenizer.run(["--input", str(corpus), "--vocab-size", "4096", "--limit-alphabet", "1500",
                              "--output-dir", str(out), "--quiet"])
        outputs.append((out / "tokenizer.json").read_bytes())
    assert outputs[0] == outputs[1]
    tok = load_tokenizer(str(tmp_path / "tok0"))
    vocab = tok.get_vocab()
    singles = [t for t in vocab if len(t) == 1]
    assert len(singles) == 1500  # exactly the chosen alphabet
    text = "".join(inews_train[300:320])
    rare = [c for c in set(unicodedata.normalize("NFKC", text)) if c not in vocab]
    assert rare, "expected characters outside a 1,500-character alphabet"
    assert tok.decode(tok.encode(text, add_special_tokens=False).ids) == nfkc(text)
