"""The one kernel registry: (op, backend) -> a plain function, and a model's frozen choice among them.

Ops and backends (every op has `reference`, pure PyTorch, CPU and GPU, the one the others are tested against):
    attention  reference, triton, flex (FlexAttention), flash_attn (the flash-attn package)
    rope       reference, triton
    geglu      reference, triton
    rms_norm   reference, triton

The choice is one frozen value, `KernelChoice` (op -> backend name), held by `ModelConfig.kernels` and written
in the checkpoint's config.json. A run resolves it for its device before anything is built
(`KernelChoice.resolved(device, dtype)`: `auto` becomes a name, and a named backend that cannot run there is
refused with one line), so what a tool prints is what runs. A model binds its choice once, when it is built
(`KernelSet`); nothing switches a kernel afterwards. Library callers that keep `auto` get it decided on the
first call per (device type, dtype), logged once.

`CMBERT_KERNEL_BACKEND` (`reference` or `triton`) replaces `auto` for every op; it is read in one place,
`environment_backend`, used by the auto pick. `auto` takes a Triton kernel only on a CUDA device that a
record of kernels/validation.py says passed tools/gpu_check.sh (same GPU, torch, triton, kernel source).
Attention runs in two parts: a plan per batch layout and window (`plan(layout, window)`: block masks, work
lists, built once per micro-batch from host-side lengths and shared by every layer) and
`attend(q, k, v, plan)`. docs/KERNELS.md has the rules; kernel modules load on first use.
"""
from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping

import torch

from megatron_cmbert.errors import UserError

logger = logging.getLogger(__name__)

OPS = ("attention", "rope", "geglu", "rms_norm")
ENV_VAR = "CMBERT_KERNEL_BACKEND"
SHARED_BACKENDS = ("reference", "triton")  # what may be named for every op at once: every op has both


class KernelError(UserError, ValueError):
    """An unknown op or backend name, or a backend that cannot run on the tensors it was given."""


@dataclass(frozen=True)
class Kernel:
    op: str
    backend: str
    module: str
    function: str
    plan: str | None = None
    """Attention only: the function that plans launches for a batch layout and window."""
    needs_cuda: bool = False
    """Only for CUDA tensors (a `triton` kernel also runs CPU tensors under Triton's interpreter)."""
    half_precision_only: bool = False
    auto: bool = True
    """Whether `auto` may pick it without more; False (the Triton kernels): only where a GPU validation record
    matches (kernels/validation.py, written when tools/gpu_check.sh's kernel tests pass on that GPU)."""
    traceable: bool = True
    """Whether torch.compile can trace it: the reference attention loops over host-side bounds, so inside a
    compiled layer it runs eagerly (torch.compiler.disable: one graph break, no recompiles)."""

    def load(self) -> Callable:
        """The kernel function; ImportError when its package is missing."""
        fn = getattr(importlib.import_module(self.module), self.function)
        return fn if self.traceable else torch.compiler.disable(fn, recursive=True)

    def load_plan(self) -> Callable:
        return getattr(importlib.import_module(self.module), self.plan)

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
    Kernel("attention", "flash_attn", _K + "attention_flash", "attend", "plan", needs_cuda=True,
           half_precision_only=True),
    Kernel("attention", "triton", _K + "attention_triton", "attend", "plan", needs_cuda=True, auto=False),
    Kernel("attention", "flex", _K + "attention_flex", "attend", "plan", needs_cuda=True),
    Kernel("attention", "reference", _K + "attention_reference", "attend", "plan", traceable=False),
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
    """CMBERT_KERNEL_BACKEND, the one place it is read; it replaces `auto` for every op."""
    name = os.environ.get(ENV_VAR) or None
    if name is not None and name not in SHARED_BACKENDS:
        raise KernelError(f"{ENV_VAR}={name!r}: choose from {list(SHARED_BACKENDS)}")
    return name


def pick_auto(op: str, device: torch.device, dtype: torch.dtype) -> tuple[str, list[str]]:
    """(backend `auto` picks for op on such tensors, the reasons the faster ones were skipped)."""
    env = environment_backend()
    if env is not None:
        return env, [f"{ENV_VAR}={env}"]
    skipped = []
    for name in backends(op):
        kernel = REGISTRY[op, name]
        reason = kernel.unavailable_reason(device, dtype)
        if reason is None and not kernel.auto:
            from megatron_cmbert.kernels.validation import not_validated_reason

            reason = not_validated_reason(op, device)
        if reason is None:
            return name, skipped
        skipped.append(f"{name}: {reason}")
    raise KernelError(f"no {op} backend can run on {device.type} {dtype}: {'; '.join(skipped)}")


