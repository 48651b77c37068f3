"""The Chinese character-level BPE tokenizer: definition, training, saving, loading.

Design (paper Sec. 3.1, ../shared/DATA.md):
- NFKC normalisation; whitespace runs, punctuation and single digits are split before BPE, so
  merges never glue a number or a punctuation mark to a word.
- Characters are the base alphabet (not bytes). A character outside the vocabulary falls back to its
  UTF-8 bytes ``<0x..>``, which are ordinary vocabulary entries (ids 5..260) so ``decode`` keeps them.
- Special tokens have fixed ids: [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4.
- The final vocabulary size is a multiple of 64 (hardware-aware: tiles of embedding/LM-head GEMMs).
- Decoding concatenates pieces exactly (no spaces inserted), so decode(encode(x)) == NFKC(x).
"""
from __future__ import annotations

import collections
import json
import os
import unicodedata
import warnings
from typing import Iterable, Iterator, Optional, Sequence

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = range(len(SPECIAL_TOKENS))
BYTE_TOKENS = tuple(f"<0x{b:02X}>" for b in range(256))
VOCAB_MULTIPLE = 64


def _configure(tok: Tokenizer) -> Tokenizer:
    """Attach the normaliser, pre-tokeniser and decoder shared by training and inference."""
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\s+"), behavior="isolated"),
            pre_tokenizers.Punctuation(behavior="isolated"),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )
    # ByteFallback turns runs of <0x..> back into characters; Fuse joins pieces without spaces.
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    return tok


def _add_post_processor(tok: Tokenizer) -> Tokenizer:
    """[CLS] A [SEP] (and [CLS] A [SEP] B [SEP]) for users of the HF tokenizer; the data builder
    encodes with add_special_tokens=False and adds them itself when packing."""
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", CLS_ID), ("[SEP]", SEP_ID)],
    )
    return tok


