#!/usr/bin/env python3
"""The paper's Table 3: fine-tune an encoder on the CLUE tasks, as the official releases ship them, in one command.

    python tools/eval_clue.py --load CKPT --clue-dir clue --output-dir runs/clue --batch-sweep   # the paper's protocol
    python tools/eval_clue.py --hf HF_DIR --clue-dir clue --tasks afqmc c3 --seeds 0 1 2 --output-dir runs/clue_hf

--clue-dir holds the tasks as their zips unpack: <task>/ or <task>_public/ for afqmc, tnews, iflytek, cmnli,
cluewsc2020, csl, ocnli, c3, with the official files (train.json, dev.json, test.json; OCNLI's train.50k.json;
TNEWS' and IFLYTEK's labels.json, the label set; C3's d-train.json + m-train.json, d-dev.json + m-dev.json,
test1.0.json / test1.1.json; TNEWS and CLUEWSC2020 also test1.0.json). Every task's files are read and checked
before any training, so a missing task or file, or a bad line, stops the run at once with one line naming it.

Each input is built as the official CLUE baselines build it (megatron_cmbert/finetune/clue_data.py): AFQMC,
CMNLI, OCNLI as pairs; TNEWS, IFLYTEK single sentences; CSL a pair (its keywords joined by spaces, the
abstract); CLUEWSC2020 a single sentence with the noun marked `_noun_` and the pronoun `[pronoun]` at their
character offsets; C3 multiple choice, each option run as `[CLS] context [SEP] question [SEP] option [SEP]`,
scored from its pooled vector, a softmax across the options (padded to 4, padding masked), accuracy per
question. CMNLI/OCNLI rows labelled `-` (no gold label) are dropped, as the baselines do, and counted.

The protocol per task (§4.1): --epochs 3, peak --lr 3e-5, linear warmup over 10% of the steps then linear decay,
AdamW, batch 32 or --batch-sweep over 16/32/64 (each from the checkpoint; the batch size with the best mean dev
accuracy over --seeds is kept), dev scored after each epoch and the best epoch kept. The figure per task is dev
accuracy (CLUE's metric for all eight), the mean over --seeds at the kept batch size.

Writes to --output-dir (each file by rename, results.json after every task with "complete": false until the
last): results.json ({"tasks": {task: {"accuracy", "dev_examples", "dropped", "batch_size", "epochs", ...}},
"average", "machine", ...}), <task>/dev_predictions.jsonl (the kept run's dev predictions), and
submission/<name>_predict.json: test predictions in the CLUE submission format ({"id", "label"} per line in the
test file's order; C3 labels are option indices), named as CLUE's submission rules name them (afqmc_predict,
tnews11 / tnews10, iflytek, cmnli, ocnli_50k, cluewsc11 / cluewsc10, csl, c311 / c310). Prints the counts per
task (examples kept, rows dropped) and a table in the layout of the paper's Table 3 with the paper's rows.
"""
from __future__ import annotations

import os
import sys
from typing import Optional

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_parser():
    from megatron_cmbert.cli import ToolParser
    from megatron_cmbert.eval.encoders import add_encoder_args
    from megatron_cmbert.finetune.clue_data import TASK_ORDER
    from megatron_cmbert.finetune.protocol import add_protocol_args

    p = ToolParser(prog="eval_clue.py", description=__doc__)
    add_encoder_args(p)
    p.add_argument("--clue-dir", required=True, help="the folder holding the unpacked tasks (<task>/ or <task>_public/)")
    p.add_argument("--tasks", nargs="+", default=["all"], metavar="TASK",
                   help=f"all (default) or some of: {' '.join(TASK_ORDER)}")
    p.add_argument("--output-dir", required=True,
                   help="results.json, <task>/dev_predictions.jsonl, submission/*_predict.json")
    add_protocol_args(p)
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="one run per seed (head initialisation, data order, dropout; --random-init: the body too) "
                        "at each batch size; the figure is their mean (default 0)")
    p.add_argument("--no-test", action="store_true", help="do not read or predict the test files")
    return p


def resolve_tasks(names) -> list:
    from megatron_cmbert.cli import UsageError
    from megatron_cmbert.finetune.clue_data import TASK_ORDER

    if "all" in names:
        return list(TASK_ORDER)
    unknown = [n for n in names if n not in TASK_ORDER]
    if unknown:
        raise UsageError(f"--tasks: unknown task {', '.join(unknown)}; choose all or from {' '.join(TASK_ORDER)}")
    return list(dict.fromkeys(names))


def counts_table(results: dict) -> str:
    lines = [f"{'task':<12}{'input':<17}{'train':>7}{'dropped':>9}{'dev':>6}{'dropped':>9}{'test':>6}"
             f"{'batch':>7}{'epoch':>7}{'accuracy':>10}"]
    for name, r in results["tasks"].items():
        lines.append(f"{name:<12}{r['kind']:<17}{r['train_examples']:>7}{r['dropped_rows']['train']:>9}"
                     f"{r['dev_examples']:>6}{r['dropped_rows']['dev']:>9}{sum(r['test_examples'].values()):>6}"
                     f"{r['batch_size']:>7}{r['best_epoch']:>7}{r['accuracy']:>10.4f}")
    return "\n".join(lines)


