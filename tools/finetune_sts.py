#!/usr/bin/env python3
"""Contrastive fine-tuning for sentence similarity (the paper's §4.3, Table 6), saved as a sentence-transformers model.

    python tools/finetune_sts.py --load ckpt --train simclue/train_pair.json simclue/train_rank.json \\
        --eval simclue/dev.json --test simclue/test_public.json --output-dir runs/sts          # SimCLUE only
    python tools/finetune_sts.py --hf some_hf_dir --train simclue/train_pair_postive.json --t2ranking t2ranking \\
        --mix-ratio 0.4 --eval simclue/dev.json --test simclue/test_public.json --output-dir runs/sts_mix

--train: SimCLUE training files as released (megatron_cmbert/finetune/sts_data.py): train_pair.json
({"sentence1", "sentence2", "label"}: the rows labelled 1 are the positives, the others are counted and left
out), train_pair_postive.json ({"query", "title"}), train_rank.json ({"query", "title", "neg_title"}: the
neg_title is a hard negative in the InfoNCE batch; --no-hard-negatives ignores it). Query-passage pairs are
mixed in by --mix-ratio R so that they make R of the training pairs (drawn by --seed): --t2ranking DIR joins
T2Ranking's queries.<split>.tsv, qrels.retrieval.<split>.tsv and collection.tsv (--t2ranking-splits, default
train); --qp FILE reads {"query", "passage"} JSON lines. --qp or --t2ranking without --mix-ratio is an error.

Loss: InfoNCE at --temperature over mean-pooled, L2-normalised embeddings; each a_i is scored against every b_j
of the batch and every hard negative of the batch, its own b_i the target. --eval (SimCLUE dev.json) and --test
(test_public.json, the paper's Table 6 set): {"sentence1", "sentence2", "label": a number}; Pearson and
Spearman between cosine similarity and the label, before and after training. Prints a table in the layout of
the paper's Table 6 with the paper's rows. Writes OUTPUT_DIR/results.json and OUTPUT_DIR/model, a
sentence-transformers model (ours through the Hugging Face export, checked against our model before it
appears; HF models with save_pretrained), each by rename.
"""
from __future__ import annotations

import os
import sys
from typing import Optional

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_parser():
    from megatron_cmbert.cli import ToolParser
    from megatron_cmbert.eval.encoders import add_encoder_args

    p = ToolParser(prog="finetune_sts.py", description=__doc__)
    add_encoder_args(p)
    p.add_argument("--train", nargs="+", required=True,
                   help="SimCLUE training file(s): train_pair.json, train_pair_postive.json, train_rank.json")
    p.add_argument("--no-hard-negatives", action="store_true", help="ignore train_rank.json's neg_title")
    p.add_argument("--t2ranking", default=None, metavar="DIR",
                   help="a T2Ranking folder (collection.tsv, queries.<split>.tsv, qrels.retrieval.<split>.tsv) "
                        "whose query-passage pairs are mixed in by --mix-ratio")
    p.add_argument("--t2ranking-splits", nargs="+", default=["train"], metavar="SPLIT",
                   help="which T2Ranking splits to join (default train)")
    p.add_argument("--qp", default=None, metavar="FILE", help="query-passage pairs ({\"query\", \"passage\"} JSON "
                   "lines) mixed in by --mix-ratio")
    p.add_argument("--mix-ratio", type=float, default=None,
                   help="share of the training pairs that are query-passage pairs (needed with --qp / --t2ranking)")
    p.add_argument("--eval", required=True, help="scored pairs (SimCLUE dev.json: sentence1, sentence2, label)")
    p.add_argument("--test", default=None, help="scored pairs for the Table 6 figure (SimCLUE test_public.json)")
    p.add_argument("--output-dir", required=True, help="model/ (sentence-transformers) and results.json")
    p.add_argument("--no-save", action="store_true", help="do not write OUTPUT_DIR/model (results.json only)")
    p.add_argument("--epochs", type=int, default=1, help="default 1")
    p.add_argument("--lr", type=float, default=2e-5, help="peak LR, linear warmup 10%% then decay (default 2e-5)")
    p.add_argument("--batch-size", type=int, default=64, help="pairs per batch: each a_i's negatives are the other "
                   "b_j and the batch's hard negatives (default 64)")
    p.add_argument("--temperature", type=float, default=0.05, help="InfoNCE temperature (default 0.05)")
    p.add_argument("--max-length", type=int, default=256, help="tokens per text (default 256)")
    p.add_argument("--seed", type=int, default=0, help="data order, dropout and which query-passage pairs are drawn")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    return p


