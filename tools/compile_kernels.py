"""Compile every Triton kernel launch for an NVIDIA GPU (default H100, sm_90a) on a machine without one.

    python tools/compile_kernels.py                 # the model's launches: bf16, head_dim 64, hidden 1024
    python tools/compile_kernels.py --full          # + fp16/fp32 and head_dims 32/128 (slower)
    python tools/compile_kernels.py --capability 80 # A100

Builds the kernel files' own launch records (forward and backward, the GPU launch settings) for small CPU
tensors and compiles each with kernels/triton_compile_only.Compiler: specialised as on the GPU, down to the
cubin, and ptxas reports registers and spills. Nothing runs. Needs TRITON_INTERPRET unset (tests run this
tool in a subprocess of its own for that reason). Prints one row per distinct compiled kernel and exits 1 when a
kernel fails to compile or would not launch (shared memory or registers over the card's limit). Spills are
reported, not failed: they cost speed, not correctness.

Why: Triton's CPU interpreter (what CI runs) accepts code the GPU compiler rejects, and GPU time is scarce.
"""
from __future__ import annotations

import sys
import time

import torch

from megatron_cmbert.cli import ToolParser, run_tool
from megatron_cmbert.errors import ToolFailure, UserError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# Each *_launches function returns the kernel file's own Launch records for CPU tensors shaped like the
# model's; this process has Triton in compiled mode, so the records carry the GPU launch settings.
def attention_launches(dtype: torch.dtype, head_dim: int, heads: int = 2) -> list:
    from megatron_cmbert.kernels.attention_triton import (AttentionConfig, backward_launches, config_blocks,
                                                          forward_launches, op_arguments, plan)
    from megatron_cmbert.kernels.varlen import PackedLayout

    # Packed lengths as training sees them: short sequences sharing a block, a long one, empty padding.
    layout = PackedLayout.from_lengths([3, 97, 0, 150, 6, 0, 0])
    q, k, v = (torch.zeros(layout.total, heads, head_dim, dtype=dtype) for _ in range(3))
    scale, config = head_dim ** -0.5, AttentionConfig.for_inputs(dtype, head_dim, gpu=True)
    launches = []
    for window in ((64, 64), (-1, -1)):  # the model's local and global layers
        bounds, fwd, dkdv, dq = op_arguments(plan(layout, window, config_blocks(config)), config)
        out, lse, forward = forward_launches(q, k, v, bounds, fwd, scale, config)
        *_, backward = backward_launches(torch.zeros_like(out), q, k, v, out, lse, bounds, dkdv, dq, scale, config)
        launches += forward + backward
    return launches


