"""CLUE fine-tuning (the paper's §4.1 protocol) over any `eval.encoders.Encoder`: classification and C3-style
multiple choice.

Examples come from `finetune.clue_data` (the official files, built as the official baselines build them).
Classification: one linear layer on the pooled final hidden states ([CLS], the first token of each packed
sequence, as BERT's classifiers; or the mean). Multiple choice: each option is its own sequence
`[CLS] context [SEP] question [SEP] option [SEP]`; one linear layer scores each option from its pooled vector;
a question's scores fill MAX_OPTIONS (4) slots, slots without an option are -inf (masked out of the softmax),
and the loss is cross-entropy over the slots; accuracy is per question. Batches are packed varlen for our
encoder (no padding, padding options are never run) and padded for HF ones, through `Encoder.hidden_states`.
The schedule is AdamW with a linear warmup over the first 10% of the steps, then a linear decay to zero.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from megatron_cmbert.finetune.clue_data import MAX_OPTIONS
from megatron_cmbert.finetune.records import ClueDataError  # noqa: F401  (the finetune errors' home, re-exported)


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
    """A linear head on one pooled vector per sequence: (batch, num_labels) logits."""

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

    def pooled(self, seqs: list[list[int]]) -> torch.Tensor:
        hidden, cu_seqlens = self.encoder.hidden_states(seqs)
        return self.dropout(pool(hidden, cu_seqlens, self.pooling))

    def forward(self, seqs: list[list[int]]) -> torch.Tensor:
        return self.head(self.pooled(seqs)).float()


class MultipleChoice(Classifier):
    """One score per option from its pooled vector; (questions, MAX_OPTIONS) logits, -inf where a question has
    no option (C3 has 2 to 4), so the softmax across a question's options ignores the padding slots."""

    def __init__(self, encoder, dropout: float = 0.1, pooling: str = "cls"):
        super().__init__(encoder, 1, dropout, pooling)

    def forward(self, questions: list[list[list[int]]]) -> torch.Tensor:
        counts = [len(q) for q in questions]
        if any(not 1 <= c <= MAX_OPTIONS for c in counts):
            raise ValueError(f"each question needs 1 to {MAX_OPTIONS} options, got {counts}")
        scores = self.head(self.pooled([seq for q in questions for seq in q])).float().squeeze(-1)
        device = scores.device
        rows = torch.repeat_interleave(torch.arange(len(questions), device=device), torch.tensor(counts, device=device))
        cols = torch.cat([torch.arange(c, device=device) for c in counts])
        empty = torch.full((len(questions), MAX_OPTIONS), float("-inf"), device=device)
        return empty.index_put((rows, cols), scores)


def linear_warmup_decay(step: int, total: int, warmup: int) -> float:
    """LR factor: 0 -> 1 over `warmup` steps, then linearly to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


# ---- inputs ------------------------------------------------------------------------------------------------
def truncate_longest_first(lengths: list[int], budget: int) -> list[int]:
    """The lengths left after removing one token at a time from the end of the longest part (ties: the
    earliest part) until they fit `budget`: the official C3 reader's rule for context, question and option,
    computed in bulk rather than token by token."""
    out = list(lengths)
    excess = sum(out) - budget
    while excess > 0:
        top = max(out)
        i = out.index(top)
        second = max([v for j, v in enumerate(out) if j != i], default=0)
        cut = min(excess, top - second) or 1  # at a tie, one token from the earliest part
        out[i] -= cut
        excess -= cut
    return out


def encode_choices(encoder, context: str, question: str, options, max_length: int) -> list[list[int]]:
    """`[CLS] context [SEP] question [SEP] option [SEP]` token ids per option, each cut to max_length tokens
    by truncate_longest_first over the three parts."""
    tok = encoder.tokenizer
    parts = tok([context, question, *options], add_special_tokens=False)["input_ids"]
    (ctx, q), opts = parts[:2], parts[2:]
    cls, sep = tok.cls_token_id, tok.sep_token_id
    seqs = []
    for opt in opts:
        a, b, c = truncate_longest_first([len(ctx), len(q), len(opt)], max(0, max_length - 4))
        seqs.append([cls, *ctx[:a], sep, *q[:b], sep, *opt[:c], sep])
    return seqs


def encode_examples(encoder, examples, kind: str, max_length: int) -> list:
    """Token ids of each example: a sequence (classification) or one sequence per option (multiple_choice)."""
    if kind == "multiple_choice":
        return [encode_choices(encoder, e.text, e.question, e.options, max_length) for e in examples]
    pairs = [e.pair for e in examples] if kind == "pair" else None
    return encoder.encode([e.text for e in examples], max_length, pair=pairs)


# ---- starting every run from the same weights ---------------------------------------------------------------------
def snapshot(encoder) -> dict:
    """A CPU copy of the encoder's weights (its MLM model when it has one: that contains the body)."""
    module = encoder.mlm if encoder.mlm is not None else encoder.backbone
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def restore(encoder, state: dict):
    """Put the weights of `snapshot` back (each batch size and seed of a sweep starts from the checkpoint)."""
    (encoder.mlm if encoder.mlm is not None else encoder.backbone).load_state_dict(state)
    return encoder


