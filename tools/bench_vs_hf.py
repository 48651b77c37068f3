#!/usr/bin/env python3
"""A race against Hugging Face ModernBERT in one process: our CMBertForMaskedLM and
transformers.ModernBertForMaskedLM built from one config with identical weights (model/hf_keymap.py), trained
on the same masked micro-batches with the same optimizer and seed, step by step in turn.

    python tools/bench_vs_hf.py --data-path DATA_text_document --presets tiny base --seq-lengths 512 1024
    python tools/bench_vs_hf.py --data-path DATA_text_document --presets large --seq-lengths 1024 8192 \\
        --device cuda --kernels auto triton,attention=flex            # HF sdpa + flash_attention_2 (+ packed)

What is the same for both: the weights at step 0 (ours seeded, copied into HF by to_hf), the norm (bias-free
LayerNorm for both by default: the stock HF class has only that; --normalization RMSNorm races our RMSNorm
against HF's LayerNorm, and the losses then start apart), the micro-batches (data/pretrain_data.py: packed
[CLS] piece [SEP] samples with whole-word masking at --mask-rate), the optimizer (StableAdamW of
training/optimizer.py with ModernBERT's weight-decay groups, or torch AdamW: --optimizer), grad clipping at
1.0, fp32 on CPU and bf16 autocast on CUDA. HF predicts sparsely too (sparse_prediction=True: logits only at
masked tokens, as ours), so neither computes logits it throws away.

How each side is fed: ours packed varlen (one PackedLayout per micro-batch, built on the host like the
loader does); HF as its users run it, every packed piece one row of a batch padded to the longest piece with
an attention mask (`sdpa`, `eager`, `flash_attention_2`), and on CUDA with flash-attn also HF's own unpadded
path (`flash_attention_2:packed`: one row of all tokens with cu_seq_lens/position_ids, the padding-free
collator's way). Contestants: one per --kernels setting of ours, one per --hf-attn of HF.

Timing: every step runs each contestant once (the order rotates per step), after --warmup-steps untimed
steps; the --steps timed steps are cut into --repeats groups, and tokens/s are real tokens (no padding) over
the group's seconds. The ratio ours/HF is taken per group: its median and [min-max] are the spread. Inference
is the encoder body's forward (no head, as Table 4) on the same batches under inference_mode. Peak memory is
measured in one more step each, untimed: CPU: the process RSS sampled every millisecond above its value at
the start of the step (freed heap returned first with malloc_trim); CUDA: torch.cuda.max_memory_allocated
above the allocation at the start. Loss at equal tokens: the mean over the last --loss-steps steps of each
(same batches), against the spread of such a mean (std / sqrt(K) of HF's per-step losses).
--profile N prints the N ops with the most self CPU time of one training step of each contestant.
"""
from __future__ import annotations

import ctypes
import gc
import importlib.util
import json
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from megatron_cmbert.errors import ToolFailure, UserError

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
HF_ATTN = ("sdpa", "eager", "flash_attention_2", "flash_attention_2:packed")


