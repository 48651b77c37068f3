#!/usr/bin/env python3
"""Train the Chinese character-level BPE tokenizer on jsonl corpora.

Example:
    python tools/train_tokenizer.py --input corpus/*.jsonl.gz --vocab-size 32000 --output-dir tok32k

Writes DIR/tokenizer.json (loadable by ``tokenizers.Tokenizer.from_file``), the config files for
``transformers.AutoTokenizer.from_pretrained(DIR)``, and DIR/training_info.json. A deterministic
held-out slice (every Nth document) is kept out of training to report chars/token honestly.

The vocabulary has exactly --vocab-size entries (rounded down to a multiple of 64), never another size.
The corpus is read twice: a first pass counts characters to choose the alphabet, by default the most
frequent characters up to half of the learned entries (vocab size - 5 special - 256 byte tokens; ties by
code point, so runs agree); rarer characters become byte tokens (still lossless) and the rest of the
budget goes to merges. A corpus too small to reach the size stops with a message saying what to pass,
unless --pad-vocab fills the rest with unused entries.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from typing import Iterator, Optional

from megatron_cmbert.data.jsonl import SkipCounter, expand_inputs, get_text, iter_records
from megatron_cmbert.data.tokenizer import (ALPHABET_SHARE, VOCAB_MULTIPLE, TokenizerSizeError, max_alphabet,
                                             save_tokenizer, select_alphabet, train_bpe, vocabulary_summary)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="jsonl / jsonl.gz files or globs")
    p.add_argument("--json-key", default="text", help="field holding the text (default: text)")
    p.add_argument("--vocab-size", type=int, default=32000,
                   help=f"final vocabulary size incl. special and byte tokens, rounded down to a multiple "
                        f"of {VOCAB_MULTIPLE} (default: 32000)")
    p.add_argument("--output-dir", required=True, help="directory for tokenizer.json and HF config files")
    p.add_argument("--min-frequency", type=int, default=2, help="minimum pair count for a merge (default: 2)")
    p.add_argument("--max-token-length", type=int, default=16,
                   help="longest token in characters; 0 = unlimited (default: 16)")
    p.add_argument("--limit-alphabet", type=int, default=0,
                   help="keep only the N most frequent characters as base alphabet (ties by code point, so "
                        "runs agree); rarer ones fall back to bytes; 0 = automatic: at most "
                        f"{ALPHABET_SHARE * 100:.0f}%% of the learned entries (vocab size - 261), e.g. "
                        f"{max_alphabet(32000):,} for 32000 (default: 0)")
    p.add_argument("--pad-vocab", action="store_true",
                   help="when the corpus is too small to reach --vocab-size, fill the rest with unused "
                        "[unusedN] entries (with a warning) instead of stopping with an error")
    p.add_argument("--heldout-every", type=int, default=100,
                   help="hold out every Nth document for the chars/token report (default: 100)")
    p.add_argument("--max-heldout-chars", type=int, default=2_000_000,
                   help="cap on held-out characters kept in memory (default: 2,000,000)")
    p.add_argument("--max-train-chars", type=int, default=0,
                   help="stop reading training text after this many characters; 0 = all (default: 0)")
    p.add_argument("--train-on-words", action="store_true",
                   help="feed segmenter words to the trainer so merges stay inside words (fewer tokens "
                        "straddle word boundaries, slightly lower chars/token)")
    p.add_argument("--segmenter", default="rjieba", choices=["rjieba", "jieba"],
                   help="segmenter for --train-on-words (default: rjieba)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def embedding_share(vocab_size: int) -> tuple[int, float]:
    """(parameters, embedding share) of the paper's large model with this vocabulary, MLM head excluded
    (the model package's own count, so the two can never disagree)."""
    from megatron_cmbert.model.config import count_parameters, get_preset

    count = count_parameters(get_preset("large", vocab_size=vocab_size))
    return count.parameters, count.embedding_share


class CorpusSplit:
    """Streams training texts from the inputs and keeps a deterministic held-out slice aside."""

    def __init__(self, paths: list[str], key: str, heldout_every: int, max_heldout_chars: int,
                 max_train_chars: int):
        self.paths, self.key = paths, key
        self.heldout_every, self.max_heldout_chars = heldout_every, max_heldout_chars
        self.max_train_chars = max_train_chars
        self.heldout: list[str] = []
        self.heldout_chars = self.train_chars = self.train_docs = 0
        self.skipped = SkipCounter()

    def train_texts(self) -> Iterator[str]:
        doc_index = 0
        for record in iter_records(self.paths):
            text, reason = get_text(record, self.key)
            if text is None:
                self.skipped.add(reason, record.where)
                continue
            doc_index += 1
            if self.heldout_every and doc_index % self.heldout_every == 0:
                if self.heldout_chars < self.max_heldout_chars:
                    self.heldout.append(text)
                    self.heldout_chars += len(text)
                continue
            if self.max_train_chars and self.train_chars >= self.max_train_chars:
                continue  # keep reading: the held-out slice is spread over the whole corpus
            self.train_docs += 1
            self.train_chars += len(text)
            yield text


def _words(texts: Iterator[str], segmenter: str) -> Iterator[str]:
    from megatron_cmbert.data.segment import Segmenter

    seg = Segmenter(segmenter)
    for text in texts:
        pos = 0
        for n in seg.word_lengths(text).tolist():
            yield text[pos:pos + n]
            pos += n


def _replace_dir(tmp_dir: str, output_dir: str) -> None:
    """Move finished files into output_dir; a crash before this leaves output_dir untouched."""
    os.makedirs(output_dir, exist_ok=True)
    for name in sorted(os.listdir(tmp_dir)):
        os.replace(os.path.join(tmp_dir, name), os.path.join(output_dir, name))
    shutil.rmtree(tmp_dir, ignore_errors=True)


class Corpus:
    """The training texts as a re-iterable: each pass reads the inputs again through a fresh CorpusSplit
    (the last pass's split holds the counts and the held-out slice)."""

    def __init__(self, args, paths: list[str]):
        self.args, self.paths = args, paths
        self.split: Optional[CorpusSplit] = None

    def __iter__(self) -> Iterator[str]:
        a = self.args
        self.split = CorpusSplit(self.paths, a.json_key, a.heldout_every, a.max_heldout_chars, a.max_train_chars)
        texts = self.split.train_texts()
        return _words(texts, a.segmenter) if a.train_on_words else texts


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    paths = expand_inputs(args.input)
    corpus = Corpus(args, paths)
    start = time.time()
    try:
        alphabet = select_alphabet(corpus, args.vocab_size, args.limit_alphabet or None)
        if corpus.split.train_docs == 0:
            raise SystemExit(f"error: no usable text under key {args.json_key!r} in {', '.join(paths)}")
        with warnings.catch_warnings(record=True) as caught:  # a padding warning is reported loudly below
            warnings.simplefilter("always")
            tok = train_bpe(corpus, vocab_size=args.vocab_size, min_frequency=args.min_frequency,
                            max_token_length=args.max_token_length or None, alphabet=alphabet,
                            show_progress=not args.quiet and sys.stderr.isatty(), pad=args.pad_vocab)
    except TokenizerSizeError as error:
        raise SystemExit(f"error: {error}") from None
    seconds = time.time() - start
    split = corpus.split
    summary = vocabulary_summary(tok)
    if summary["unused"]:
        reason = "; ".join(str(w.message) for w in caught)
        print(f"WARNING: {reason}; {summary['unused']:,} of {tok.get_vocab_size():,} entries are unused",
              file=sys.stderr)

    heldout_tokens = sum(len(e.ids) for e in tok.encode_batch(split.heldout, add_special_tokens=False))
    chars_per_token = split.heldout_chars / heldout_tokens if heldout_tokens else float("nan")
    vocab = tok.get_vocab_size()
    params, share = embedding_share(vocab)
    info = {
        "vocab_size": vocab,
        "inputs": paths,
        "json_key": args.json_key,
        "train_documents": split.train_docs,
        "train_chars": split.train_chars,
        "heldout_documents": len(split.heldout),
        "heldout_chars": split.heldout_chars,
        "heldout_chars_per_token": round(chars_per_token, 4),
        "skipped": dict(sorted(split.skipped.counts.items())),
        "train_seconds": round(seconds, 2),
        "train_on_words": args.train_on_words,
        "alphabet": summary["characters"],
        "merges": summary["merges"],
        "unused_entries": summary["unused"],
        "large_model_parameters": params,
        "large_model_embedding_share": round(share, 4),
    }
    parent = os.path.dirname(os.path.abspath(args.output_dir))
    os.makedirs(parent, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=".tokenizer-", dir=parent)
    save_tokenizer(tok, tmp_dir)
    with open(os.path.join(tmp_dir, "training_info.json"), "w", encoding="utf-8") as fh:
        json.dump(info, fh, ensure_ascii=False, indent=2)
    _replace_dir(tmp_dir, args.output_dir)

    print(f"trained on {split.train_docs:,} documents, {split.train_chars:,} chars in {seconds:.1f} s")
    if args.vocab_size != vocab:
        print(f"note: --vocab-size {args.vocab_size} rounded down to {vocab}, a multiple of {VOCAB_MULTIPLE}")
    for line in split.skipped.summary_lines():
        print(line)
    print(f"vocabulary: {vocab:,} tokens ({vocab // VOCAB_MULTIPLE} x {VOCAB_MULTIPLE}), "
          f"special ids [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4; {summary['characters']:,} characters, "
          f"{summary['merges']:,} merges, {summary['unused']:,} unused")
    print(f"held-out: {len(split.heldout):,} documents, {split.heldout_chars:,} chars, "
          f"{chars_per_token:.3f} chars/token")
    print(f"large model (28 x 1024, FFN 2624) with this vocabulary: "
          f"{params / 1e6:.1f}M parameters, embedding share {100 * share:.1f}%")
    print(f"wrote {args.output_dir}/tokenizer.json")
    return info


if __name__ == "__main__":
    main()
