"""Small helpers shared by the Triton kernel files (attention_triton, rope, geglu, rms_norm).

Kernels are decorated with plain `@triton.jit` at import. Which executor runs them is decided per launch
from the tensors' device, not from import order: CUDA tensors use the compiled kernel; CPU tensors use
Triton's interpreter (the only way Triton can touch CPU memory). So tests need not set TRITON_INTERPRET before
the first `import triton` (which Triton's own interpreter mode requires), and one process can hold both kinds
of tensors. The dispatch layers still only route CPU tensors to Triton when TRITON_INTERPRET=1 is set.
"""
from __future__ import annotations

import contextlib
import functools
import os
import types

import torch

from megatron_cmbert.kernels import triton_compile_only

INTERPRET_ENV = "TRITON_INTERPRET"
# The Triton kernels have passed only the CPU-interpreter tests so far. Until tools/gpu_check.sh has passed
# on a GPU (and docs/BENCHMARKS.md says so), `auto` does not pick them; backend="triton" (or
# CMBERT_KERNEL_BACKEND / CMBERT_ATTN_BACKEND=triton) still runs them. Flip this after that check.
AUTO_PICKS_TRITON = False
NOT_AUTO_REASON = "not yet validated on a GPU (run tools/gpu_check.sh; ask for backend 'triton' explicitly)"


def interpreter_enabled() -> bool:
    """True when the user asked for Triton's interpreter (TRITON_INTERPRET=1), i.e. Triton on CPU tensors."""
    return os.environ.get(INTERPRET_ENV, "0").lower() in ("1", "true", "on", "yes")


def unavailable_reason(t: torch.Tensor) -> str | None:
    """Why the Triton kernels cannot run on tensors like t (None when they can)."""
    if t.is_cuda:
        try:
            import triton  # noqa: F401
        except ImportError as error:
            return f"triton not importable ({error})"
        return None
    if t.device.type == "cpu" and interpreter_enabled():
        return None
    return "needs CUDA tensors (or TRITON_INTERPRET=1 to run Triton's interpreter on CPU)"


@functools.cache
def _interpreted(fn):
    from triton.runtime.interpreter import InterpretedFunction

    return InterpretedFunction(fn)


def _language_objects():
    """What Triton's interpreter patches (runtime/interpreter.py _patch_lang): triton.language and its core,
    math, tensor, condition, dtype and tensor-descriptor namespaces."""
    import triton.language as tl

    core = tl.core
    names = ("tensor", "condition", "dtype", "tensor_descriptor_base")
    return [tl, core, tl.math] + [getattr(core, n) for n in names if hasattr(core, n)]


@contextlib.contextmanager
def _language_restored():
    """Put triton.language back as it was. The interpreter patches it on every device-function call and never
    undoes that (it assumes the whole process interprets); left patched, Triton's GPU compiler fails later in
    the same process ('block_argument' object has no attribute 'get_element_ty')."""
    objects = _language_objects()
    saved = [dict(vars(obj)) for obj in objects]
    try:
        yield
    finally:
        for obj, before in zip(objects, saved):
            for name, value in list(vars(obj).items()):
                if isinstance(value, types.ModuleType):
                    continue  # a submodule imported meanwhile (e.g. triton.language.semantic): not a patch
                if name not in before:
                    delattr(obj, name)
                elif before[name] is not value:
                    setattr(obj, name, before[name])


@contextlib.contextmanager
def _device_calls_interpreted():
    """Inside an interpreted launch, let compiled @triton.jit functions (triton.language's own tl.sum, tl.max,
    tl.zeros, ... and any helper of ours) run as interpreted device functions. Triton's interpreter expects
    TRITON_INTERPRET=1 before `import triton`; this scoped patch gives the same behaviour per launch, and
    leaves triton.language as it found it."""
    from triton.runtime.jit import JITFunction

    original = JITFunction.__call__
    JITFunction.__call__ = lambda self, *args, **kwargs: _interpreted(self.fn)(*args, **kwargs)
    try:
        with _language_restored():
            yield
    finally:
        JITFunction.__call__ = original


class _InterpretedLauncher:
    def __init__(self, kernel):
        self.kernel = _interpreted(getattr(kernel, "fn", kernel))

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            kwargs = {k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages")}
            with _device_calls_interpreted():
                return self.kernel[grid](*args, **kwargs)
        return launch


def gpu_path(t: torch.Tensor) -> bool:
    """Whether launches for t take the GPU configuration (block sizes, no interpreter workarounds): CUDA
    tensors, or any tensor inside triton_compile_only.compile_only(), which compiles them for a GPU."""
    return t.is_cuda or triton_compile_only.active()


def launcher(kernel, t: torch.Tensor):
    """The object to index with a grid: the compiled kernel for CUDA tensors, a compile-only recorder inside
    compile_only(), the interpreted twin else."""
    if t.is_cuda:
        return kernel
    if triton_compile_only.active():
        return triton_compile_only.CompileOnlyLauncher(kernel)
    return _InterpretedLauncher(kernel)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def program_count(t: torch.Tensor, cpu_programs: int = 4) -> int:
    """Programs of a persistent grid: one per SM on CUDA; a few under the interpreter (each costs time)."""
    if t.is_cuda:
        return _sm_count(t.device.index if t.device.index is not None else torch.cuda.current_device())
    if triton_compile_only.active():
        return triton_compile_only.sm_count()
    return cpu_programs


def next_power_of_2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()