def train_bpe(
    texts: Iterable[str],
    vocab_size: int = 32000,
    min_frequency: int = 2,
    max_token_length: Optional[int] = 16,
    alphabet: Optional[Sequence[str]] = None,
    show_progress: bool = True,
) -> Tokenizer:
    """Train the tokenizer on an iterator of texts; the result has exactly a multiple of 64 entries.

    ``alphabet`` (from ``top_characters``) restricts the base characters; others fall back to bytes.
    ``vocab_size`` is rounded down to a multiple of 64 and includes the special and byte tokens. A
    corpus too small to reach it gives the largest multiple of 64 it supports (the last merges are
    dropped), or is padded with unreachable ``[unusedN]`` entries when even that is impossible.
    """
    target = (vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    reserved = len(SPECIAL_TOKENS) + len(BYTE_TOKENS)
    if target <= reserved + VOCAB_MULTIPLE:
        raise ValueError(f"vocab_size {vocab_size} too small: need more than {reserved + VOCAB_MULTIPLE}")
    tok = _configure(Tokenizer(models.BPE(unk_token="[UNK]", byte_fallback=True)))
    # The trainer's own limit_alphabet breaks frequency ties in hash-map order, so two runs can keep
    # different characters: the caller picks the alphabet deterministically (top_characters) instead.
    # Forced characters outrank every counted one, so limiting to their number keeps exactly them.
    options = {"max_token_length": max_token_length,
               "initial_alphabet": list(alphabet) if alphabet is not None else None,
               "limit_alphabet": len(alphabet) if alphabet is not None else None}
    trainer = trainers.BpeTrainer(
        vocab_size=target - len(BYTE_TOKENS),
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        show_progress=show_progress,
        **{k: v for k, v in options.items() if v is not None},  # the trainer rejects None
    )
    tok.train_from_iterator(texts, trainer=trainer)
    out = _with_byte_tokens_and_rounded_size(tok)
    if out.get_vocab_size() > target:
        warnings.warn(
            f"the corpus has more distinct characters than vocab_size allows: the vocabulary has "
            f"{out.get_vocab_size()} entries (asked {target}) and learned no merges; pass "
            f"an alphabet (--limit-alphabet) so that rare characters fall back to bytes",
            stacklevel=2,
        )
    return out


def top_characters(texts: Iterable[str], n: int) -> list[str]:
    """The ``n`` most frequent characters after NFKC, ties broken by code point, so the choice is the
    same on every run."""
    counts: collections.Counter = collections.Counter()
    for text in texts:
        counts.update(unicodedata.normalize("NFKC", text))
    ranked = sorted(counts, key=lambda c: (-counts[c], c))
    return ranked[:n]


def _with_byte_tokens_and_rounded_size(tok: Tokenizer) -> Tokenizer:
    """Re-number the vocabulary as [specials][256 bytes][alphabet + merges] and make its size a
    multiple of 64 by dropping the latest (least frequent) merges, whose tokens nothing else uses."""
    spec = json.loads(tok.to_str())
    model = spec["model"]
    by_id = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    learned = [t for t, _ in by_id if t not in SPECIAL_TOKENS and t not in BYTE_TOKENS]
    merges = [m if isinstance(m, list) else m.split(" ") for m in model["merges"]]
    excess = (len(SPECIAL_TOKENS) + len(BYTE_TOKENS) + len(learned)) % VOCAB_MULTIPLE
    padding: list[str] = []
    if excess and excess <= len(merges):
        dropped = {"".join(pair) for pair in merges[-excess:]}
        merges = merges[:-excess]
        learned = [t for t in learned if t not in dropped]
    elif excess:
        # "[" is split off by the pre-tokenizer, so these entries can never be produced.
        padding = [f"[unused{i}]" for i in range(VOCAB_MULTIPLE - excess)]
    tokens = list(SPECIAL_TOKENS) + list(BYTE_TOKENS) + learned + padding
    model["vocab"] = {t: i for i, t in enumerate(tokens)}
    model["merges"] = merges
    spec["added_tokens"] = [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for i, t in enumerate(SPECIAL_TOKENS)
    ]
    out = _add_post_processor(Tokenizer.from_str(json.dumps(spec, ensure_ascii=False)))
    assert out.get_vocab_size() % VOCAB_MULTIPLE == 0, out.get_vocab_size()
    return out


def save_tokenizer(tok: Tokenizer, output_dir: str, model_max_length: int = 8192) -> None:
    """Write tokenizer.json plus the config files that ``transformers.AutoTokenizer`` reads."""
    os.makedirs(output_dir, exist_ok=True)
    tok.save(os.path.join(output_dir, "tokenizer.json"))
    names = dict(zip(("pad_token", "unk_token", "cls_token", "sep_token", "mask_token"), SPECIAL_TOKENS))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **names,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,  # decoding must give the text back exactly
        "model_input_names": ["input_ids", "attention_mask"],
    }
    with open(os.path.join(output_dir, "tokenizer_config.json"), "w", encoding="utf-8") as fh:
        json.dump(config, fh, ensure_ascii=False, indent=2)
    with open(os.path.join(output_dir, "special_tokens_map.json"), "w", encoding="utf-8") as fh:
        json.dump(names, fh, ensure_ascii=False, indent=2)


def load_tokenizer(path: str) -> Tokenizer:
    """Load from a directory written by ``save_tokenizer`` (or a tokenizer.json path) and check
    that the special tokens sit at their fixed ids."""
    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no tokenizer.json at {path!r} (train one with tools/train_tokenizer.py)")
    tok = Tokenizer.from_file(file)
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(token) != expected_id:
            raise ValueError(f"{file}: {token} has id {tok.token_to_id(token)}, expected {expected_id}")
    return tok


def batched(items: Iterable[str], size: int = 1000) -> Iterator[list[str]]:
    """Group an iterator into lists (the trainer is faster on batches)."""
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
