"""What the Triton kernel files share: a launch as data, how launches run, and which Triton mode is active.

Each kernel file builds its launches as `Launch` records (kernel, grid, arguments) and runs them with
`run(launches)`: the kernel object is indexed with its grid and called, the one supported way. Which executor
that is, Triton decides when the kernels are decorated (at import of the kernel file):
  - compiled for the GPU (the normal case, CUDA tensors);
  - Triton's own interpreter when TRITON_INTERPRET=1 was set before `import triton` (CPU tensors; the tests).
Nothing here patches Triton. tools/compile_kernels.py builds the same `Launch` records and compiles them for
a GPU target instead of running them (kernels/triton_compile_only.py), in a process without the interpreter.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field

import torch

INTERPRET_ENV = "TRITON_INTERPRET"


class KernelModeError(RuntimeError):
    """Triton was imported in another mode (compiled / interpreted) than the one the process asks for."""


def interpreter_requested() -> bool:
    """True when TRITON_INTERPRET asks for Triton's interpreter (Triton's own convention and spelling)."""
    return os.environ.get(INTERPRET_ENV, "0").lower() in ("1", "true", "on", "yes", "y")


@functools.cache
def interpreted() -> bool:
    """Whether Triton's kernels run in its interpreter in this process. Triton decides this per @triton.jit
    decoration, and its own triton.language functions (tl.sum, ...) were decorated at `import triton`, so the
    import is what counts; asked once, as kernel files are imported after triton."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.sum, InterpretedFunction)


def check_mode() -> bool:
    """Whether this process interprets (each kernel file keeps it as its INTERPRETED constant). Raises
    KernelModeError when TRITON_INTERPRET now says something else than when triton was imported: kernels
    decorated in one mode cannot call triton.language functions decorated in the other; and, interpreted, when
    this Triton + numpy cannot run the kernels' runtime-bound loops (`interpreter_problem`), so that a
    version mismatch fails with one line naming the fix instead of a TypeError inside every kernel."""
    if interpreter_requested() != interpreted():
        raise KernelModeError(
            f"triton was imported with {INTERPRET_ENV}={'1' if interpreted() else 'unset'} but it is now "
            f"{os.environ.get(INTERPRET_ENV)!r}; set it in the environment before the process imports triton")
    if interpreted() and (problem := interpreter_problem()):
        raise KernelModeError(problem)
    return interpreted()


@functools.cache
def interpreter_problem() -> str | None:
    """Why this process's Triton interpreter cannot run the kernels (None when it can), probed once."""
    from megatron_cmbert.kernels.triton_common import interpreter_loop_problem

    return interpreter_loop_problem()


def unavailable_reason(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on tensors on `device` (None when they can)."""
    if device.type != "cuda" and not interpreter_requested():  # decided without importing triton
        return "needs CUDA tensors (or TRITON_INTERPRET=1 before triton is imported, for its CPU interpreter)"
    try:
        import triton  # noqa: F401
    except ImportError as error:
        return f"triton not importable ({error})"
    if interpreter_requested() != interpreted():
        return "TRITON_INTERPRET changed after triton was imported"
    if device.type == "cuda":
        return "Triton runs its CPU interpreter in this process (TRITON_INTERPRET=1)" if interpreted() else None
    if device.type == "cpu" and interpreted():
        return interpreter_problem()
    return "needs CUDA tensors (or TRITON_INTERPRET=1 before triton is imported, for its CPU interpreter)"


@dataclass
class Launch:
    """One kernel launch as data: run by `run`, or compiled without running by tools/compile_kernels.py."""

    kernel: object  # a @triton.jit function (an InterpretedFunction under the interpreter)
    grid: tuple
    args: tuple
    kwargs: dict = field(default_factory=dict)


def run(launches: list[Launch]) -> None:
    for launch in launches:
        launch.kernel[launch.grid](*launch.args, **launch.kwargs)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def program_count(t: torch.Tensor, cpu_programs: int = 4) -> int:
    """Programs of a persistent grid: one per SM on CUDA; a few under the interpreter (each costs time)."""
    if t.is_cuda:
        return _sm_count(t.device.index if t.device.index is not None else torch.cuda.current_device())
    return cpu_programs


def next_power_of_2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()
