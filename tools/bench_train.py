#!/usr/bin/env python3
"""Training throughput of the real pretraining path: tokens/s, model TFLOP/s and MFU per sequence length
(Stage I at 1,024, Stage II at 8,192) and per kernel setting, side by side in one run, each row in its own
`tools/pretrain.py` process on an existing indexed dataset.

    python tools/bench_train.py --tokenizer-model tok --data-path data/corpus_text_document --bf16 \
        --kernels reference triton triton,attention=flex --compile both
        # large preset, seq 1024 and 8192, 32,768 tokens per step, 10 warm-up + 20 timed steps per row
    python tools/bench_train.py --tokenizer-model tok --data-path data/corpus_text_document --smoke   # CI, CPU

Timing and FLOPs come from the trainer's own meter (megatron_cmbert/training/meter.py): the warm-up steps
(compilation, autotuning, allocator growth) are one logging interval that is dropped, the timed steps the
next. Model FLOPs are the meter's model_flops over the real documents (attention per document, local
layers capped at the window; 3x forward); MFU divides by the dense datasheet peak (none on CPU or in fp32).
Each row prints the kernels that actually ran (resolved by pretrain for the device). Baseline measured in
the same run: a dense matmul of the FFN input projection's shape (tokens x hidden @ hidden x 2*ffn) at the
same dtype on the same device; the ratio says how much of that the whole training step keeps. Exit status
1 when any row failed (its error is in the table and the JSON). Other pretrain flags (e.g.
--tensor-model-parallel-size under torchrun) pass through after `--`.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Optional

from megatron_cmbert.cli import ToolParser, run_tool

HERE = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv: Optional[list[str]]) -> tuple[argparse.Namespace, list[str]]:
    p = ToolParser(description=__doc__)
    p.add_argument("--tokenizer-model", required=True, help="tokenizer directory (tools/train_tokenizer.py)")
    p.add_argument("--data-path", required=True, help="PREFIX_text_document to train on (looped as needed)")
    p.add_argument("--preset", default=None, help="model preset (default large; tiny with --smoke)")
    p.add_argument("--seq-lengths", type=int, nargs="+", default=None, help="default 1024 8192 (64 128 with --smoke)")
    p.add_argument("--tokens-per-step", type=int, default=None,
                   help="tokens per optimizer step, one micro-batch (default 32,768: batch 32 at 1k, 4 at 8k; "
                        "1,024 with --smoke)")
    p.add_argument("--warmup-steps", type=int, default=None, help="steps before timing (default 10; 2 with --smoke)")
    p.add_argument("--timed-steps", type=int, default=None, help="steps timed (default 20; 2 with --smoke)")
    p.add_argument("--bf16", action="store_true", help="bf16 activations under autocast, as on a GPU")
    p.add_argument("--kernels", nargs="+", default=["auto"], metavar="SPEC",
                   help="kernel settings, one row each per length (e.g. reference triton triton,attention=flex; "
                        "default auto)")
    p.add_argument("--compile", choices=("off", "on", "both"), default="off",
                   help="torch.compile each encoder layer: off, on, or both (a row of each; default off)")
    p.add_argument("--timeout", type=float, default=0, help="seconds per length before it is abandoned (0: none)")
    p.add_argument("--smoke", action="store_true", help="small defaults for CI on CPU (tiny preset, short runs)")
    p.add_argument("--output-json", default=None, help="write the figures here")
    ours, passthrough = list(argv if argv is not None else sys.argv[1:]), []
    if "--" in ours:
        i = ours.index("--")
        ours, passthrough = ours[:i], ours[i + 1:]
    args = p.parse_args(ours)
    defaults = dict(preset="tiny", seq_lengths=[64, 128], tokens_per_step=1024, warmup_steps=2, timed_steps=2) \
        if args.smoke else dict(preset="large", seq_lengths=[1024, 8192], tokens_per_step=32768, warmup_steps=10,
                                timed_steps=20)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for seq in args.seq_lengths:
        if seq <= 0 or args.tokens_per_step % seq:
            p.error(f"--tokens-per-step {args.tokens_per_step} is not a whole number of {seq}-token samples")
    if args.warmup_steps < 1 or args.timed_steps < 1 or args.timed_steps % args.warmup_steps and \
            args.warmup_steps % args.timed_steps:
        p.error("--warmup-steps and --timed-steps must be >= 1 and one must divide the other")
    return args, passthrough


def timed_rate(records: list[dict], warmup_steps: int) -> dict:
    """Tokens/s (and MFU, TFLOP/s per device) over the logged intervals after `warmup_steps`. Intervals carry
    (about) equal tokens, so the rate over all of them is the harmonic mean of theirs (total tokens / total
    time); FLOP rates are total FLOPs over total time, i.e. each interval's rate weighted by its time."""
    timed = [r for r in records if "tokens_per_s" in r and r["step"] > warmup_steps]
    if not timed:
        raise ValueError(f"no logged interval after step {warmup_steps}")
    time_per_token = [1 / r["tokens_per_s"] for r in timed]
    out = {"tokens_per_s": len(timed) / sum(time_per_token)}
    for key in ("mfu", "tflops_per_device"):
        if all(key in r for r in timed):
            out[key] = sum(r[key] * t for r, t in zip(timed, time_per_token)) / sum(time_per_token)
    return out


