"""RMSNorm: reference, Triton forward/backward kernels, autograd (gradients for x and weight).

    rms_norm_reference(x, weight, eps) / rms_norm_triton(x, weight, eps) -> y in x's dtype

y = x / sqrt(mean(x^2) + eps) * weight, all arithmetic in fp32 (as model/layers.py RMSNorm), rounded once.
Forward keeps rstd (fp32, one per row) for the backward:
    x_hat = x * rstd,  dx = rstd * (dy*w - x_hat * mean(dy*w * x_hat)),  dw = sum_rows dy * x_hat.
The backward runs a persistent grid (one program per SM), each program walking rows with a stride and
keeping its dw partial sum in registers: one (programs, hidden) fp32 store at the end instead of a
(rows, hidden) intermediate, the reason Liger's one-row-per-program backward is slow at hidden 1024.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from megatron_cmbert.kernels.reference import rms_norm_reference  # noqa: F401 (re-exported)
from megatron_cmbert.kernels.triton_common import cast
from megatron_cmbert.kernels.triton_utils import Launch, check_mode, next_power_of_2, program_count, run

# Fixed for the process when triton was imported: compiled (GPU) or interpreted (CPU tests).
INTERPRETED = check_mode()

MAX_HIDDEN = 65536


@triton.jit
def _rms_fwd_kernel(X, W, Y, RSTD, rows, hidden, eps, stride_x, stride_y,
                    BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, INTERP: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, BLOCK_H)
    c_ok = c < hidden
    mask = (r < rows)[:, None] & c_ok[None, :]
    r64 = r.to(tl.int64)[:, None]
    x = tl.load(X + r64 * stride_x + c[None, :], mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + c, mask=c_ok, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 1) / hidden + eps)
    tl.store(Y + r64 * stride_y + c[None, :], cast(x * rstd[:, None] * w[None, :], Y.dtype.element_ty, INTERP), mask=mask)
    tl.store(RSTD + r, rstd, mask=r < rows)


@triton.jit
def _rms_bwd_kernel(X, W, DY, RSTD, DX, DW_PARTIAL, rows, hidden, stride_x, stride_dy, stride_dx,
                    BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, INTERP: tl.constexpr):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    c = tl.arange(0, BLOCK_H)
    c_ok = c < hidden
    w = tl.load(W + c, mask=c_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_H], tl.float32)
    for r0 in range(pid * BLOCK_R, rows, programs * BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        r_ok = r < rows
        mask = r_ok[:, None] & c_ok[None, :]
        r64 = r.to(tl.int64)[:, None]
        x = tl.load(X + r64 * stride_x + c[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + r64 * stride_dy + c[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + r, mask=r_ok, other=0.0)
        x_hat = x * rstd[:, None]
        dyw = dy * w[None, :]
        dot = tl.sum(dyw * x_hat, 1) / hidden
        dx = (dyw - x_hat * dot[:, None]) * rstd[:, None]
        tl.store(DX + r64 * stride_dx + c[None, :], cast(dx, DX.dtype.element_ty, INTERP), mask=mask)
        dw += tl.sum(dy * x_hat, 0)
    tl.store(DW_PARTIAL + pid.to(tl.int64) * hidden + c, dw, mask=c_ok)


@dataclass(frozen=True)
class RmsNormConfig:
    """Rows per program (BLOCK_H is the hidden size rounded up to a power of 2) and warps. Default on GPU:
    ~4-8k fp32 elements per tile, enough loads in flight per SM without spilling registers."""

    BLOCK_R: int
    num_warps: int

    @classmethod
    def for_hidden(cls, hidden: int, gpu: bool | None = None) -> "RmsNormConfig":
        if not (gpu if gpu is not None else not INTERPRETED):
            return cls(16, 4)
        block_h = next_power_of_2(hidden)
        return cls(max(1, min(16, 4096 // block_h)), 8 if block_h >= 2048 else 4)


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def forward_launches(x: torch.Tensor, weight: torch.Tensor, eps: float, config: RmsNormConfig | None = None):
    """(y, rstd, launches)."""
    hidden = x.shape[-1]
    if hidden > MAX_HIDDEN or weight.shape != (hidden,):
        raise ValueError(f"rms_norm: hidden {hidden} (max {MAX_HIDDEN}) with weight {tuple(weight.shape)}")
    x2 = _rows(x)
    rows = x2.shape[0]
    y = torch.empty_like(x2)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    if not rows:
        return y, rstd, []
    config = config or RmsNormConfig.for_hidden(hidden)
    return y, rstd, [Launch(_rms_fwd_kernel, (triton.cdiv(rows, config.BLOCK_R),), (
        x2, weight.contiguous(), y, rstd, rows, hidden, eps, x2.stride(0), y.stride(0)), dict(
        BLOCK_R=config.BLOCK_R, BLOCK_H=next_power_of_2(hidden), INTERP=INTERPRETED, num_warps=config.num_warps))]


def backward_launches(grad_y, x, weight, rstd, config: RmsNormConfig | None = None):
    """(dx, dw partial sums (programs, hidden) fp32, launches): a persistent grid, one program per SM."""
    x2, dy = _rows(x), _rows(grad_y)
    rows, hidden = x2.shape
    dx = torch.empty_like(x2)
    config = config or RmsNormConfig.for_hidden(hidden)
    programs = max(1, min(program_count(x), triton.cdiv(rows, config.BLOCK_R)))
    partial = torch.zeros((programs, hidden), dtype=torch.float32, device=x.device)
    if not rows:
        return dx, partial, []
    return dx, partial, [Launch(_rms_bwd_kernel, (programs,), (
        x2, weight.contiguous(), dy, rstd, dx, partial, rows, hidden, x2.stride(0), dy.stride(0), dx.stride(0)),
        dict(BLOCK_R=config.BLOCK_R, BLOCK_H=next_power_of_2(hidden), INTERP=INTERPRETED,
             num_warps=config.num_warps))]


@torch.library.custom_op("cmbert::rms_norm_forward", mutates_args=())
def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    y, rstd, launches = forward_launches(x, weight, eps)
    run(launches)
    return y.view(x.shape), rstd


@rms_norm_forward.register_fake
def _(x, weight, eps):
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty((rows,), dtype=torch.float32)


@torch.library.custom_op("cmbert::rms_norm_backward", mutates_args=())
def rms_norm_backward(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                      rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dx, partial, launches = backward_launches(grad_y, x, weight, rstd)
    run(launches)
    return dx.view(x.shape), partial.sum(0).to(weight.dtype)


@rms_norm_backward.register_fake
def _(grad_y, x, weight, rstd):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight, output[1])


def _backward(ctx, grad_y, grad_rstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = rms_norm_backward(grad_y, x, weight, rstd)
    return dx, dw, None


rms_norm_forward.register_autograd(_backward, setup_context=_setup_context)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    return rms_norm_forward(x, weight, float(eps))[0]
