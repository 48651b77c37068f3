"""CLUE-style classification fine-tuning (the paper's §4.1 protocol) over any `eval.encoders.Encoder`.

Data: jsonl, one example per line, single sentences (TNEWS / IFLYTEK: {"sentence": ..., "label": ...}) or
pairs (AFQMC / CMNLI / OCNLI / CSL: "sentence1", "sentence2"). The head is one linear layer on the final
hidden state of [CLS] (the first token of each packed sequence), as BERT's classifiers. Batches are packed
varlen for our encoder (no padding) and padded for HF ones, through `Encoder.hidden_states`. The schedule is
AdamW with a linear warmup over the first 10% of the steps, then a linear decay to zero.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from megatron_cmbert.errors import UserError


class ClueDataError(UserError, ValueError):
    """A data line that cannot be used, as file:line: reason."""


@dataclass
class Example:
    text: str
    pair: str | None
    label: str


def jsonl_rows(path: str):
    """(line number, object) of each non-blank line of a jsonl file; ClueDataError names a malformed line."""
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except ValueError as exc:
                raise ClueDataError(f"{path}:{number}: malformed JSON ({exc})") from None


def read_examples(path: str, fields: tuple[str, ...], label_field: str = "label") -> list[Example]:
    """Examples of a CLUE jsonl file: fields = ("sentence",) or ("sentence1", "sentence2")."""
    out = []
    for number, row in jsonl_rows(path):
        missing = [f for f in (*fields, label_field) if f not in row]
        if missing:
            raise ClueDataError(f"{path}:{number}: no field {', '.join(map(repr, missing))} "
                                f"(fields here: {', '.join(sorted(row))})")
        texts = [row[f] for f in fields]
        if not all(isinstance(t, str) and t.strip() for t in texts):
            raise ClueDataError(f"{path}:{number}: empty or non-string text")
        out.append(Example(texts[0], texts[1] if len(texts) > 1 else None, str(row[label_field])))
    if not out:
        raise ClueDataError(f"{path}: no examples")
    return out


def accuracy_and_macro_f1(gold: list[int], pred: list[int], num_labels: int) -> tuple[float, float]:
    """Accuracy, and the mean over labels of F1 = 2TP / (2TP + FP + FN) (a label never gold nor predicted
    counts as F1 0 only when it has gold examples; labels absent from both are left out)."""
    gold_a, pred_a = np.asarray(gold), np.asarray(pred)
    f1s = []
    for c in range(num_labels):
        tp = int(((gold_a == c) & (pred_a == c)).sum())
        fp = int(((gold_a != c) & (pred_a == c)).sum())
        fn = int(((gold_a == c) & (pred_a != c)).sum())
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    return float((gold_a == pred_a).mean()), float(np.mean(f1s)) if f1s else 0.0


POOLINGS = ("cls", "mean")


def pool(hidden: torch.Tensor, cu_seqlens: torch.Tensor, pooling: str) -> torch.Tensor:
    """One vector per packed sequence: its first token ([CLS]) or the mean over its tokens."""
    if pooling == "cls":
        return hidden[cu_seqlens[:-1].long()]
    if pooling != "mean":
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    segment = torch.repeat_interleave(torch.arange(len(lengths), device=hidden.device), lengths)
    sums = torch.zeros(len(lengths), hidden.shape[-1], device=hidden.device, dtype=torch.float32)
    sums.index_add_(0, segment, hidden.float())
    return (sums / lengths.unsqueeze(-1)).to(hidden.dtype)


class Classifier(torch.nn.Module):
    def __init__(self, encoder, num_labels: int, dropout: float = 0.1, pooling: str = "cls"):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.encoder = encoder
        self.pooling = pooling
        self.body = encoder.backbone  # registered, so parameters() and state_dict() include it
        self.dropout = torch.nn.Dropout(dropout)
        dtype = next(encoder.backbone.parameters()).dtype
        self.head = torch.nn.Linear(encoder.hidden_size, num_labels, device=encoder.device, dtype=dtype)

    def forward(self, seqs: list[list[int]]) -> torch.Tensor:
        hidden, cu_seqlens = self.encoder.hidden_states(seqs)
        return self.head(self.dropout(pool(hidden, cu_seqlens, self.pooling))).float()


def linear_warmup_decay(step: int, total: int, warmup: int) -> float:
    """LR factor: 0 -> 1 over `warmup` steps, then linearly to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


@dataclass
class FinetuneResult:
    batch_size: int
    best_epoch: int
    dev_accuracy: float
    dev_macro_f1: float
    history: list
    predictions: list
    state: dict


def finetune(encoder, train: list[list[int]], train_labels: list[int], dev: list[list[int]], dev_labels: list[int],
             num_labels: int, *, epochs: int = 3, lr: float = 3e-5, batch_size: int = 32, warmup_ratio: float = 0.1,
             weight_decay: float = 0.01, seed: int = 0, pooling: str = "cls", progress=None) -> FinetuneResult:
    """Train a classifier on the pooled output; evaluate on dev after each epoch, keep the best epoch's weights."""
    torch.manual_seed(seed)
    model = Classifier(encoder, num_labels, pooling=pooling)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    steps_per_epoch = math.ceil(len(train) / batch_size)
    total = epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: linear_warmup_decay(s, total, max(1, int(warmup_ratio * total))))
    order_rng = random.Random(seed)
    best, history = None, []
    for epoch in range(1, epochs + 1):
        model.train()
        encoder.train()
        order = list(range(len(train)))
        order_rng.shuffle(order)
        losses = []
        for lo in range(0, len(order), batch_size):
            idx = order[lo:lo + batch_size]
            logits = model([train[i] for i in idx])
            loss = F.cross_entropy(logits, torch.tensor([train_labels[i] for i in idx], device=logits.device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            if progress is not None:
                progress.update(1)
        pred = predict(model, dev, batch_size)
        acc, f1 = accuracy_and_macro_f1(dev_labels, pred, num_labels)
        history.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "dev_accuracy": acc, "dev_macro_f1": f1})
        if best is None or acc > best.dev_accuracy:
            state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            best = FinetuneResult(batch_size, epoch, acc, f1, history, pred, state)
    best.history = history
    return best


@torch.no_grad()
def predict(model: Classifier, seqs: list[list[int]], batch_size: int) -> list[int]:
    model.eval()
    model.encoder.eval()
    out = []
    for lo in range(0, len(seqs), batch_size):
        out.extend(model(seqs[lo:lo + batch_size]).argmax(-1).tolist())
    return out
