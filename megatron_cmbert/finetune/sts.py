"""Contrastive sentence-embedding fine-tuning (the paper's §4.3 protocol) over any `eval.encoders.Encoder`.

Embeddings are the mean of the final hidden states over each sequence's tokens, L2-normalised (what the
exported sentence-transformers model computes). The loss is InfoNCE with in-batch negatives: for a batch of
pairs (a_i, b_i), cross-entropy of a_i against every b_j with logits cos(a_i, b_j) / temperature, the target
being j = i. Hard negatives (SimCLUE's `neg_title`, see finetune/sts_data.py) join the candidates: every a_i is
also scored against every hard negative n_k of the batch, none of them its target. Evaluation: Pearson and
Spearman correlation between cosine similarity and gold scores.
"""
from __future__ import annotations

import math
import random

import numpy as np
import torch
import torch.nn.functional as F

from megatron_cmbert.finetune.clue import linear_warmup_decay


def embed(encoder, seqs: list[list[int]]) -> torch.Tensor:
    """Mean-pooled, L2-normalised embeddings (len(seqs), hidden); gradients flow in train mode."""
    hidden, cu = encoder.hidden_states(seqs)
    lengths = (cu[1:] - cu[:-1]).long()
    owner = torch.repeat_interleave(torch.arange(len(seqs), device=hidden.device), lengths)
    sums = torch.zeros(len(seqs), hidden.shape[-1], device=hidden.device, dtype=torch.float32)
    sums.index_add_(0, owner, hidden.float())
    return F.normalize(sums / lengths[:, None].float(), dim=-1)


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float, negatives: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over i of -log softmax over the candidates c (b_1..b_B, then the hard negatives) of a_i . c / t,
    the target being b_i (a, b, negatives normalised)."""
    candidates = b if negatives is None or not len(negatives) else torch.cat([b, negatives])
    logits = a @ candidates.T / temperature
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
    """InfoNCE over in-batch negatives and the batch's hard negatives; `pairs` are sts_data.Pair. Returns the
    mean loss of each epoch."""
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
            a = embed(encoder, encoder.encode([p.a for p in batch], max_length))
            b = embed(encoder, encoder.encode([p.b for p in batch], max_length))
            hard = [p.negative for p in batch if p.negative is not None]
            negatives = embed(encoder, encoder.encode(hard, max_length)) if hard else None
            loss = info_nce(a, b, temperature, negatives)
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
