#!/usr/bin/env python3
"""Pseudo-perplexity (PPPL) of a masked LM on held-out text at several lengths: the Stage II monitor.

    python tools/eval_pppl.py --load CKPT --data-prefix PREFIX_text_document --split 98,2,0 --split-part valid
    python tools/eval_pppl.py --hf HF_DIR --input held_out.jsonl --lengths 128 512 --unit token --max-units 200

Held-out text: an indexed dataset (--data-prefix, the ids and whole-word flags tools/preprocess_data.py
wrote; --split/--split-part pick training's validation documents) or a jsonl file (--input, tokenized here;
word units from rjieba word spans and the tokenizer's offsets, for any tokenizer). Documents are joined in
order into one token stream; its first --pool-tokens tokens (the same text at every length) are cut into
consecutive windows of LENGTH - 2 tokens, each run as [CLS] window [SEP]. Each whole word (--unit word) or
token (--unit token) is masked in turn in its own copy of its window, many copies packed per forward;
--max-units N scores N units per length, picked by a seeded key of their position in the stream, so every
length scores nearly the same tokens with more or less context. PPPL = exp(mean NLL over masked tokens);
the 95% interval is a percentile bootstrap over units. A model trained at 1k shows where it degrades
beyond 1k; Stage II should flatten that curve. Lengths past a model's learned position table (BERT) are
reported as N/A; rotary models (ours) run past their trained length (an HF model's max_position_embeddings),
marked in the table and by a dashed line in the plot.

Writes --output-json (results) and --plot (PPPL against length, 95% intervals), each by rename when complete.
As each length is done its result is printed (one line) and appended to OUTPUT_JSON.partial (JSON lines,
the first line the settings), so a long or stopped run keeps what it measured; the .partial file is removed
when the final JSON is in place. Progress: a bar on a terminal, otherwise a line every 30 s.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional

from megatron_cmbert import cli

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
DEFAULT_LENGTHS = (128, 512, 1024, 2048, 4096, 8192)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    from megatron_cmbert.eval.encoders import add_encoder_args

    p = cli.ToolParser(prog="eval_pppl.py", description=__doc__)
    add_encoder_args(p)
    src = p.add_argument_group("held-out text (exactly one)").add_mutually_exclusive_group(required=True)
    src.add_argument("--data-prefix", help="an indexed dataset prefix (PREFIX.bin/.idx and PREFIX_wordstart) built "
                     "with the model's tokenizer")
    src.add_argument("--input", help="a jsonl file of documents (key --json-key)")
    p.add_argument("--json-key", default="text", help="jsonl field holding the text (default text)")
    p.add_argument("--split", default=None, help="with --data-prefix: training's --split, e.g. 98,2,0 (default: "
                   "all documents)")
    p.add_argument("--split-part", choices=("train", "valid", "test"), default="valid",
                   help="which part of --split is held out (default valid)")
    p.add_argument("--lengths", type=int, nargs="+", default=list(DEFAULT_LENGTHS),
                   help=f"window lengths in tokens, [CLS]/[SEP] included (default {' '.join(map(str, DEFAULT_LENGTHS))})")
    p.add_argument("--unit", choices=("word", "token"), default="word", help="what is masked in turn (default word)")
    p.add_argument("--max-units", type=int, default=256, help="units scored per length; 0 = every unit (default 256)")
    p.add_argument("--pool-tokens", type=int, default=None,
                   help="held-out tokens cut into windows at every length (default 2 x (largest length - 2))")
    p.add_argument("--tokens-per-forward", type=int, default=16384,
                   help="masked copies packed per forward, in tokens (default 16384; at least one window)")
    p.add_argument("--segmenter", choices=("rjieba", "jieba"), default="rjieba", help="word spans for --input")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% interval (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="unit selection and bootstrap seed (default 0)")
    p.add_argument("--output-json", default="pppl.json", help="results file (default pppl.json)")
    p.add_argument("--plot", default=None, help="PNG of PPPL against length (default: --output-json with .png)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines on stderr")
    args = p.parse_args(argv)
    if any(n < 3 for n in args.lengths):
        p.error("--lengths must be at least 3 ([CLS] token [SEP])")
    return args


def held_out(args, encoder, pool_tokens: int):
    from megatron_cmbert.data.dataset_checks import check_data_prefix, check_dataset_tokenizer
    from megatron_cmbert.data.pretrain_data import split_ranges
    from megatron_cmbert.eval.pppl import PPPLError, stream_from_prefix, stream_from_texts

    if args.data_prefix:
        check_data_prefix(args.data_prefix)
        if not encoder.tokenizer_dir or not os.path.isfile(os.path.join(encoder.tokenizer_dir, "tokenizer.json")):
            raise PPPLError(f"{args.data_prefix}: an indexed dataset holds our tokenizer's ids, and {encoder.name} "
                            f"has no tokenizer.json to check it against; give --input JSONL instead")
        check_dataset_tokenizer(args.data_prefix, encoder.tokenizer_dir)
        doc_range = None
        if args.split:
            from megatron_cmbert.data.pretrain_data import TokenDataset

            n_docs = len(TokenDataset(args.data_prefix).lengths)
            doc_range = split_ranges(args.split, n_docs)[("train", "valid", "test").index(args.split_part)]
            if doc_range[0] == doc_range[1]:
                raise PPPLError(f"--split {args.split}: the {args.split_part} part of {args.data_prefix} is empty")
        return stream_from_prefix(args.data_prefix, pool_tokens, doc_range)
    from megatron_cmbert.data.jsonl import get_text, iter_records

    if not os.path.isfile(args.input):
        raise PPPLError(f"{args.input}: no such file")
    from megatron_cmbert.data.jsonl import check_readable

    check_readable(args.input)
    texts = (t for t, _ in (get_text(r, args.json_key) for r in iter_records([args.input])) if t)
    return stream_from_texts(texts, encoder.tokenizer, pool_tokens, segmenter=args.segmenter)


def plot(rows: list[dict], path: str, title: str, trained: int | None) -> None:
    import matplotlib

    from megatron_cmbert.eval.report import write_atomic

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r.get("pppl") is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    x = [r["length"] for r in done]
    y = [r["pppl"] for r in done]
    err = [[r["pppl"] - r["ci95"][0] for r in done], [r["ci95"][1] - r["pppl"] for r in done]]
    ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label="PPPL (95% bootstrap interval)")
    if trained:
        ax.axvline(trained, color="grey", linestyle="--", label=f"trained length {trained}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(x, [str(v) for v in x])
    ax.set_xlabel("window length (tokens)")
    ax.set_ylabel("pseudo-perplexity")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


class PartialResults:
    """OUTPUT_JSON.partial: the settings, then one JSON line per finished length (appended, flushed)."""

    def __init__(self, output_json: str, settings: dict):
        self.path = output_json + ".partial"
        if os.path.exists(self.path):
            print(f"{self.path}: partial results of an earlier run that did not finish; replaced by this run's",
                  file=sys.stderr)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self.fh = open(self.path, "w", encoding="utf-8")
        self._write({"settings": settings})
        self.start = time.monotonic()

    def _write(self, row: dict) -> None:
        self.fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.fh.flush()

    def add(self, result) -> None:
        self._write(result.as_dict())
        print(f"PPPL @ {result.length}: {result.pppl:.3f} [{result.ci95[0]:.3f}, {result.ci95[1]:.3f}] over "
              f"{result.units} units ({time.monotonic() - self.start:.0f} s so far; in {self.path})",
              file=sys.stderr, flush=True)

    def done(self) -> None:
        self.fh.close()
        os.remove(self.path)


def evaluate(args):
    """(the report, its PartialResults: removed by the caller once the final JSON is written)."""
    from megatron_cmbert.eval.encoders import encoder_from_args
    from megatron_cmbert.eval.pppl import encoder_nll_fn, evaluate_lengths
    from megatron_cmbert.eval.report import machine

    encoder = encoder_from_args(args).eval()
    lengths = sorted(set(args.lengths))
    limit = encoder.length_limit()
    runnable = [n for n in lengths if limit is None or n <= limit]
    pool = args.pool_tokens or 2 * (max(runnable or lengths) - 2)
    tokens, flags = held_out(args, encoder, pool)
    tok = encoder.tokenizer
    bar = lambda total, n: cli.Progress(total, f"PPPL @ {n}", "units", disable=args.no_progress)  # noqa: E731
    partial = PartialResults(args.output_json, {
        "model": encoder.name, "held_out": args.data_prefix or args.input, "unit": args.unit,
        "max_units": args.max_units, "lengths": runnable, "pool_tokens": int(len(tokens)), "seed": args.seed})
    results = evaluate_lengths(encoder_nll_fn(encoder), tokens, flags, runnable, cls_id=tok.cls_token_id,
                               sep_id=tok.sep_token_id, mask_id=tok.mask_token_id, unit=args.unit,
                               max_units=args.max_units or None, seed=args.seed, bootstrap=args.bootstrap,
                               progress_factory=bar, on_result=partial.add,
                               tokens_per_forward=max(args.tokens_per_forward, max(runnable or [1])),
                               device=encoder.device)
    by_length = {r.length: r.as_dict() for r in results}
    # ours: the trained --seq-length; hf: max_position_embeddings (our exports write the trained length there)
    trained = encoder.max_length
    rows = []
    for n in lengths:
        row = by_length.get(n) or {"length": n, "pppl": None, "reason": f"past the model's {limit} positions"}
        row["beyond_trained_length"] = bool(trained and n > trained)
        rows.append(row)
    return {"model": encoder.name, "kind": encoder.kind, "unit": args.unit, "max_units": args.max_units,
            "held_out": args.data_prefix or args.input, "split": args.split, "split_part": args.split_part if args.split else None,
            "pool_tokens": int(len(tokens)), "dtype": str(next(encoder.backbone.parameters()).dtype).replace("torch.", ""),
            "device": str(encoder.device), "trained_length": trained, "seed": args.seed,
            "interval": "95% percentile bootstrap over units", "machine": machine(encoder.device),
            "results": rows}, partial


def print_table(report: dict) -> None:
    from megatron_cmbert.eval.report import machine_line

    print(machine_line(report["machine"]))
    print(f"PPPL of {report['model']} ({report['kind']}, {report['dtype']}, {report['device']}), unit={report['unit']}, "
          f"pool {report['pool_tokens']} tokens of {report['held_out']}")
    first = report["results"][0]["length"]
    print(f"{'length':>7} {'windows':>7} {'units':>6} {'tokens':>7} {'PPPL':>11} {'95% CI':>23}"
          f" {'x PPPL@' + str(first) + ' (shared units, paired 95% CI)':>44}")
    for r in report["results"]:
        if r["pppl"] is None:
            print(f"{r['length']:>7} {'N/A':>7}   ({r['reason']})")
            continue
        note = "  (beyond trained length)" if r["beyond_trained_length"] else ""
        pair = r.get("vs_first")
        paired = "" if not pair else f"{pair['ratio']:.4f} [{pair['ci95'][0]:.4f}, {pair['ci95'][1]:.4f}] " \
                                     f"on {pair['shared_units']}"
        print(f"{r['length']:>7} {r['windows']:>7} {r['units']:>6} {r['masked_tokens']:>7} {r['pppl']:>11.3f} "
              f"[{r['ci95'][0]:>9.3f}, {r['ci95'][1]:>9.3f}] {paired:>44}{note}")


def run(argv: Optional[list[str]] = None) -> dict:
    """Evaluate; returns the report (also --output-json)."""
    from megatron_cmbert.eval.report import write_json

    args = parse_args(argv)
    report, partial = evaluate(args)
    print_table(report)
    write_json(report, args.output_json)
    partial.done()  # the final file is in place: the partial one has done its job
    png = args.plot or os.path.splitext(args.output_json)[0] + ".png"
    plot(report["results"], png, f"{report['model']} ({report['unit']} units)", report["trained_length"])
    print(f"wrote {args.output_json} and {png}")
    return report


def main(argv: Optional[list[str]] = None) -> int:
    return cli.run_tool(run, argv)


if __name__ == "__main__":
    sys.exit(main())
