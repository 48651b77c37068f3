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

The output folder is checked before the corpus is read (it must take a file); a tokenizer already there is
replaced only with --force. The files are written to PARENT/.DIR.tokenizer-tmp-<pid> and moved into DIR when
complete (a new DIR appears by one rename); what a killed run left there is removed at the next start.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import warnings
from typing import Iterator, Optional

from megatron_cmbert import cli
from megatron_cmbert.data.jsonl import SkipCounter, expand_inputs, get_text, iter_records
from megatron_cmbert.data.outputs import (DISK_FULL, DiskFullError, check_writable, refuse_existing, remove_stale,
                                          stale_temp_pattern, write_errors)
from megatron_cmbert.data.tokenizer import (ALPHABET_SHARE, VOCAB_MULTIPLE, max_alphabet, save_tokenizer,
                                             select_alphabet, train_bpe, vocabulary_summary)
from megatron_cmbert.errors import UserError

OUTPUTS = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "training_info.json")


class TokenizerInputError(UserError, ValueError):
    """A corpus that gives no training text."""


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = cli.ToolParser(prog="train_tokenizer.py", description=__doc__)
    p.add_argument("--input", nargs="+", required=True, help="jsonl / jsonl.gz files or globs")
    p.add_argument("--json-key", default="text", help="field holding the text (default: text)")
    p.add_argument("--vocab-size", type=int, default=32000,
                   help=f"final vocabulary size incl. special and byte tokens, rounded down to a multiple "
                        f"of {VOCAB_MULTIPLE} (default: 32000)")
    p.add_argument("--output-dir", required=True, help="directory for tokenizer.json and HF config files")
    p.add_argument("--force", action="store_true", help="replace a tokenizer already in --output-dir")
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
    p.add_argument("--quiet", action="store_true",
                   help="no progress (a bar on a terminal, otherwise a line every 30 s per pass over the corpus)")
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
                 max_train_chars: int, progress: Optional[cli.Progress] = None):
        self.paths, self.key, self.progress = paths, key, progress
        self.heldout_every, self.max_heldout_chars = heldout_every, max_heldout_chars
        self.max_train_chars = max_train_chars
        self.heldout: list[str] = []
        self.heldout_chars = self.train_chars = self.train_docs = 0
        self.skipped = SkipCounter()

    def train_texts(self) -> Iterator[str]:
        doc_index = 0
        for record in iter_records(self.paths):
            if self.progress is not None:
                self.progress.update(record.nbytes)
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


def temp_dir_name(output_dir: str, pid: int) -> str:
    return f".{os.path.basename(os.path.abspath(output_dir))}.tokenizer-tmp-{pid}"


def _replace_dir(tmp_dir: str, output_dir: str) -> None:
    """Move the finished files into output_dir: a new (or empty) folder appears by one rename; into a folder
    that holds other files too, file by file, tokenizer.json last. A crash before this leaves output_dir as
    it was."""
    if os.path.isdir(output_dir) and not os.listdir(output_dir):
        os.rmdir(output_dir)
    if not os.path.exists(output_dir):
        os.rename(tmp_dir, output_dir)
        return
    for name in sorted(os.listdir(tmp_dir), key=lambda n: n == "tokenizer.json"):
        os.replace(os.path.join(tmp_dir, name), os.path.join(output_dir, name))
    shutil.rmtree(tmp_dir, ignore_errors=True)


class Corpus:
    """The training texts as a re-iterable: each pass reads the inputs again through a fresh CorpusSplit
    (the last pass's split holds the counts and the held-out slice)."""

    PASSES = ("counting characters", "training BPE")

    def __init__(self, args, paths: list[str]):
        self.args, self.paths = args, paths
        self.split: Optional[CorpusSplit] = None
        self.passes = 0
        self.total = sum(os.path.getsize(p) for p in paths)  # bytes read, compressed inputs count more

    def __iter__(self) -> Iterator[str]:
        a = self.args
        name = self.PASSES[min(self.passes, 1)]
        self.passes += 1
        progress = cli.Progress(None, f"train_tokenizer: {name}", "bytes read", disable=a.quiet)
        self.split = CorpusSplit(self.paths, a.json_key, a.heldout_every, a.max_heldout_chars, a.max_train_chars,
                                 progress)

        def texts():
            with progress:
                yield from self.split.train_texts()
        return _words(texts(), a.segmenter) if a.train_on_words else texts()


def check_output_dir(output_dir: str, force: bool) -> str:
    """Before the corpus is read: the parent folder takes a file, a killed run's temporary folder is removed,
    and a tokenizer already there needs --force. Returns the parent folder."""
    parent = os.path.dirname(os.path.abspath(output_dir))
    check_writable(parent, "--output-dir")
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise TokenizerInputError(f"--output-dir {output_dir}: a file, not a folder")
    remove_stale(parent, stale_temp_pattern([f".{os.path.basename(os.path.abspath(output_dir))}"], r"\.tokenizer-tmp-"))
    refuse_existing([os.path.join(output_dir, n) for n in OUTPUTS], force)
    return parent


def write_output(tok, info: dict, parent: str, output_dir: str) -> None:
    """The files into a temporary folder, then into output_dir (a full disk: one line, the folder removed)."""
    tmp_dir = os.path.join(parent, temp_dir_name(output_dir, os.getpid()))
    cleanup = lambda: shutil.rmtree(tmp_dir, ignore_errors=True)  # noqa: E731
    with write_errors(tmp_dir, cleanup, kept=f"nothing written to {output_dir}"):
        os.makedirs(tmp_dir)
        try:
            save_tokenizer(tok, tmp_dir)
        except Exception as exc:  # the Rust writer reports an OS error as a plain Exception
            if any(f"os error {e}" in str(exc) for e in DISK_FULL):
                cleanup()
                raise DiskFullError(f"disk full while writing {tmp_dir}/tokenizer.json ({cli.one_line(exc)}); "
                                    f"nothing written to {output_dir}") from None
            raise
        with open(os.path.join(tmp_dir, "training_info.json"), "w", encoding="utf-8") as fh:
            json.dump(info, fh, ensure_ascii=False, indent=2)
        _replace_dir(tmp_dir, output_dir)


def run(argv: Optional[list[str]] = None) -> dict:
    """Train and write the tokenizer; returns training_info.json's contents."""
    args = parse_args(argv)
    paths = expand_inputs(args.input)
    parent = check_output_dir(args.output_dir, args.force)
    corpus = Corpus(args, paths)
    start = time.time()
    alphabet = select_alphabet(corpus, args.vocab_size, args.limit_alphabet or None)
    if corpus.split.train_docs == 0:
        skipped = corpus.split.skipped
        why = f"{skipped.total:,} line(s) skipped: {skipped.describe()}" if skipped.total else "no non-blank line"
        raise TokenizerInputError(f"{', '.join(paths)}: no usable text under key {args.json_key!r} ({why})")
    with warnings.catch_warnings(record=True) as caught:  # a padding warning is reported loudly below
        warnings.simplefilter("always")
        tok = train_bpe(corpus, vocab_size=args.vocab_size, min_frequency=args.min_frequency,
                        max_token_length=args.max_token_length or None, alphabet=alphabet,
                        show_progress=not args.quiet and sys.stderr.isatty(), pad=args.pad_vocab)
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
    write_output(tok, info, parent, args.output_dir)

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


def main(argv: Optional[list[str]] = None) -> int:
    return cli.run_tool(run, argv)


if __name__ == "__main__":
    sys.exit(main())