def build_parser():
    from megatron_cmbert import cli

    p = cli.ToolParser(description=__doc__)
    p.add_argument("--data-path", required=True, metavar="PREFIX", help="indexed dataset (tools/preprocess_data.py's "
                   "..._text_document); its vocabulary size comes from PREFIX.meta.json")
    p.add_argument("--presets", nargs="+", default=["tiny"], help="model presets, one table block each (default tiny)")
    p.add_argument("--seq-lengths", type=int, nargs="+", default=[512], help="sample lengths (default 512)")
    p.add_argument("--tokens-per-step", type=int, default=4096,
                   help="samples per step = this / seq length (default 4096: 8 x 512, 4 x 1024)")
    p.add_argument("--steps", type=int, default=60, help="timed training steps per contestant (default 60)")
    p.add_argument("--warmup-steps", type=int, default=5, help="untimed steps first (default 5)")
    p.add_argument("--repeats", type=int, default=3, help="groups the timed steps are cut into (default 3)")
    p.add_argument("--infer-steps", type=int, default=None, help="timed inference batches (default --steps)")
    p.add_argument("--loss-steps", type=int, default=20, help="K: loss is compared as the mean of the last K steps")
    p.add_argument("--kernels", nargs="+", default=["auto"], metavar="SPEC",
                   help="our kernel settings, one contestant each (default auto; docs/KERNELS.md)")
    p.add_argument("--hf-attn", nargs="+", default=None, choices=HF_ATTN,
                   help="HF attn_implementation contestants (default sdpa, plus flash_attention_2 and "
                        "flash_attention_2:packed on CUDA when flash-attn imports); the first is the baseline")
    p.add_argument("--normalization", choices=("LayerNorm", "RMSNorm"), default="LayerNorm",
                   help="our norm (HF always has LayerNorm; default LayerNorm: identical models)")
    p.add_argument("--optimizer", choices=("stableadamw", "adamw"), default="stableadamw",
                   help="the same for both: training/optimizer.StableAdamW or torch.optim.AdamW")
    p.add_argument("--lr", type=float, default=5e-4, help="constant learning rate (default 5e-4)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="(default 0.1; norms and biases 0)")
    p.add_argument("--mask-rate", type=float, default=0.3, help="whole-word masking rate (default 0.3)")
    p.add_argument("--seed", type=int, default=1234, help="model init and data seed (default 1234)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default torch's)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="also profile one training step per contestant and print its top N ops by self CPU time")
    p.add_argument("--json", metavar="PATH", help="write the result here (by rename)")
    return p


class BenchFlagError(UserError):
    """A flag or file the benchmark cannot use (one line naming it)."""


class BenchError(ToolFailure):
    """The two models could not be made the same (a key map mismatch)."""


# ---- data ------------------------------------------------------------------------------------------------
@dataclass
class Batch:
    """One micro-batch in both forms, on the device: ours packed, HF padded (one row per packed piece)."""

    ids: torch.Tensor
    labels: torch.Tensor
    layout: object            # kernels/varlen.PackedLayout
    hf_ids: torch.Tensor      # (pieces, longest)
    hf_mask: torch.Tensor
    hf_labels: torch.Tensor
    tokens: int               # real tokens
    padded: int               # HF's rows x longest


def vocab_size(prefix: str) -> int:
    from megatron_cmbert.data.dataset_checks import check_data_prefix, max_token_id, meta_path

    check_data_prefix(prefix)
    try:
        with open(meta_path(prefix), encoding="utf-8") as fh:
            return int(json.load(fh)["tokenizer"]["vocab_size"])
    except (OSError, ValueError, KeyError):
        return int(max_token_id(prefix) or 0) + 1


def make_batches(prefix: str, seq: int, per_step: int, count: int, vocab: int, args, device) -> list[Batch]:
    from megatron_cmbert.data.masking import MaskingConfig
    from megatron_cmbert.data.pretrain_data import PretrainSamples
    from megatron_cmbert.data.tokenizer import MASK_ID, PAD_ID
    from megatron_cmbert.kernels.varlen import PackedLayout
    from megatron_cmbert.tokens import IGNORE_INDEX

    samples = PretrainSamples([prefix], "100,0,0", "train", seq, args.seed, count * per_step,
                              MaskingConfig(mask_token_id=MASK_ID, vocab_size=vocab))
    batches = []
    for step in range(count):
        mb = samples.micro_batch(step * per_step, per_step, args.mask_rate)
        lengths = np.diff(mb.cu_seqlens.numpy()).astype(np.int64)
        rows, longest = len(lengths), int(lengths.max())
        flat = (np.arange(rows)[:, None] * longest + np.arange(longest)[None, :])[
            np.arange(longest)[None, :] < lengths[:, None]]  # each real token's place in the padded batch
        ids = torch.full((rows * longest,), PAD_ID, dtype=torch.long)
        labels = torch.full((rows * longest,), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros(rows * longest, dtype=torch.long)
        index = torch.from_numpy(flat)
        ids[index], labels[index], mask[index] = mb.input_ids, mb.labels, 1
        batches.append(Batch(mb.input_ids.to(device), mb.labels.to(device),
                             PackedLayout.from_lengths(lengths, device, max_seqlen=seq),
                             ids.view(rows, longest).to(device), mask.view(rows, longest).to(device),
                             labels.view(rows, longest).to(device), int(lengths.sum()), rows * longest))
    return batches


# ---- contestants ------------------------------------------------------------------------------------------
class Contestant:
    """One model with its optimizer; `loss(batch)` and `encode(batch)` in the form it is fed."""

    def __init__(self, name: str, kind: str, label: str, model, args):
        from megatron_cmbert.training.optimizer import StableAdamW, param_groups

        self.name, self.kind, self.label, self.model = name, kind, label, model
        groups = param_groups(model, args.weight_decay)
        if args.optimizer == "stableadamw":
            self.opt = StableAdamW(groups, lr=args.lr)
        else:
            self.opt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "param_names"} for g in groups],
                                         lr=args.lr, betas=(0.9, 0.95), eps=1e-6)
        self.params = [p for g in groups for p in g["params"]]
        self.losses: list[torch.Tensor] = []
        self.times = {"train": [], "infer": []}