def rope_launches(dtype: torch.dtype, head_dim: int, heads: int = 16) -> list:
    from megatron_cmbert.kernels.rope_triton import RopeConfig, rope_launches as build

    # q and k as views into a fused (tokens, 3, heads, head_dim) QKV output, as the model passes them.
    qkv = torch.zeros(256, 3, heads, head_dim, dtype=dtype)
    positions = torch.arange(256, dtype=torch.int64)
    inv_freq = torch.ones(head_dim // 2, dtype=torch.float32)
    config = RopeConfig.for_inputs(head_dim, gpu=True)
    return [launch for conjugate in (False, True)  # forward, backward
            for launch in build(qkv[:, 0], qkv[:, 1], positions, inv_freq, conjugate, config)[2]]


def geglu_launches(dtype: torch.dtype, intermediate: int = 2624) -> list:
    from megatron_cmbert.kernels.geglu_triton import GegluConfig, geglu_launches as build

    x = torch.zeros(64, 2 * intermediate, dtype=dtype)
    y = torch.zeros(64, intermediate, dtype=dtype)
    config = GegluConfig.default(gpu=True)
    return [launch for interleaved in (True, False)  # the model's layout, the HF layout
            for grad in (None, y) for launch in build(x, grad, interleaved, config)[1]]


def rms_norm_launches(dtype: torch.dtype, hidden: int = 1024) -> list:
    from megatron_cmbert.kernels.rms_norm_triton import RmsNormConfig, backward_launches, forward_launches

    x, weight = torch.zeros(64, hidden, dtype=dtype), torch.ones(hidden, dtype=dtype)
    config = RmsNormConfig.for_hidden(hidden, gpu=True)
    y, rstd, forward = forward_launches(x, weight, 1e-5, config)
    return forward + backward_launches(torch.zeros_like(y), x, weight, rstd, config)[2]


def cases(full: bool):
    """(label, function): the model's launches first; --full adds the other dtypes and head dims."""
    dtypes = ("bf16", "fp16", "fp32") if full else ("bf16", "fp32")
    head_dims = (32, 64, 128) if full else (64, 128)
    for name in dtypes:
        for head_dim in head_dims:
            if not full and name == "fp32" and head_dim != 64:
                continue  # fp32 at 64 already takes the halved-block path that 128 takes
            yield f"attention {name} d={head_dim}", lambda d=DTYPES[name], h=head_dim: attention_launches(d, h)
    for name in dtypes if full else ("bf16",):
        dtype = DTYPES[name]
        yield f"rope {name} d=64", lambda d=dtype: rope_launches(d, 64)
        yield f"geglu {name} I=2624", lambda d=dtype: geglu_launches(d)
        yield f"rms_norm {name} h=1024", lambda d=dtype: rms_norm_launches(d)


def compile_all(capability: int = 90, full: bool = False, report=print):
    """Compile every case; returns (records, failures) where failures are (label or kernel, message)."""
    from megatron_cmbert.kernels.triton_compile_only import Compiler, resource_problems

    failures = []
    compiler = Compiler(capability=capability)
    records = compiler.records
    for label, launches in cases(full):
        begin, before = time.perf_counter(), len(records)
        try:
            for launch in launches():
                compiler.compile(launch)
        except Exception as error:  # noqa: BLE001 - a compile error of any kind is the finding
            failures.append((label, f"{type(error).__name__}: {error}"))
            report(f"  {label}: FAILED to compile")
            continue
        report(f"  {label}: {len(records) - before} kernels in {time.perf_counter() - begin:.1f} s")
    for record in records:
        failures += [(record.describe(), problem) for problem in resource_problems(record, capability)]
    return records, failures


def wide_share(record) -> float:
    """Share of the kernel's global load/store instructions that move 16 bytes (vectorised)."""
    total = sum(record.global_access_bytes.values())
    return record.global_access_bytes.get(16, 0) / total if total else 0.0


def format_table(records) -> str:
    head = f"{'kernel':<18} {'constexprs':<66} {'warps':>5} {'stages':>6} {'smem KB':>7} {'regs':>4} {'spill B':>7} {'matmul':>6} {'16B ld/st':>9}"
    lines = [head, "-" * len(head)]
    seen = set()
    for r in records:  # the local and global windows specialise the same kernel twice; show one row
        row_key = (r.kernel, repr(r.constexprs), r.num_warps, r.num_stages, r.registers, r.spilled_bytes)
        if row_key in seen:
            continue
        seen.add(row_key)
        consts = " ".join(f"{k}={v}" for k, v in r.constexprs.items() if k not in ("INTERP",))
        lines.append(f"{r.kernel:<18} {consts[:66]:<66} {r.num_warps:>5} {r.num_stages:>6} "
                     f"{r.shared_bytes / 1024:>7.1f} {r.registers if r.registers is not None else '?':>4} "
                     f"{r.spilled_bytes if r.spilled_bytes is not None else '?':>7} {r.matmul:>6} {wide_share(r):>8.0%}")
    return "\n".join(lines)


def run(argv=None) -> list:
    """The compiled kernels' records; ToolFailure (exit 1) when any launch failed to compile."""
    parser = ToolParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--capability", type=int, default=90,
                        help="CUDA compute capability to compile for (90 = H100/H200, 80 = A100)")
    parser.add_argument("--full", action="store_true", help="also fp16/fp32 and head_dim 32/128 everywhere")
    args = parser.parse_args(argv)
    from megatron_cmbert.kernels.triton_utils import interpreter_requested

    if interpreter_requested():
        raise UserError("TRITON_INTERPRET is set, so Triton builds interpreter-only kernels; unset it to compile "
                        "them for a GPU")
    import triton

    print(f"compiling for sm_{args.capability} with triton {triton.__version__} (no GPU needed)")
    begin = time.perf_counter()
    records, failures = compile_all(args.capability, args.full)
    print(format_table(records))
    spilling = [r for r in records if r.spilled_bytes]
    if spilling:
        print(f"note: {len(spilling)} kernels spill registers (slower, still correct): "
              + ", ".join(r.kernel for r in spilling))
    for where, message in failures:
        print(f"FAIL {where}: {message}", file=sys.stderr)
    print(f"{len(records)} kernels compiled, {len(failures)} failures, {time.perf_counter() - begin:.0f} s")
    if failures:
        raise ToolFailure(f"{len(failures)} launches did not compile (first: {failures[0][0]})")
    return records


def main(argv=None) -> int:
    return run_tool(run, argv)


if __name__ == "__main__":
    sys.exit(main())
