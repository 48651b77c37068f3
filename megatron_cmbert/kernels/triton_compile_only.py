"""Compile Triton launches for a GPU target without a GPU (used by tools/compile_kernels.py, nowhere else).

    compiler = Compiler(capability=90)                 # H100 (sm_90a)
    out, lse, launches = forward_launches(q_cpu, ...)  # the kernel file's own launch records, GPU settings
    for launch in launches: compiler.compile(launch)
    for r in compiler.records: print(r.kernel, r.shared_bytes, r.registers, r.spilled_bytes)

Why: Triton's CPU interpreter accepts code the GPU compiler rejects (non-constexpr globals, tile shapes
tensor cores cannot take, too much shared memory), and a GPU is lent only now and then. Each `Launch` is
specialised exactly as `JITFunction.run` would (same binder, so the same divisibility and constant
specialisations), compiled to a cubin with Triton's bundled ptxas, and recorded; nothing runs. ptxas is then
asked for its register and spill report, which Triton's compile does not keep. The launch path never comes
here: kernels run through triton_utils.run.

Needs a process where triton was imported without TRITON_INTERPRET (the kernels must be JITFunctions), and
Triton's runtime internals (`create_function_from_signature`, `_pack_args`), checked on triton 3.6 and 3.9;
`CompileOnlyUnsupported` says so where an installed Triton differs.
"""
from __future__ import annotations

import dataclasses
import re
import subprocess
import tempfile

# Per-block shared memory limit by compute capability (CUDA programming guide, "opt-in" maximum).
SHARED_LIMIT_BYTES = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448}


class CompileOnlyUnsupported(RuntimeError):
    """This Triton lacks the internals compile-only mode needs."""


@dataclasses.dataclass
class CompiledLaunch:
    kernel: str
    constexprs: dict
    num_warps: int
    num_stages: int
    shared_bytes: int
    registers: int | None = None
    spilled_bytes: int | None = None
    matmul: str = "none"  # "wgmma" (Hopper tensor cores), "mma" (Ampere-style tensor cores) or "none"
    global_access_bytes: dict = dataclasses.field(default_factory=dict)  # width in bytes -> PTX ld/st.global count
    ptxas_log: str = ""

    def describe(self) -> str:
        consts = ", ".join(f"{k}={v}" for k, v in self.constexprs.items())
        return f"{self.kernel}[{consts}] warps={self.num_warps} stages={self.num_stages}"


class Compiler:
    """Compiles launches for one GPU target and keeps a record per distinct specialisation."""

    def __init__(self, capability: int = 90, ptxas_report: bool = True):
        try:
            from triton.backends.compiler import GPUTarget
            from triton.compiler import make_backend
        except ImportError as error:
            raise CompileOnlyUnsupported(f"triton has no GPUTarget/make_backend ({error})") from error
        self.target = GPUTarget("cuda", capability, 32)
        self.backend = make_backend(self.target)
        self.ptxas_report = ptxas_report
        self.records: list[CompiledLaunch] = []
        self._seen: set = set()

    def compile(self, launch) -> None:
        """Compile one triton_utils.Launch (its tensors may live on the CPU: only dtypes and strides count)."""
        import triton
        try:
            from triton.runtime.jit import create_function_from_signature
        except ImportError as error:
            raise CompileOnlyUnsupported(f"triton.runtime.jit changed ({error})") from error
        kernel, backend = launch.kernel, self.backend
        if not hasattr(kernel, "params"):
            raise CompileOnlyUnsupported(
                f"{getattr(kernel, 'fn', kernel)} is an interpreter-only kernel: TRITON_INTERPRET=1 was set when "
                "triton was imported; unset it to compile for a GPU")
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        bound_args, specialization, options = binder(*launch.args, **launch.kwargs)
        options, signature, constexprs, attrs = kernel._pack_args(backend, launch.kwargs, bound_args,
                                                                  specialization, options)
        key = (kernel.fn.__qualname__, repr(signature), repr(constexprs), repr(attrs), repr(options))
        if key in self._seen:
            return
        source = triton.compiler.ASTSource(kernel, signature, constexprs, attrs)
        compiled = triton.compile(source, target=self.target, options=options.__dict__)
        names = [p.name for p in kernel.params]
        record = CompiledLaunch(
            kernel=kernel.fn.__name__,
            constexprs={names[path[0]]: value for path, value in constexprs.items() if len(path) == 1
                        and kernel.params[path[0]].is_constexpr},
            num_warps=compiled.metadata.num_warps, num_stages=compiled.metadata.num_stages,
            shared_bytes=int(compiled.metadata.shared), matmul=_matmul_kind(compiled.asm["ptx"]),
            global_access_bytes=global_access_widths(compiled.asm["ptx"]))
        if self.ptxas_report:
            _ptxas_report(record, compiled.asm["ptx"], self.target.arch)
        self._seen.add(key)
        self.records.append(record)


def _matmul_kind(ptx: str) -> str:
    if "wgmma." in ptx:
        return "wgmma"
    return "mma" if "mma.sync" in ptx else "none"


def global_access_widths(ptx: str) -> dict[int, int]:
    """Bytes per global load/store instruction (ld.global.v4.b32 = 16) -> how many the PTX has. A
    bandwidth-bound kernel wants its bulk data in 16-byte accesses; 2- or 4-byte ones cost issue slots."""
    widths: dict[int, int] = {}
    for match in re.finditer(r"\b(?:ld|st)\.global((?:\.[\w:]+)*)", ptx):
        parts = match.group(1).split(".")
        vector = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d", p)), 1)
        bits = next((int(p[1:]) for p in parts if re.fullmatch(r"[bfsu]\d+", p)), 0)
        width = vector * bits // 8
        widths[width] = widths.get(width, 0) + 1
    return dict(sorted(widths.items()))


def _ptxas_report(record: CompiledLaunch, ptx: str, capability: int) -> None:
    """Registers per thread and spill bytes, from ptxas -v on the kernel's PTX (Triton's bundled ptxas)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as src, tempfile.NamedTemporaryFile(suffix=".o") as obj:
        src.write(ptx)
        src.flush()
        done = subprocess.run([get_ptxas(capability).path, "-v", f"--gpu-name={sm_arch_from_capability(capability)}",
                               src.name, "-o", obj.name], capture_output=True, text=True, check=True)
    log = done.stdout + done.stderr
    record.ptxas_log = log
    if match := re.search(r"Used (\d+) registers", log):
        record.registers = int(match.group(1))
    stores = re.search(r"(\d+) bytes spill stores", log)
    loads = re.search(r"(\d+) bytes spill loads", log)
    if stores and loads:
        record.spilled_bytes = int(stores.group(1)) + int(loads.group(1))


def resource_problems(record: CompiledLaunch, capability: int = 90) -> list[str]:
    """What would stop this kernel from launching on the target: shared memory or registers over the limit."""
    problems = []
    limit = SHARED_LIMIT_BYTES.get(capability)
    if limit is not None and record.shared_bytes > limit:
        problems.append(f"shared memory {record.shared_bytes} B > {limit} B per block")
    if record.registers is not None and record.registers * 32 * record.num_warps > 65536:
        problems.append(f"{record.registers} registers x {32 * record.num_warps} threads > 65536 per SM")
    return problems