class Ours(Contestant):
    def loss(self, b: Batch):
        return self.model(b.ids, b.layout, labels=b.labels).loss

    def encode(self, b: Batch):
        return self.model.model(b.ids, b.layout)


class HF(Contestant):
    packed = False

    def _inputs(self, b: Batch) -> dict:
        if not self.packed:
            return {"input_ids": b.hf_ids, "attention_mask": b.hf_mask}
        cu = b.layout.cu_seqlens
        return {"input_ids": b.ids[None], "position_ids": b.layout.positions[None], "cu_seq_lens_q": cu,
                "cu_seq_lens_k": cu, "max_length_q": b.layout.max_seqlen, "max_length_k": b.layout.max_seqlen}

    def loss(self, b: Batch):
        return self.model(**self._inputs(b), labels=b.labels[None] if self.packed else b.hf_labels).loss

    def encode(self, b: Batch):
        return self.model.model(**self._inputs(b)).last_hidden_state


def hf_variants(args, device) -> list[str]:
    flash = device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None
    chosen = args.hf_attn or (["sdpa"] + (["flash_attention_2", "flash_attention_2:packed"] if flash else []))
    for name in chosen:
        if name.startswith("flash_attention_2") and not flash:
            raise BenchFlagError(f"--hf-attn {name}: needs CUDA and the flash-attn package")
    return chosen


def build_contestants(config, args, device, dtype) -> list[Contestant]:
    import transformers

    from megatron_cmbert.kernels.registry import KernelChoice
    from megatron_cmbert.model import CMBertForMaskedLM
    from megatron_cmbert.model.hf_keymap import modernbert_config_dict, to_hf

    torch.manual_seed(args.seed)
    first = CMBertForMaskedLM(config)
    state = {k: v.clone() for k, v in first.state_dict().items()}
    del first
    out: list[Contestant] = []
    for spec in args.kernels:
        choice = KernelChoice.parse(spec).resolved(device, dtype)
        model = CMBertForMaskedLM(config.replace(kernels=choice))
        model.load_state_dict(state)
        out.append(Ours(f"ours[{choice}]" if len(args.kernels) > 1 else "ours", "ours",
                        str(model.kernels.choice), model.to(device).train(), args))
    hf_state = to_hf(state, config)
    for variant in hf_variants(args, device):
        hf_config = transformers.ModernBertConfig(**modernbert_config_dict(config), sparse_prediction=True)
        hf_config._attn_implementation = variant.split(":")[0]
        model = transformers.ModernBertForMaskedLM(hf_config)
        missing, unexpected = model.load_state_dict(hf_state, strict=False)
        if unexpected or missing != ["decoder.weight"]:  # the decoder is tied to the embedding
            raise BenchError(f"HF state dict mismatch: missing {missing}, unexpected {unexpected}")
        c = HF(f"HF {variant}", "hf", f"attn_implementation={variant.split(':')[0]}, " +
               ("one packed row (cu_seq_lens)" if variant.endswith(":packed") else "padded to the longest piece"),
               model.to(device).train(), args)
        c.packed = variant.endswith(":packed")
        out.append(c)
    return out