def check_args(args) -> None:
    from megatron_cmbert.cli import UsageError

    sources = args.qp or args.t2ranking
    if sources and args.mix_ratio is None:
        raise UsageError("--qp / --t2ranking are mixed in by --mix-ratio R (their share of the training pairs); "
                         "give --mix-ratio")
    if args.mix_ratio is not None and not sources:
        raise UsageError("--mix-ratio needs query-passage pairs: --t2ranking DIR or --qp FILE")
    if args.mix_ratio is not None and not 0 < args.mix_ratio < 1:
        raise UsageError(f"--mix-ratio must be in (0, 1), got {args.mix_ratio}")
    if args.epochs < 1 or args.batch_size < 2 or args.max_length < 4 or not args.temperature > 0:
        raise UsageError("--epochs at least 1, --batch-size at least 2, --max-length at least 4, --temperature > 0")


def training_pairs(args):
    """(pairs, counts): the SimCLUE positives, then the query-passage pairs mixed in."""
    from megatron_cmbert.finetune.sts_data import mix_query_passage, read_training_pairs

    files = [read_training_pairs(path, not args.no_hard_negatives) for path in args.train]
    pairs = [p for f in files for p in f.pairs]
    counts = {"simclue": {f.path: {"rows": f.rows, "positives": len(f.pairs), "not_positive": f.not_positive,
                                   "hard_negatives": f.hard_negatives} for f in files},
              "simclue_pairs": len(pairs)}
    if args.mix_ratio is not None:
        mix = mix_query_passage(len(pairs), args.mix_ratio, args.seed, args.qp, args.t2ranking, args.t2ranking_splits)
        counts["query_passage"] = {"available": mix.available, "wanted": mix.wanted, "used": len(mix.pairs),
                                   "ratio": len(mix.pairs) / (len(pairs) + len(mix.pairs))}
        if len(mix.pairs) < mix.wanted:
            print(f"note: --mix-ratio {args.mix_ratio} wants {mix.wanted:,} query-passage pairs, {mix.available:,} "
                  f"exist: all are used (ratio {counts['query_passage']['ratio']:.3f})")
        pairs = pairs + mix.pairs
    counts["train_pairs"] = len(pairs)
    return pairs, counts


def save_model(encoder, out: str, max_length: int) -> None:
    """A sentence-transformers directory at `out` (mean pooling, normalised), by rename."""
    import types

    from megatron_cmbert.hf.sentence import write_sentence_transformers

    if encoder.kind == "ours":
        from megatron_cmbert.hf.export import export_loaded
        from megatron_cmbert.checkpoint import RunRecord, TrainState
        from megatron_cmbert.checkpoint.reader import Checkpoint

        ck = Checkpoint(path=encoder.name, record=RunRecord(model=encoder.config, seq_length=max_length,
                                                            stage="contrastive fine-tuning"), state=TrainState(),
                        state_dict={k: v.detach().float().cpu() for k, v in encoder.mlm.state_dict().items()},
                        tokenizer_dir=encoder.tokenizer_dir)
        export_loaded(ck, out, sentence_transformers=True, log=lambda *_: None)
        return
    from megatron_cmbert.eval.report import write_atomic

    def write(tmp):
        os.remove(tmp)
        encoder.backbone.save_pretrained(tmp)
        encoder.tokenizer.save_pretrained(tmp)
        write_sentence_transformers(tmp, types.SimpleNamespace(
            config=types.SimpleNamespace(hidden_size=encoder.hidden_size), seq_length=max_length))
    write_atomic(out, write)


def backbone(encoder) -> str:
    if encoder.kind == "ours":
        return f"ModernBERT (ours, trained at {encoder.max_length})"
    return f"{getattr(encoder.config, 'model_type', 'hf')} (max {encoder.max_length})"