# ---- training ----------------------------------------------------------------------------------------------------
@dataclass
class FinetuneResult:
    batch_size: int
    best_epoch: int
    dev_accuracy: float
    dev_macro_f1: float
    history: list
    predictions: list
    state: dict
    test_predictions: list = field(default_factory=list)
    """Per test set given to finetune: the predictions of the best epoch's weights."""


def finetune(encoder, train: list, train_labels: list[int], dev: list, dev_labels: list[int], num_labels: int, *,
             epochs: int = 3, lr: float = 3e-5, batch_size: int = 32, warmup_ratio: float = 0.1,
             weight_decay: float = 0.01, seed: int = 0, pooling: str = "cls", multiple_choice: bool = False,
             tests: tuple = (), progress=None) -> FinetuneResult:
    """Train a classifier (or, with multiple_choice, an option scorer) on the pooled output; evaluate on dev
    after each epoch and keep the best epoch's weights, with which each of `tests` is then predicted."""
    torch.manual_seed(seed)
    model = MultipleChoice(encoder, pooling=pooling) if multiple_choice else Classifier(encoder, num_labels,
                                                                                       pooling=pooling)
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
    if tests:
        model.load_state_dict(best.state)
        best.test_predictions = [predict(model, seqs, batch_size) for seqs in tests]
    return best


@torch.no_grad()
def predict(model: Classifier, items: list, batch_size: int) -> list[int]:
    model.eval()
    model.encoder.eval()
    out = []
    for lo in range(0, len(items), batch_size):
        out.extend(model(items[lo:lo + batch_size]).argmax(-1).tolist())
    return out


# ---- the protocol's sweep: batch sizes x seeds, each from the checkpoint -----------------------------------------
@dataclass
class Sweep:
    runs: list
    """[(batch_size, seed, FinetuneResult)] in the order run."""
    batch_size: int
    """The batch size with the best mean dev accuracy over the seeds (ties: the first given)."""
    best: FinetuneResult
    """The chosen batch size's best seed (ties: the first): its dev and test predictions are the ones kept."""

    def accuracies(self) -> list[float]:
        return [r.dev_accuracy for size, _, r in self.runs if size == self.batch_size]


def sweep(loaded, train, train_labels, dev, dev_labels, num_labels: int, *, sizes, seeds, random_init: bool = False,
          multiple_choice: bool = False, tests: tuple = (), desc: str = "", progress: bool = True, log=print,
          **kwargs) -> Sweep:
    """finetune once per (batch size, seed), each run from `loaded`'s weights as loaded (or, with random_init,
    from a fresh initialisation of the same architecture seeded by the run's seed); `kwargs` go to finetune."""
    from megatron_cmbert.cli import Progress
    from megatron_cmbert.eval.encoders import random_init_like

    initial = None if random_init else snapshot(loaded)
    runs = []
    for size in sizes:
        for seed in seeds:
            encoder = random_init_like(loaded, seed) if random_init else restore(loaded, initial)
            steps = kwargs.get("epochs", 3) * math.ceil(len(train) / size)
            with Progress(steps, f"{desc}batch {size} seed {seed}", "steps", disable=not progress) as bar:
                result = finetune(encoder, train, train_labels, dev, dev_labels, num_labels, batch_size=size, seed=seed,
                                  multiple_choice=multiple_choice, tests=tests, progress=bar, **kwargs)
            log(f"{desc}batch {size} seed {seed}: best dev accuracy {result.dev_accuracy:.4f} "
                f"(macro-F1 {result.dev_macro_f1:.4f}) at epoch {result.best_epoch}")
            runs.append((size, seed, result))
    mean = {s: float(np.mean([r.dev_accuracy for size, _, r in runs if size == s])) for s in sizes}
    chosen = max(sizes, key=lambda s: (mean[s], -list(sizes).index(s)))
    best = max((r for size, _, r in runs if size == chosen), key=lambda r: r.dev_accuracy)
    if initial is not None:
        restore(loaded, initial)  # leave the caller's encoder as it was given
    return Sweep(runs, chosen, best)