# ---- timing and memory ------------------------------------------------------------------------------------
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def train_step(c: Contestant, b: Batch, device) -> torch.Tensor:
    from megatron_cmbert.training.optimizer import clip_grad_norm

    c.opt.zero_grad(set_to_none=True)
    with _autocast(device):
        loss = c.loss(b)
    loss.backward()
    clip_grad_norm(c.params, 1.0)
    c.opt.step()
    return loss.detach()


def infer_step(c: Contestant, b: Batch, device) -> None:
    with torch.inference_mode(), _autocast(device):
        c.encode(b)


class PeakMemory:
    """Peak memory of one call above the start: CPU RSS sampled every ms, or CUDA max_memory_allocated."""

    def __init__(self, device):
        self.device = device
        self.page = os.sysconf("SC_PAGE_SIZE")
        try:
            self._trim = ctypes.CDLL("libc.so.6").malloc_trim
        except OSError:
            self._trim = None

    def _rss(self) -> int:
        with open("/proc/self/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * self.page

    def measure(self, fn) -> float:
        """MB above the start while fn() runs."""
        gc.collect()
        if self.device.type == "cuda":
            _sync(self.device)
            start = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            fn()
            _sync(self.device)
            return (torch.cuda.max_memory_allocated(self.device) - start) / 2**20
        if self._trim is not None:
            self._trim(0)
        start = peak = self._rss()
        done = threading.Event()

        def sample():
            nonlocal peak
            while not done.is_set():
                peak = max(peak, self._rss())
                time.sleep(0.001)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            fn()
        finally:
            done.set()
            thread.join()
        return (max(peak, self._rss()) - start) / 2**20


def timed(fn, device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def profile_step(c: Contestant, b: Batch, device, top: int) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        train_step(c, b, device)
        _sync(device)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    return [{"op": e.key, "self_cpu_ms": e.self_cpu_time_total / 1e3, "share": e.self_cpu_time_total / total,
             "calls": e.count} for e in events[:top]]


# ---- one (preset, seq) case -------------------------------------------------------------------------------
def _groups(values: list[float], repeats: int) -> list[list[float]]:
    size = len(values) // repeats
    return [values[i * size:(i + 1) * size] for i in range(repeats)]


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "repeats": values}


def run_case(preset: str, seq: int, args, device, vocab: int) -> dict:
    from megatron_cmbert.model.config import get_preset

    per_step = args.tokens_per_step // seq
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = get_preset(preset, vocab_size=vocab, normalization=args.normalization,
                        max_position_embeddings=max(seq, get_preset(preset).max_position_embeddings))
    total_steps = args.warmup_steps + args.steps
    batches = make_batches(args.data_path, seq, per_step, total_steps, vocab, args, device)
    contestants = build_contestants(config, args, device, dtype)
    for step, b in enumerate(batches):  # training: every contestant once per step, the order rotating
        k = step % len(contestants)
        for c in contestants[k:] + contestants[:k]:
            seconds = timed(lambda: c.losses.append(train_step(c, b, device)), device)
            if step >= args.warmup_steps:
                c.times["train"].append(seconds)
    infer = [batches[i % len(batches)] for i in range(args.infer_steps + 1)]
    for c in contestants:
        c.model.eval()
    for step, b in enumerate(infer):  # batch 0 is the untimed warm-up
        k = step % len(contestants)
        for c in contestants[k:] + contestants[:k]:
            seconds = timed(lambda: infer_step(c, b, device), device)
            if step:
                c.times["infer"].append(seconds)
    memory = PeakMemory(device)
    train_tokens = _groups([b.tokens for b in batches[args.warmup_steps:]], args.repeats)
    infer_tokens = _groups([b.tokens for b in infer[1:]], args.repeats)
    rows = []
    for c in contestants:
        rates = {"train": [sum(t) / sum(s) for t, s in zip(train_tokens, _groups(c.times["train"], args.repeats))],
                 "infer": [sum(t) / sum(s) for t, s in zip(infer_tokens, _groups(c.times["infer"], args.repeats))]}
        losses = [float(x) for x in c.losses]
        c.model.train()
        row = {"name": c.name, "kind": c.kind, "kernels": c.label,
               "train_tokens_per_s": _spread(rates["train"]), "infer_tokens_per_s": _spread(rates["infer"]),
               "train_peak_mb": memory.measure(lambda: train_step(c, batches[-1], device)),
               "infer_peak_mb": memory.measure(lambda: infer_step(c, batches[-1], device)),
               "loss_step0": losses[0], "losses": losses,
               "loss_last": statistics.fmean(losses[-args.loss_steps:])}
        if args.profile:
            row["profile"] = profile_step(c, batches[-1], device, args.profile)
        rows.append(row)
    base = next(r for r in rows if r["kind"] == "hf")
    last = base["losses"][-args.loss_steps:]
    loss_spread = statistics.stdev(last) / len(last) ** 0.5 if len(last) > 1 else float("nan")
    ratios = []
    for ours in (r for r in rows if r["kind"] == "ours"):
        for hf in (r for r in rows if r["kind"] == "hf"):
            ratios.append({"ours": ours["name"], "hf": hf["name"], **{
                what: _spread([a / b for a, b in zip(ours[f"{what}_tokens_per_s"]["repeats"],
                                                     hf[f"{what}_tokens_per_s"]["repeats"])])
                for what in ("train", "infer")},
                "loss_difference": ours["loss_last"] - hf["loss_last"]})
    del contestants
    gc.collect()
    return {"preset": preset, "seq_length": seq, "samples_per_step": per_step,
            "real_tokens_per_step": statistics.fmean(b.tokens for b in batches),
            "hf_padded_tokens_per_step": statistics.fmean(b.padded for b in batches),
            "pieces_per_step": statistics.fmean(b.layout.num_seqs for b in batches),
            "dtype": str(dtype).replace("torch.", ""), "baseline": base["name"], "loss_spread": loss_spread,
            "rows": rows, "ratios": ratios}


# ---- output -----------------------------------------------------------------------------------------------
def _fmt_spread(s: dict, digits: int = 2) -> str:
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}-{s['max']:.{digits}f}]"


