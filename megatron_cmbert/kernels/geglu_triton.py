"""GeGLU with exact (erf) GELU: reference, Triton forward/backward kernels, autograd.

    geglu_reference(x, interleaved=False) / geglu_triton(x, interleaved=False) -> (..., I)

x: (..., 2I). Halves layout (the issue's and HF's): gelu(x[..., :I]) * x[..., I:].
Interleaved layout (this model's Wi rows, chosen so a tensor-parallel shard is contiguous, see
model/modernbert.py): gelu(x[..., 0::2]) * x[..., 1::2].
The kernel computes in fp32 and rounds once; PyTorch's bf16 path rounds gelu(a) before the product, so the
kernel is at least as accurate (tests hold it to <= 2x PyTorch's own low-precision error).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from megatron_cmbert.kernels.reference import geglu_reference  # noqa: F401 (re-exported)
from megatron_cmbert.kernels.triton_common import cast
from megatron_cmbert.kernels.triton_utils import Launch, check_mode, run

# Fixed for the process when triton was imported: compiled (GPU) or interpreted (CPU tests).
INTERPRETED = check_mode()

# constexpr: compiled kernels may only read constexpr globals (the interpreter reads any).
SQRT1_2 = tl.constexpr(0.7071067811865476)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _geglu_kernel(X, Y, DY, DX, rows, width, stride_x, stride_y, BACKWARD: tl.constexpr,
                  INTERLEAVED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, INTERP: tl.constexpr):
    """Forward: Y = gelu(a) * g. Backward: DX[a] = DY * g * gelu'(a), DX[g] = DY * gelu(a) (same layout as X).
    stride_y is the row stride of Y (forward) or DY (backward); DX shares X's strides."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (r < rows)[:, None] & (c < width)[None, :]
    r64 = r.to(tl.int64)[:, None]
    y_off = r64 * stride_y + c[None, :]
    if INTERLEAVED:
        # One contiguous (rows, 2 * cols) tile, reshaped into (a, g) pairs: 16-byte vector loads and stores
        # instead of 2-byte ones at stride 2.
        pair = tl.program_id(1) * 2 * BLOCK_C + tl.arange(0, 2 * BLOCK_C)
        pair_off = r64 * stride_x + pair[None, :]
        pair_mask = (r < rows)[:, None] & (pair < 2 * width)[None, :]
        x = tl.load(X + pair_off, mask=pair_mask, other=0.0).to(tl.float32)
        a, g = tl.split(tl.reshape(x, [BLOCK_R, BLOCK_C, 2]))
    else:
        a_off = r64 * stride_x + c[None, :]
        g_off = a_off + width
        a = tl.load(X + a_off, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(X + g_off, mask=mask, other=0.0).to(tl.float32)
    cdf = 0.5 * (1.0 + tl.math.erf(a * SQRT1_2))
    if BACKWARD:
        dy = tl.load(DY + y_off, mask=mask, other=0.0).to(tl.float32)
        pdf = tl.exp(-0.5 * a * a) * INV_SQRT_2PI
        da = dy * g * (cdf + a * pdf)
        dg = dy * a * cdf
        if INTERLEAVED:
            dx = tl.reshape(tl.join(da, dg), [BLOCK_R, 2 * BLOCK_C])
            tl.store(DX + pair_off, cast(dx, DX.dtype.element_ty, INTERP), mask=pair_mask)
        else:
            tl.store(DX + a_off, cast(da, DX.dtype.element_ty, INTERP), mask=mask)
            tl.store(DX + g_off, cast(dg, DX.dtype.element_ty, INTERP), mask=mask)
    else:
        tl.store(Y + y_off, cast(a * cdf * g, Y.dtype.element_ty, INTERP), mask=mask)


@dataclass(frozen=True)
class GegluConfig:
    """Rows x output columns per program, and warps. Default on GPU: 4 x 1024 elements per program
    (bandwidth-bound: enough bytes in flight, few index ops); under the interpreter: few large programs."""

    BLOCK_R: int
    BLOCK_C: int
    num_warps: int

    @classmethod
    def default(cls, gpu: bool | None = None) -> "GegluConfig":
        return cls(4, 1024, 8) if (gpu if gpu is not None else not INTERPRETED) else cls(16, 128, 4)


def geglu_launches(x: torch.Tensor, grad_y: torch.Tensor | None, interleaved: bool,
                   config: GegluConfig | None = None):
    """(result, launches): y = geglu(x) when grad_y is None, else dx (the backward)."""
    x2 = _rows(x)
    rows, width = x2.shape[0], x2.shape[1] // 2
    backward = grad_y is not None
    if backward:
        dy = _rows(grad_y)
        result = torch.empty_like(x2)
    else:
        result = dy = torch.empty((rows, width), dtype=x.dtype, device=x.device)
    if not rows:
        return result, []
    config = config or GegluConfig.default()
    return result, [Launch(_geglu_kernel, (triton.cdiv(rows, config.BLOCK_R), triton.cdiv(width, config.BLOCK_C)), (
        x2, result if not backward else dy, dy, result if backward else x2, rows, width, x2.stride(0), dy.stride(0)),
        dict(BACKWARD=backward, INTERLEAVED=interleaved, BLOCK_R=config.BLOCK_R, BLOCK_C=config.BLOCK_C,
             INTERP=INTERPRETED, num_warps=config.num_warps))]


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


@torch.library.custom_op("cmbert::geglu_forward", mutates_args=())
def geglu_forward(x: torch.Tensor, interleaved: bool) -> torch.Tensor:
    if x.shape[-1] % 2:
        raise ValueError(f"geglu needs an even last dimension, got {x.shape[-1]}")
    y, launches = geglu_launches(x, None, interleaved)
    run(launches)
    return y.view(*x.shape[:-1], x.shape[-1] // 2)


@geglu_forward.register_fake
def _(x, interleaved):
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))


@torch.library.custom_op("cmbert::geglu_backward", mutates_args=())
def geglu_backward(grad_y: torch.Tensor, x: torch.Tensor, interleaved: bool) -> torch.Tensor:
    dx, launches = geglu_launches(x, grad_y, interleaved)
    run(launches)
    return dx.view(x.shape)


@geglu_backward.register_fake
def _(grad_y, x, interleaved):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    x, interleaved = inputs
    ctx.save_for_backward(x)
    ctx.interleaved = interleaved


def _backward(ctx, grad_y):
    (x,) = ctx.saved_tensors
    return geglu_backward(grad_y, x, ctx.interleaved), None


geglu_forward.register_autograd(_backward, setup_context=_setup_context)


def geglu_triton(x: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    return geglu_forward(x, bool(interleaved))
