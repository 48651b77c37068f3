"""The one attention entry point of the model, and the registry of its backends.

    attention(q, k, v, cu_seqlens, max_seqlen, window=(left, right), softmax_scale=None, backend=None)

q, k, v are packed: (total_tokens, heads, head_dim); sequence b owns tokens cu_seqlens[b]:cu_seqlens[b+1].
Query i sees key j of the same sequence when i - left <= j <= i + right; window (-1, -1) is global.

Backends: `reference` (pure PyTorch, CPU and GPU), `flex` (FlexAttention, GPU), `flash_attn` (when the
package is installed), `triton` (kernels/attention_triton.py; also runs on CPU tensors under Triton's
interpreter when TRITON_INTERPRET=1; `auto` never picks it on CPU, nor on GPU until AUTO_PICKS_TRITON). `auto` picks the fastest available one for the tensor's device and logs the
choice once. The backend comes from the `backend` argument, else the CMBERT_ATTN_BACKEND environment
variable, else CMBERT_KERNEL_BACKEND when it names an attention backend (one switch for all kernels, see
kernels/dispatch.py), else `auto`. Nothing is imported or chosen at import time.
"""
from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass
from typing import Callable

import torch

from megatron_cmbert.kernels.triton_utils import AUTO_PICKS_TRITON, NOT_AUTO_REASON

logger = logging.getLogger(__name__)

ENV_VAR = "CMBERT_ATTN_BACKEND"
KERNEL_ENV_VAR = "CMBERT_KERNEL_BACKEND"


@dataclass
class Backend:
    name: str
    module: str
    function: str
    needs_cuda: bool
    """Only usable on CUDA tensors (auto never picks it for CPU tensors)."""
    half_precision_only: bool = False
    interpretable: bool = False
    """Also runs on CPU tensors through Triton's interpreter when TRITON_INTERPRET=1 (tests; never auto)."""

    def load(self) -> Callable:
        """The kernel function; ImportError when its package (or module) is missing."""
        return getattr(importlib.import_module(self.module), self.function)

    def unavailable_reason(self, q: torch.Tensor) -> str | None:
        if self.needs_cuda and not q.is_cuda and not (self.interpretable and _interpreter_enabled()):
            return "needs CUDA tensors"
        if self.half_precision_only and q.dtype not in (torch.float16, torch.bfloat16):
            return f"needs fp16/bf16, got {q.dtype}"
        try:
            self.load()
        except ImportError as error:
            return f"not importable ({error})"
        return None


# Fastest first: the order `auto` tries (FA2 > FlexAttention ~0.9x FA2 forward; see docs/BENCHMARKS.md, reference figures).
BACKENDS: dict[str, Backend] = {
    "flash_attn": Backend("flash_attn", "megatron_cmbert.kernels.attention_flash", "attention_flash_attn",
                          needs_cuda=True, half_precision_only=True),
    "triton": Backend("triton", "megatron_cmbert.kernels.attention_triton", "attention_triton",
                      needs_cuda=True, interpretable=True),
    "flex": Backend("flex", "megatron_cmbert.kernels.attention_flex", "attention_flex", needs_cuda=True),
    "reference": Backend("reference", "megatron_cmbert.kernels.attention_reference", "attention_reference",
                         needs_cuda=False),
}

def _interpreter_enabled() -> bool:
    from megatron_cmbert.kernels.triton_utils import interpreter_enabled

    return interpreter_enabled()


def _kernel_env_backend() -> str | None:
    """CMBERT_KERNEL_BACKEND applies to attention only when it names an attention backend."""
    name = os.environ.get(KERNEL_ENV_VAR)
    return name if name in BACKENDS else None


_auto_choice: dict[tuple[str, torch.dtype], str] = {}


def clear_auto_choice():
    """Forget what `auto` picked (it is chosen once per device type and dtype)."""
    _auto_choice.clear()


def select_backend(q: torch.Tensor, backend: str | None = None) -> str:
    """Name of the backend that will run for tensors like q."""
    name = backend or os.environ.get(ENV_VAR) or _kernel_env_backend() or "auto"
    if name != "auto":
        if name not in BACKENDS:
            raise ValueError(f"unknown attention backend {name!r}; choose from {['auto', *BACKENDS]}")
        return name
    key = (q.device.type, q.dtype)
    if key not in _auto_choice:
        skipped = []
        for candidate in BACKENDS.values():
            reason = "needs CUDA tensors" if candidate.needs_cuda and not q.is_cuda else \
                candidate.unavailable_reason(q)
            if reason is None and candidate.name == "triton" and not AUTO_PICKS_TRITON:
                reason = NOT_AUTO_REASON
            if reason is None:
                _auto_choice[key] = candidate.name
                break
            skipped.append(f"{candidate.name}: {reason}")
        logger.info("attention backend for %s %s: %s (skipped %s)", q.device.type, q.dtype,
                    _auto_choice[key], "; ".join(skipped) or "none")
    return _auto_choice[key]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
              window: tuple[int, int] = (-1, -1), softmax_scale: float | None = None,
              backend: str | None = None) -> torch.Tensor:
    """Varlen (packed) self-attention; returns (total_tokens, heads, head_dim). See the module docstring."""
    if q.dim() != 3 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must share one (tokens, heads, head_dim) shape, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if int(cu_seqlens[-1]) != q.shape[0]:
        raise ValueError(f"cu_seqlens ends at {int(cu_seqlens[-1])} but there are {q.shape[0]} tokens")
    name = select_backend(q, backend)
    chosen = BACKENDS[name]
    reason = chosen.unavailable_reason(q)
    if reason is not None:
        raise RuntimeError(f"attention backend {name!r} cannot run here: {reason}")
    return chosen.load()(q, k, v, cu_seqlens, max_seqlen, window=tuple(window), softmax_scale=softmax_scale)
