"""Varlen sliding-window FlashAttention (forward + backward) in Triton: the `triton` attention backend.

    plan(layout, window) -> attend(q, k, v, plan, softmax_scale)     (the registry's two parts)
    attention_triton(q, k, v, cu_seqlens, max_seqlen, window=(left, right), softmax_scale=None)   (tests, benches)

Same contract as kernels/attention_reference.py (the reference it is tested against): q, k, v packed as
(total_tokens, heads, head_dim); query i of a sequence sees key j of the same sequence when
i - left <= j <= i + right (-1 = unbounded side). Bidirectional, fp32 accumulation, fp32 log-sum-exp kept for
the backward (FlashAttention-2 recomputation: no (S, S) matrix is ever stored).

The plan (built once per micro-batch and window from the host lengths, outside any compiled region) holds
per-token key bounds and, per block size, the work items of kernels/block_plan.py: one program per block of
consecutive packed tokens and head, exactly cdiv(tokens, block) of them whatever the sequence lengths, so a
batch of hundreds of short documents launches no empty programs and zero-length sequences cost nothing; a
(sequence, block) grid padded to a static bound would be mostly empty at ~budget/3 sequence slots. Each program
visits only the columns its rows reach (O(S * window) for a local layer). The kernels are in
kernels/attention_triton_kernels.py; registered as torch.library custom ops so torch.compile can trace them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import triton

from megatron_cmbert.kernels.attention_triton_kernels import (_bwd_delta_kernel, _bwd_dkdv_kernel, _bwd_dq_kernel,
                                                             _fwd_kernel)
from megatron_cmbert.kernels.block_plan import token_key_bounds, token_query_bounds, work_items
from megatron_cmbert.kernels.triton_utils import Launch, check_mode, next_power_of_2, run
from megatron_cmbert.kernels.varlen import PackedLayout

# Fixed for the process when triton was imported: compiled (GPU) or interpreted (CPU tests).
INTERPRETED = check_mode()

LOG2E = 1.4426950408889634
# Block sizes a plan makes work lists for by default: every default launch setting (AttentionConfig.for_inputs,
# GPU and interpreter) and every --attention-sweep alternative of tools/bench_kernels.py owns 64 or 128 rows.
PLAN_BLOCKS = (64, 128)


# ---- launch configuration -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Blocks:
    """One kernel's launch settings: BLOCK_M queries x BLOCK_N keys per step, warps, pipeline stages."""

    BLOCK_M: int
    BLOCK_N: int
    num_warps: int = 4
    num_stages: int = 2

    def describe(self) -> str:
        return f"{self.BLOCK_M}x{self.BLOCK_N} w{self.num_warps} s{self.num_stages}"


@dataclass(frozen=True)
class AttentionConfig:
    """Launch settings of the three block kernels (the delta kernel has fixed ones). tools/bench_kernels.py
    --attention-sweep times alternatives by passing them; `for_inputs` gives the defaults."""

    fwd: Blocks
    dkdv: Blocks
    dq: Blocks

    @classmethod
    def for_inputs(cls, dtype: torch.dtype, head_dim: int, gpu: bool | None = None) -> "AttentionConfig":
        """Defaults. Under the interpreter (gpu False), blocks are small and unequal so that the tests reach
        every stage and the BLOCK_M != BLOCK_N paths on short sequences. On GPU: the FlashAttention-2 Triton
        tutorial's H100 shapes (forward 128 x 64; backward dK/dV 128 keys x 32 queries, dQ 128 queries x 32
        keys), halved for fp32 operands and for head_dim 128, which would otherwise exceed registers / shared
        memory. Warps: with 4, ptxas (tools/compile_kernels.py, sm_90a) spills 352 B in the bf16 d=64 dK/dV
        kernel at 255 registers and 2 KB in the fp32 forward, and (with the work-item bounds) 48 B in the fp32
        dQ kernel; 8 warps spill nothing at the same warps per SM."""
        if not (gpu if gpu is not None else not INTERPRETED):
            return cls(fwd=Blocks(64, 32), dkdv=Blocks(32, 64), dq=Blocks(64, 32))
        fp32 = dtype == torch.float32
        big = head_dim > 64 or fp32
        return cls(fwd=Blocks(64 if big else 128, 32 if big else 64, 8 if fp32 else 4, 3),
                   dkdv=Blocks(16 if big else 32, 64 if big else 128, 8, 2),
                   dq=Blocks(64 if big else 128, 16 if big else 32, 8 if fp32 else 4, 2))

    def to_list(self) -> list[int]:
        """Flat ints, the form a torch.library custom op can take."""
        return [v for b in (self.fwd, self.dkdv, self.dq) for v in (b.BLOCK_M, b.BLOCK_N, b.num_warps, b.num_stages)]

    @classmethod
    def from_list(cls, values) -> "AttentionConfig":
        return cls(*(Blocks(*values[i:i + 4]) for i in (0, 4, 8)))


