#!/usr/bin/env python3
"""Fine-tune an encoder on one CLUE task (the paper's §4.1 protocol). tools/eval_clue.py runs all eight.

    python tools/finetune_clue.py --load ckpt --task single --train tnews/train.json --dev tnews/dev.json \\
        --labels tnews/labels.json --test tnews/test.json --output-dir runs/tnews     # TNEWS / IFLYTEK
    python tools/finetune_clue.py --hf some_hf_dir --task pair --train cmnli_public/train.json \\
        --dev cmnli_public/dev.json --batch-sweep --output-dir runs/cmnli            # AFQMC / CMNLI / OCNLI
    python tools/finetune_clue.py --load ckpt --task pair --fields keyword abst ...   # CSL (keywords joined)
    python tools/finetune_clue.py --load ckpt --task wsc --train cluewsc2020_public/train.json ...
    python tools/finetune_clue.py --load ckpt --task multiple_choice --train c3/d-train.json c3/m-train.json \\
        --dev c3/d-dev.json c3/m-dev.json --test c3/test1.1.json --output-dir runs/c3
    python tools/finetune_clue.py --load ckpt --random-init ...    # the same recipe from random initialisation

Inputs are built as the official CLUE baselines build them (megatron_cmbert/finetune/clue_data.py):
single: one text field; pair: `[CLS] a [SEP] b [SEP]` (a field holding a list of strings, CSL's keywords,
is joined with spaces); wsc: CLUEWSC2020's text with the noun marked `_noun_` and the pronoun `[pronoun]` at
their offsets in `target`; multiple_choice: C3 documents, one example per question, each option run as
`[CLS] context [SEP] question [SEP] option [SEP]`, scored from its pooled vector, a softmax across the (up to
4; missing ones masked) options. Files are JSON lines (C3: one JSON document, or one document per line);
several files per split are read in order. Rows labelled with a --drop-labels value (default `-`, the NLI
sets' "no gold label") are dropped and counted in results.json.

Defaults are the paper's protocol: 3 epochs, peak LR 3e-5, linear warmup (10% of the steps) and linear decay,
batch 32 (--batch-sweep: 16, 32 and 64, each from the checkpoint, the best on dev kept). The head is a linear
layer on the [CLS] (or mean) vector; our checkpoints run packed varlen batches, HF encoders padded ones. Dev
is scored after every epoch; the best epoch of the best batch size is kept. Writes to --output-dir, each by
rename: results.json (dev accuracy and macro-F1 per epoch and batch size, kept and dropped rows, the
machine), dev_predictions.jsonl, <test file>_predict.json per --test file (the CLUE submission format:
{"id", "label"} per line, in the test file's order), and best_model.pt (the classifier's state dict, label
names, pooling and the encoder it came from).
"""
from __future__ import annotations

import os
import sys
from typing import Optional

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
FIELD_HELP = "single: sentence | pair: sentence1 sentence2 | wsc: text target | multiple_choice: none"


def build_parser():
    from megatron_cmbert.cli import ToolParser
    from megatron_cmbert.eval.encoders import add_encoder_args
    from megatron_cmbert.finetune.clue_data import KINDS
    from megatron_cmbert.finetune.protocol import add_protocol_args

    p = ToolParser(prog="finetune_clue.py", description=__doc__)
    add_encoder_args(p)
    p.add_argument("--task", choices=KINDS, required=True,
                   help="how an example is built (see above): single, pair, wsc or multiple_choice")
    p.add_argument("--fields", nargs="+", default=None,
                   help=f"the text fields, as many as the task takes (default {FIELD_HELP})")
    p.add_argument("--label-field", default="label", help="label field (default label; C3 uses 'answer' itself)")
    p.add_argument("--labels", default=None, metavar="LABELS_JSON",
                   help="the task's labels.json (TNEWS, IFLYTEK): the label set; default: the training labels")
    p.add_argument("--drop-labels", nargs="*", default=["-"], metavar="LABEL",
                   help="rows with these labels are dropped and counted (default '-'; give the flag alone to "
                        "keep every row)")
    p.add_argument("--train", nargs="+", required=True, help="training file(s)")
    p.add_argument("--dev", nargs="+", required=True, help="dev file(s): model selection and the reported scores")
    p.add_argument("--test", nargs="+", default=[], help="test file(s) to predict with the best model")
    p.add_argument("--output-dir", required=True, help="results.json, dev_predictions.jsonl, *_predict.json, "
                   "best_model.pt")
    add_protocol_args(p)
    p.add_argument("--seed", type=int, default=0, help="initialisation (head; --random-init body), order, dropout")
    return p