def kernel(op: str, name: str, device: torch.device, dtype: torch.dtype) -> Kernel:
    """The registry entry of backend `name` (or `auto`'s pick) for op, checked to run on such tensors."""
    if name == "auto":
        name, _ = pick_auto(op, device, dtype)
    if (op, name) not in REGISTRY:
        raise KernelError(f"unknown {op} backend {name!r}; choose from {['auto', *backends(op)]}")
    entry = REGISTRY[op, name]
    reason = entry.unavailable_reason(device, dtype)
    if reason is not None:
        raise KernelError(f"{op} backend {name!r} cannot run on {device.type} {dtype}: {reason}")
    return entry


def resolve(op: str, name: str, device: torch.device, dtype: torch.dtype) -> Callable:
    """The function of backend `name` (or `auto`'s pick) for op on such tensors (for attention: `attend`)."""
    return kernel(op, name, device, dtype).load()


# ---- a model's choice ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KernelChoice:
    """One backend name per op (`auto` or a registry backend). Written `attention=flex,rope=triton`; a bare
    name applies to every op (`triton`, or `triton,attention=flex`). Frozen: a copy is made to change it."""

    attention: str = "auto"
    rope: str = "auto"
    geglu: str = "auto"
    rms_norm: str = "auto"

    def __post_init__(self):
        for op in OPS:
            name = getattr(self, op)
            if name != "auto" and name not in backends(op):
                raise KernelError(f"unknown {op} backend {name!r}; choose from {['auto', *backends(op)]}")

    @classmethod
    def parse(cls, spec: "str | Mapping[str, str] | KernelChoice | None", base: "KernelChoice | None" = None):
        """`spec` over `base` (default all auto): a KernelChoice, {op: name}, or the text form."""
        base = base or cls()
        if spec is None or spec == "":
            return base
        if isinstance(spec, KernelChoice):
            return spec
        if isinstance(spec, Mapping):
            unknown = sorted(set(spec) - set(OPS))
            if unknown:
                raise KernelError(f"unknown kernel op {unknown[0]!r}; choose from {list(OPS)}")
            return replace(base, **dict(spec))
        changes: dict[str, str] = {}
        for part in (p.strip() for p in str(spec).split(",")):
            if not part:
                continue
            if "=" in part:
                op, name = (s.strip() for s in part.split("=", 1))
                if op not in OPS:
                    raise KernelError(f"kernels {spec!r}: unknown op {op!r}; choose from {list(OPS)}")
                changes[op] = name
            elif part == "auto" or part in SHARED_BACKENDS:
                changes = {op: part for op in OPS} | changes
            else:
                raise KernelError(f"kernels {spec!r}: {part!r} is neither op=backend nor one of "
                                  f"{['auto', *SHARED_BACKENDS]} (attention-only backends: attention=NAME)")
        return replace(base, **changes)

    @classmethod
    def from_legacy(cls, kernel_backend: str | None, kernel_overrides: str | None) -> "KernelChoice":
        """The two config.json fields of checkpoints written before KernelChoice."""
        return cls.parse(kernel_overrides or "", cls.parse(kernel_backend or "auto"))

    def as_dict(self) -> dict[str, str]:
        return {op: getattr(self, op) for op in OPS}

    def __str__(self) -> str:
        return ",".join(f"{op}={name}" for op, name in self.as_dict().items())

    def with_op(self, op: str, name: str) -> "KernelChoice":
        return KernelChoice.parse({op: name}, self)

    def resolved(self, device, dtype: torch.dtype) -> "KernelChoice":
        """Every `auto` replaced by its pick for `device`/`dtype`, and every name checked to run there
        (KernelError in one line otherwise): the choice a run prints and builds with."""
        device = torch.device(device)
        return KernelChoice(**{op: kernel(op, name, device, dtype).backend for op, name in self.as_dict().items()})


