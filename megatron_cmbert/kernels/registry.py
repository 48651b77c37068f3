"""The one kernel registry: (op, backend) -> a plain function, and the per-model choice among them.

Ops and backends (every op has `reference`, pure PyTorch, CPU and GPU, the one the others are tested against):
    attention  reference, triton, flex (FlexAttention), flash_attn (the flash-attn package)
    rope       reference, triton
    geglu      reference, triton
    rms_norm   reference, triton
A model asks for its kernels once, when it is built: `KernelSet(config.kernel_backend, config.kernel_overrides)`
(model/modernbert.py). `auto` is decided on the first call per (op, device type, dtype), because a model is
usually built on the CPU and moved afterwards; it takes the first available backend in the order below and
logs one line naming it. The CMBERT_KERNEL_BACKEND environment variable, read only in `environment_backend`,
replaces a config's `auto`. docs/KERNELS.md has the rules; the kernel modules are imported on first use.
"""
from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from megatron_cmbert.errors import UserError

logger = logging.getLogger(__name__)

OPS = ("attention", "rope", "geglu", "rms_norm")
ENV_VAR = "CMBERT_KERNEL_BACKEND"
SHARED_BACKENDS = ("reference", "triton")  # what kernel_backend may name: every op has both
NOT_VALIDATED = "not yet validated on a GPU (tools/gpu_check.sh); name it explicitly to use it"


class KernelError(UserError, ValueError):
    """An unknown op or backend name, or a backend that cannot run on the tensors it was given."""


@dataclass(frozen=True)
class Kernel:
    op: str
    backend: str
    module: str
    function: str
    needs_cuda: bool = False
    """Only for CUDA tensors (a `triton` kernel also runs CPU tensors under Triton's interpreter)."""
    half_precision_only: bool = False
    auto: bool = True
    """Whether `auto` may pick it (the Triton kernels have passed only the interpreter and compile checks)."""

    def load(self) -> Callable:
        """The kernel function; ImportError when its package is missing."""
        return getattr(importlib.import_module(self.module), self.function)

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype) -> str | None:
        if self.backend == "triton":
            from megatron_cmbert.kernels.triton_utils import unavailable_reason

            reason = unavailable_reason(device)
            if reason:
                return reason
        elif self.needs_cuda and device.type != "cuda":
            return "needs CUDA tensors"
        if self.half_precision_only and dtype not in (torch.float16, torch.bfloat16):
            return f"needs fp16/bf16, got {dtype}"
        try:
            self.load()
        except ImportError as error:
            return f"not importable ({error})"
        return None


_K = "megatron_cmbert.kernels."
# Per op, fastest first: the order `auto` tries (FA2 > FlexAttention ~0.9x FA2 forward, docs/BENCHMARKS.md).
REGISTRY: dict[tuple[str, str], Kernel] = {(k.op, k.backend): k for k in (
    Kernel("attention", "flash_attn", _K + "attention_flash", "attention_flash_attn", needs_cuda=True,
           half_precision_only=True),
    Kernel("attention", "triton", _K + "attention_triton", "attention_triton", needs_cuda=True, auto=False),
    Kernel("attention", "flex", _K + "attention_flex", "attention_flex", needs_cuda=True),
    Kernel("attention", "reference", _K + "attention_reference", "attention_reference"),
    Kernel("rope", "triton", _K + "rope_triton", "rope_triton", needs_cuda=True, auto=False),
    Kernel("rope", "reference", _K + "reference", "rope_reference"),
    Kernel("geglu", "triton", _K + "geglu_triton", "geglu_triton", needs_cuda=True, auto=False),
    Kernel("geglu", "reference", _K + "reference", "geglu_reference"),
    Kernel("rms_norm", "triton", _K + "rms_norm_triton", "rms_norm_triton", needs_cuda=True, auto=False),
    Kernel("rms_norm", "reference", _K + "reference", "rms_norm_reference"),
)}


def backends(op: str) -> tuple[str, ...]:
    """The backends of `op`, in the order `auto` tries them."""
    if op not in OPS:
        raise KernelError(f"unknown kernel op {op!r}; choose from {list(OPS)}")
    return tuple(b for (o, b) in REGISTRY if o == op)


def environment_backend() -> str | None:
    """CMBERT_KERNEL_BACKEND, the one place it is read; it replaces a config's `auto` for every op."""
    return os.environ.get(ENV_VAR) or None


def parse_overrides(overrides: str | Mapping[str, str] | None) -> dict[str, str]:
    """`attention=flex,rms_norm=reference` (the config.json / CLI form) or a mapping -> {op: backend}, checked."""
    if isinstance(overrides, str):
        pairs = [p.split("=", 1) for p in overrides.replace(" ", "").split(",") if p]
        if any(len(p) != 2 for p in pairs):
            raise KernelError(f"kernel overrides {overrides!r}: write op=backend pairs separated by commas")
        overrides = dict(pairs)
    result = dict(overrides or {})
    for op, name in result.items():
        if name != "auto" and name not in backends(op):
            raise KernelError(f"unknown {op} backend {name!r}; choose from {['auto', *backends(op)]}")
    return result