def _launch_kwargs(blocks: Blocks) -> dict:
    return dict(BLOCK_M=blocks.BLOCK_M, BLOCK_N=blocks.BLOCK_N, num_warps=blocks.num_warps,
                num_stages=blocks.num_stages)


def _precision(q: torch.Tensor) -> dict:
    # fp32 inputs must not silently drop to tf32 (PyTorch's fp32 matmul does not either). Triton 3.9's
    # interpreter multiplies bf16/fp16 tiles as raw integers, so there (INTERP) every dot operand is upcast to
    # fp32 (exact for values already rounded to the input dtype, so the arithmetic matches the GPU's).
    return dict(PRECISION="ieee" if q.dtype == torch.float32 else "tf32", INTERP=INTERPRETED)


def _checked(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


# ---- the plan: per-token bounds and work items, from the host lengths ----------------------------------
@dataclass(frozen=True, eq=False)
class TritonPlan:
    """What the kernels read for one micro-batch and window, on the device. Shapes depend only on the token
    count and the block sizes (static under a fixed token budget, so a compiled step never recompiles):
    bounds (2, total) int32, the keys [bounds[0, i], bounds[1, i]) that query i sees; items[block] = (items
    whose rows are queries: forward and dQ, items whose rows are keys: dK/dV), each (cdiv(total, block), 5)
    int32 rows of kernels/block_plan.work_items."""

    layout: PackedLayout
    window: tuple[int, int]
    bounds: torch.Tensor
    items: dict

    def items_for(self, block: int, rows_are_keys: bool) -> torch.Tensor:
        if block not in self.items:
            raise ValueError(f"this attention plan has work items for blocks {sorted(self.items)}, the launch "
                             f"settings need {block}: build it with plan(layout, window, blocks=(..., {block}))")
        return self.items[block][int(rows_are_keys)]


def plan(layout: PackedLayout, window=(-1, -1), blocks=PLAN_BLOCKS) -> TritonPlan:
    """The plan of one micro-batch and window: host numpy over the lengths (O(tokens)), then one copy to the
    device (pinned, non-blocking on CUDA: no sync). bounds[0/1, i] = the keys query i sees, lo <= j < hi."""
    window = tuple(int(w) for w in window)
    q_lo, q_hi = token_key_bounds(layout.lengths, window)    # per query: its keys (forward, dQ masks)
    k_lo, k_hi = token_query_bounds(layout.lengths, window)  # per key: its queries (dK/dV items only)
    if q_lo.shape[0] != layout.total:
        raise ValueError(f"the layout's lengths sum to {q_lo.shape[0]} tokens, its positions to {layout.total}")
    parts = [np.stack([q_lo, q_hi]).astype(np.int32)]
    for block in blocks:
        parts += [work_items(q_lo, q_hi, block), work_items(k_lo, k_hi, block)]
    host = torch.from_numpy(np.concatenate([p.reshape(-1) for p in parts]))
    device = layout.device
    if device.type == "cuda":
        host = host.pin_memory()
    flat = host.to(device, non_blocking=True)
    views, offset = [], 0
    for p in parts:
        views.append(flat[offset:offset + p.size].view(p.shape))
        offset += p.size
    items = {block: (views[1 + 2 * i], views[2 + 2 * i]) for i, block in enumerate(blocks)}
    return TritonPlan(layout, window, views[0], items)


# ---- launches (built as data: run by the custom ops, compiled by tools/compile_kernels.py) ----------------
def forward_launches(q, k, v, bounds, items, scale: float, config: AttentionConfig):
    """(out, lse, launches) for the forward over `items` (the plan's query items for config.fwd.BLOCK_M)."""
    q, k, v = (_checked(t) for t in (q, k, v))
    total, heads, head_dim = q.shape
    out = torch.empty((total, heads, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((heads, total), dtype=torch.float32, device=q.device)
    if total == 0:
        return out, lse, []
    launch = Launch(_fwd_kernel, (items.shape[0], heads), (
        q, k, v, out, lse, bounds, items, scale * LOG2E, total,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0),
        out.stride(1)), dict(HEAD_DIM=head_dim, BLOCK_D=max(16, next_power_of_2(head_dim)), **_precision(q),
                             **_launch_kwargs(config.fwd)))
    return out, lse, [launch]


def backward_launches(grad_out, q, k, v, out, lse, bounds, dkdv_items, dq_items, scale: float,
                      config: AttentionConfig):
    """(dq, dk, dv, launches): the delta kernel, then dK/dV over the key items, then dQ over the query items."""
    q, k, v, out, grad_out = (_checked(t) for t in (q, k, v, out, grad_out))
    total, heads, head_dim = q.shape
    dq, dk, dv = (torch.empty((total, heads, head_dim), dtype=q.dtype, device=q.device) for _ in range(3))
    if total == 0:
        return dq, dk, dv, []
    block_d = max(16, next_power_of_2(head_dim))
    delta = torch.empty((heads, total), dtype=torch.float32, device=q.device)
    block_t = 64
    launches = [Launch(_bwd_delta_kernel, (triton.cdiv(total, block_t), heads), (
        out, grad_out, delta, total, heads, out.stride(0), out.stride(1), grad_out.stride(0), grad_out.stride(1)),
        dict(HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_T=block_t))]
    common = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, **_precision(q))
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), grad_out.stride(0),
               grad_out.stride(1))
    launches.append(Launch(_bwd_dkdv_kernel, (dkdv_items.shape[0], heads), (
        q, k, v, grad_out, lse, delta, dk, dv, bounds, dkdv_items, scale, scale * LOG2E, total, *strides,
        dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1)), dict(**common, **_launch_kwargs(config.dkdv))))
    launches.append(Launch(_bwd_dq_kernel, (dq_items.shape[0], heads), (
        q, k, v, grad_out, lse, delta, dq, bounds, dq_items, scale, scale * LOG2E, total, *strides,
        dq.stride(0), dq.stride(1)), dict(**common, **_launch_kwargs(config.dq))))
    return dq, dk, dv, launches


