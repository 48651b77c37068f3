"""Varlen sliding-window FlashAttention (forward + backward) in Triton: the `triton` attention backend.

    attention_triton(q, k, v, cu_seqlens, max_seqlen, window=(left, right), softmax_scale=None)
    plan(layout, window) -> attend(q, k, v, plan, softmax_scale)     (the registry's two parts)

Same contract as kernels/attention_reference.py (the reference it is tested against): q, k, v packed as
(total_tokens, heads, head_dim); query i of a sequence sees key j of the same sequence when
i - left <= j <= i + right (-1 = unbounded side). Bidirectional, fp32 accumulation, fp32 log-sum-exp kept for
the backward (FlashAttention-2 recomputation: no (S, S) matrix is ever stored).

Layout follows flash-attention's Triton kernels: one program per (query block, sequence, head) in the
forward and the dQ pass, one per (key block, sequence, head) in the dK/dV pass, so no atomics are needed.
Each program visits only the key (or query) blocks that the window can reach, so a local layer costs
O(S * window), not O(S^2). The visited range is split in three stages: blocks straddling the left edge
(masked), blocks fully inside window and sequence (no mask arithmetic), blocks straddling the right edge or
the sequence end (masked). Registered as torch.library custom ops so torch.compile can trace the model.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from megatron_cmbert.kernels.triton_common import cast
from megatron_cmbert.kernels.triton_utils import Launch, check_mode, next_power_of_2, run
from megatron_cmbert.kernels.varlen import VarlenPlan, plan_from_cu_seqlens

# Fixed for the process when triton was imported: compiled (GPU) or interpreted (CPU tests).
INTERPRETED = check_mode()

LOG2E = 1.4426950408889634
# Finite "minus infinity": a fully masked block then gives exp2(0) terms, later rescaled by 0. A constexpr,
# because compiled kernels may only read constexpr globals (the interpreter reads any).
MASKED = tl.constexpr(-1.0e30)


# ---- kernels ------------------------------------------------------------------------------------------
@triton.jit
def _visit_bounds(own0, before, after, length, OWN: tl.constexpr, STEP: tl.constexpr):
    """Blocks of STEP on the other side that rows own0 .. own0+OWN-1 reach, where row i reaches
    i-before .. i+after within [0, length) (-1 = unbounded side). Returns the three stages' bounds:
    [lo_b, end0) straddles the near edge (masked), [mid_lo, mid_hi) is reached by every row (no mask),
    [start2, hi) straddles the far edge or the sequence end (masked). Forward and dQ: rows are queries,
    (before, after) = (left, right); dK/dV: rows are keys, (before, after) = (right, left)."""
    lo = tl.where(before >= 0, tl.maximum(own0 - before, 0), 0)
    hi = tl.where(after >= 0, tl.minimum(own0 + OWN + after, length), length)
    full_lo = tl.where(before >= 0, own0 + OWN - 1 - before, 0)
    full_hi = tl.where(after >= 0, tl.minimum(own0 + after + 1, length), length)
    lo_b = (lo // STEP) * STEP
    mid_lo = lo_b + tl.cdiv(tl.maximum(full_lo - lo_b, 0), STEP) * STEP
    mid_hi = mid_lo + (tl.maximum(full_hi - mid_lo, 0) // STEP) * STEP
    end0 = tl.minimum(mid_lo, hi)
    start2 = tl.maximum(mid_hi, end0)
    return lo_b, end0, mid_lo, mid_hi, start2, hi


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, CU, scale_log2, left, right, total,
                stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                PRECISION: tl.constexpr, INTERP: tl.constexpr):
    pid_m = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    start = tl.load(CU + seq)
    length = tl.load(CU + seq + 1) - start
    q0 = pid_m * BLOCK_M
    if q0 >= length:  # the grid is sized for the longest sequence
        return
    rows = q0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_ok = rows < length
    base = start.to(tl.int64)
    q = tl.load(Q + (base + rows)[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if INTERP:
        q = q.to(tl.float32)
    k_base = K + base * stride_kt + head * stride_kh
    v_base = V + base * stride_vt + head * stride_vh

    # Key blocks this query block reaches, in three stages (see _visit_bounds).
    lo_b, end0, mid_lo, mid_hi, start2, hi = _visit_bounds(q0, left, right, length, BLOCK_M, BLOCK_N)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for stage in tl.static_range(3):
        if stage == 0:
            n_begin, n_end = lo_b, end0
        elif stage == 1:
            n_begin, n_end = mid_lo, mid_hi
        else:
            n_begin, n_end = start2, hi
        for n0 in range(n_begin, n_end, BLOCK_N):
            cols = n0 + offs_n
            kv_mask = (cols < length)[:, None] & d_ok[None, :]
            k = tl.load(k_base + cols[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
            if INTERP:
                k = k.to(tl.float32)
            qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
            if stage != 1:
                keep = (cols[None, :] < length)
                keep &= (cols[None, :] >= rows[:, None] - left) | (left < 0)
                keep &= (cols[None, :] <= rows[:, None] + right) | (right < 0)
                qk = tl.where(keep, qk, MASKED)
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(qk - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + cols[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
            p_in = cast(p, V.dtype.element_ty, INTERP)  # P rounded to the input precision, as tensor cores get it
            if INTERP:
                v, p_in = v.to(tl.float32), p_in.to(tl.float32)
            acc = tl.dot(p_in, v, acc * alpha[:, None], input_precision=PRECISION)
            m_i = m_new
    out = acc / l_i[:, None]
    tl.store(O + (base + rows)[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
             cast(out, O.dtype.element_ty, INTERP), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + head.to(tl.int64) * total + base + rows, m_i + tl.log2(l_i), mask=row_ok)


@triton.jit
def _bwd_delta_kernel(O, DO, DELTA, total, heads, stride_ot, stride_oh, stride_dt, stride_dh,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):
    """delta[h, t] = sum_d o * do: the row term of softmax's backward, computed once per row."""
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    head = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (tokens < total)[:, None] & (offs_d < HEAD_DIM)[None, :]
    t64 = tokens.to(tl.int64)[:, None]
    o = tl.load(O + t64 * stride_ot + head * stride_oh + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + t64 * stride_dt + head * stride_dh + offs_d[None, :], mask=mask, other=0.0)
    tl.store(DELTA + head.to(tl.int64) * total + tokens, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1),
             mask=tokens < total)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, CU, scale, scale_log2, left, right, total,
                     stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
                     stride_dkt, stride_dkh, stride_dvt, stride_dvh,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, INTERP: tl.constexpr):
    pid_n = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    start = tl.load(CU + seq)
    length = tl.load(CU + seq + 1) - start
    n0 = pid_n * BLOCK_N
    if n0 >= length:
        return
    cols = n0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    col_ok = cols < length
    base = start.to(tl.int64)
    kv_mask = col_ok[:, None] & d_ok[None, :]
    k = tl.load(K + (base + cols)[:, None] * stride_kt + head * stride_kh + offs_d[None, :], mask=kv_mask,
                other=0.0)
    v = tl.load(V + (base + cols)[:, None] * stride_vt + head * stride_vh + offs_d[None, :], mask=kv_mask,
                other=0.0)
    if INTERP:
        k, v = k.to(tl.float32), v.to(tl.float32)
    q_base = Q + base * stride_qt + head * stride_qh
    do_base = DO + base * stride_dot + head * stride_doh
    row_base = head.to(tl.int64) * total + base

    # Queries that see some key of this block: i - left <= j <= i + right  <=>  j - right <= i <= j + left.
    lo_b, end0, mid_lo, mid_hi, start2, hi = _visit_bounds(n0, right, left, length, BLOCK_N, BLOCK_M)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for stage in tl.static_range(3):
        if stage == 0:
            m_begin, m_end = lo_b, end0
        elif stage == 1:
            m_begin, m_end = mid_lo, mid_hi
        else:
            m_begin, m_end = start2, hi
        for m0 in range(m_begin, m_end, BLOCK_M):
            rows = m0 + offs_m
            row_ok = rows < length
            q_mask = row_ok[:, None] & d_ok[None, :]
            q = tl.load(q_base + rows[:, None] * stride_qt + offs_d[None, :], mask=q_mask, other=0.0)
            do = tl.load(do_base + rows[:, None] * stride_dot + offs_d[None, :], mask=q_mask, other=0.0)
            if INTERP:
                q, do = q.to(tl.float32), do.to(tl.float32)
            lse = tl.load(LSE + row_base + rows, mask=row_ok, other=0.0)
            delta = tl.load(DELTA + row_base + rows, mask=row_ok, other=0.0)
            # Transposed scores (keys x queries) so dK, dV accumulate as plain (BLOCK_N, D) products.
            p_t = tl.exp2(tl.dot(k, tl.trans(q), input_precision=PRECISION) * scale_log2 - lse[None, :])
            if stage != 1:
                keep = row_ok[None, :]
                keep &= (cols[:, None] >= rows[None, :] - left) | (left < 0)
                keep &= (cols[:, None] <= rows[None, :] + right) | (right < 0)
                p_t = tl.where(keep, p_t, 0.0)
            p_in = cast(p_t, DO.dtype.element_ty, INTERP)
            if INTERP:
                p_in = p_in.to(tl.float32)
            dv = tl.dot(p_in, do, dv, input_precision=PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])
            ds_in = cast(ds_t, Q.dtype.element_ty, INTERP)
            if INTERP:
                ds_in = ds_in.to(tl.float32)
            dk = tl.dot(ds_in, q, dk, input_precision=PRECISION)
    tl.store(DK + (base + cols)[:, None] * stride_dkt + head * stride_dkh + offs_d[None, :],
             cast(dk * scale, DK.dtype.element_ty, INTERP), mask=kv_mask)
    tl.store(DV + (base + cols)[:, None] * stride_dvt + head * stride_dvh + offs_d[None, :],
             cast(dv, DV.dtype.element_ty, INTERP), mask=kv_mask)


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, CU, scale, scale_log2, left, right, total,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
                   stride_dqt, stride_dqh,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   PRECISION: tl.constexpr, INTERP: tl.constexpr):
    pid_m = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    start = tl.load(CU + seq)
    length = tl.load(CU + seq + 1) - start
    q0 = pid_m * BLOCK_M
    if q0 >= length:
        return
    rows = q0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_ok = rows < length
    base = start.to(tl.int64)
    q_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + (base + rows)[:, None] * stride_qt + head * stride_qh + offs_d[None, :], mask=q_mask,
                other=0.0)
    do = tl.load(DO + (base + rows)[:, None] * stride_dot + head * stride_doh + offs_d[None, :], mask=q_mask,
                 other=0.0)
    if INTERP:
        q, do = q.to(tl.float32), do.to(tl.float32)
    row_base = head.to(tl.int64) * total + base
    lse = tl.load(LSE + row_base + rows, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + row_base + rows, mask=row_ok, other=0.0)
    k_base = K + base * stride_kt + head * stride_kh
    v_base = V + base * stride_vt + head * stride_vh

    # Same key ranges as the forward.
    lo_b, end0, mid_lo, mid_hi, start2, hi = _visit_bounds(q0, left, right, length, BLOCK_M, BLOCK_N)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for stage in tl.static_range(3):
        if stage == 0:
            n_begin, n_end = lo_b, end0
        elif stage == 1:
            n_begin, n_end = mid_lo, mid_hi
        else:
            n_begin, n_end = start2, hi
        for n0 in range(n_begin, n_end, BLOCK_N):
            cols = n0 + offs_n
            kv_mask = (cols < length)[:, None] & d_ok[None, :]
            k = tl.load(k_base + cols[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_base + cols[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
            if INTERP:
                k, v = k.to(tl.float32), v.to(tl.float32)
            p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2 - lse[:, None])
            if stage != 1:
                keep = (cols[None, :] < length)
                keep &= (cols[None, :] >= rows[:, None] - left) | (left < 0)
                keep &= (cols[None, :] <= rows[:, None] + right) | (right < 0)
                p = tl.where(keep, p, 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            ds_in = cast(ds, K.dtype.element_ty, INTERP)
            if INTERP:
                ds_in = ds_in.to(tl.float32)
            dq = tl.dot(ds_in, k, dq, input_precision=PRECISION)
    tl.store(DQ + (base + rows)[:, None] * stride_dqt + head * stride_dqh + offs_d[None, :],
             cast(dq * scale, DQ.dtype.element_ty, INTERP), mask=q_mask)


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
        kernel at 255 registers and 2 KB in the fp32 forward; 8 warps spill nothing at the same warps per SM."""
        if not (gpu if gpu is not None else not INTERPRETED):
            return cls(fwd=Blocks(64, 32), dkdv=Blocks(32, 64), dq=Blocks(64, 32))
        fp32 = dtype == torch.float32
        big = head_dim > 64 or fp32
        return cls(fwd=Blocks(64 if big else 128, 32 if big else 64, 8 if fp32 else 4, 3),
                   dkdv=Blocks(16 if big else 32, 64 if big else 128, 8, 2),
                   dq=Blocks(64 if big else 128, 16 if big else 32, 4, 2))

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


def _grid(max_seqlen: int, block: int, num_seqs: int, heads: int):
    return (triton.cdiv(max(int(max_seqlen), 1), block), num_seqs, heads)


# ---- launches (built as data: run by the custom ops, compiled by tools/compile_kernels.py) ----------------
def forward_launches(q, k, v, cu_seqlens, max_seqlen: int, left: int, right: int, scale: float,
                     config: AttentionConfig):
    """(out, lse, launches) for the forward; out and lse are filled once the launches run."""
    q, k, v = (_checked(t) for t in (q, k, v))
    total, heads, head_dim = q.shape
    out = torch.empty((total, heads, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((heads, total), dtype=torch.float32, device=q.device)
    if total == 0:
        return out, lse, []
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    launch = Launch(_fwd_kernel, _grid(max_seqlen, config.fwd.BLOCK_M, cu.numel() - 1, heads), (
        q, k, v, out, lse, cu, scale * LOG2E, left, right, total,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0),
        out.stride(1)), dict(HEAD_DIM=head_dim, BLOCK_D=max(16, next_power_of_2(head_dim)), **_precision(q),
                             **_launch_kwargs(config.fwd)))
    return out, lse, [launch]


def backward_launches(grad_out, q, k, v, out, lse, cu_seqlens, max_seqlen: int, left: int, right: int,
                      scale: float, config: AttentionConfig):
    """(dq, dk, dv, launches): the delta kernel, then dK/dV, then dQ."""
    q, k, v, out, grad_out = (_checked(t) for t in (q, k, v, out, grad_out))
    total, heads, head_dim = q.shape
    dq, dk, dv = (torch.empty((total, heads, head_dim), dtype=q.dtype, device=q.device) for _ in range(3))
    if total == 0:
        return dq, dk, dv, []
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    block_d = max(16, next_power_of_2(head_dim))
    delta = torch.empty((heads, total), dtype=torch.float32, device=q.device)
    block_t = 64
    launches = [Launch(_bwd_delta_kernel, (triton.cdiv(total, block_t), heads), (
        out, grad_out, delta, total, heads, out.stride(0), out.stride(1), grad_out.stride(0), grad_out.stride(1)),
        dict(HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_T=block_t))]
    common = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, **_precision(q))
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), grad_out.stride(0),
               grad_out.stride(1))
    seqs = cu.numel() - 1
    launches.append(Launch(_bwd_dkdv_kernel, _grid(max_seqlen, config.dkdv.BLOCK_N, seqs, heads), (
        q, k, v, grad_out, lse, delta, dk, dv, cu, scale, scale * LOG2E, left, right, total, *strides,
        dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1)), dict(**common, **_launch_kwargs(config.dkdv))))
    launches.append(Launch(_bwd_dq_kernel, _grid(max_seqlen, config.dq.BLOCK_M, seqs, heads), (
        q, k, v, grad_out, lse, delta, dq, cu, scale, scale * LOG2E, left, right, total, *strides,
        dq.stride(0), dq.stride(1)), dict(**common, **_launch_kwargs(config.dq))))
    return dq, dk, dv, launches


# ---- custom ops -------------------------------------------------------------------------------------------
@torch.library.custom_op("cmbert::attention_forward", mutates_args=())
def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                      max_seqlen: int, left: int, right: int, scale: float,
                      config: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (out (T, H, D) in q's dtype, lse (H, T) fp32 in log2 units of the scaled scores).
    config: AttentionConfig.to_list()."""
    out, lse, launches = forward_launches(q, k, v, cu_seqlens, max_seqlen, left, right, scale,
                                          AttentionConfig.from_list(config))
    run(launches)
    return out, lse


@attention_forward.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, left, right, scale, config):
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(
        (q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("cmbert::attention_backward", mutates_args=())
def attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       out: torch.Tensor, lse: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                       left: int, right: int, scale: float,
                       config: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv, launches = backward_launches(grad_out, q, k, v, out, lse, cu_seqlens, max_seqlen, left, right,
                                             scale, AttentionConfig.from_list(config))
    run(launches)
    return dq, dk, dv


@attention_backward.register_fake
def _(grad_out, q, k, v, out, lse, cu_seqlens, max_seqlen, left, right, scale, config):
    return tuple(torch.empty_like(q, memory_format=torch.contiguous_format) for _ in range(3))


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, left, right, scale, config = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
    ctx.args = (max_seqlen, left, right, scale, config)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = attention_backward(grad_out, q, k, v, out, lse, cu_seqlens, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None


attention_forward.register_autograd(_backward, setup_context=_setup_context)


# ---- public functions (the `triton` backend of the registry) ------------------------------------------
def plan(layout, window=(-1, -1)) -> VarlenPlan:
    return VarlenPlan(layout, tuple(int(w) for w in window))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: VarlenPlan, softmax_scale: float | None = None,
           config: AttentionConfig | None = None) -> torch.Tensor:
    """The `triton` attention backend; config: launch settings (default AttentionConfig.for_inputs)."""
    if q.shape[-1] > 256:
        raise ValueError(f"head_dim {q.shape[-1]} > 256 is not supported by the Triton attention kernel")
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    left, right = plan.window
    config = config or AttentionConfig.for_inputs(q.dtype, q.shape[-1])
    out, _ = attention_forward(q, k, v, plan.layout.cu_seqlens, int(plan.layout.max_seqlen), left, right, scale,
                               config.to_list())
    return out


def attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, window: tuple[int, int] = (-1, -1),
                     softmax_scale: float | None = None, config: AttentionConfig | None = None) -> torch.Tensor:
    """The functional form (tests, benchmarks): plan from cu_seqlens (read once), then attend."""
    return attend(q, k, v, plan_from_cu_seqlens(plan, cu_seqlens, max_seqlen, window), softmax_scale, config)


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


__all__ = ["AttentionConfig", "Blocks", "attention_triton", "attention_forward", "attention_backward",
           "forward_launches", "backward_launches", "attention_flops"]
