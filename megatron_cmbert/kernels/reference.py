"""Pure-PyTorch references of RoPE, GeGLU and RMSNorm: the `reference` backends, and what the Triton kernels
are tested against. No Triton import here, so the reference path never loads it. (Attention's reference is
kernels/attention_reference.py.)"""
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


def rope_reference(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, theta: float):
    """Pure PyTorch, fp32 math, HF ModernBERT's operations (cos/sin of the halves repeated, rotate_half)."""
    inv_freq = inverse_frequencies(float(theta), q.shape[-1], str(q.device))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos()[:, None, :], emb.sin()[:, None, :]

    def rotate(x):
        xf = x.float()
        half = x.shape[-1] // 2
        return (xf * cos + torch.cat((-xf[..., half:], xf[..., :half]), dim=-1) * sin).to(x.dtype)

    return rotate(q), rotate(k)


# ---- GeGLU ------------------------------------------------------------------------------------------------
def split(x: torch.Tensor, interleaved: bool):
    if interleaved:
        return x[..., 0::2], x[..., 1::2]
    return x.chunk(2, dim=-1)


def geglu_reference(x: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    activated, gate = split(x, interleaved)
    return F.gelu(activated, approximate="none") * gate


# ---- RMSNorm ----------------------------------------------------------------------------------------------
def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    return F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps).to(x.dtype)