class KernelSet:
    """One model's kernels: its KernelChoice, bound when the model is built, and the functions they resolve
    to per (device type, dtype), cached on first use (`auto` logs its pick there). Never changed later."""

    def __init__(self, choice: "KernelChoice | str | Mapping[str, str] | None" = None):
        self.choice = KernelChoice.parse(choice)
        self._kernels: dict[tuple, Kernel] = {}
        self._functions: dict[tuple, Callable] = {}

    @classmethod
    def from_config(cls, config) -> "KernelSet":
        return cls(config.kernels)

    @property
    def names(self) -> dict[str, str]:
        return self.choice.as_dict()

    def prepare(self, device, dtypes=(torch.float32, torch.bfloat16)) -> None:
        """Resolve every op for `device` at each of `dtypes` that it can run (before torch.compile traces the
        model, so the compiled code finds plain functions, not the registry's imports)."""
        device = torch.device(device)
        for dtype in dtypes:
            for op in OPS:
                try:
                    self.function(op, torch.empty(0, device=device, dtype=dtype))
                except KernelError:
                    pass  # e.g. flash_attn in fp32: that dtype is never asked for

    def entry(self, op: str, device: torch.device, dtype: torch.dtype) -> Kernel:
        key = (op, device.type, dtype)
        found = self._kernels.get(key)
        if found is None:
            name = getattr(self.choice, op)
            if name == "auto":
                picked, skipped = pick_auto(op, device, dtype)
                logger.info("kernel auto for %s on %s %s: %s (skipped %s)", op, device.type, dtype, picked,
                            "; ".join(skipped) or "none")
                name = picked
            found = self._kernels[key] = kernel(op, name, device, dtype)
        return found

    def function(self, op: str, x: torch.Tensor) -> Callable:
        key = (op, x.device.type, x.dtype)
        fn = self._functions.get(key)
        if fn is None:
            fn = self._functions[key] = self.entry(op, x.device, x.dtype).load()
        return fn

    # ---- the ops, as the model calls them ----------------------------------------------------------------
    def attention_plan(self, layout, window=(-1, -1), dtype: torch.dtype = torch.float32) -> Any:
        """The attention backend's plan for one batch layout (kernels/varlen.PackedLayout) and window, built
        once per micro-batch and shared by every layer with that window. dtype: what q will have."""
        return self.entry("attention", layout.device, dtype).load_plan()(layout, tuple(window))  # not traced

    def attention(self, q, k, v, plan, softmax_scale=None):
        """Varlen (packed) attention: q, k, v (tokens, heads, head_dim); query i of a sequence sees key j of
        the same sequence when i - left <= j <= i + right ((-1, -1) = global), as planned."""
        return self.function("attention", q)(q, k, v, plan, softmax_scale=softmax_scale)

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
        return f"KernelSet({self.choice})"


# ---- command-line flags (every tool that builds a model) ------------------------------------------------
KERNELS_HELP = ("kernel backend per op: auto, reference or triton for every op, and/or op=backend pairs "
                "(ops: attention, rope, geglu, rms_norm; attention also flex, flash_attn), e.g. "
                "'triton,attention=flex'; resolved for the device before the model is built and printed "
                "(docs/KERNELS.md)")


def add_kernel_args(group, dest: str = "kernels", default: str | None = None) -> None:
    """--kernels SPEC, and its spellings --kernel-backend NAME / --kernel-overrides PAIRS / --attention-backend
    NAME, all merged in command-line order into one text at `dest` (parse it with KernelChoice.parse)."""
    import argparse

    class Merge(argparse.Action):
        def __init__(self, option_strings, dest, prefix="", **kwargs):
            self.prefix = prefix
            super().__init__(option_strings, dest, **kwargs)

        def __call__(self, parser, namespace, value, option_string=None):
            current = getattr(namespace, self.dest, None) or ""
            setattr(namespace, self.dest, ",".join(x for x in (current, self.prefix + value) if x))

    group.add_argument("--kernels", "--kernel-backend", "--kernel-overrides", dest=dest, action=Merge, default=default,
                       metavar="SPEC", help=KERNELS_HELP + (f" (default {default})" if default else ""))
    group.add_argument("--attention-backend", dest=dest, action=Merge, prefix="attention=", metavar="NAME",
                       choices=("auto", *backends("attention")),
                       help="the attention kernel alone: shorthand for --kernels attention=NAME")
