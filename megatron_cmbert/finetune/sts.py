"""Contrastive sentence-embedding fine-tuning (the paper's §4.3 protocol) over any `eval.encoders.Encoder`.

Embeddings are the mean of the final hidden states over each sequence's tokens, L2-normalised (what the
exported sentence-transformers model computes). The loss is InfoNCE with in-batch negatives: for a batch of
pairs (a_i, b_i), cross-entropy of a_i against every b_j with logits cos(a_i, b_j) / temperature, the target
being j = i. Evaluation: Pearson and Spearman correlation between cosine similarity and gold scores.
"""
from __future__ import annotations

import math
import random

import numpy as np
import torch
import torch.nn.functional as F

from megatron_cmbert.finetune.clue import ClueDataError, jsonl_rows, linear_warmup_decay


def read_pairs(path: str, first: str, second: str, score: str | None = None, positives_only: bool = False):
    """[(text_a, text_b)] or, with `score`, [(text_a, text_b, float score)] from a jsonl file; positives_only
    keeps SimCLUE rows whose label is 1 (or that have no label)."""
    rows = []
    for number, row in jsonl_rows(path):
        try:
            a, b = row[first], row[second]
            value = float(row[score]) if score else None
        except (ValueError, KeyError, TypeError) as exc:
            raise ClueDataError(f"{path}:{number}: needs fields {first!r}, {second!r}"
                                f"{f', {score!r} (a number)' if score else ''} ({type(exc).__name__}: {exc})") from None
        if not (isinstance(a, str) and isinstance(b, str) and a.strip() and b.strip()):
            raise ClueDataError(f"{path}:{number}: empty or non-string text")
        if positives_only and str(row.get("label", "1")) not in ("1", "1.0"):
            continue
        rows.append((a, b, value) if score else (a, b))
    if not rows:
        raise ClueDataError(f"{path}: no usable pairs")
    return rows


def embed(encoder, seqs: list[list[int]]) -> torch.Tensor:
    """Mean-pooled, L2-normalised embeddings (len(seqs), hidden); gradients flow in train mode."""
    hidden, cu = encoder.hidden_states(seqs)
    lengths = (cu[1:] - cu[:-1]).long()
    owner = torch.repeat_interleave(torch.arange(len(seqs), device=hidden.device), lengths)
    sums = torch.zeros(len(seqs), hidden.shape[-1], device=hidden.device, dtype=torch.float32)
    sums.index_add_(0, owner, hidden.float())
    return F.normalize(sums / lengths[:, None].float(), dim=-1)


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over i of -log softmax_j(a_i . b_j / t)[i] (a, b normalised)."""
    logits = a @ b.T / temperature
    return F.cross_entropy(logits, torch.arange(len(a), device=a.device))


def ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their mean rank (as Spearman's coefficient needs)."""
    order = np.argsort(x, kind="mergesort")
    r = np.empty(len(x), dtype=np.float64)
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        r[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return r


def pearson(x, y) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / math.sqrt((x * x).sum() * (y * y).sum()))


def spearman(x, y) -> float:
    return pearson(ranks(np.asarray(x, np.float64)), ranks(np.asarray(y, np.float64)))


@torch.no_grad()
def evaluate(encoder, scored, max_length: int, batch_size: int = 64) -> dict:
    """Pearson and Spearman of cos(a, b) against the gold scores of [(a, b, score)]."""
    encoder.eval()
    cos = []
    for lo in range(0, len(scored), batch_size):
        part = scored[lo:lo + batch_size]
        a = embed(encoder, encoder.encode([p[0] for p in part], max_length))
        b = embed(encoder, encoder.encode([p[1] for p in part], max_length))
        cos.extend((a * b).sum(-1).tolist())
    gold = [p[2] for p in scored]
    return {"pearson": pearson(cos, gold), "spearman": spearman(cos, gold), "pairs": len(scored)}


def train_contrastive(encoder, pairs, *, epochs: int, lr: float, batch_size: int, temperature: float,
                      max_length: int, warmup_ratio: float = 0.1, seed: int = 0, progress=None) -> list[float]:
    """InfoNCE over in-batch negatives; returns the mean loss of each epoch."""
    torch.manual_seed(seed)
    params = list(encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    total = epochs * math.ceil(len(pairs) / batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: linear_warmup_decay(s, total, max(1, int(warmup_ratio * total))))
    rng, history = random.Random(seed), []
    for _ in range(epochs):
        encoder.train()
        order = list(range(len(pairs)))
        rng.shuffle(order)
        losses = []
        for lo in range(0, len(order), batch_size):
            batch = [pairs[i] for i in order[lo:lo + batch_size]]
            if len(batch) < 2:
                continue  # one pair has no negative
            a = embed(encoder, encoder.encode([p[0] for p in batch], max_length))
            b = embed(encoder, encoder.encode([p[1] for p in batch], max_length))
            loss = info_nce(a, b, temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            if progress is not None:
                progress.update(1)
        history.append(float(np.mean(losses)) if losses else float("nan"))
    return history
