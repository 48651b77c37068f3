#!/usr/bin/env python3
"""Fine-tune an encoder on a CLUE-format classification task (the paper's §4.1 protocol).

    python tools/finetune_clue.py --load ckpt --task single --train tnews/train.jsonl --dev tnews/dev.jsonl \\
        --output-dir runs/tnews                                   # TNEWS / IFLYTEK: {"sentence", "label"}
    python tools/finetune_clue.py --hf some_hf_dir --task pair --train afqmc/train.jsonl --dev afqmc/dev.jsonl \\
        --batch-sweep --output-dir runs/afqmc                      # AFQMC / CMNLI / OCNLI / CSL: sentence1, sentence2
    python tools/finetune_clue.py --load ckpt --random-init ...    # the same recipe from random initialisation

Defaults are the paper's protocol: 3 epochs, peak LR 3e-5, linear warmup (10% of the steps) and linear decay,
batch 32 (--batch-sweep tries 16, 32 and 64 and keeps the best on dev). The classifier is a linear layer on
the [CLS] hidden state; our checkpoints run packed varlen batches, HF encoders padded ones. After each epoch
the dev set is scored; the best epoch (of the best batch size) is kept. Writes to --output-dir: results.json
(dev accuracy and macro-F1 per epoch and batch size, the machine), dev_predictions.jsonl, and
best_model.pt (the classifier's state dict, label names, pooling and the encoder it came from), each by rename.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
FIELDS = {"single": ("sentence",), "pair": ("sentence1", "sentence2")}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    from megatron_cmbert.eval.encoders import add_encoder_args

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_encoder_args(p)
    p.add_argument("--task", choices=sorted(FIELDS), required=True,
                   help="single: one sentence per example; pair: two (the field names follow CLUE; --fields "
                        "changes them)")
    p.add_argument("--fields", nargs="+", default=None, help="text fields (default: sentence | sentence1 sentence2)")
    p.add_argument("--label-field", default="label", help="label field (default label)")
    p.add_argument("--train", required=True, help="training jsonl")
    p.add_argument("--dev", required=True, help="dev jsonl (model selection and the reported scores)")
    p.add_argument("--output-dir", required=True, help="results.json, dev_predictions.jsonl, best_model.pt")
    p.add_argument("--epochs", type=int, default=3, help="default 3 (the paper's)")
    p.add_argument("--lr", type=float, default=3e-5, help="peak learning rate (default 3e-5, the paper's)")
    p.add_argument("--batch-size", type=int, default=32, help="default 32")
    p.add_argument("--batch-sweep", action="store_true", help="try batch 16, 32 and 64; keep the best on dev")
    p.add_argument("--warmup-ratio", type=float, default=0.1, help="share of steps in warmup (default 0.1)")
    p.add_argument("--pooling", choices=["cls", "mean"], default="cls",
                   help="sentence vector for the head: the [CLS] token (default) or the mean over the tokens, as "
                        "HF ModernBERT's classifier_pooling")
    p.add_argument("--max-length", type=int, default=512, help="tokens per example, [CLS]/[SEP] included (default 512)")
    p.add_argument("--max-train", type=int, default=None, help="use the first N training examples (quick runs)")
    p.add_argument("--random-init", action="store_true", help="same architecture and tokenizer, random weights")
    p.add_argument("--seed", type=int, default=0, help="initialisation (head; --random-init body), order, dropout")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def run(args) -> dict:
    import torch
    from tqdm import tqdm

    from megatron_cmbert.eval.encoders import encoder_from_args, random_init_like
    from megatron_cmbert.eval.report import machine, write_atomic, write_json
    from megatron_cmbert.finetune.clue import finetune, read_examples

    fields = tuple(args.fields or FIELDS[args.task])
    train = read_examples(args.train, fields, args.label_field)[:args.max_train]
    dev = read_examples(args.dev, fields, args.label_field)
    labels = sorted({e.label for e in train})
    unknown = sorted({e.label for e in dev} - set(labels))
    if unknown:
        raise ValueError(f"{args.dev}: labels never seen in training: {unknown[:5]}")
    label_id = {name: i for i, name in enumerate(labels)}

    loaded = encoder_from_args(args)
    sizes = [16, 32, 64] if args.batch_sweep else [args.batch_size]
    best, runs = None, []
    for size in sizes:
        encoder = random_init_like(loaded, args.seed) if args.random_init else \
            (loaded if len(sizes) == 1 else encoder_from_args(args))  # each batch size starts from the checkpoint
        def encode(examples):
            pairs = [e.pair for e in examples] if args.task == "pair" else None
            return encoder.encode([e.text for e in examples], args.max_length, pair=pairs)
        steps = args.epochs * -(-len(train) // size)
        bar = tqdm(total=steps, desc=f"batch {size}", disable=args.no_progress or None, dynamic_ncols=True)
        result = finetune(encoder, encode(train), [label_id[e.label] for e in train], encode(dev),
                          [label_id[e.label] for e in dev], len(labels), epochs=args.epochs, lr=args.lr,
                          batch_size=size, warmup_ratio=args.warmup_ratio, seed=args.seed, pooling=args.pooling,
                          progress=bar)
        bar.close()
        print(f"batch {size}: best dev accuracy {result.dev_accuracy:.4f} (macro-F1 {result.dev_macro_f1:.4f}) "
              f"at epoch {result.best_epoch}")
        runs.append({"batch_size": size, "best_epoch": result.best_epoch, "dev_accuracy": result.dev_accuracy,
                     "dev_macro_f1": result.dev_macro_f1, "epochs": result.history})
        if best is None or result.dev_accuracy > best.dev_accuracy:
            best = result
    os.makedirs(args.output_dir, exist_ok=True)
    summary = {"encoder": loaded.name, "random_init": args.random_init, "task": args.task, "fields": list(fields),
               "labels": labels, "train_examples": len(train), "dev_examples": len(dev), "seed": args.seed,
               "lr": args.lr, "pooling": args.pooling, "best_batch_size": best.batch_size,
               "dev_accuracy": best.dev_accuracy, "dev_macro_f1": best.dev_macro_f1, "runs": runs,
               "machine": machine(args.device)}
    write_json(summary, os.path.join(args.output_dir, "results.json"))

    def predictions(tmp):
        import json
        with open(tmp, "w", encoding="utf-8") as fh:
            for e, p in zip(dev, best.predictions):
                fh.write(json.dumps({"label": e.label, "prediction": labels[p]}, ensure_ascii=False) + "\n")
    write_atomic(os.path.join(args.output_dir, "dev_predictions.jsonl"), predictions)
    write_atomic(os.path.join(args.output_dir, "best_model.pt"), lambda tmp: torch.save(
        {"state_dict": best.state, "labels": labels, "encoder": loaded.name, "kind": loaded.kind,
         "random_init": args.random_init, "task": args.task, "fields": list(fields), "pooling": args.pooling}, tmp))
    print(f"dev accuracy {best.dev_accuracy:.4f}, macro-F1 {best.dev_macro_f1:.4f} (batch {best.batch_size}); "
          f"wrote {args.output_dir}/results.json, dev_predictions.jsonl, best_model.pt")
    return summary


def main(argv: Optional[list[str]] = None) -> int:
    from megatron_cmbert.eval.encoders import EncoderError
    from megatron_cmbert.eval.report import run_quietly
    from megatron_cmbert.finetune.clue import ClueDataError

    errors = (EncoderError, ClueDataError, ValueError, OSError)
    return 2 if run_quietly(run, parse_args(argv), errors) is None else 0


if __name__ == "__main__":
    sys.exit(main())