def run(argv: Optional[list[str]] = None) -> dict:
    from megatron_cmbert.cli import Progress
    from megatron_cmbert.eval.encoders import encoder_from_args
    from megatron_cmbert.eval.report import machine, machine_line, write_json
    from megatron_cmbert.finetune.paper import table6
    from megatron_cmbert.finetune.sts import evaluate, train_contrastive
    from megatron_cmbert.finetune.sts_data import read_scored_pairs

    args = build_parser().parse_args(argv)
    check_args(args)
    pairs, counts = training_pairs(args)
    sets = {"eval": read_scored_pairs(args.eval)}
    if args.test:
        sets["test"] = read_scored_pairs(args.test)
    qp = counts.get("query_passage", {}).get("used", 0)
    hard = sum(f["hard_negatives"] for f in counts["simclue"].values())
    print(f"training pairs: {counts['simclue_pairs']:,} SimCLUE positives ({hard:,} with a hard negative)"
          + (f" + {qp:,} query-passage" if args.mix_ratio is not None else ""))
    encoder = encoder_from_args(args)
    before = {k: evaluate(encoder, v, args.max_length) for k, v in sets.items()}
    steps = args.epochs * -(-len(pairs) // args.batch_size)
    with Progress(steps, "contrastive", "steps", disable=args.no_progress) as bar:
        losses = train_contrastive(encoder, pairs, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                                   temperature=args.temperature, max_length=args.max_length, seed=args.seed,
                                   progress=bar)
    after = {k: evaluate(encoder, v, args.max_length) for k, v in sets.items()}
    for k in sets:
        name = args.eval if k == "eval" else args.test
        print(f"{name}: Pearson {before[k]['pearson']:.4f} -> {after[k]['pearson']:.4f}, Spearman "
              f"{before[k]['spearman']:.4f} -> {after[k]['spearman']:.4f} ({before[k]['pairs']:,} pairs)")
    print(f"InfoNCE per epoch: {', '.join(f'{x:.4f}' for x in losses)}")
    os.makedirs(args.output_dir, exist_ok=True)
    if not args.no_save:
        if args.no_progress:  # the export's check reloads the model: transformers' own "Loading weights" bars
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        save_model(encoder, os.path.join(args.output_dir, "model"), args.max_length)
    results = {"encoder": encoder.name, **counts, "hard_negatives_used": not args.no_hard_negatives,
               "mix_ratio": args.mix_ratio, "t2ranking": args.t2ranking, "t2ranking_splits": args.t2ranking_splits,
               "qp": args.qp, "temperature": args.temperature, "lr": args.lr, "batch_size": args.batch_size,
               "epochs": args.epochs, "max_length": args.max_length, "seed": args.seed, "loss_per_epoch": losses,
               "eval_file": args.eval, "before": before["eval"], "after": after["eval"], "machine": machine(args.device)}
    if args.test:
        results.update(test_file=args.test, test={"before": before["test"], "after": after["test"]})
    write_json(results, os.path.join(args.output_dir, "results.json"))
    key = "test" if args.test else "eval"
    data = "SimCLUE" + (" + T2Ranking" if args.t2ranking else "") + (" + query-passage" if args.qp else "")
    name = os.path.basename(os.path.normpath(encoder.name))
    rows = [(f"this run: {name} ({data})", f"{len(pairs):,}", backbone(encoder), after[key]["pearson"],
             after[key]["spearman"]),
            (f"this run: {name}, before fine-tuning", "0", backbone(encoder), before[key]["pearson"],
             before[key]["spearman"])]
    print(f"\nSTS on {args.test or args.eval} (the paper's rows: SimCLUE test), the layout of the paper's Table 6:")
    print(table6(rows))
    print(machine_line(results["machine"]))
    print(f"wrote {args.output_dir}/results.json" + ("" if args.no_save else " and model/ (sentence-transformers)"))
    return results


def main(argv: Optional[list[str]] = None) -> int:
    from megatron_cmbert.cli import run_tool

    return run_tool(run, argv)


if __name__ == "__main__":
    sys.exit(main())
