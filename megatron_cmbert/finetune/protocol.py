"""What tools/finetune_clue.py and tools/eval_clue.py share: the §4.1 protocol's flags, their checks, and the
prediction files (dev predictions; test predictions in the CLUE submission format)."""
from __future__ import annotations

import json

BATCH_SWEEP = (16, 32, 64)


def add_protocol_args(p) -> None:
    """The paper's §4.1 protocol as flags: 3 epochs, peak LR 3e-5, linear warmup (10%) then decay, batch 32 or
    the 16/32/64 sweep."""
    g = p.add_argument_group("fine-tuning protocol (defaults: the paper's §4.1)")
    g.add_argument("--epochs", type=int, default=3, help="epochs per run (default 3, the paper's)")
    g.add_argument("--lr", type=float, default=3e-5, help="peak learning rate (default 3e-5, the paper's)")
    g.add_argument("--batch-size", type=int, default=32,
                   help="examples per batch (C3: questions, each with its options; default 32)")
    g.add_argument("--batch-sweep", action="store_true",
                   help=f"run batch {', '.join(map(str, BATCH_SWEEP))} (the paper's per-task sweep), each from the "
                        "checkpoint, and keep the batch size with the best dev accuracy")
    g.add_argument("--warmup-ratio", type=float, default=0.1,
                   help="share of the steps in linear warmup, then linear decay to zero (default 0.1)")
    g.add_argument("--pooling", choices=["cls", "mean"], default="cls",
                   help="vector for the head: the [CLS] token (default) or the mean over the tokens, as HF "
                        "ModernBERT's classifier_pooling")
    g.add_argument("--max-length", type=int, default=512,
                   help="tokens per sequence (C3: per option), [CLS]/[SEP] included; longer inputs are cut "
                        "longest part first (default 512)")
    g.add_argument("--max-train", type=int, default=None, help="use the first N training examples (quick runs)")
    g.add_argument("--random-init", action="store_true",
                   help="the same architecture and tokenizer with random weights (seeded by the run's seed): "
                        "what pretraining adds")
    g.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")


def check_protocol_args(args) -> None:
    """The numeric flags, refused with one line (UsageError) when unusable."""
    from megatron_cmbert.cli import UsageError

    if args.epochs < 1 or args.batch_size < 1 or args.max_length < 8 or not args.lr > 0:
        raise UsageError("--epochs and --batch-size must be at least 1, --max-length at least 8, --lr positive")
    if not 0 <= args.warmup_ratio < 1:
        raise UsageError("--warmup-ratio must be in [0, 1)")
    if args.max_train is not None and args.max_train < 1:
        raise UsageError("--max-train must be at least 1")


def batch_sizes(args) -> list:
    return list(BATCH_SWEEP) if args.batch_sweep else [args.batch_size]


def write_jsonl(path: str, rows) -> None:
    """One JSON object per line at `path`, by rename."""
    from megatron_cmbert.eval.report import write_atomic

    def dump(tmp):
        with open(tmp, "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    write_atomic(path, dump)


def dev_rows(split, predictions, labels):
    """The dev predictions file: where each row came from, its gold label and the prediction (label names;
    C3: option indices)."""
    return ({"where": e.where, "label": e.label, "prediction": labels[p]} for e, p in zip(split.examples, predictions))


def submission_rows(split, predictions, labels, kind: str):
    """CLUE's submission lines, in the test file's order: {"id": the row's id, "label": the label name}; C3:
    {"id": the question's id, "label": the option index}."""
    return [{"id": e.id, "label": int(p) if kind == "multiple_choice" else labels[p]}
            for e, p in zip(split.examples, predictions)]