# ---- custom ops -------------------------------------------------------------------------------------------
@torch.library.custom_op("cmbert::attention_forward", mutates_args=())
def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: torch.Tensor,
                      fwd_items: torch.Tensor, dkdv_items: torch.Tensor, dq_items: torch.Tensor, scale: float,
                      config: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (out (T, H, D) in q's dtype, lse (H, T) fp32 in log2 units of the scaled scores). The plan's
    tensors: bounds and the items of each kernel's block size (the backward's are kept for it).
    config: AttentionConfig.to_list()."""
    out, lse, launches = forward_launches(q, k, v, bounds, fwd_items, scale, AttentionConfig.from_list(config))
    run(launches)
    return out, lse


@attention_forward.register_fake
def _(q, k, v, bounds, fwd_items, dkdv_items, dq_items, scale, config):
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(
        (q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("cmbert::attention_backward", mutates_args=())
def attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       out: torch.Tensor, lse: torch.Tensor, bounds: torch.Tensor, dkdv_items: torch.Tensor,
                       dq_items: torch.Tensor, scale: float,
                       config: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv, launches = backward_launches(grad_out, q, k, v, out, lse, bounds, dkdv_items, dq_items, scale,
                                             AttentionConfig.from_list(config))
    run(launches)
    return dq, dk, dv


@attention_backward.register_fake
def _(grad_out, q, k, v, out, lse, bounds, dkdv_items, dq_items, scale, config):
    return tuple(torch.empty_like(q, memory_format=torch.contiguous_format) for _ in range(3))


def _setup_context(ctx, inputs, output):
    q, k, v, bounds, fwd_items, dkdv_items, dq_items, scale, config = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, bounds, dkdv_items, dq_items)
    ctx.args = (scale, config)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, bounds, dkdv_items, dq_items = ctx.saved_tensors
    dq, dk, dv = attention_backward(grad_out, q, k, v, out, lse, bounds, dkdv_items, dq_items, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None


attention_forward.register_autograd(_backward, setup_context=_setup_context)


# ---- public functions (the `triton` backend of the registry) ------------------------------------------
def op_arguments(plan: TritonPlan, config: AttentionConfig) -> tuple:
    """The plan's tensors the custom op takes for these launch settings: (bounds, fwd, dK/dV, dQ items)."""
    return (plan.bounds, plan.items_for(config.fwd.BLOCK_M, False), plan.items_for(config.dkdv.BLOCK_N, True),
            plan.items_for(config.dq.BLOCK_M, False))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: TritonPlan, softmax_scale: float | None = None,
           config: AttentionConfig | None = None) -> torch.Tensor:
    """The `triton` attention backend; config: launch settings (default AttentionConfig.for_inputs)."""
    if q.shape[-1] > 256:
        raise ValueError(f"head_dim {q.shape[-1]} > 256 is not supported by the Triton attention kernel")
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    config = config or AttentionConfig.for_inputs(q.dtype, q.shape[-1])
    out, _ = attention_forward(q, k, v, *op_arguments(plan, config), scale, config.to_list())
    return out


