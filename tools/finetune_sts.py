#!/usr/bin/env python3
"""Contrastive fine-tuning for sentence similarity (the paper's §4.3 protocol), saved as a sentence-transformers model.

    python tools/finetune_sts.py --load ckpt --train simclue_train.jsonl --eval sts_dev.jsonl --output-dir runs/sts
    python tools/finetune_sts.py --hf some_hf_dir --train simclue_train.jsonl --qp t2ranking.jsonl --mix-ratio 0.3 \\
        --eval sts_dev.jsonl --output-dir runs/sts_mix

--train: sentence pairs in the SimCLUE format ({"sentence1", "sentence2", "label"}; rows labelled other than 1
are not positives and are skipped). --qp: query-passage pairs (T2Ranking style {"query", "passage"}) mixed
in so that they make --mix-ratio of the training pairs. Loss: InfoNCE with in-batch negatives at
--temperature over mean-pooled, L2-normalised embeddings. --eval: pairs with a gold score ({"sentence1",
"sentence2", "label": number}); reports Pearson and Spearman between cosine similarity and the scores,
before and after training. The result is written to OUTPUT_DIR/model as a sentence-transformers model
(ours through the Hugging Face export, checked against our model before it appears; HF models with
save_pretrained) and OUTPUT_DIR/results.json.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    from megatron_cmbert.eval.encoders import add_encoder_args

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_encoder_args(p)
    p.add_argument("--train", required=True, help="SimCLUE-format pairs (sentence1, sentence2[, label])")
    p.add_argument("--qp", default=None, help="query-passage pairs (query, passage) to mix in")
    p.add_argument("--mix-ratio", type=float, default=0.0, help="share of --qp pairs in training (default 0)")
    p.add_argument("--eval", required=True, help="scored pairs (sentence1, sentence2, label = a number)")
    p.add_argument("--output-dir", required=True, help="model/ (sentence-transformers) and results.json")
    p.add_argument("--epochs", type=int, default=1, help="default 1")
    p.add_argument("--lr", type=float, default=2e-5, help="peak LR, linear warmup 10%% then decay (default 2e-5)")
    p.add_argument("--batch-size", type=int, default=64, help="pairs per batch = 1 positive + batch-1 negatives each")
    p.add_argument("--temperature", type=float, default=0.05, help="InfoNCE temperature (default 0.05)")
    p.add_argument("--max-length", type=int, default=256, help="tokens per text (default 256)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if not 0 <= args.mix_ratio < 1 or (args.mix_ratio and not args.qp):
        p.error("--mix-ratio must be in [0, 1) and needs --qp")
    return args


def training_pairs(args) -> list[tuple[str, str]]:
    from megatron_cmbert.finetune.sts import read_pairs

    pairs = read_pairs(args.train, "sentence1", "sentence2", positives_only=True)
    if args.qp and args.mix_ratio:
        qp = read_pairs(args.qp, "query", "passage")
        pairs = pairs + qp[:round(args.mix_ratio * len(pairs) / (1 - args.mix_ratio))]
    return pairs


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


def run(args) -> dict:
    from tqdm import tqdm

    from megatron_cmbert.eval.encoders import encoder_from_args
    from megatron_cmbert.eval.report import machine, write_json
    from megatron_cmbert.finetune.sts import evaluate, read_pairs, train_contrastive

    pairs = training_pairs(args)
    scored = read_pairs(args.eval, "sentence1", "sentence2", score="label")
    encoder = encoder_from_args(args)
    before = evaluate(encoder, scored, args.max_length)
    print(f"before: Pearson {before['pearson']:.4f}, Spearman {before['spearman']:.4f} on {len(scored)} pairs")
    bar = tqdm(total=args.epochs * -(-len(pairs) // args.batch_size), desc="contrastive",
               disable=args.no_progress or None, dynamic_ncols=True)
    losses = train_contrastive(encoder, pairs, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                               temperature=args.temperature, max_length=args.max_length, seed=args.seed,
                               progress=bar)
    bar.close()
    after = evaluate(encoder, scored, args.max_length)
    print(f"after:  Pearson {after['pearson']:.4f}, Spearman {after['spearman']:.4f} (InfoNCE per epoch: "
          f"{', '.join(f'{x:.4f}' for x in losses)})")
    os.makedirs(args.output_dir, exist_ok=True)
    save_model(encoder, os.path.join(args.output_dir, "model"), args.max_length)
    results = {"encoder": encoder.name, "train_pairs": len(pairs), "mix_ratio": args.mix_ratio,
               "temperature": args.temperature, "lr": args.lr, "batch_size": args.batch_size, "epochs": args.epochs,
               "loss_per_epoch": losses, "before": before, "after": after, "machine": machine(args.device)}
    write_json(results, os.path.join(args.output_dir, "results.json"))
    print(f"wrote {args.output_dir}/model (sentence-transformers) and results.json")
    return results


def main(argv: Optional[list[str]] = None) -> int:
    from megatron_cmbert.eval.encoders import EncoderError
    from megatron_cmbert.eval.report import run_quietly
    from megatron_cmbert.finetune.clue import ClueDataError
    from megatron_cmbert.hf import ConversionError

    errors = (EncoderError, ClueDataError, ConversionError, OSError)
    return 2 if run_quietly(run, parse_args(argv), errors) is None else 0


if __name__ == "__main__":
    sys.exit(main())
