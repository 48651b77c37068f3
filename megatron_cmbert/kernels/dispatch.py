"""Backend choice for the fused non-attention kernels: apply_rope, geglu, rms_norm.

Each op exists as a pure-PyTorch `reference` (CPU and GPU) and a `triton` kernel (CUDA; CPU tensors only
through Triton's interpreter with TRITON_INTERPRET=1). The backend comes from the `backend` argument, else
the CMBERT_KERNEL_BACKEND environment variable, else `auto`: triton for CUDA tensors when Triton imports
and the kernels are validated on a GPU (triton_utils.AUTO_PICKS_TRITON), reference otherwise, decided lazily on first use per (op, device type, dtype) and logged once.
Attention has its own registry (kernels/attention.py), which also honours CMBERT_KERNEL_BACKEND=triton.
The kernel modules are imported on first use, never at import time of this module.
"""
from __future__ import annotations

import importlib
import logging
import os

import torch

from megatron_cmbert.kernels.triton_utils import AUTO_PICKS_TRITON, NOT_AUTO_REASON, unavailable_reason

logger = logging.getLogger(__name__)

ENV_VAR = "CMBERT_KERNEL_BACKEND"
KERNEL_BACKENDS = ("triton", "reference")
# op -> (module, reference function, triton function)
_OPS = {
    "rope": ("megatron_cmbert.kernels.rope_triton", "rope_reference", "rope_triton"),
    "geglu": ("megatron_cmbert.kernels.geglu_triton", "geglu_reference", "geglu_triton"),
    "rms_norm": ("megatron_cmbert.kernels.rms_norm_triton", "rms_norm_reference", "rms_norm_triton"),
}
# Attention backend names that may come through CMBERT_KERNEL_BACKEND; the other ops run them as `auto`.
_ATTENTION_ONLY = ("flex", "flash_attn")
_auto_choice: dict[tuple[str, str, torch.dtype], str] = {}


def clear_auto_choice():
    _auto_choice.clear()


def select_kernel_backend(op: str, x: torch.Tensor, backend: str | None = None) -> str:
    """Name of the backend ('triton' or 'reference') that runs `op` for tensors like x."""
    name = backend or os.environ.get(ENV_VAR) or "auto"
    if name in _ATTENTION_ONLY:
        name = "auto"
    if name != "auto":
        if name not in KERNEL_BACKENDS:
            raise ValueError(f"unknown kernel backend {name!r}; choose from {['auto', *KERNEL_BACKENDS]}")
        return name
    key = (op, x.device.type, x.dtype)
    if key not in _auto_choice:
        reason = "needs CUDA tensors" if not x.is_cuda else unavailable_reason(x)
        if reason is None and not AUTO_PICKS_TRITON:
            reason = NOT_AUTO_REASON
        _auto_choice[key] = "triton" if reason is None else "reference"
        logger.info("%s backend for %s %s: %s%s", op, x.device.type, x.dtype, _auto_choice[key],
                    f" (triton: {reason})" if reason else "")
    return _auto_choice[key]


def _function(op: str, x: torch.Tensor, backend: str | None):
    name = select_kernel_backend(op, x, backend)
    if name == "triton":
        reason = unavailable_reason(x)
        if reason is not None:
            raise RuntimeError(f"{op} backend 'triton' cannot run here: {reason}")
    module, reference, kernel = _OPS[op]
    return getattr(importlib.import_module(module), kernel if name == "triton" else reference)


def apply_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, theta: float,
               backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k, (tokens, heads, head_dim), by position * theta^(-2i/d) (non-interleaved halves);
    positions: (tokens,) integers restarting at every sequence. fp32 math, outputs in the input dtypes."""
    return _function("rope", q, backend)(q, k, positions, theta)


def geglu(x: torch.Tensor, interleaved: bool = False, backend: str | None = None) -> torch.Tensor:
    """gelu_erf(x[..., :I]) * x[..., I:] (interleaved=True: gelu_erf(x[..., 0::2]) * x[..., 1::2])."""
    return _function("geglu", x, backend)(x, interleaved)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5, backend: str | None = None) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last dim, fp32 math, output in x's dtype."""
    return _function("rms_norm", x, backend)(x, weight, eps)
