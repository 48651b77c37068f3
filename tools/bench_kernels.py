"""Microbenchmark of the Triton kernels against their baselines, on the model's shapes.

    python tools/bench_kernels.py [--csv FILE] [--ops attention,rope,geglu,rms_norm] [--modes fwd,bwd,fwd_bwd]
    python tools/bench_kernels.py --ops attention --cases packed --impls triton,flex   # vs FlexAttention
    python tools/bench_kernels.py --smoke      # tiny shapes, CPU + Triton interpreter: checks the harness (CI)
    python tools/bench_kernels.py --attention-sweep   # + other attention launch settings vs the defaults

Each row: median time, achieved TFLOP/s (attention) or GB/s (the rest), percentage of the peak measured in
this same run (a large device copy, counting read + write bytes; a large bf16 matmul), and each baseline's
time over ours (>1 = we are faster). Baselines, when importable: the PyTorch reference eager and under
torch.compile, FlexAttention with a document + window block mask, flash-attn, torch.nn.RMSNorm, Liger.
The short table is printed last; --csv writes every row as it is timed.

Attention cases, per sequence length S (default 8192 then 1024) and window (global, +-64):
  packed  a training micro-batch of --tokens tokens: the bundled demo corpus's documents
          (examples/data/demo_corpus.jsonl) packed by the project's packer (data/packing.py) into samples of
          at most S tokens, as many samples as fit, then one padding sequence up to the budget and empty
          sequences up to tokens // 3 slots (the static shapes training runs with). Document lengths are
          tokens from --tokenizer DIR when given, else characters / 1.35: the corpus's chars per token under a
          32k tokenizer trained on it (598,229 characters, 443,375 tokens; the per-document ratio spans
          1.22-1.52 from the 10th to the 90th percentile, median length 55 vs 57, 99th percentile 1,032 vs 1,027);
  equal   --tokens // S sequences of exactly S tokens.
Every backend's plan (block masks, work lists) is built once per case outside the timed calls, as the model
builds one per micro-batch for all its layers; its build time is printed and written as a `plan` row.

Exit status 1 when a Triton row failed (the rows it exists for); a baseline that cannot run is reported.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

from megatron_cmbert.cli import ToolParser, run_tool
from megatron_cmbert.errors import ToolFailure

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CORPUS = os.path.join(ROOT, "examples", "data", "demo_corpus.jsonl")
CHARS_PER_TOKEN = 1.35  # demo corpus, 32k tokenizer trained on it (see the module docstring)
WINDOWS = ((-1, -1), (64, 64))  # the model's global and local (window 128 = +-64) layers
FIELDS = ["op", "case", "mode", "impl", "ms", "rate", "unit", "pct_peak", "speedup_vs_this"]
ATTENTION_IMPLS = ("triton", "flex", "reference", "flash_attn", "compiled_ref")


class Rows(list):
    """Result rows, kept for the table and appended to `<csv>.partial` as they are timed (a run cut short
    keeps what it measured); close() renames the file to its final name once the run is complete."""

    def __init__(self, path: str | None):
        super().__init__()
        self.path, self._fh, self._writer = path, None, None
        if path:
            self._fh = open(f"{path}.partial", "w", newline="")
            self._writer = csv.DictWriter(self._fh, fieldnames=FIELDS)
            self._writer.writeheader()

    def add(self, row: dict) -> None:
        self.append(row)
        if self._writer:
            self._writer.writerow(row)
            self._fh.flush()

    def close(self) -> None:
        if self._fh:
            self._fh.close()
            os.replace(f"{self.path}.partial", self.path)


# Launch settings --attention-sweep times against attention_triton's defaults, one kernel at a time. Each
# compiles for sm_90a without spilling (tools/compile_kernels.py's check, Triton 3.6); the dK/dV kernel's
# BLOCK_N and the dQ kernel's BLOCK_M are the rows it owns, BLOCK_N/BLOCK_M the other side it walks.
# (BLOCK_M, BLOCK_N, num_warps, num_stages): attention_triton.Blocks fields, kept as tuples so that importing
# this tool does not import Triton (its interpreter mode is fixed at that import).
SWEEP = {
    "fwd": [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 4, 4)],
    "dkdv": [(64, 128, 8, 2), (64, 64, 4, 3), (16, 128, 8, 3)],
    "dq": [(128, 32, 8, 2), (128, 64, 8, 2), (64, 64, 4, 3)],
}


def timer(device: str, smoke: bool):
    if device == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=25, rep=100, return_mode="median")

    def cpu(fn, reps=1 if smoke else 5):
        fn()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    return cpu


def peaks(device, bench, smoke):
    """(copy GB/s counting read + write, bf16 matmul TFLOP/s), both measured now."""
    n = 2 ** 16 if smoke else 2 ** 28
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    copy_gbs = 2 * src.numel() * 4 / bench(lambda: dst.copy_(src)) / 1e6
    m = 256 if smoke else 8192
    a, b = (torch.randn(m, m, device=device, dtype=torch.bfloat16) for _ in range(2))
    mm_tflops = 2 * m ** 3 / bench(lambda: a @ b) / 1e9
    del src, dst, a, b
    return copy_gbs, mm_tflops


def make_runner(fn, inputs, mode):
    """A no-argument callable timing `mode` of fn(*inputs): fwd, bwd (backward only) or fwd_bwd."""
    leaves = [t.detach().clone().requires_grad_(mode != "fwd" and t.is_floating_point()) for t in inputs]
    if mode == "fwd":
        def run():
            with torch.no_grad():
                fn(*leaves)
        return run
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    grads = [torch.randn_like(o) for o in outs]
    if mode == "bwd":
        return lambda: torch.autograd.backward(outs, grads, retain_graph=True)

    def run():
        fresh = fn(*leaves)
        torch.autograd.backward(fresh if isinstance(fresh, tuple) else (fresh,), grads)
    return run


def attention_impls(wanted, compile_ok):
    """{name: (plan(layout, window), attend(q, k, v, plan))} of the attention backends asked for: the registry's
    own two parts, so each is timed as the model runs it (plan once, attend per layer)."""
    from megatron_cmbert.kernels import attention_reference
    from megatron_cmbert.kernels.registry import REGISTRY

    impls = {}
    for name in wanted:
        if name == "compiled_ref":
            if compile_ok:  # opt-in: dynamo unrolls the reference's loop over documents, minutes at packed lengths
                impls[name] = (attention_reference.plan, torch.compile(attention_reference.attend, dynamic=False))
            continue
        entry = REGISTRY["attention", name]
        try:
            impls[name] = (entry.load_plan(), (lambda e: lambda q, k, v, p: e.load()(q, k, v, p))(entry))
        except ImportError as error:
            if name == "triton":
                raise
            print(f"  attention {name}: not importable ({error})")
    return impls


def corpus_lengths(path: str, tokenizer: str | None) -> tuple[np.ndarray, str]:
    """Document lengths in tokens of a jsonl corpus (field "text") and how they were obtained."""
    with open(path, encoding="utf-8") as fh:
        texts = [t for t in (json.loads(line).get("text") for line in fh if line.strip()) if t]
    if tokenizer:
        from megatron_cmbert.data.tokenizer import load_tokenizer

        encoded = load_tokenizer(tokenizer).encode_batch(texts, add_special_tokens=False)
        return np.array([len(e.ids) for e in encoded], dtype=np.int64), f"tokenized with {tokenizer}"
    lengths = np.maximum(1, np.rint(np.array([len(t) for t in texts]) / CHARS_PER_TOKEN)).astype(np.int64)
    return lengths, f"characters / {CHARS_PER_TOKEN}"


def packed_lengths(doc_lengths: np.ndarray, seq: int, budget: int, seed: int = 0) -> tuple[list[int], str]:
    """A micro-batch as training builds it (see the module docstring): lengths and a one-line description."""
    from megatron_cmbert.data.packing import pack_documents

    order = np.random.default_rng(seed).permutation(len(doc_lengths))
    pieces, offsets = pack_documents(doc_lengths, seq, order, min_piece=min(16, max(1, seq // 4)))
    samples = min(budget // seq, len(offsets) - 1)
    real = (pieces[:offsets[samples], 2] + 2).tolist()  # + [CLS] and [SEP] per piece
    pad = budget - sum(real)
    slots = max(budget // 3, len(real) + 1)
    lengths = real + [pad] + [0] * (slots - len(real) - 1)
    about = (f"{len(real)} sequences in {samples} samples (mean {np.mean(real):.0f}, max {max(real)} tokens), "
             f"1 padding sequence of {pad} tokens, {slots - len(real) - 1} empty")
    return lengths, about


def elementwise_impls(op, compile_ok):
    from megatron_cmbert.kernels import geglu_triton, rms_norm_triton, rope_triton

    module = {"rope": rope_triton, "geglu": geglu_triton, "rms_norm": rms_norm_triton}[op]
    impls = {"triton": getattr(module, f"{op}_triton"), "reference": getattr(module, f"{op}_reference")}
    if compile_ok:
        impls["compiled_ref"] = torch.compile(impls["reference"], dynamic=False)
    if op == "rms_norm":
        impls["torch.nn.RMSNorm"] = lambda x, w, eps: torch.nn.functional.rms_norm(x, (x.shape[-1],), w, eps)
        try:
            from liger_kernel.ops.rms_norm import LigerRMSNormFunction
            impls["liger"] = lambda x, w, eps: LigerRMSNormFunction.apply(x, w, eps)
        except ImportError:
            pass
    return impls


def cases(args, device, dtype):
    """(op, case label, inputs, work, unit, impls) with work in FLOPs per forward (attention) or bytes per mode."""
    from megatron_cmbert.kernels.varlen import PackedLayout
    from megatron_cmbert.model.padding import cu_seqlens_from_lengths

    tokens, heads, head_dim, hidden, ffn = (args.tokens, 16, 64, 1024, 2624)
    if args.smoke:
        tokens, heads, head_dim, hidden, ffn = 96, 2, 32, 48, 40
    size = torch.finfo(dtype).bits // 8
    compile_ok = not args.no_compile
    if "attention" in args.ops:
        yield from attention_cases(args, device, dtype, tokens, heads, head_dim, compile_ok)
    elw = []
    if "rope" in args.ops:
        cu = cu_seqlens_from_lengths([tokens // 2, tokens - tokens // 2], device=device)
        pos = PackedLayout.from_cu_seqlens(cu).positions
        qkv = torch.randn(tokens, heads, 3, head_dim, device=device, dtype=dtype)
        nbytes = 4 * tokens * heads * head_dim * size  # read q, k; write q', k' (per pass)
        impls = {n: (lambda f: lambda q, k: f(q, k, pos, 10_000.0))(f)
                 for n, f in elementwise_impls("rope", compile_ok).items()}
        elw.append(("rope", f"T={tokens} {heads}x{head_dim}", (qkv[:, :, 0], qkv[:, :, 1]),
                    {"fwd": nbytes, "bwd": nbytes, "fwd_bwd": 2 * nbytes}, impls))
    if "geglu" in args.ops:
        x = torch.randn(tokens, 2 * ffn, device=device, dtype=dtype)
        fwd, bwd = 3 * tokens * ffn * size, 5 * tokens * ffn * size  # fwd: x in, y out; bwd: x, dy in, dx out
        impls = {n: (lambda f: lambda x: f(x, True))(f) for n, f in elementwise_impls("geglu", compile_ok).items()}
        elw.append(("geglu", f"T={tokens} I={ffn}", (x,), {"fwd": fwd, "bwd": bwd, "fwd_bwd": fwd + bwd}, impls))
    if "rms_norm" in args.ops:
        x = torch.randn(tokens, hidden, device=device, dtype=dtype)
        w = torch.ones(hidden, device=device, dtype=dtype)
        fwd, bwd = 2 * tokens * hidden * size, 3 * tokens * hidden * size
        impls = {n: (lambda f: lambda x, w: f(x, w, 1e-5))(f)
                 for n, f in elementwise_impls("rms_norm", compile_ok).items()}
        elw.append(("rms_norm", f"T={tokens} H={hidden}", (x, w), {"fwd": fwd, "bwd": bwd, "fwd_bwd": fwd + bwd},
                    impls))
    for op, label, inputs, work, impls in elw:
        yield op, label, inputs, work, "GB/s", impls, {}


def attention_cases(args, device, dtype, tokens, heads, head_dim, compile_ok):
    """Per (S, packed/equal, window): the case tuple of `cases`, with each backend's plan built once here."""
    from megatron_cmbert.kernels.attention_triton import attention_flops
    from megatron_cmbert.kernels.varlen import PackedLayout

    impls = attention_impls(args.impls, compile_ok and args.compile_attention)
    doc_lengths, how = (corpus_lengths(args.corpus, args.tokenizer) if "packed" in args.cases else (None, ""))
    for seq in args.seq_lengths:
        for kind in args.cases:
            if kind == "packed":
                lengths, about = packed_lengths(doc_lengths, seq, tokens)
                print(f"  packed S={seq}: {about}; document lengths: {how}", flush=True)
            else:
                lengths = [seq] * max(1, tokens // seq)
            layout = PackedLayout.from_lengths(lengths, device, max_seqlen=seq)
            q, k, v = (torch.randn(layout.total, heads, head_dim, device=device, dtype=dtype) for _ in range(3))
            for window in WINDOWS if not args.smoke else ((-1, -1), (8, 8)):
                label = f"S={seq} {kind} w={window[0] * 2 if window[0] >= 0 else 'global'}"
                flops = {m: attention_flops(lengths, heads, head_dim, window, m) for m in ("fwd", "bwd", "fwd_bwd")}
                wrapped, plan_ms = {}, {}
                for name, (make_plan, attend) in impls.items():
                    try:
                        begin = time.perf_counter()
                        plan = make_plan(layout, window)
                        plan_ms[name] = (time.perf_counter() - begin) * 1e3
                    except Exception as error:  # reported by the runner as this impl's failure
                        wrapped[name] = (lambda e: lambda q, k, v: (_ for _ in ()).throw(e))(error)
                        continue
                    wrapped[name] = (lambda a, p: lambda q, k, v: a(q, k, v, p))(attend, plan)
                yield "attention", label, (q, k, v), flops, "TFLOP/s", wrapped, {"plan_ms": plan_ms}


def attention_sweep(args, device, dtype, bench, sink) -> list[str]:
    """Time each SWEEP setting against the default on the packed S=8192 micro-batch, global and window 128
    (rows added to `sink`): the forward for "fwd", the whole backward (delta + dK/dV + dQ) for the two
    backward kernels. Returns the cases where the default setting itself failed (alternatives may fail)."""
    from megatron_cmbert.kernels import attention_triton
    from megatron_cmbert.kernels.varlen import PackedLayout

    seq, heads, head_dim, tokens = (32, 2, 32, 96) if args.smoke else (8192, 16, 64, args.tokens)
    lengths, about = packed_lengths(corpus_lengths(args.corpus, args.tokenizer)[0], seq, tokens)
    print(f"  sweep on packed S={seq}: {about}", flush=True)
    layout = PackedLayout.from_lengths(lengths, device, max_seqlen=seq)
    q, k, v = (torch.randn(layout.total, heads, head_dim, device=device, dtype=dtype) for _ in range(3))
    sweep = {kind: options[:1] for kind, options in SWEEP.items()} if args.smoke else SWEEP
    default = attention_triton.AttentionConfig.for_inputs(dtype, head_dim)
    blocks_needed = {b for options in sweep.values() for o in options for b in o[:2]}
    blocks_needed |= set(attention_triton.config_blocks(default))
    failed = []
    for window in ((-1, -1), (64, 64)):
        case = f"S={seq} packed w={'global' if window[0] < 0 else 2 * window[0]}"
        plan = attention_triton.plan(layout, window, tuple(sorted(blocks_needed)))
        for kind, options in sweep.items():
            mode = "fwd" if kind == "fwd" else "bwd"
            default_ms = None
            for option in [None, *options]:
                blocks = None if option is None else attention_triton.Blocks(*option)
                config = default if blocks is None else dataclasses.replace(default, **{kind: blocks})

                def fn(q, k, v, plan=plan, config=config):
                    return attention_triton.attend(q, k, v, plan, config=config)
                label = f"{kind} default" if blocks is None else f"{kind} {blocks.describe()}"
                try:
                    ms = bench(make_runner(fn, (q, k, v), mode))
                except Exception as error:  # an alternative that cannot run is reported, not fatal
                    print(f"  sweep {case} {label}: failed ({type(error).__name__}: {error})"[:300], flush=True)
                    if option is None:
                        failed.append(f"sweep {case} {label}")
                    continue
                default_ms = ms if option is None else default_ms
                ratio = round(ms / default_ms, 3) if default_ms else ""
                sink.add(dict(op="attention_sweep", case=case, mode=mode, impl=label, ms=round(ms, 4),
                              rate="", unit="", pct_peak="", speedup_vs_this=ratio))
                print(f"  sweep {case} {label}: {ms:.3f} ms ({ratio}x the default's time)", flush=True)
    rows = [r for r in sink if r["op"] == "attention_sweep"]
    for case in dict.fromkeys(r["case"] for r in rows):
        for kind in sweep:
            timed = [r for r in rows if r["case"] == case and r["impl"].startswith(kind + " ")]
            if timed:
                best = min(timed, key=lambda r: r["ms"])
                print(f"  sweep best {case} {kind}: {best['impl']} ({best['speedup_vs_this']}x the default's time)")
    return failed


def run(argv=None) -> list[dict]:
    """The timed rows; ToolFailure (exit 1) when a Triton row this benchmark exists for failed."""
    parser = ToolParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under Triton's interpreter")
    parser.add_argument("--csv", help="write every row to this CSV file (as it is timed, to FILE.partial first)")
    parser.add_argument("--ops", default="attention,rope,geglu,rms_norm",
                        help="comma-separated ops to time, or 'none' (e.g. with --attention-sweep alone)")
    parser.add_argument("--modes", default="fwd,bwd,fwd_bwd")
    parser.add_argument("--tokens", type=int, default=65536, help="tokens per call: the micro-batch budget")
    parser.add_argument("--seq-lengths", type=int, nargs="+", default=None,
                        help="attention sequence lengths S (default 8192 1024; 32 with --smoke)")
    parser.add_argument("--cases", default="packed,equal",
                        help="attention cases: packed (demo corpus lengths), equal (S each), comma-separated")
    parser.add_argument("--impls", default="triton,flex,reference,flash_attn",
                        help=f"attention implementations to time, from {','.join(ATTENTION_IMPLS)} (triton always)")
    parser.add_argument("--corpus", default=DEMO_CORPUS, help="jsonl whose document lengths the packed case uses")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer directory for the packed case's lengths (default: characters / 1.35)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    parser.add_argument("--attention-sweep", action="store_true",
                        help="also time other launch settings of the Triton attention kernels (block sizes, warps, "
                             "stages; one kernel at a time) against the defaults at S=8192")
    parser.add_argument("--compile-attention", action="store_true",
                        help="also time the torch.compile'd attention reference (slow to compile)")
    args = parser.parse_args(argv)
    args.ops = [] if args.ops == "none" else args.ops.split(",")
    unknown = set(args.ops) - {"attention", "rope", "geglu", "rms_norm"}
    if unknown:
        parser.error(f"--ops: unknown {sorted(unknown)}; choose from attention,rope,geglu,rms_norm or none")
    args.cases = [c for c in args.cases.split(",") if c]
    if not args.cases or set(args.cases) - {"packed", "equal"}:
        parser.error("--cases: choose from packed, equal")
    args.impls = ["triton"] + [i for i in args.impls.split(",") if i and i != "triton"]
    if set(args.impls) - set(ATTENTION_IMPLS):
        parser.error(f"--impls: unknown {sorted(set(args.impls) - set(ATTENTION_IMPLS))}")
    if "compiled_ref" in args.impls:
        args.compile_attention = True
    elif args.compile_attention:
        args.impls.append("compiled_ref")
    args.seq_lengths = args.seq_lengths or ([32] if args.smoke else [8192, 1024])
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # the kernels run on CPU tensors via the interpreter
        args.no_compile = args.no_compile or args.smoke  # inductor's C++ build would dominate a smoke run
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    bench = timer(device, args.smoke)
    copy_gbs, mm_tflops = peaks(device, bench, args.smoke)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (Triton interpreter)"
    print(f"device: {name}; measured peaks: copy {copy_gbs:.0f} GB/s (read+write), bf16 matmul "
          f"{mm_tflops:.1f} TFLOP/s", flush=True)
    rows = Rows(args.csv)
    failed, timed = [], 0  # Triton rows that failed / ran
    for op, label, inputs, work, unit, impls, extra in cases(args, device, dtype):
        for impl, ms in extra.get("plan_ms", {}).items():
            rows.add(dict(op=op, case=label, mode="plan", impl=impl, ms=round(ms, 4), rate="", unit="host ms",
                          pct_peak="", speedup_vs_this=""))
        if extra.get("plan_ms"):
            print(f"  {op} {label} plan (host, once per micro-batch): "
                  + ", ".join(f"{k} {v:.2f} ms" for k, v in extra["plan_ms"].items()), flush=True)
        for mode in args.modes.split(","):
            times = {}
            for impl, fn in impls.items():
                if impl == "flex" and device == "cpu" and mode != "fwd":
                    continue  # FlexAttention's backward does not run on CPU
                try:
                    times[impl] = bench(make_runner(fn, inputs, mode))
                except Exception as error:  # a baseline that cannot run here is reported, not fatal
                    verdict = "FAILED" if impl == "triton" else "skipped"
                    print(f"  {op} {label} {mode} {impl}: {verdict} ({type(error).__name__}: {error})"[:300],
                          flush=True)
                    if impl == "triton":
                        failed.append(f"{op} {label} {mode}")
                if device == "cuda":
                    torch.cuda.empty_cache()
            timed += "triton" in times
            for impl, ms in times.items():
                rate = work[mode] / ms / (1e9 if unit == "TFLOP/s" else 1e6)
                peak = mm_tflops if unit == "TFLOP/s" else copy_gbs
                rows.add(dict(op=op, case=label, mode=mode, impl=impl, ms=round(ms, 4), rate=float(f"{rate:.4g}"),
                              unit=unit, pct_peak=round(100 * rate / peak, 1),
                              speedup_vs_this=round(ms / times["triton"], 3) if "triton" in times else ""))
            print(f"  {op} {label} {mode}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in times.items()), flush=True)
    if args.attention_sweep:
        failed += attention_sweep(args, device, dtype, bench, rows)
    rows.close()
    # Short table: our kernel per case and mode, with each baseline's time / ours.
    print(f"\n{'op':9} {'case':26} {'mode':8} {'ms':>9} {'rate':>14} {'%peak':>6}  baseline time / triton time")
    for row in rows:
        if row["impl"] != "triton" or row["mode"] == "plan":
            continue
        others = [r for r in rows if (r["op"], r["case"], r["mode"]) == (row["op"], row["case"], row["mode"])
                  and r["impl"] != "triton"]
        ratios = " ".join(f"{r['impl']}={r['speedup_vs_this']}x" for r in others)
        print(f"{row['op']:9} {row['case']:26} {row['mode']:8} {row['ms']:9.3f} {row['rate']:>8} {row['unit']:7}"
              f"{row['pct_peak']:5.1f}%  {ratios}")
    if failed:
        raise ToolFailure(f"{len(failed)} Triton rows failed ({timed} ran): {'; '.join(failed)[:1000]}")
    return list(rows)


def main(argv=None) -> int:
    return run_tool(run, argv)


if __name__ == "__main__":
    sys.exit(main())