def task_result(data, sweep, args, submissions) -> dict:
    import numpy as np

    accs = sweep.accuracies()
    best = sweep.best
    best_seed = next(seed for size, seed, r in sweep.runs if r is best)
    return {"accuracy": float(np.mean(accs)), "dev_examples": len(data.dev.examples),
            "dropped": data.train.dropped + data.dev.dropped, "batch_size": sweep.batch_size, "epochs": args.epochs,
            "accuracy_std": float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0, "seed_accuracies": accs,
            "best_seed": best_seed, "best_seed_accuracy": best.dev_accuracy, "macro_f1": best.dev_macro_f1,
            "best_epoch": best.best_epoch, "train_examples": len(data.train.examples),
            "dropped_rows": {"train": data.train.dropped, "dev": data.dev.dropped},
            "test_examples": {os.path.basename(s.files[0]): len(s.examples) for s, _ in data.tests},
            "kind": data.task.kind, "labels": data.labels, "label_source": data.label_source,
            "files": {"train": data.train.files, "dev": data.dev.files, "test": [s.files[0] for s, _ in data.tests]},
            "dev_predictions": f"{data.task.name}/dev_predictions.jsonl", "submission": submissions,
            "runs": [{"batch_size": size, "seed": seed, "dev_accuracy": r.dev_accuracy, "dev_macro_f1": r.dev_macro_f1,
                      "best_epoch": r.best_epoch, "epochs": r.history} for size, seed, r in sweep.runs]}


def run(argv: Optional[list[str]] = None) -> dict:
    import numpy as np

    from megatron_cmbert.eval.encoders import encoder_from_args
    from megatron_cmbert.eval.report import machine, machine_line, write_json
    from megatron_cmbert.finetune.clue import encode_examples, sweep
    from megatron_cmbert.finetune.clue_data import TASKS, load_task
    from megatron_cmbert.finetune.paper import table3
    from megatron_cmbert.finetune.protocol import (batch_sizes, check_protocol_args, dev_rows, submission_rows,
                                                   write_jsonl)

    args = build_parser().parse_args(argv)
    check_protocol_args(args)
    names = resolve_tasks(args.tasks)
    data = {name: load_task(args.clue_dir, name, with_test=not args.no_test) for name in names}
    for name, d in data.items():
        d.train.examples = d.train.examples[:args.max_train]
        tests = ", ".join(f"{os.path.basename(s.files[0])} {len(s.examples)}" for s, _ in d.tests) or "none"
        print(f"{name}: {d.folder}: train {len(d.train.examples):,} ({d.train.dropped} dropped), dev "
              f"{len(d.dev.examples):,} ({d.dev.dropped} dropped), test {tests}; {len(d.labels)} labels")
    loaded = encoder_from_args(args)
    results = {"encoder": loaded.name, "random_init": args.random_init, "clue_dir": args.clue_dir,
               "protocol": {"epochs": args.epochs, "lr": args.lr, "warmup_ratio": args.warmup_ratio,
                            "batch_sizes": batch_sizes(args), "seeds": args.seeds, "max_length": args.max_length,
                            "pooling": args.pooling, "max_train": args.max_train},
               "tasks": {}, "average": None, "complete": False, "machine": machine(args.device)}
    out = args.output_dir
    for name in names:
        d = data[name]
        kind = d.task.kind
        label_id = {label: i for i, label in enumerate(d.labels)}
        encode = lambda split: encode_examples(loaded, split.examples, kind, args.max_length)
        result = sweep(loaded, encode(d.train), [label_id[e.label] for e in d.train.examples], encode(d.dev),
                       [label_id[e.label] for e in d.dev.examples], len(d.labels), sizes=batch_sizes(args),
                       seeds=args.seeds, random_init=args.random_init, multiple_choice=kind == "multiple_choice",
                       tests=tuple(encode(s) for s, _ in d.tests), desc=f"{name} ", progress=not args.no_progress,
                       epochs=args.epochs, lr=args.lr, warmup_ratio=args.warmup_ratio, pooling=args.pooling)
        write_jsonl(os.path.join(out, name, "dev_predictions.jsonl"), dev_rows(d.dev, result.best.predictions, d.labels))
        submissions = []
        for (split, sub), preds in zip(d.tests, result.best.test_predictions):
            write_jsonl(os.path.join(out, "submission", sub), submission_rows(split, preds, d.labels, kind))
            submissions.append(sub)
        results["tasks"][name] = task_result(d, result, args, submissions)
        results["average"] = float(np.mean([r["accuracy"] for r in results["tasks"].values()]))
        write_json(results, os.path.join(out, "results.json"))
    results["complete"] = True
    write_json(results, os.path.join(out, "results.json"))
    label = f"this run ({os.path.basename(os.path.normpath(loaded.name))}{', random init' if args.random_init else ''})"
    print(f"\nper task (examples kept, rows dropped; the accuracy is the mean over seeds {args.seeds}):")
    print(counts_table(results))
    print(f"\nCLUE dev accuracy (%), the layout of the paper's Table 3 (paper rows: large models, full data):")
    print(table3({n: r["accuracy"] for n, r in results["tasks"].items()}, {n: TASKS[n].title for n in names}, label))
    print(f"{machine_line(results['machine'])}\nwrote {out}/results.json, <task>/dev_predictions.jsonl"
          + (f", submission/ ({sum(len(r['submission']) for r in results['tasks'].values())} files)"
             if not args.no_test else ""))
    return results


def main(argv: Optional[list[str]] = None) -> int:
    from megatron_cmbert.cli import run_tool

    return run_tool(run, argv)


if __name__ == "__main__":
    sys.exit(main())
