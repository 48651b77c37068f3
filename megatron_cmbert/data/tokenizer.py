"""The Chinese character-level BPE tokenizer: definition, training, saving, loading.

Design (paper Sec. 3.1):
- NFKC normalisation; whitespace runs, punctuation and single digits are split before BPE, so
  merges never glue a number or a punctuation mark to a word.
- Characters are the base alphabet (not bytes). A character outside the vocabulary falls back to its
  UTF-8 bytes ``<0x..>``, which are ordinary vocabulary entries (ids 5..260) so ``decode`` keeps them.
- Special tokens have fixed ids: [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4.
- The final vocabulary size is exactly the requested size rounded down to a multiple of 64
  (hardware-aware: tiles of embedding/LM-head GEMMs); training never returns another size.
- The alphabet gets at most ALPHABET_SHARE of the learned entries (size - 261), the rest go to merges:
  when the corpus has more distinct characters, the most frequent ones are kept (ties by code point, so
  every run keeps the same) and the rare ones become byte tokens. Without this limit a corpus with more
  characters than the budget gives a larger vocabulary with no merges at all.
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

from megatron_cmbert.errors import UserError
from megatron_cmbert.tokens import CLS_ID, MASK_ID, PAD_ID, SEP_ID, SPECIAL_TOKENS, UNK_ID  # noqa: F401  (re-exported)

BYTE_TOKENS = tuple(f"<0x{b:02X}>" for b in range(256))
VOCAB_MULTIPLE = 64
RESERVED = len(SPECIAL_TOKENS) + len(BYTE_TOKENS)
# Half of the learned entries may be characters: a 32k vocabulary keeps ~15.9k characters (far more than
# the ~7k that cover 99.99% of Chinese text), a 4k test vocabulary ~1.9k, and merges always get the rest.
ALPHABET_SHARE = 0.5
UNUSED_PREFIX = "[unused"


class TokenizerSizeError(UserError, ValueError):
    """The requested vocabulary cannot be built as asked; the one-line message says what to pass."""


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


def target_size(vocab_size: int) -> int:
    """The size a request gives: rounded down to a multiple of 64, with room for some learned entries."""
    target = (vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    if target <= RESERVED + VOCAB_MULTIPLE:
        smallest = (RESERVED + VOCAB_MULTIPLE) // VOCAB_MULTIPLE * VOCAB_MULTIPLE + VOCAB_MULTIPLE
        raise TokenizerSizeError(f"vocab_size {vocab_size} too small: pass at least {smallest} (--vocab-size)")
    return target


def max_alphabet(vocab_size: int) -> int:
    """The automatic alphabet limit: ALPHABET_SHARE of the learned entries (size - special - byte tokens)."""
    return int(ALPHABET_SHARE * (target_size(vocab_size) - RESERVED))


def character_counts(texts: Iterable[str]) -> collections.Counter:
    """How often each character occurs after NFKC (what the trainer sees)."""
    counts: collections.Counter = collections.Counter()
    for text in texts:
        counts.update(unicodedata.normalize("NFKC", text))
    return counts


def top_characters(texts: Iterable[str], n: int) -> list[str]:
    """The ``n`` most frequent characters after NFKC, ties broken by code point, so the choice is the
    same on every run."""
    counts = character_counts(texts)
    return sorted(counts, key=lambda c: (-counts[c], c))[:n]


def select_alphabet(texts: Iterable[str], vocab_size: int, limit: Optional[int] = None) -> list[str]:
    """The base alphabet for ``vocab_size``: the ``limit`` most frequent characters (default: the
    automatic ``max_alphabet``), all of them when the corpus has fewer. One pass over ``texts``."""
    learned = target_size(vocab_size) - RESERVED
    limit = max_alphabet(vocab_size) if limit is None else limit
    if not 0 < limit < learned:
        raise TokenizerSizeError(f"an alphabet limit of {limit} leaves no room for merges in a vocabulary of "
                                 f"{learned + RESERVED}: pass a limit from 1 to {learned - 1} (--limit-alphabet; "
                                 f"0 there is automatic: {max_alphabet(vocab_size)})")
    return top_characters(texts, limit)


def train_bpe(
    texts: Iterable[str],
    vocab_size: int = 32000,
    min_frequency: int = 2,
    max_token_length: Optional[int] = 16,
    alphabet: Optional[Sequence[str]] = None,
    show_progress: bool = True,
    pad: bool = False,
) -> Tokenizer:
    """Train the tokenizer on texts; the result has exactly ``vocab_size`` rounded down to a multiple of
    64 entries (special and byte tokens included), or a TokenizerSizeError says what to pass.

    ``alphabet``: the base characters (others fall back to bytes). None chooses it automatically with
    ``select_alphabet`` (at most ALPHABET_SHARE of the learned entries, most frequent first), which needs a
    first pass: ``texts`` must then be re-iterable (a list, or an object whose ``__iter__`` starts over).
    A corpus with too few pairs seen ``min_frequency`` times to reach the size raises TokenizerSizeError,
    unless ``pad`` fills the rest with ``[unusedN]`` entries that no text can produce (with a warning).
    """
    target = target_size(vocab_size)
    if alphabet is None:
        if iter(texts) is texts:
            raise TypeError("train_bpe chooses the alphabet in a first pass over texts: pass a re-iterable "
                            "corpus (a list) or an explicit alphabet (select_alphabet)")
        alphabet = select_alphabet(texts, vocab_size)
    elif not 0 < len(alphabet) < target - RESERVED:
        raise TokenizerSizeError(f"an alphabet of {len(alphabet)} characters leaves no room for merges in a "
                                 f"vocabulary of {target}: pass fewer than {target - RESERVED} (--limit-alphabet)")
    tok = _configure(Tokenizer(models.BPE(unk_token="[UNK]", byte_fallback=True)))
    # The trainer's own limit_alphabet breaks frequency ties in hash-map order, so two runs can keep
    # different characters: the alphabet is chosen here (deterministically) and forced. Forced characters
    # outrank every counted one, so limiting to their number keeps exactly them.
    trainer = trainers.BpeTrainer(
        vocab_size=target - len(BYTE_TOKENS),
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        show_progress=show_progress,
        initial_alphabet=list(alphabet),
        limit_alphabet=len(alphabet),
        **({"max_token_length": max_token_length} if max_token_length else {}),  # the trainer rejects None
    )
    tok.train_from_iterator(batched(iter(texts)), trainer=trainer)
    return _with_byte_tokens(tok, target, min_frequency, pad)


def vocabulary_summary(tok: Tokenizer) -> dict:
    """{"characters", "merges", "unused"}: entries of each kind (besides the 5 special and 256 byte tokens)."""
    model = json.loads(tok.to_str())["model"]
    learned = [t for t in model["vocab"] if t not in SPECIAL_TOKENS and t not in BYTE_TOKENS]
    unused = sum(t.startswith(UNUSED_PREFIX) for t in learned)
    return {"characters": sum(len(t) == 1 for t in learned), "merges": len(model["merges"]), "unused": unused}


def _with_byte_tokens(tok: Tokenizer, target: int, min_frequency: int, pad: bool) -> Tokenizer:
    """Re-number the vocabulary as [specials][256 bytes][alphabet + merges] and check it has `target`
    entries; a shortfall (a corpus too small) is an error, or padding when asked."""
    spec = json.loads(tok.to_str())
    model = spec["model"]
    by_id = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    learned = [t for t, _ in by_id if t not in SPECIAL_TOKENS and t not in BYTE_TOKENS]
    reached = RESERVED + len(learned)
    if reached > target:  # the alphabet is limited below the budget, so the trainer cannot overshoot
        raise RuntimeError(f"the trainer returned {reached} entries for a budget of {target}")
    padding: list[str] = []
    if reached < target:
        chars = sum(len(t) == 1 for t in learned)
        fits = (reached // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
        what = (f"the corpus supports {reached} vocabulary entries ({chars} characters + "
                f"{len(learned) - chars} merges seen at least {min_frequency} times), not the {target} asked")
        if not pad:
            smaller = f"vocab_size={fits} (--vocab-size {fits}) or less, " if fits > RESERVED + VOCAB_MULTIPLE else ""
            raise TokenizerSizeError(f"{what}: pass {smaller}more text, a lower min_frequency (--min-frequency), "
                                     f"or pad=True (--pad-vocab) to fill the rest with unused entries")
        # "[" is split off by the pre-tokenizer, so these entries can never be produced.
        padding = [f"{UNUSED_PREFIX}{i}]" for i in range(target - reached)]
        warnings.warn(f"{what}: padded with {len(padding)} unused entries", stacklevel=3)
    tokens = list(SPECIAL_TOKENS) + list(BYTE_TOKENS) + learned + padding
    model["vocab"] = {t: i for i, t in enumerate(tokens)}
    spec["added_tokens"] = [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for i, t in enumerate(SPECIAL_TOKENS)
    ]
    out = _add_post_processor(Tokenizer.from_str(json.dumps(spec, ensure_ascii=False)))
    assert out.get_vocab_size() == target, (out.get_vocab_size(), target)
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
