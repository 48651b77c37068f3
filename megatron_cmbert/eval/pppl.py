"""Pseudo-perplexity (PPPL) of a masked LM across sequence lengths (the Stage II monitor, docs/EVAL.md).

Protocol, per length L:
- The held-out text is one token stream: documents in order, joined without separators, each token with
  its whole-word start flag. The pool is the stream's first `pool_tokens` tokens, the same at every length.
- The pool is cut into consecutive windows of L - 2 tokens (the tail that does not fill one is dropped);
  each window becomes `[CLS] tokens [SEP]`. Units never cross a window: a window that starts mid-word
  starts a unit of its own (as pretraining's pieces do).
- A unit is a whole word (a start-flagged token and the non-start tokens after it) or, with unit="token",
  one token. Each scored unit is masked in turn (all its tokens -> [MASK]) in its own copy of its window;
  its NLL is the sum of -log p(original token) over its masked tokens.
- With max_units, the units scored are those with the smallest seeded random key of their first token's
  stream position, so every length scores (nearly) the same text with different amounts of context.
- PPPL = exp(sum of NLL / number of masked tokens). The 95% interval is a percentile bootstrap over the
  scored units (each unit keeps its NLL and token count together); units of one window share context,
  so the interval is a lower bound of the uncertainty of the window sample.

Many masked copies run in one forward: copies are packed as varlen sequences up to `tokens_per_forward`.
The model enters through `nll_fn(tokens, cu_seqlens, max_seqlen, labels)` -> the NLL (fp32) of each token
where labels != -100, in order, or through `logits_fn` with the same arguments returning those rows'
logits; either can be a tensor-parallel model run identically on every rank.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from megatron_cmbert.model.padding import pack_sequences
from megatron_cmbert.errors import UserError

IGNORE_INDEX = -100
UNITS = ("word", "token")


class PPPLError(UserError, ValueError):
    """A one-line reason the evaluation cannot run (too little text, bad lengths); tools print it."""


@dataclass
class Window:
    tokens: np.ndarray
    """[CLS] piece [SEP] ids (int64)."""
    units: list = field(default_factory=list)
    """Scored units as (start, end) token positions inside `tokens`."""
    offset: int = 0
    """Stream position of tokens[1] (the first token after [CLS]): identifies a unit across lengths."""


@dataclass
class LengthResult:
    length: int
    pppl: float
    ci95: tuple
    units: int
    masked_tokens: int
    windows: int
    mean_nll: float
    unit_nll: dict = field(default_factory=dict, repr=False)
    """(stream start, stream end) of each scored unit -> (NLL, masked tokens): for paired comparisons."""
    vs_first: dict | None = None
    """PPPL ratio to the first length on the units both scored, with a paired bootstrap interval."""

    def as_dict(self) -> dict:
        return {"length": self.length, "pppl": self.pppl, "ci95": list(self.ci95), "units": self.units,
                "masked_tokens": self.masked_tokens, "windows": self.windows, "mean_nll": self.mean_nll,
                "vs_first": self.vs_first}


# ---- windows and units --------------------------------------------------------------------------------
def unit_spans(flags: np.ndarray, unit: str) -> np.ndarray:
    """(n_units, 2) [start, end) token positions of the units of one piece (flags[0] is taken as a start)."""
    n = len(flags)
    if unit == "token":
        starts = np.arange(n)
    elif unit == "word":
        starts = np.flatnonzero(np.asarray(flags, dtype=bool) | (np.arange(n) == 0))
    else:
        raise PPPLError(f"unit {unit!r}: choose from {UNITS}")
    return np.stack([starts, np.append(starts[1:], n)], axis=1) if n else np.zeros((0, 2), np.int64)


def cut_windows(tokens: np.ndarray, flags: np.ndarray, length: int, *, cls_id: int, sep_id: int,
                unit: str = "word", max_units: int | None = None, seed: int = 0) -> list[Window]:
    """The windows of one length over the pool (see the module docstring); windows without a scored unit
    are dropped. Raises PPPLError when the pool does not fill one window."""
    body = length - 2
    if body < 1:
        raise PPPLError(f"length {length}: too short for [CLS] text [SEP]")
    count = len(tokens) // body
    if count == 0:
        raise PPPLError(f"length {length}: the held-out pool has {len(tokens)} tokens, fewer than one window "
                        f"({body} + [CLS]/[SEP]); give more text (--pool-tokens, more documents)")
    key = np.random.default_rng(seed).random(len(tokens))  # one key per stream position, same at every length
    windows, chosen = [], []
    for w in range(count):
        lo = w * body
        spans = unit_spans(flags[lo:lo + body], unit)
        windows.append(Window(np.concatenate(([cls_id], tokens[lo:lo + body], [sep_id])).astype(np.int64), offset=lo))
        chosen += [(key[lo + s], w, s + 1, e + 1) for s, e in spans.tolist()]  # +1: after [CLS]
    if max_units is not None and len(chosen) > max_units:
        chosen = sorted(chosen)[:max_units]
    for _, w, s, e in sorted(chosen, key=lambda c: (c[1], c[2])):
        windows[w].units.append((s, e))
    return [w for w in windows if w.units]


# ---- scoring ------------------------------------------------------------------------------------------
def masked_copies(windows: list[Window], mask_id: int):
    """(unit index, input ids, labels) of every masked copy, in window order."""
    k = 0
    for window in windows:
        for s, e in window.units:
            ids = window.tokens.copy()
            labels = np.full_like(ids, IGNORE_INDEX)
            labels[s:e] = ids[s:e]
            ids[s:e] = mask_id
            yield k, ids, labels
            k += 1


def _batches(windows, mask_id, tokens_per_forward):
    batch, size = [], 0
    for item in masked_copies(windows, mask_id):
        if batch and size + len(item[1]) > tokens_per_forward:
            yield batch
            batch, size = [], 0
        batch.append(item)
        size += len(item[1])
    if batch:
        yield batch


def pppl_from_nll_fn(nll_fn, windows: list[Window], *, mask_id: int, tokens_per_forward: int = 16384,
                     device="cpu", pad_to_multiple_of: int = 1, pad_id: int = 0, progress=None):
    """Per scored unit: (NLL sums, masked-token counts) as float64 / int64 arrays, in window order.
    nll_fn(tokens, cu_seqlens, max_seqlen, labels) -> NLL of each labelled token, in order. Runs under
    torch.no_grad; the same windows give the same forwards on every rank (tensor-parallel models)."""
    n_units = sum(len(w.units) for w in windows)
    nll = np.zeros(n_units, dtype=np.float64)
    count = np.zeros(n_units, dtype=np.int64)
    with torch.no_grad():
        for batch in _batches(windows, mask_id, tokens_per_forward):
            ids, cu, max_seqlen = pack_sequences([torch.from_numpy(b[1]) for b in batch], pad_to_multiple_of, pad_id)
            labels, _, _ = pack_sequences([torch.from_numpy(b[2]) for b in batch], pad_to_multiple_of, IGNORE_INDEX)
            which = torch.repeat_interleave(torch.tensor([b[0] for b in batch]),
                                            torch.tensor([int((b[2] != IGNORE_INDEX).sum()) for b in batch]))
            values = nll_fn(ids.to(device), cu.to(device), max_seqlen, labels.to(device))
            values = values.detach().double().cpu().numpy()
            if values.shape != (len(which),):
                raise PPPLError(f"nll_fn returned shape {values.shape}, expected ({len(which)},) (one NLL per "
                                f"labelled token)")
            np.add.at(nll, which.numpy(), values)
            np.add.at(count, which.numpy(), 1)
            if progress is not None:
                progress.update(len(batch))
    return nll, count


def nll_from_logits(logits_fn):
    """An nll_fn from logits_fn(tokens, cu_seqlens, max_seqlen, labels) -> (labelled tokens, vocab) logits."""
    def nll_fn(tokens, cu_seqlens, max_seqlen, labels):
        targets = labels[labels != IGNORE_INDEX]
        return F.cross_entropy(logits_fn(tokens, cu_seqlens, max_seqlen, labels).float(), targets, reduction="none")
    return nll_fn


def pppl_from_logits_fn(logits_fn, windows: list[Window], **kwargs):
    """pppl_from_nll_fn for a model that returns full-vocabulary logits of the labelled tokens."""
    return pppl_from_nll_fn(nll_from_logits(logits_fn), windows, **kwargs)


def summarize(length: int, nll: np.ndarray, count: np.ndarray, windows: int, *, bootstrap: int = 1000,
              seed: int = 0) -> LengthResult:
    """PPPL = exp(sum NLL / tokens) and a 95% percentile bootstrap interval over units."""
    total, tokens = float(nll.sum()), int(count.sum())
    if tokens == 0:
        raise PPPLError(f"length {length}: no masked tokens were scored")
    lo = hi = math.exp(total / tokens)
    if bootstrap > 0 and len(nll) > 1:
        rng = np.random.default_rng(seed)
        picks = rng.integers(0, len(nll), size=(bootstrap, len(nll)))
        stats = np.exp(nll[picks].sum(1) / count[picks].sum(1))
        lo, hi = (float(x) for x in np.percentile(stats, [2.5, 97.5]))
    return LengthResult(length=length, pppl=math.exp(total / tokens), ci95=(lo, hi), units=len(nll),
                        masked_tokens=tokens, windows=windows, mean_nll=total / tokens)


def evaluate_lengths(nll_fn, tokens: np.ndarray, flags: np.ndarray, lengths, *, cls_id: int, sep_id: int,
                     mask_id: int, unit: str = "word", max_units: int | None = 256, seed: int = 0,
                     bootstrap: int = 1000, progress_factory=None, on_result=None,
                     **score_kwargs) -> list[LengthResult]:
    """PPPL at each length over one pool (the trainer's validation metric and eval_pppl's core).
    progress_factory(total, length) -> a tqdm-like object (or None); on_result(LengthResult) is called as
    each length is done (a long evaluation writes its partial results as it goes)."""
    results = []
    for length in lengths:
        windows = cut_windows(tokens, flags, length, cls_id=cls_id, sep_id=sep_id, unit=unit,
                              max_units=max_units, seed=seed)
        total = sum(len(w.units) for w in windows)
        bar = progress_factory(total, length) if progress_factory else None
        try:
            nll, count = pppl_from_nll_fn(nll_fn, windows, mask_id=mask_id, progress=bar, **score_kwargs)
        finally:
            if bar is not None:
                bar.close()
        result = summarize(length, nll, count, len(windows), bootstrap=bootstrap, seed=seed)
        keys = [(w.offset + s - 1, w.offset + e - 1) for w in windows for s, e in w.units]
        result.unit_nll = dict(zip(keys, zip(nll.tolist(), count.tolist())))
        if results:
            result.vs_first = paired_ratio(results[0], result, bootstrap=bootstrap, seed=seed)
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results


def paired_ratio(base: LengthResult, other: LengthResult, *, bootstrap: int = 1000, seed: int = 0) -> dict | None:
    """PPPL(other) / PPPL(base) on the units both scored (same stream span), with a 95% percentile
    bootstrap that resamples those units jointly: context is the only difference, so this interval is
    much tighter than comparing the two lengths' own intervals."""
    shared = sorted(set(base.unit_nll) & set(other.unit_nll))
    if not shared:
        return None
    a = np.array([base.unit_nll[k] for k in shared], dtype=np.float64)
    b = np.array([other.unit_nll[k] for k in shared], dtype=np.float64)

    def ratio(rows):
        return np.exp(b[rows, 0].sum(-1) / b[rows, 1].sum(-1) - a[rows, 0].sum(-1) / a[rows, 1].sum(-1))

    point = float(ratio(np.arange(len(shared))))
    lo = hi = point
    if bootstrap > 0 and len(shared) > 1:
        picks = np.random.default_rng(seed).integers(0, len(shared), size=(bootstrap, len(shared)))
        lo, hi = (float(x) for x in np.percentile(ratio(picks), [2.5, 97.5]))
    return {"base_length": base.length, "shared_units": len(shared), "ratio": point, "ci95": [lo, hi]}


