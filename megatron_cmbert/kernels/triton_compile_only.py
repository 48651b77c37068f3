"""Compile-only mode: build every Triton kernel launch for a GPU target without a GPU.

    with compile_only(capability=90) as records:      # H100 (sm_90a)
        attention_forward(q_cpu, k_cpu, v_cpu, ...)   # the real launch code runs, with its GPU block sizes
    for r in records: print(r.kernel, r.shared_bytes, r.registers, r.spilled_bytes)

Why: Triton's CPU interpreter accepts code the GPU compiler rejects (non-constexpr globals, tile shapes
tensor cores cannot take, too much shared memory), and a GPU is lent only now and then. Inside
`compile_only`, `triton_utils.launcher` hands CPU tensors here instead of to the interpreter; the launch
code picks its GPU configuration (`triton_utils.gpu_path`), and each launch is specialised exactly as
`JITFunction.run` would (same binder, so the same divisibility and constant specialisations), compiled to a
cubin with Triton's bundled ptxas, and recorded; nothing runs, so outputs hold garbage. ptxas is then asked
for its register and spill report, which Triton's compile does not keep.

Uses Triton's runtime internals (`create_function_from_signature`, `_pack_args`), checked on triton 3.9;
`CompileOnlyUnsupported` says so where an installed Triton differs.
"""
from __future__ import annotations

import contextlib
import dataclasses
import re
import subprocess
import tempfile

# The streaming multiprocessor count the persistent grids size themselves by (H100 SXM has 132).
DEFAULT_SM_COUNT = 132
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


_STATE: dict | None = None  # set inside compile_only(): {"target", "records", "sm_count", "cache"}


def active() -> bool:
    return _STATE is not None


def sm_count() -> int:
    return _STATE["sm_count"]


@contextlib.contextmanager
def compile_only(capability: int = 90, sm_count: int = DEFAULT_SM_COUNT, ptxas_report: bool = True):
    """Within the block, Triton launches on CPU tensors compile for `capability` and are recorded."""
    global _STATE
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
    except ImportError as error:
        raise CompileOnlyUnsupported(f"triton has no GPUTarget/make_backend ({error})") from error
    target = GPUTarget("cuda", capability, 32)
    records: list[CompiledLaunch] = []
    previous = _STATE
    _STATE = {"target": target, "backend": make_backend(target), "records": records, "sm_count": sm_count,
              "cache": {}, "ptxas_report": ptxas_report}
    try:
        yield records
    finally:
        _STATE = previous


class CompileOnlyLauncher:
    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        return self._compile

    def _compile(self, *args, **kwargs):
        import triton
        try:
            from triton.runtime.jit import create_function_from_signature
        except ImportError as error:
            raise CompileOnlyUnsupported(f"triton.runtime.jit changed ({error})") from error
        kernel, backend = self.kernel, _STATE["backend"]
        if not hasattr(kernel, "params"):
            raise CompileOnlyUnsupported(
                f"{getattr(kernel, 'fn', kernel)} is an interpreter-only kernel: TRITON_INTERPRET=1 was set when "
                "triton was imported; unset it to compile for a GPU")
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        bound_args, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization,
                                                                  options)
        key = (kernel.fn.__qualname__, repr(signature), repr(constexprs), repr(attrs), repr(options))
        if key in _STATE["cache"]:
            return
        source = triton.compiler.ASTSource(kernel, signature, constexprs, attrs)
        compiled = triton.compile(source, target=_STATE["target"], options=options.__dict__)
        names = [p.name for p in kernel.params]
        record = CompiledLaunch(
            kernel=kernel.fn.__name__,
            constexprs={names[path[0]]: value for path, value in constexprs.items() if len(path) == 1
                        and kernel.params[path[0]].is_constexpr},
            num_warps=compiled.metadata.num_warps, num_stages=compiled.metadata.num_stages,
            shared_bytes=int(compiled.metadata.shared), matmul=_matmul_kind(compiled.asm["ptx"]),
            global_access_bytes=global_access_widths(compiled.asm["ptx"]))
        if _STATE["ptxas_report"]:
            _ptxas_report(record, compiled.asm["ptx"], _STATE["target"].arch)
        _STATE["cache"][key] = record
        _STATE["records"].append(record)


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