def print_case(case: dict, args) -> None:
    padding = 1 - case["real_tokens_per_step"] / case["hf_padded_tokens_per_step"]
    k = args.loss_steps
    print(f"\npreset {case['preset']}, seq {case['seq_length']}, {case['dtype']}: {case['samples_per_step']} samples "
          f"per step, {case['real_tokens_per_step']:,.0f} real tokens in {case['pieces_per_step']:.1f} pieces "
          f"(HF padded: {padding:.1%} padding); ratio ours/{case['baseline']}, median [min-max] of {args.repeats} "
          f"repeats")
    print(f"{'model':<12} {'train tok/s':>12} {'ratio':>18} {'infer tok/s':>12} {'ratio':>18} {'train MB':>9} "
          f"{'infer MB':>9} {'loss@0':>8} {f'loss last {k}':>12}  kernels")
    ratio = {r["ours"]: r for r in case["ratios"] if r["hf"] == case["baseline"]}
    for row in case["rows"]:
        r = ratio.get(row["name"])
        train = _fmt_spread(r["train"]) if r else "baseline" if row["name"] == case["baseline"] else ""
        infer = _fmt_spread(r["infer"]) if r else "baseline" if row["name"] == case["baseline"] else ""
        print(f"{row['name']:<12} {row['train_tokens_per_s']['median']:>12,.0f} {train:>18} "
              f"{row['infer_tokens_per_s']['median']:>12,.0f} {infer:>18} {row['train_peak_mb']:>9,.0f} "
              f"{row['infer_peak_mb']:>9,.0f} {row['loss_step0']:>8.4f} {row['loss_last']:>12.4f}  {row['kernels']}")
    for r in case["ratios"]:
        if r["hf"] != case["baseline"]:
            print(f"  {r['ours']} / {r['hf']}: train {_fmt_spread(r['train'])}, infer {_fmt_spread(r['infer'])}")
    for r in case["ratios"]:
        verdict = "within" if abs(r["loss_difference"]) <= case["loss_spread"] else "OUTSIDE"
        print(f"  loss, last {k} steps: {r['ours']} - {r['hf']} = {r['loss_difference']:+.4f} ({verdict} the "
              f"spread of a {k}-step mean, {case['loss_spread']:.4f})")
    for row in case["rows"]:
        for i, op in enumerate(row.get("profile", [])):
            head = f"  profile {row['name']}:" if i == 0 else " " * (len(row["name"]) + 11)
            print(f"{head} {op['share']:6.1%} {op['self_cpu_ms']:9.1f} ms {op['calls']:6d}x  {op['op']}")