def config_blocks(config: AttentionConfig) -> tuple[int, ...]:
    """The block sizes whose work items these launch settings read."""
    return tuple(sorted({config.fwd.BLOCK_M, config.dkdv.BLOCK_N, config.dq.BLOCK_M}))


def attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, window: tuple[int, int] = (-1, -1),
                     softmax_scale: float | None = None, config: AttentionConfig | None = None) -> torch.Tensor:
    """The functional form (tests, benchmarks): plan from cu_seqlens (read once), then attend."""
    config = config or AttentionConfig.for_inputs(q.dtype, q.shape[-1])
    layout = PackedLayout.from_cu_seqlens(cu_seqlens, max_seqlen)
    return attend(q, k, v, plan(layout, window, config_blocks(config)), softmax_scale, config)


def attention_flops(lengths, heads: int, head_dim: int, window=(-1, -1), mode: str = "fwd") -> float:
    """Useful matmul FLOPs (masked pairs not counted): 4 * pairs * head_dim per head forward, 2.5x that for
    the backward (the convention of docs/BENCHMARKS.md)."""
    left, right = window
    pairs = 0
    for n in lengths:
        n = int(n)
        if left < 0 and right < 0:
            pairs += n * n
            continue
        lft = n if left < 0 else left
        rgt = n if right < 0 else right
        pairs += sum(min(n - 1, i + rgt) - max(0, i - lft) + 1 for i in range(n))  # keys each query sees
    forward = 4.0 * pairs * head_dim * heads
    return {"fwd": forward, "bwd": 2.5 * forward, "fwd_bwd": 3.5 * forward}[mode]


__all__ = ["AttentionConfig", "Blocks", "TritonPlan", "attention_triton", "attention_forward", "attention_backward",
           "forward_launches", "backward_launches", "attention_flops", "plan", "attend"]