def check_backend(name: str) -> str:
    if name != "auto" and name not in SHARED_BACKENDS:
        raise KernelError(f"unknown kernel backend {name!r}; choose from {['auto', *SHARED_BACKENDS]} "
                          f"(attention-only backends go in the per-op overrides, e.g. attention=flex)")
    return name


def pick_auto(op: str, device: torch.device, dtype: torch.dtype) -> tuple[str, list[str]]:
    """(backend auto picks for op on such tensors, the reasons the faster ones were skipped)."""
    skipped = []
    for name in backends(op):
        kernel = REGISTRY[op, name]
        reason = kernel.unavailable_reason(device, dtype)
        if reason is None and not kernel.auto:
            reason = NOT_VALIDATED
        if reason is None:
            return name, skipped
        skipped.append(f"{name}: {reason}")
    raise KernelError(f"no {op} backend can run on {device.type} {dtype}: {'; '.join(skipped)}")


def resolve(op: str, name: str, device: torch.device, dtype: torch.dtype) -> Callable:
    """The function of backend `name` (or `auto`'s pick, unlogged) for op on such tensors."""
    if name == "auto":
        name, _ = pick_auto(op, device, dtype)
    if (op, name) not in REGISTRY:
        raise KernelError(f"unknown {op} backend {name!r}; choose from {['auto', *backends(op)]}")
    kernel = REGISTRY[op, name]
    reason = kernel.unavailable_reason(device, dtype)
    if reason is not None:
        raise KernelError(f"{op} backend {name!r} cannot run on {device.type} {dtype}: {reason}")
    return kernel.load()


class KernelSet:
    """One model's kernels: a backend name per op, fixed when the model is built, and the functions they
    resolve to per (device type, dtype), cached on first use (`auto` logs its pick there)."""

    def __init__(self, kernel_backend: str = "auto", overrides: str | Mapping[str, str] | None = None):
        default = check_backend(kernel_backend)
        if default == "auto":
            default = check_backend(environment_backend() or "auto")
        self.names = {op: default for op in OPS} | parse_overrides(overrides)
        self._functions: dict[tuple, Callable] = {}

    @classmethod
    def from_config(cls, config) -> "KernelSet":
        return cls(config.kernel_backend, config.kernel_overrides)

    def set_backend(self, op: str, name: str) -> None:
        """Change one op's backend (e.g. attention for a reference check); forgets that op's resolved functions."""
        self.names |= parse_overrides({op: name})
        self._functions = {key: fn for key, fn in self._functions.items() if key[0] != op}

    def function(self, op: str, x: torch.Tensor) -> Callable:
        key = (op, x.device.type, x.dtype)
        fn = self._functions.get(key)
        if fn is None:
            name = self.names[op]
            if name == "auto":
                name, skipped = pick_auto(op, x.device, x.dtype)
                logger.info("kernel auto for %s on %s %s: %s (skipped %s)", op, x.device.type, x.dtype, name,
                            "; ".join(skipped) or "none")
            fn = self._functions[key] = resolve(op, name, x.device, x.dtype)
        return fn

    # ---- the ops, as the model calls them ----------------------------------------------------------------
    def attention(self, q, k, v, cu_seqlens, max_seqlen: int, window=(-1, -1), softmax_scale=None):
        """Varlen (packed) attention: q, k, v (tokens, heads, head_dim); query i of a sequence sees key j of
        the same sequence when i - left <= j <= i + right ((-1, -1) = global)."""
        return self.function("attention", q)(q, k, v, cu_seqlens, max_seqlen, window=tuple(window),
                                             softmax_scale=softmax_scale)

    def rope(self, q, k, positions, theta: float):
        """q, k rotated by position * theta^(-2i/d) (non-interleaved halves), fp32 math."""
        return self.function("rope", q)(q, k, positions, theta)

    def geglu(self, x, interleaved: bool = False):
        """gelu_erf(x[..., :I]) * x[..., I:] (interleaved: gelu_erf(x[..., 0::2]) * x[..., 1::2])."""
        return self.function("geglu", x)(x, interleaved)

    def rms_norm(self, x, weight, eps: float = 1e-5):
        """x / sqrt(mean(x^2) + eps) * weight over the last dim, fp32 math, output in x's dtype."""
        return self.function("rms_norm", x)(x, weight, eps)

    def __repr__(self) -> str:
        return f"KernelSet({', '.join(f'{op}={name}' for op, name in self.names.items())})"