def read_data(args):
    """(fields, train, dev, tests, labels, label source), every problem a one-line ClueDataError naming file:line."""
    from megatron_cmbert.cli import UsageError
    from megatron_cmbert.finetune.clue_data import (DEFAULT_FIELDS, MAX_OPTIONS, ClueDataError, check_labels,
                                                    read_labels_file, read_split)

    want = len(DEFAULT_FIELDS[args.task])
    fields = tuple(args.fields) if args.fields is not None else DEFAULT_FIELDS[args.task]
    if len(fields) != want:
        raise UsageError(f"--task {args.task} takes {want} --fields ({FIELD_HELP}), got {len(fields)}: "
                         f"{' '.join(fields)}")
    read = lambda paths, labelled: read_split(paths, args.task, fields, args.label_field, labelled, args.drop_labels)
    train, dev = read(args.train, True), read(args.dev, True)
    tests = [read([path], False) for path in args.test]
    if args.task == "multiple_choice":
        labels, source = [str(i) for i in range(MAX_OPTIONS)], "the option indices"
    elif args.labels:
        labels, source = read_labels_file(args.labels), args.labels
        check_labels(train, labels, source)
    else:
        labels, source = sorted({e.label for e in train.examples}), "the training labels"
    check_labels(dev, labels, source)
    if len(labels) < 2 and args.task != "multiple_choice":
        raise ClueDataError(f"{', '.join(args.train)}: one label only ({labels[0]!r}); nothing to learn")
    train.examples = train.examples[:args.max_train]
    return fields, train, dev, tests, labels, source


def run(argv: Optional[list[str]] = None) -> dict:
    import torch

    from megatron_cmbert.eval.encoders import encoder_from_args
    from megatron_cmbert.eval.report import machine, write_atomic, write_json
    from megatron_cmbert.finetune.clue import encode_examples, sweep
    from megatron_cmbert.finetune.protocol import (batch_sizes, check_protocol_args, dev_rows, submission_rows,
                                                   write_jsonl)

    args = build_parser().parse_args(argv)
    check_protocol_args(args)
    fields, train, dev, tests, labels, source = read_data(args)
    print(f"train: {len(train.examples):,} examples ({train.dropped:,} rows dropped), dev: {len(dev.examples):,} "
          f"({dev.dropped:,} dropped), {len(labels)} labels from {source}")
    loaded = encoder_from_args(args)
    label_id = {name: i for i, name in enumerate(labels)}
    encode = lambda split: encode_examples(loaded, split.examples, args.task, args.max_length)
    result = sweep(loaded, encode(train), [label_id[e.label] for e in train.examples], encode(dev),
                   [label_id[e.label] for e in dev.examples], len(labels),
                   sizes=batch_sizes(args), seeds=[args.seed],
                   random_init=args.random_init, multiple_choice=args.task == "multiple_choice",
                   tests=tuple(encode(t) for t in tests), progress=not args.no_progress, epochs=args.epochs,
                   lr=args.lr, warmup_ratio=args.warmup_ratio, pooling=args.pooling)
    best = result.best
    os.makedirs(args.output_dir, exist_ok=True)
    written = []
    for split, preds in zip(tests, best.test_predictions):
        name = os.path.splitext(os.path.basename(split.files[0]))[0] + "_predict.json"
        write_jsonl(os.path.join(args.output_dir, name), submission_rows(split, preds, labels, args.task))
        written.append(name)
    write_jsonl(os.path.join(args.output_dir, "dev_predictions.jsonl"), dev_rows(dev, best.predictions, labels))
    summary = {"encoder": loaded.name, "random_init": args.random_init, "task": args.task,
               "fields": list(fields), "labels": labels, "label_source": source,
               "train_files": train.files, "dev_files": dev.files, "train_examples": len(train.examples),
               "train_dropped": train.dropped, "dev_examples": len(dev.examples), "dev_dropped": dev.dropped,
               "drop_labels": args.drop_labels, "test_predictions": dict(zip(written, (len(t.examples) for t in tests))),
               "seed": args.seed, "lr": args.lr, "epochs": args.epochs, "max_length": args.max_length,
               "pooling": args.pooling, "best_batch_size": best.batch_size, "best_epoch": best.best_epoch,
               "dev_accuracy": best.dev_accuracy, "dev_macro_f1": best.dev_macro_f1,
               "runs": [{"batch_size": size, "seed": seed, "best_epoch": r.best_epoch, "dev_accuracy": r.dev_accuracy,
                         "dev_macro_f1": r.dev_macro_f1, "epochs": r.history} for size, seed, r in result.runs],
               "machine": machine(args.device)}
    write_json(summary, os.path.join(args.output_dir, "results.json"))
    write_atomic(os.path.join(args.output_dir, "best_model.pt"), lambda tmp: torch.save(
        {"state_dict": best.state, "labels": labels, "encoder": loaded.name, "kind": loaded.kind,
         "random_init": args.random_init, "task": args.task, "fields": list(fields),
         "pooling": args.pooling}, tmp))
    print(f"dev accuracy {best.dev_accuracy:.4f}, macro-F1 {best.dev_macro_f1:.4f} (batch {best.batch_size}); "
          f"wrote {args.output_dir}/results.json, dev_predictions.jsonl, best_model.pt"
          + "".join(f", {n}" for n in written))
    return summary


def main(argv: Optional[list[str]] = None) -> int:
    from megatron_cmbert.cli import run_tool

    return run_tool(run, argv)


if __name__ == "__main__":
    sys.exit(main())