def model_nll_fn(mlm):
    """nll_fn of our CMBertForMaskedLM (any layer spec): sparse prediction on the labelled tokens only, and
    the spec's cross entropy, which is vocab-parallel under tensor parallelism (every rank gets the NLL)."""
    def nll_fn(tokens, cu_seqlens, max_seqlen, labels):
        logits = mlm(tokens, cu_seqlens, max_seqlen, labels=labels).logits
        return mlm.spec.cross_entropy(logits.float(), labels[labels != IGNORE_INDEX])
    return nll_fn


def encoder_nll_fn(encoder):
    """nll_fn of an eval.encoders.Encoder: ours sparse and packed, an HF model padded (all logits, then
    the labelled rows)."""
    if encoder.mlm is None:
        raise PPPLError(f"{encoder.name}: no MLM head, so no pseudo-perplexity")
    encoder.require_tokens("cls_token", "sep_token", "mask_token")
    if encoder.kind == "ours":
        return model_nll_fn(encoder.mlm)

    def hf_logits(tokens, cu_seqlens, max_seqlen, labels):
        bounds = cu_seqlens.tolist()
        logits = encoder.mlm_logits([tokens[a:b].tolist() for a, b in zip(bounds[:-1], bounds[1:])])[0]
        return logits[labels != IGNORE_INDEX]
    return nll_from_logits(hf_logits)