def matmul_rate(tokens: int, hidden: int, ffn: int, bf16: bool) -> tuple[float, str]:
    """FLOP/s of tokens x hidden @ hidden x 2*ffn on this process's device, median of 5 after warm-up."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if bf16 else torch.float32
    a = torch.randn(tokens, hidden, device=device, dtype=dtype)
    b = torch.randn(hidden, 2 * ffn, device=device, dtype=dtype)
    times = []
    for k in range(8):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        if k >= 3:
            times.append(time.perf_counter() - start)
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    return 2.0 * tokens * hidden * 2 * ffn / sorted(times)[len(times) // 2], name


def run_row(args, passthrough: list[str], seq: int, kernels: str, compiled: bool, workdir: str) -> dict:
    steps = args.warmup_steps + args.timed_steps
    batch = args.tokens_per_step // seq
    tag = f"{seq}_{re.sub(r'[^A-Za-z0-9]+', '-', kernels)}_{int(compiled)}"
    metrics = os.path.join(workdir, f"metrics_{tag}.jsonl")
    row = {"seq_length": seq, "micro_batch_size": batch, "kernels": kernels, "compile": compiled}
    cmd = [sys.executable, os.path.join(HERE, "pretrain.py"), "--preset", args.preset,
           "--tokenizer-model", args.tokenizer_model, "--data-path", args.data_path, "--split", "100,0,0",
           "--seq-length", str(seq), "--micro-batch-size", str(batch), "--global-batch-size", str(batch),
           "--train-iters", str(steps), "--lr-warmup-iters", "1", "--log-interval",
           str(min(args.warmup_steps, args.timed_steps)), "--metrics-file", metrics,
           "--data-cache-path", os.path.join(workdir, "cache"), "--kernels", kernels,
           *(["--bf16"] if args.bf16 else []), *(["--compile"] if compiled else []), *passthrough]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout or None)
    except subprocess.TimeoutExpired:
        return {**row, "error": f"timed out after {args.timeout:.0f} s"}
    ran = re.search(r"^\s*kernels \((\w+)\): (\S+)", proc.stdout, flags=re.M)
    if ran:
        row["kernels_ran"] = ran.group(2)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {**row, "error": " | ".join(tail)}
    with open(metrics, encoding="utf-8") as fh:
        records = [json.loads(line) for line in fh if line.strip()]
    timed = [r for r in records if "mask_rate" in r and r["step"] > args.warmup_steps]
    mask_rate = sum(r["mask_rate"] for r in timed) / max(1, len(timed))
    return {**row, "mask_rate": mask_rate, **timed_rate(records, args.warmup_steps)}


def run(argv: Optional[list[str]] = None) -> dict:
    """Every row's figures (a failed row holds its error)."""
    args, passthrough = parse_args(argv)
    from megatron_cmbert.data.tokenizer import load_tokenizer
    from megatron_cmbert.eval.report import write_json
    from megatron_cmbert.model.config import get_preset

    config = get_preset(args.preset, vocab_size=load_tokenizer(args.tokenizer_model).get_vocab_size())
    matmul, device = matmul_rate(args.tokens_per_step, config.hidden_size, config.ffn_hidden_size, args.bf16)
    compile_modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    results = {"device": device, "preset": args.preset, "bf16": args.bf16, "tokens_per_step": args.tokens_per_step,
               "warmup_steps": args.warmup_steps, "timed_steps": args.timed_steps, "pretrain_flags": passthrough,
               "baseline_matmul_flops_per_s": matmul, "runs": []}
    print(f"machine: {device}; preset {args.preset}, {'bf16' if args.bf16 else 'fp32'}, "
          f"{args.tokens_per_step:,} tokens per step, {args.warmup_steps} warm-up + {args.timed_steps} timed steps")
    print(f"baseline: {args.tokens_per_step} x {config.hidden_size} @ {config.hidden_size} x "
          f"{2 * config.ffn_hidden_size} matmul, {matmul / 1e12:.2f} TFLOP/s")
    print(f"{'seq':>6} {'batch':>6} {'compile':>7} {'tok/s':>12} {'MFU':>7} {'TFLOP/s':>9} {'vs matmul':>10}  kernels ran")
    with tempfile.TemporaryDirectory() as workdir:
        for seq in args.seq_lengths:
            for kernels in args.kernels:
                for compiled in compile_modes:
                    row = run_row(args, passthrough, seq, kernels, compiled, workdir)
                    head = f"{seq:>6} {row['micro_batch_size']:>6} {'yes' if compiled else 'no':>7}"
                    if "error" not in row:
                        row["model_flops_per_s"] = row["tflops_per_device"] * 1e12  # one process per row
                        row["ratio_to_matmul"] = row["model_flops_per_s"] / matmul
                        mfu = f"{100 * row['mfu']:.1f}%" if "mfu" in row else "n/a"
                        print(f"{head} {row['tokens_per_s']:>12,.0f} {mfu:>7} {row['tflops_per_device']:>9.3f} "
                              f"{row['ratio_to_matmul']:>9.2f}x  {row.get('kernels_ran', '?')}", flush=True)
                    else:
                        print(f"{head}  error ({kernels}): {row['error']}", flush=True)
                    results["runs"].append(row)
                    if args.output_json:  # after every row: a run cut short keeps what it measured
                        write_json(results, args.output_json)
    return results


def main(argv: Optional[list[str]] = None) -> int:
    """0 when every row ran; 1 when any failed (the rows this benchmark exists for)."""
    results: dict = {}
    code = run_tool(lambda a: results.update(run(a)), argv)
    return code or (1 if any("error" in r for r in results.get("runs", [])) else 0)


if __name__ == "__main__":
    sys.exit(main())