def run(argv: Optional[list[str]] = None) -> dict:
    from megatron_cmbert.eval.report import machine, machine_line, write_json
    from megatron_cmbert.kernels.registry import KernelChoice, KernelError

    args = build_parser().parse_args(argv)
    args.infer_steps = args.steps if args.infer_steps is None else args.infer_steps
    for flag in ("steps", "repeats", "infer_steps", "loss_steps", "tokens_per_step"):
        if getattr(args, flag) < 1:
            raise BenchFlagError(f"--{flag.replace('_', '-')} must be >= 1")
    if args.steps < args.repeats or args.infer_steps < args.repeats:
        raise BenchFlagError(f"--steps and --infer-steps must be at least --repeats ({args.repeats})")
    if args.loss_steps > args.warmup_steps + args.steps:
        raise BenchFlagError("--loss-steps is longer than the run (--warmup-steps + --steps)")
    for seq in args.seq_lengths:
        if seq < 8 or args.tokens_per_step % seq:
            raise BenchFlagError(f"--tokens-per-step {args.tokens_per_step} is not a whole number of {seq}-token samples")
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        for spec in args.kernels:
            KernelChoice.parse(spec).resolved(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    except KernelError as exc:
        raise BenchFlagError(f"--kernels: {exc}") from exc
    hf_variants(args, device)
    from megatron_cmbert.model.config import PRESETS

    unknown = [p for p in args.presets if p not in PRESETS]
    if unknown:
        raise BenchFlagError(f"--presets: unknown preset {unknown[0]!r}; choose from {sorted(PRESETS)}")
    vocab = vocab_size(args.data_path)
    info = machine(device)
    norm = "LayerNorm (both)" if args.normalization == "LayerNorm" else "RMSNorm (ours) vs LayerNorm (HF)"
    optimizer = ("StableAdamW (training/optimizer.py)" if args.optimizer == "stableadamw" else "torch AdamW") + \
        f" for both, lr {args.lr}, weight decay {args.weight_decay}, grad clip 1.0, seed {args.seed}"
    print(machine_line(info))
    print(f"norm: {norm}; optimizer: {optimizer}; data: {args.data_path} (vocabulary {vocab:,}), "
          f"mask rate {args.mask_rate}; {args.warmup_steps} warm-up + {args.steps} timed training steps, "
          f"{args.infer_steps} inference batches (encoder body)", flush=True)
    result = {"machine": info, "norm": norm, "optimizer": optimizer, "data_path": args.data_path, "vocab_size": vocab,
              "mask_rate": args.mask_rate, "warmup_steps": args.warmup_steps, "steps": args.steps,
              "infer_steps": args.infer_steps, "repeats": args.repeats, "loss_steps": args.loss_steps,
              "tokens_per_step": args.tokens_per_step, "argv": list(argv if argv is not None else sys.argv[1:]),
              "cases": []}
    for preset in args.presets:
        for seq in args.seq_lengths:
            case = run_case(preset, seq, args, device, vocab)
            print_case(case, args)
            result["cases"].append(case)
            sys.stdout.flush()
    if args.json:
        write_json(result, args.json)
        print(f"\nwrote {args.json}")
    return result


def main(argv: Optional[list[str]] = None) -> int:
    from megatron_cmbert import cli

    return cli.run_tool(run, argv)


if __name__ == "__main__":
    sys.exit(main())
