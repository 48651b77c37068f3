"""Rotary position embedding on packed q and k: reference, Triton kernel (q and k in one launch), autograd.

    rope_reference(q, k, positions, theta) / rope_triton(q, k, positions, theta) -> (q_rotated, k_rotated)

q, k: (tokens, heads, head_dim), any token/head strides (the model passes views into its fused QKV output).
Non-interleaved ("rotate half") form, as HF ModernBERT: for the pair (x1, x2) = (x[:d/2], x[d/2:]),
y1 = x1 cos - x2 sin, y2 = x2 cos + x1 sin, angle = position * theta^(-2i/d). Positions restart per sequence
(kernels/varlen.PackedLayout.positions). Angles and the rotation are fp32; outputs in the input dtype.
The inverse frequencies are computed by PyTorch exactly as the model does, so the kernel's fp32 angles are
bitwise the reference's and only cos/sin rounding differs. The backward is the same kernel rotating by -angle
(flash-attention's `conjugate`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from megatron_cmbert.kernels.reference import inverse_frequencies, rope_reference  # noqa: F401 (re-exported)
from megatron_cmbert.kernels.triton_common import cast
from megatron_cmbert.kernels.triton_utils import Launch, check_mode, next_power_of_2, run

# Fixed for the process when triton was imported: compiled (GPU) or interpreted (CPU tests).
INTERPRETED = check_mode()


@dataclass(frozen=True)
class RopeConfig:
    """Tokens per program and warps. Default on GPU: 2k-element (tokens x half) tiles, 16 per thread at 4
    warps; under the interpreter: few, small programs."""

    BLOCK_T: int
    num_warps: int = 4

    @classmethod
    def for_inputs(cls, head_dim: int, gpu: bool | None = None) -> "RopeConfig":
        gpu = gpu if gpu is not None else not INTERPRETED
        return cls(max(1, 2048 // next_power_of_2(head_dim // 2)) if gpu else 32)


@triton.jit
def _rotate(src, dst, cos, sin, mask, HALF: tl.constexpr, INTERP: tl.constexpr):
    """dst = src rotated: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), one (tokens, half) tile of a head."""
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(dst, cast(x1 * cos - x2 * sin, dst.dtype.element_ty, INTERP), mask=mask)
    tl.store(dst + HALF, cast(x2 * cos + x1 * sin, dst.dtype.element_ty, INTERP), mask=mask)


@triton.jit
def _rope_kernel(Q, K, QO, KO, POS, INV_FREQ, total, heads,
                 stride_qt, stride_qh, stride_kt, stride_kh, stride_qot, stride_qoh, stride_kot, stride_koh,
                 HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_T: tl.constexpr,
                 CONJUGATE: tl.constexpr, INTERP: tl.constexpr):
    # cos/sin once per (token, frequency) in a 2-D tile, then a loop over heads that reuses them for q and k:
    # one transcendental pair per (token, frequency), however Triton lays out the tiles. (A 3-D
    # tokens x heads x frequencies tile let Triton 3.9 recompute them per head: 4x the cos/sin code.)
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = tokens < total
    offs_f = tl.arange(0, BLOCK_HALF)
    f_ok = offs_f < HALF
    pos = tl.load(POS + tokens, mask=t_ok, other=0).to(tl.float32)
    inv = tl.load(INV_FREQ + offs_f, mask=f_ok, other=0.0)
    angle = pos[:, None] * inv[None, :]
    cos = tl.cos(angle)
    sin = tl.sin(angle)
    if CONJUGATE:
        sin = -sin
    mask = t_ok[:, None] & f_ok[None, :]
    t64 = tokens.to(tl.int64)[:, None]
    q_src, q_dst = Q + t64 * stride_qt + offs_f[None, :], QO + t64 * stride_qot + offs_f[None, :]
    k_src, k_dst = K + t64 * stride_kt + offs_f[None, :], KO + t64 * stride_kot + offs_f[None, :]
    for h in range(heads):
        _rotate(q_src + h * stride_qh, q_dst + h * stride_qoh, cos, sin, mask, HALF, INTERP)
        _rotate(k_src + h * stride_kh, k_dst + h * stride_koh, cos, sin, mask, HALF, INTERP)


def rope_launches(q, k, positions, inv_freq, conjugate: bool, config: RopeConfig | None = None):
    """(q_out, k_out, launches)."""
    if q.shape != k.shape or q.dim() != 3 or q.shape[-1] % 2:
        raise ValueError(f"q, k must share a (tokens, heads, even head_dim) shape, got {q.shape}, {k.shape}")
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    total, heads, head_dim = q.shape
    q_out = torch.empty((total, heads, head_dim), dtype=q.dtype, device=q.device)
    k_out = torch.empty_like(q_out, dtype=k.dtype)
    if total == 0:
        return q_out, k_out, []
    config = config or RopeConfig.for_inputs(head_dim)
    launch = Launch(_rope_kernel, (triton.cdiv(total, config.BLOCK_T),), (
        q, k, q_out, k_out, positions, inv_freq, total, heads, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1)), dict(
        HALF=head_dim // 2, BLOCK_HALF=next_power_of_2(head_dim // 2), BLOCK_T=config.BLOCK_T,
        CONJUGATE=conjugate, INTERP=INTERPRETED, num_warps=config.num_warps))
    return q_out, k_out, [launch]


@torch.library.custom_op("cmbert::rope", mutates_args=())
def rope_op(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
            conjugate: bool) -> tuple[torch.Tensor, torch.Tensor]:
    q_out, k_out, launches = rope_launches(q, k, positions, inv_freq, conjugate)
    run(launches)
    return q_out, k_out


@rope_op.register_fake
def _(q, k, positions, inv_freq, conjugate):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    _, _, positions, inv_freq, conjugate = inputs
    ctx.save_for_backward(positions, inv_freq)
    ctx.conjugate = conjugate


def _backward(ctx, grad_q, grad_k):
    positions, inv_freq = ctx.saved_tensors
    # A rotation's transpose is the rotation by the opposite angle.
    dq, dk = rope_op(grad_q, grad_k, positions, inv_freq, not ctx.conjugate)
    return dq, dk, None, None, None


rope_op.register_autograd(_backward, setup_context=_setup_context)


def rope_triton(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, theta: float):
    inv_freq = inverse_frequencies(float(theta), q.shape[-1], str(q.device))
    return rope_op(q, k, positions.to(q.device), inv_freq, False)
