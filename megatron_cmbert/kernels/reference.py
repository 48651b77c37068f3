"""Pure-PyTorch references of RoPE, GeGLU and RMSNorm: the `reference` backends, and what the Triton kernels
are tested against. No Triton import here, so the reference path never loads it. (Attention's reference is
kernels/attention_reference.py.)

They are also the CPU path, so RoPE and the model's interleaved GeGLU are autograd Functions with hand-written
backwards: the same floating-point operations as Hugging Face ModernBERT's forward (RoPE bitwise; GeGLU to
fp32 ulps), without the copies that autograd through slices and `cat` makes, and traceable by torch.compile.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


# ---- RoPE -------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=16)
def inverse_frequencies(theta: float, head_dim: int, device: str) -> torch.Tensor:
    """fp32 (head_dim / 2,) 1 / theta^(2i/d), as HF ModernBERT's rotary embedding computes them.
    Made outside inference mode: the cached tensor is later saved for backward, which an inference tensor
    (first call under torch.inference_mode, e.g. a throughput benchmark) cannot be."""
    with torch.inference_mode(False):
        return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + swap_halves(x) * sin in fp32, in x's dtype. `sin` carries rotate_half's sign, so this is
    HF's x * cos + rotate_half(x) * sin with the same products and sum (-a * s == a * -s exactly); the halves
    are swapped by one flip of a (.., 2, d/2) view instead of a neg and a cat."""
    xf = x.float()
    half = x.shape[-1] // 2
    swapped = xf.unflatten(-1, (2, half)).flip(-2).flatten(-2)
    return (xf * cos + swapped * sin).to(x.dtype)


class _Rope(torch.autograd.Function):
    """Rotation of q and k by the angles whose cos/sin are given; backward is the rotation by minus them
    (nothing but the (tokens, 1, head_dim) tables is saved)."""

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)

    @staticmethod
    def backward(ctx, grad_q, grad_k):
        cos, sin = ctx.saved_tensors
        back = lambda g: None if g is None else _rotate(g, cos, -sin)  # noqa: E731 (the transposed rotation)
        return back(grad_q), back(grad_k), None, None


def rope_tables(positions: torch.Tensor, theta: float, head_dim: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, signed sin), each fp32 (tokens, 1, head_dim): cos of the angles repeated over both halves, and
    sin with rotate_half's sign (-sin on the first half, +sin on the second)."""
    inv_freq = inverse_frequencies(float(theta), head_dim, str(device))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    cos, sin = freqs.cos(), freqs.sin()
    return torch.cat((cos, cos), dim=-1)[:, None, :], torch.cat((-sin, sin), dim=-1)[:, None, :]


def rope_reference(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, theta: float):
    """Pure PyTorch, fp32 math, HF ModernBERT's operations (cos/sin of the halves repeated, rotate_half)."""
    cos, sin = rope_tables(positions, theta, q.shape[-1], q.device)
    return _Rope.apply(q, k, cos, sin)


# ---- GeGLU ------------------------------------------------------------------------------------------------
class _GegluInterleaved(torch.autograd.Function):
    """gelu(x[..., 0::2]) * x[..., 1::2] for the model's Wi layout (channels interleaved [input_c; gate_c]).

    Elementwise ops on stride-2 views fall off PyTorch's vectorised CPU loops (GELU's erf runs scalar),
    and autograd through the two slices zero-fills two full-size gradients. Here the GELU input channels
    are copied out once (a plain strided copy), GELU and its derivative run vectorised on that contiguous
    copy, only the products read the gate at stride 2, and the backward interleaves both channels of the
    gradient with one `stack` (no out= into strided views, so torch.compile traces it). Only x is saved.
    The per-element ops are HF's chunked GeGLU's; the values agree to fp32 ulps (torch's CPU GELU rounds a
    contiguous tensor and HF's strided chunk view differently in the last bit)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        pairs = x.unflatten(-1, (-1, 2))
        return F.gelu(pairs[..., 0].contiguous()) * pairs[..., 1]

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        pairs = x.unflatten(-1, (-1, 2))
        activated_input = pairs[..., 0].contiguous()  # recomputed: saving it would cost half of x's size
        grad_input = torch.ops.aten.gelu_backward(grad * pairs[..., 1], activated_input)
        grad_gate = grad * F.gelu(activated_input)
        return torch.stack((grad_input, grad_gate), dim=-1).flatten(-2)


def split(x: torch.Tensor, interleaved: bool):
    """(GELU input, gate) views of a fused projection: halves, or interleaved channels."""
    if interleaved:
        return x[..., 0::2], x[..., 1::2]
    return x.chunk(2, dim=-1)


def geglu_reference(x: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """gelu_erf(input) * gate; `chunk` halves (contiguous rows, HF's way) or the interleaved Function."""
    if interleaved:
        return _GegluInterleaved.apply(x)
    activated, gate = x.chunk(2, dim=-1)
    return F.gelu(activated, approximate="none") * gate


# ---- RMSNorm ----------------------------------------------------------------------------------------------
def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    return F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps).to(x.dtype)