# ---- held-out text --------------------------------------------------------------------------------------
def stream_from_prefix(prefix: str, max_tokens: int, doc_range: tuple[int, int] | None = None):
    """(tokens int64, word-start flags uint8): the documents of an indexed dataset (PREFIX and
    PREFIX_wordstart, as tools/preprocess_data.py writes them) in order, up to max_tokens."""
    from megatron_cmbert.data.pretrain_data import TokenDataset

    data = TokenDataset(prefix)
    lo, hi = doc_range or (0, len(data.lengths))
    toks, flags, have = [], [], 0
    for doc in range(lo, hi):
        if have >= max_tokens:
            break
        n = int(min(data.lengths[doc], max_tokens - have))
        if n == 0:
            continue
        toks.append(np.asarray(data.tokens.get(doc, offset=0, length=n), dtype=np.int64))
        f = np.asarray(data.word_starts.get(doc, offset=0, length=n), dtype=np.uint8).copy()
        f[0] = 1  # a document starts a unit
        flags.append(f)
        have += n
    if not toks:
        raise PPPLError(f"{prefix}: no tokens in documents {lo}..{hi}")
    return np.concatenate(toks), np.concatenate(flags)


def stream_from_texts(texts, tokenizer, max_tokens: int, segmenter: str = "rjieba"):
    """(tokens, word-start flags) of texts with any transformers fast tokenizer: a token starts a word when
    its start offset is a word boundary of the segmenter (the rule of data/encode.py, which gives the same
    flags for our tokenizer), up to max_tokens."""
    from megatron_cmbert.data.helpers import word_start_flags
    from megatron_cmbert.data.segment import Segmenter

    seg = Segmenter(segmenter)
    toks, flags, have = [], [], 0
    for text in texts:
        if have >= max_tokens:
            break
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        if not ids:
            continue
        starts = np.array([s for s, _ in offsets], dtype=np.int64)
        char_is_start = np.zeros(len(text) + 1, dtype=np.uint8)
        lengths = seg.word_lengths(text)
        char_is_start[np.cumsum(lengths) - lengths] = 1
        f = word_start_flags(np.minimum(starts, len(text)), np.array([0, len(ids)], dtype=np.int64), char_is_start)
        n = min(len(ids), max_tokens - have)
        toks.append(np.asarray(ids[:n], dtype=np.int64))
        flags.append(np.asarray(f[:n], dtype=np.uint8))
        have += n
    if not toks:
        raise PPPLError("no held-out text (every document was empty)")
    return np.concatenate(toks), np.concatenate(flags)
